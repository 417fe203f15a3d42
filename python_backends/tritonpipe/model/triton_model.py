"""The one generic Triton Python model: reads its stage chain from its config and runs it.

Every generated Python model's ``model.py`` imports :class:`TritonPythonModel` from here.
Tensors move in and out through DLPack only, so nothing is copied on the way and numpy's
version does not matter.  Each request gets its own response or its own error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from ..contract import FanOutParams, instance_index
from ..errors import RequestError, is_bad_input
from ..stages.base import DATA, ERROR
from ..stages.control import set_stage_sink
from .fanout import FanOut, bls_call
from .metrics import GPU_STEP, STEP_PREFIX, STEPS, WAIT_STEP, StageMetrics
from .overlap import Flight, Overlap, Results, TailTimes
from .pinned import PinnedPool, stub_pool
from .runtime import ModelRuntime, Watchdog, pick_device, wait_for_gpu

log = logging.getLogger("tritonpipe")


def _error(exc: BaseException) -> pb_utils.TritonError:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if is_bad_input(exc) else "INTERNAL", None)
    message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RequestError) else str(exc)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _share_cores(config: dict[str, Any], instance_name: str) -> None:
    """Take this CPU instance's threads, and its cores, from the generator's share of the host.

    Every instance is its own process; left alone, each would start a thread per core in torch
    and OpenCV, and the instances would fight over the same cores.
    """
    import cv2

    from ..contract import ModelParams

    cores = ModelParams.from_config(config).cores
    if cores is None:
        # a model the generator expected on a GPU (KIND_AUTO) that found none: split with its own instances
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        threads = max(1, len(os.sched_getaffinity(0)) // instances)
    else:
        threads = cores.threads
        if cores.sets:
            _pin(cores.sets, instance_name, instance_index(config, instance_name))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def _pin(sets: tuple[tuple[int, ...], ...], instance_name: str, index: int | None) -> None:
    """Pin every thread of this process to the cores of its instance (``index``: its place among the model's)."""
    wanted = set(sets[index % len(sets)] if index is not None else sets[0])
    usable = wanted & os.sched_getaffinity(0)
    if not usable:
        log.warning("%s: none of its cores %s is allowed here; it runs unpinned", instance_name, sorted(wanted))
        return
    # the stub started threads of its own before initialize; threads started later inherit the mask
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread may have ended meanwhile
            os.sched_setaffinity(int(task), usable)
    log.info("%s: pinned to cores %s", instance_name, sorted(usable))


def _show_info() -> None:
    """Let the package's INFO records (the decoder picked, what was folded, the warm-up) reach the server's log
    beside its warnings, once per process: with no handler, Python shows WARNING and above only.  They go to
    the stub's stderr, which is the server's, so that a record written just before the stub exits is not lost."""
    if any(getattr(handler, "tritonpipe_stub", False) for handler in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tritonpipe %(levelname)s: %(message)s"))
    handler.tritonpipe_stub = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        _show_info()
        config = json.loads(args["model_config"])
        self.fanout = None
        plan = FanOutParams.from_config(config)
        if plan is not None:
            # the orchestrator of a graph that fans out: no chain of its own, only calls to the two parts
            self.fanout, self.runtime, self.metrics, self.watchdog = FanOut(plan, bls_call(pb_utils)), None, None, None
            self.overlap, self.pinned = None, None
            log.info("%s: fans out %s -> %s per item of %r", args["model_name"], plan.first, plan.each, plan.items)
            return
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.device = pick_device(args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            _share_cores(config, args.get("model_instance_name", args["model_name"]))
        with self._on_stream():
            self.runtime = ModelRuntime(config, version_dir, self.device)
        log.info("%s: %s on %s", args["model_name"], self.runtime.pipeline, self.device)
        # the region as mapped at load is registered now, so that the first batch does not pay for it
        self.pinned: PinnedPool | None = stub_pool() if self.stream is not None and self.runtime.pin_inputs else None
        if self.stream is not None:
            self._warm_up(args["model_name"])
        self.instance_name = args.get("model_instance_name", args["model_name"])
        # after the warm-up, so that /metrics counts requests only
        device = self.device
        cache = (lambda: torch.cuda.memory_reserved(device)) if device.type == "cuda" else None
        self.metrics = StageMetrics(pb_utils, args["model_name"], gpu_cache=cache, instance=self.instance_name)
        set_stage_sink(self.metrics)
        # the GPU time of each batch's chain, read once the batch is synchronised (so never waited for)
        self.events = (
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.stream is not None else None
        )
        timeout = self.runtime.execution_timeout
        self.watchdog = Watchdog(timeout, self._give_up) if timeout > 0 else None
        self.overlap = None
        if self.runtime.overlap:
            # the tail thread's own watchdog: it watches the batch the tail is on
            watchdog = Watchdog(timeout, self._give_up) if timeout > 0 else None
            self.overlap = Overlap(self.runtime, self.stream, self._answer, self._record_tail, watchdog)
            log.info("%s: two batches in flight (%s, then %s)", args["model_name"],
                     ", ".join(s.name for s in self.overlap.head) or "-", ", ".join(s.name for s in self.overlap.tail) or "-")

    def _warm_up(self, name: str) -> None:
        try:
            with self._on_stream():
                count, problem = self.runtime.warm_up()
            self.stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - a failed warm-up must not keep the model from loading
            count, problem = 0, f"{type(exc).__name__}: {exc}"
        if problem is not None:
            log.warning("%s: warm-up stopped after %d sample requests (%s); set warmup = off to skip it", name, count, problem)
        elif count:
            log.info("%s: warmed up with %d sample requests", name, count)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _read(self, request) -> dict[str, Any]:
        item: dict[str, Any] = {}
        try:
            for name, key in self.runtime.inputs.items():
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise RequestError(f"input {name!r} is missing")
                item[key] = torch.from_dlpack(tensor.to_dlpack())
        except Exception as exc:  # noqa: BLE001 - a malformed request fails alone
            item[ERROR] = exc if isinstance(exc, RequestError) else RequestError(f"cannot read the request: {exc}")
        return item

    def _pin(self, items: list[dict[str, Any]]) -> None:
        """Page-lock where the batch's inputs lie, the first time they lie somewhere new (``pin_inputs``)."""
        if self.pinned is not None:
            self.pinned.cover(value for item in items for value in item.values() if isinstance(value, torch.Tensor))

    def _respond(self, result: dict[str, torch.Tensor] | BaseException):
        if isinstance(result, BaseException):
            return pb_utils.InferenceResponse(output_tensors=[], error=_error(result))
        try:
            tensors = [pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor)) for name, tensor in result.items()]
        except Exception as exc:  # noqa: BLE001
            return pb_utils.InferenceResponse(output_tensors=[], error=_error(exc))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def _fan_out(self, requests):
        results = await self.fanout.answer_all([{t.name(): t for t in request.inputs()} for request in requests])
        return [self._respond(result) for result in results]

    def execute(self, requests):
        if self.fanout is not None:
            return self._fan_out(requests)  # the stub runs the coroutine it is given
        if self.overlap is not None:
            return self._hand_over(requests)
        with self.watchdog.watch(requests) if self.watchdog is not None else contextlib.nullcontext():
            started = time.perf_counter()
            items = [self._read(request) for request in requests]
            self._pin(items)
            read = time.perf_counter()
            with self._on_stream():
                if self.events is not None:
                    self.events[0].record()
                self.runtime.run(items)
                if self.events is not None:
                    self.events[1].record()
                chained = time.perf_counter()
                waited = 0.0
                if self.stream is not None and self.runtime.gpu_wait != "spin":
                    # wait for the chain before the outputs' copy to the host, which would spin for it
                    wait_for_gpu(self.stream, self.runtime.gpu_wait)
                    waited = time.perf_counter() - chained
                results = self.runtime.responses(items)
            built = time.perf_counter()
            if self.stream is not None:
                # one synchronisation per batch, after the whole chain (at once where gpu_wait waited above)
                self.stream.synchronize()
            synchronized = time.perf_counter()
            responses = [self._respond(result) for result in results]
            self._record_steps(len(requests), (read - started, built - chained - waited, synchronized - built + waited,
                                               time.perf_counter() - synchronized))
            return responses

    def _hand_over(self, requests) -> None:
        """Run the head here, then give the batch to the tail thread and return: the tail answers each request."""
        with self.watchdog.watch(requests) if self.watchdog is not None else contextlib.nullcontext():
            started = time.perf_counter()
            flight = Flight([self._read(request) for request in requests], [r.get_response_sender() for r in requests])
            self._pin(flight.items)
            read = time.perf_counter()
            self.overlap.run_head(flight)
            for item in flight.items:
                # inputs the head left for the tail must outlive the requests, which Triton frees on return
                for key in self.runtime.inputs.values():
                    if key != DATA and isinstance(item.get(key), torch.Tensor):
                        item[key] = item[key].clone()
            waited = self.overlap.submit(flight)
        self.metrics.record(STEP_PREFIX + STEPS[0], read - started, len(requests), [])
        self.metrics.record(STEP_PREFIX + WAIT_STEP, waited, len(requests), [])

    def _answer(self, flight: Flight, results: Results) -> None:
        """Send each request of a flight its response, on the tail thread."""
        if isinstance(results, BaseException):
            log.error("%s: a batch of %d request(s) failed: %s: %s", self.instance_name, len(flight.senders),
                      type(results).__name__, results)
            results = [results] * len(flight.senders)
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for sender, result in zip(flight.senders, results):
            try:
                sender.send(self._respond(result), flags=final)
            except Exception as exc:  # noqa: BLE001 - a client gone away loses only its own answer
                log.warning("%s: a response could not be sent: %s", self.instance_name, exc)

    def _record_tail(self, flight: Flight, times: TailTimes) -> None:
        count = len(flight.senders)
        for step, spent in zip(STEPS[1:], (times.outputs, times.synchronize, times.respond)):
            self.metrics.record(STEP_PREFIX + step, spent, count, [])
        if self.stream is not None:
            self.metrics.record(STEP_PREFIX + GPU_STEP, times.gpu, count, [])

    def _record_steps(self, count: int, seconds: tuple[float, float, float, float]) -> None:
        """The time of execute's own steps, beside the stages' (the bench's stages.csv shows both)."""
        for step, spent in zip(STEPS, seconds):
            self.metrics.record(STEP_PREFIX + step, spent, count, [])
        if self.events is not None:
            self.metrics.record(STEP_PREFIX + GPU_STEP, self.events[0].elapsed_time(self.events[1]) / 1e3, count, [])

    def _give_up(self, batch) -> None:
        """A batch ran past ``execution_timeout``: answer its requests with an error, then exit the stub.

        ``batch`` is the requests, or the :class:`Flight` an overlapping instance's tail was on; an
        overlapping instance also answers its other batch in flight, which would otherwise die with
        the stub.  The stuck call cannot be interrupted from Python, and this instance would hold
        every later batch behind it; the exited stub is what the server owner reloads.
        """
        senders = batch.senders if isinstance(batch, Flight) else [request.get_response_sender() for request in batch]
        others = [s for flight in list(self.overlap.in_flight) if flight is not batch for s in flight.senders] if self.overlap else []
        message = (
            f"{self.instance_name}: the batch of {len(senders)} request(s) ran past execution_timeout="
            f"{self.runtime.execution_timeout:g}s; the instance's stub exits so that it is replaced"
        )
        log.error(message)
        error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
        for sender in senders + others:
            # the process ends next whatever happens here; a request answered twice refuses the second
            with contextlib.suppress(Exception):
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=[], error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def finalize(self) -> None:
        if self.overlap is not None:
            self.overlap.close()
        if self.pinned is not None:
            self.pinned.release()
        set_stage_sink(None)
        if self.metrics is not None:
            self.metrics.close()
        self.runtime = None
