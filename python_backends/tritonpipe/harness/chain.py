"""A generated repository's Python models run in this process, as the server would run them.

The benchmark times this chain (the in-process limit, no server); the soak computes every
request's expected answer with it.  Each model is built by :class:`ModelRuntime` as Triton's
stub builds it and answers through ``ModelRuntime.responses`` as the served model does, and
tensors pass between models along the ensemble's own input and output maps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from ..contract import PARAM_PIPELINE, FanOutParams
from ..errors import ConfigError, RequestError
from ..model.fanout import gather, item_rows
from ..model.runtime import ModelRuntime, pick_device
from ..repository.generate import VERSION, GeneratedRepository
from ..stages.base import ERROR
from ..stages.control import set_stage_sink

#: a request's tensors by name, or the error the chain failed it with
Answer = dict[str, torch.Tensor] | BaseException


@dataclass
class StageTime:
    model: str
    stage: str
    images: int
    calls: int
    seconds: float


class StageClock:
    """A stage sink that times every leaf stage together with the GPU work it queued.

    The devices are synchronised after every stage, so a stage's time runs from the end of the
    one before it (or from the start of its model's batch, reading the batch included) to the end
    of its own GPU work.  The synchronisations cost time of their own: use it on batches kept
    apart from a throughput measurement.
    """

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.model = ""
        self.last = time.perf_counter()
        self.tallies: dict[tuple[str, str], StageTime] = {}

    def start(self, model: str) -> None:
        self.sync()
        self.model, self.last = model, time.perf_counter()

    def record(self, stage: str, seconds: float, images: int, errors: list[BaseException]) -> None:
        self.sync()
        now = time.perf_counter()
        tally = self.tallies.setdefault((self.model, stage), StageTime(self.model, stage, 0, 0, 0.0))
        tally.images += images
        tally.calls += 1
        tally.seconds += now - self.last
        self.last = now


@dataclass
class InprocessResult:
    device: str
    batch: int
    images: int
    seconds: float
    batch_ms: list[float]
    model_ms: dict[str, float] = field(default_factory=dict)  # per image, by model
    chunks: dict[str, int] = field(default_factory=dict)  # models called with fewer images at a time
    gpu_mem_before_mb: float | None = None
    gpu_mem_after_mb: float | None = None
    #: each leaf stage's time with its GPU work, from separate batches with a synchronisation after every stage
    stages: list[StageTime] = field(default_factory=list)
    #: when the timed batches began (``time.perf_counter()``); they ran for ``seconds`` from there
    started: float = 0.0

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency of an image is the time of its batch."""
        return float(np.percentile(self.batch_ms, q)) if self.batch_ms else 0.0


@dataclass
class Step:
    """One model of the chain and how the ensemble wires it."""

    name: str
    runtime: ModelRuntime
    input_map: dict[str, str]  # model input -> pipeline tensor
    output_map: dict[str, str]  # model output -> pipeline tensor
    largest: int = 0  # items per call at most; 0: any number


class Chain:
    """The models behind ``entry`` (a tritonpipe Python model or an ensemble of them), in step order.

    Args:
        config: returns a model's config in Triton's JSON form by name.
        entry: the model a client calls.
        repository: the repository folder, needed only when a stage reads files (a model's weights).
        device: where every model runs; by default each where its instance group puts it.
        chunked: models fed at most their ``max_batch_size`` items per call, as the server's
            batches are (an engine's profiles stop there).
    """

    def __init__(
        self,
        config: Callable[[str], dict],
        entry: str,
        repository: Path | None = None,
        device: torch.device | None = None,
        chunked: Collection[str] = (),
    ):
        top = config(entry)
        self.clock: StageClock | None = None  # set while a StageClock times the stages
        self.inputs = [t["name"] for t in top.get("input", [])]
        self.outputs = [t["name"] for t in top.get("output", [])]
        self.fan_out = FanOutParams.from_config(top)
        if self.fan_out is not None:
            # a graph that fans out: its two parts, joined here as the orchestrator joins them
            self.parts = tuple(Chain(config, name, repository, device, chunked) for name in (self.fan_out.first, self.fan_out.each))
            self.steps = [step for part in self.parts for step in part.steps]
            self.devices = {step.runtime.device for step in self.steps}
            return
        if top.get("platform") == "ensemble":
            wiring = [(s["model_name"], s.get("input_map", {}), s.get("output_map", {}))
                      for s in top["ensemble_scheduling"]["step"]]
        else:
            wiring = [(entry, {n: n for n in self.inputs}, {n: n for n in self.outputs})]
        self.steps: list[Step] = []
        for name, input_map, output_map in wiring:
            model = config(name)
            if model.get("backend") != "python" or PARAM_PIPELINE not in model.get("parameters", {}):
                raise ConfigError(
                    f"cannot run model {name!r} in this process (backend "
                    f"{model.get('backend') or model.get('platform')!r}): only tritonpipe Python models are supported"
                )
            version = Path(repository) / name / VERSION if repository else None
            runtime = ModelRuntime(model, version, device or served_device(model))
            largest = int(model.get("max_batch_size", 0)) if name in chunked else 0
            self.steps.append(Step(name, runtime, input_map, output_map, largest))
        self.devices = {step.runtime.device for step in self.steps}

    @classmethod
    def of_repository(cls, repo: GeneratedRepository, device: torch.device) -> Chain:
        """The chain of a repository generated in this process; its model stage is chunked."""
        configs = {name: json_format.MessageToDict(c, preserving_proto_field_name=True) for name, c in repo.configs.items()}
        if repo.plan.fan_out is not None:
            model_stages = set(configs)  # every part is chunked as the server batches it
        else:
            model_stages = {m.name if repo.plan.needs_ensemble else repo.plan.name for m in repo.plan.models if m.is_model_stage}
        return cls(configs.__getitem__, repo.entry, repo.path, device, model_stages)

    def chunks(self) -> dict[str, int]:
        """Models that are called with at most this many items at a time."""
        return {step.name: step.largest for step in self.steps if step.largest}

    def sync(self) -> None:
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def run(self, requests: list[dict[str, torch.Tensor]], timings: dict[str, float] | None = None) -> list[Answer]:
        """Each request's outputs by name, or the error the server would answer it with.

        ``requests`` hold the entry's inputs by name, shaped as a client sends them (batch
        dimension first).  ``timings`` gathers seconds per model.
        """
        if self.fan_out is not None:
            return self._run_fan_out(requests, timings)
        tensors = [dict(request) for request in requests]  # every pipeline tensor so far, per request
        failed: dict[int, BaseException] = {}
        for step in self.steps:
            start = time.perf_counter()
            alive = [i for i in range(len(tensors)) if i not in failed]
            items: list[dict[str, Any]] = [
                {key: tensors[i][step.input_map[name]] for name, key in step.runtime.inputs.items()} for i in alive
            ]
            size = step.largest or max(1, len(items))
            answers: list[Answer] = []
            for first in range(0, len(items), size):
                batch = items[first : first + size]
                if self.clock is not None:
                    self.clock.start(step.name)
                step.runtime.run(batch)
                answers += step.runtime.responses(batch)
            for i, answer in zip(alive, answers):
                if isinstance(answer, BaseException):
                    failed[i] = answer
                else:
                    tensors[i].update({step.output_map[n]: v for n, v in answer.items() if n in step.output_map})
            if timings is not None:
                self.sync()
                timings[step.name] = timings.get(step.name, 0.0) + time.perf_counter() - start
        self.sync()
        return [failed[i] if i in failed else {n: t[n] for n in self.outputs} for i, t in enumerate(tensors)]

    def _run_fan_out(self, requests: list[dict[str, torch.Tensor]], timings: dict[str, float] | None) -> list[Answer]:
        """The per-request part on every request, then the per-item part on every item of them all at once."""
        params, (first, each) = self.fan_out, self.parts
        answers: list[Answer] = first.run(requests, timings)
        owners: list[int] = []  # the request of each item
        items: list[dict[str, torch.Tensor]] = []
        for index, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                continue
            try:
                rows = item_rows(params, answer[params.items])
            except RequestError as exc:
                answers[index] = exc
                continue
            owners += [index] * rows.shape[0]
            items += [{each.inputs[0]: rows[i : i + 1]} for i in range(rows.shape[0])]
        results: dict[int, list[Answer]] = {index: [] for index in range(len(answers))}
        for owner, result in zip(owners, each.run(items, timings) if items else []):
            results[owner].append(result)
        for index, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                continue
            failure = next((r for r in results[index] if isinstance(r, BaseException)), None)
            answers[index] = failure if failure is not None else gather(params, answer, results[index])
        return answers


def served_device(config: dict) -> torch.device:
    """Where the server runs a model (its first instance group's kind), so this process decodes alike."""
    groups = config.get("instance_group") or [{}]
    return pick_device(groups[0].get("kind", "KIND_AUTO"))


def run_inprocess(
    repo: GeneratedRepository,
    images: list[bytes],
    *,
    device: str = "auto",
    batch: int = 64,
    seconds: float = 10.0,
    warmup: int = 2,
    min_batches: int = 3,
    progress: bool = True,
    gpu_memory=None,
    stage_batches: int = 3,
) -> InprocessResult:
    """Decode and infer the corpus in batches of ``batch`` for about ``seconds``; images/s and batch times.

    Then ``stage_batches`` more batches time every stage on its own (:class:`StageClock`): decode,
    resize, the model, each with its GPU work.
    """
    from tqdm import tqdm

    target = pick_device(device, strict=True)
    with torch.inference_mode():
        chain = Chain.of_repository(repo, target)
        # requests arrive as [1, nbytes] uint8 host tensors, as in the server
        tensors = [{chain.inputs[0]: torch.frombuffer(bytearray(image), dtype=torch.uint8)[None]} for image in images]
        batches = [[tensors[(start + i) % len(tensors)] for i in range(batch)] for start in range(0, len(tensors), batch)]

        def run(requests: list[dict[str, torch.Tensor]], timings: dict[str, float] | None = None) -> None:
            failed = next((a for a in chain.run(requests, timings) if isinstance(a, BaseException)), None)
            if failed is not None:
                raise RuntimeError(f"the in-process chain failed a corpus image: {failed}") from failed

        for index in range(warmup):
            run(batches[index % len(batches)])
        before = gpu_memory() if gpu_memory else None
        batch_ms: list[float] = []
        timings: dict[str, float] = {}
        bar = tqdm(desc=f"in-process batch {batch} on {target}", unit="img", disable=not progress, leave=False)
        started = time.perf_counter()
        while len(batch_ms) < min_batches or time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            # timing each model adds one sync between models, which the server also has
            run(batches[len(batch_ms) % len(batches)], timings)
            batch_ms.append((time.perf_counter() - tick) * 1000.0)
            bar.update(batch)
        elapsed = time.perf_counter() - started
        bar.close()
        after = gpu_memory() if gpu_memory else None
        stages = _stage_times(chain, lambda index: run(batches[index % len(batches)]), stage_batches)
    images_done = batch * len(batch_ms)
    per_image = {name: total / images_done * 1000.0 for name, total in timings.items()}
    return InprocessResult(
        str(target), batch, images_done, elapsed, batch_ms, per_image, chain.chunks(), before, after, stages, started
    )


def _one_batch_at_a_time(stages: list[Any]) -> str | None:
    """Why these stages cannot work on two batches at once (the first stage's reason), or None."""
    return next((why for stage in _leaves(stages) if (why := stage.one_batch_at_a_time()) is not None), None)


def _leaves(stages: list[Any]) -> list[Any]:
    found = []
    for stage in stages:
        children = getattr(stage, "children", None) or []
        found += _leaves(children) if children else [stage]
    return found


def run_preprocessing_in_flight(
    repo: GeneratedRepository, images: list[bytes], *, device: str = "auto", batch: int = 64, seconds: float = 5.0,
    threads: int = 2,
) -> tuple[float, str, tuple[float, float]]:
    """tritonpipe's preprocessing alone (the stages before the model stage) with ``threads`` batches in flight,
    each on a host thread and CUDA stream of its own, as DALI's pipeline keeps two at prefetch 2: (img/s, what
    ran, when the timed part began and ended as ``time.perf_counter()`` values).  Raises ConfigError where the
    repository has no such part to run alone, or stages that take one batch at a time."""
    target = pick_device(device, strict=True)
    with torch.inference_mode():
        chain = Chain.of_repository(repo, target)
    if chain.fan_out is not None:
        raise ConfigError("a graph that fans out has no one preprocessing model to run alone")
    model_stages = {m.name for m in repo.plan.models if m.is_model_stage}
    first = chain.steps[0]
    if first.name in model_stages:
        raise ConfigError(f"the first model, {first.name!r}, is the model stage: there is no preprocessing to run")
    runtime = first.runtime
    if len(chain.steps) > 1:
        stages, run, what = [runtime.root], runtime.run, f"the {first.name} model"
    else:
        head, tail = runtime.halves()
        if not tail:
            raise ConfigError(f"{first.name!r} is one step: there is no preprocessing apart from it")
        stages, run, what = head, runtime.run_head, f"{first.name}'s stages before the model stage"
    why = _one_batch_at_a_time(stages)
    if why is not None:
        raise ConfigError(why)
    if len(runtime.inputs) != 1:
        raise ConfigError(f"{first.name!r} takes {len(runtime.inputs)} inputs; only one (the image) is fed here")
    (key,) = runtime.inputs.values()
    tensors = [torch.frombuffer(bytearray(image), dtype=torch.uint8)[None] for image in images]
    done, lock = [0], threading.Lock()

    def work(index: int, stop: float, counted_from: float) -> None:
        if target.type == "cuda":
            torch.cuda.set_device(target)
        stream = torch.cuda.Stream(target) if target.type == "cuda" else None
        start = index * batch
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            while (began := time.perf_counter()) < stop:
                items = [{key: tensors[(start + i) % len(tensors)]} for i in range(batch)]
                start += threads * batch
                run(items)
                failed = next((item[ERROR] for item in items if ERROR in item), None)
                if failed is not None:
                    raise RuntimeError(f"the preprocessing failed a corpus image: {failed}") from failed
                if stream is not None:
                    stream.synchronize()
                if began >= counted_from:
                    with lock:
                        done[0] += batch

    with ThreadPoolExecutor(threads, thread_name_prefix="tritonpipe-pre") as pool:
        now = time.perf_counter()
        list(pool.map(work, range(threads), [now + 0.5] * threads, [now + 1.0] * threads))  # warm: compiles, caches
        counted_from = time.perf_counter()
        stop = counted_from + seconds
        list(pool.map(work, range(threads), [stop] * threads, [counted_from] * threads))
        elapsed = time.perf_counter() - counted_from
    return done[0] / elapsed, what, (counted_from, counted_from + elapsed)


def _stage_times(chain: Chain, run: Callable[[int], None], batches: int) -> list[StageTime]:
    """Every leaf stage's time with its GPU work, over ``batches`` batches timed with a :class:`StageClock`.

    Nothing for a graph that fans out (its per-item part runs in chains of its own).
    """
    if chain.fan_out is not None or batches < 1:
        return []
    clock = StageClock(chain.sync)
    chain.clock = clock
    set_stage_sink(clock)
    try:
        for index in range(batches):
            run(index)
    finally:
        set_stage_sink(None)
        chain.clock = None
    return list(clock.tallies.values())
