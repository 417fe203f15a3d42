"""The shared process's service: merges the batches of the connected instances, runs its part of the chain on
them and writes each instance's results where it reads them.

``python -m tritonpipe.shared_process --key K --config FILE --version-dir DIR --device cuda:0 --server-pid PID``;
the instances start it (:class:`tritonpipe.model.shared_client.SharedClient`), nobody else needs to.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import torch

from ..model.runtime import REQUEST_ROWS, ModelRuntime
from ..model.shared_client import (
    GROWTH,
    IDLE_SECONDS,
    PREFIX,
    Segment,
    address,
    aligned,
    authkey_path,
    dtype_name,
    dtype_of,
    error_record,
    view,
)
from ..procfs import is_running
from ..stages.base import ERROR
from ..stages.control import run_chain

log = logging.getLogger("tritonpipe")

#: batches in flight at once, each on a thread and CUDA stream of its own: the decoder's calls take turns,
#: and the next batch's checks and allocations run meanwhile (two batches of 64 in flight decoded and resized
#: 1.5x as fast as one at a time on an H100)
WORKERS = 2
#: seconds between looks at whether the server still runs
POLL_SECONDS = 1.0
#: seconds between the log lines that say how the merged batches went (where any ran)
STATS_SECONDS = 10.0


class Instance:
    """One connected instance: its socket, its input segments and the output region it reads results from."""

    def __init__(self, conn: Connection, device: torch.device):
        self.conn = conn
        self.device = device
        self.segment: Segment | None = None
        self.region: torch.Tensor | None = None
        self._region_segment: Segment | None = None
        self._send_lock = threading.Lock()

    def open(self, name: str) -> Segment:
        if self.segment is None or self.segment.name != name:
            if self.segment is not None:
                self.segment.close()
            self.segment = Segment(name)
        return self.segment

    def room(self, size: int) -> Any:
        """An output region of at least ``size`` bytes; what the instance maps it by where it is new, else None."""
        if size == 0 or self.region is not None and self.region.numel() >= size:
            return None  # (a batch whose every request failed needs none)
        size = max(size, GROWTH * (self.region.numel() if self.region is not None else 0))
        if self.device.type == "cuda":
            with torch.inference_mode(False):  # a plain tensor, as torch's CUDA IPC shares them
                self.region = torch.empty(size, dtype=torch.uint8, device=self.device)
            return self.region  # pickled by torch as a CUDA IPC handle
        if self._region_segment is not None:
            self._region_segment.close()
        self._region_segment = Segment.new(size)  # the instance unlinks it once it has it open
        self.region = self._region_segment.tensor
        return ("shm", self._region_segment.name)

    def send(self, answer: tuple) -> None:
        with self._send_lock:
            try:
                self.conn.send(answer)
            except (OSError, EOFError):
                pass  # the instance has gone; its reader thread finds out
            except Exception as exc:  # noqa: BLE001 - an answer that cannot be pickled fails the batch, not the process
                with contextlib.suppress(Exception):
                    self.conn.send(("failed", f"the answer could not be sent: {type(exc).__name__}: {exc}"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        for segment in (self.segment, self._region_segment):
            if segment is not None:
                segment.close()


@dataclass(eq=False)
class Job:
    """One instance's batch: its items, their places in the instance's batch, and the inputs as they came."""

    instance: Instance
    indexes: list[int]
    items: list[dict[str, Any]]
    inputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Tally:
    """How the merged batches went since the last log line: counts, and seconds summed over the workers."""

    batches: int = 0
    images: int = 0
    jobs: int = 0
    waiting: float = 0.0  # a worker with nothing to take
    stages: float = 0.0  # the stages (their Python calls; GPU work only queued)
    copy: float = 0.0  # results into the instances' regions
    gpu: float = 0.0  # waiting for the GPU
    answer: float = 0.0  # sending the answers
    began: float = field(default_factory=time.perf_counter)  # waits before this count nothing

    def line(self, seconds: float, workers: int) -> str:
        per = lambda total: total / self.batches * 1e3  # noqa: E731
        return (
            f"last {seconds:.0f} s: {self.images / seconds:,.0f} img/s in {self.batches} merged batches of "
            f"{self.images / self.batches:.1f} images from {self.jobs / self.batches:.1f} instance batches each; per "
            f"merged batch: stages {per(self.stages):.2f} ms, copies {per(self.copy):.2f}, waiting for the GPU "
            f"{per(self.gpu):.2f}, answers {per(self.answer):.2f}; workers idle {self.waiting / (seconds * workers):.0%}"
        )


class SharedService:
    """Runs ``runtime``'s shared part for every connected instance, at most ``max_batch`` images per merged batch.

    The steps before the model run on ``workers`` merged batches at once; in ``chain`` mode the model (the
    chain's last step, which may hold one batch at a time: CUDA graphs replay into fixed buffers) then runs on one
    merged batch at a time.
    """

    def __init__(self, runtime: ModelRuntime, device: torch.device, authkey: bytes, workers: int = WORKERS):
        self.authkey = authkey
        self.head, tail = runtime.halves()
        self.tail = tail if runtime.shared_process == "chain" else []
        self._tail_lock = threading.Lock()
        self._tail_done: torch.cuda.Event | None = None
        self.device = device
        self.max_batch = max(1, runtime.max_batch)
        self.pending: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        self.connected = 0
        self.idle_since = time.monotonic()
        self.workers = workers
        self.tally = Tally()
        self._tally_lock = threading.Lock()
        self._warned_host = False
        for index in range(workers):
            threading.Thread(target=self._work, name=f"tritonpipe-shared-{index}", daemon=True).start()

    # -- instances

    def serve(self, listener: Listener, server_pid: int) -> bool:
        """Take instances until the server is gone (True) or none has been connected for :data:`IDLE_SECONDS`."""
        threading.Thread(target=self._accept, args=(listener,), name="tritonpipe-shared-accept", daemon=True).start()
        counted_from = time.monotonic()
        while is_running(server_pid):
            time.sleep(POLL_SECONDS)
            with self.ready:
                nobody = self.connected == 0
            # a line every STATS_SECONDS, and one when the last instance leaves (a model unloaded, a probe's row done)
            if time.monotonic() - counted_from >= STATS_SECONDS or (nobody and self.tally.batches):
                with self._tally_lock:
                    tally, self.tally = self.tally, Tally()
                if tally.batches:
                    log.info("%s", tally.line(time.monotonic() - counted_from, self.workers))
                counted_from = time.monotonic()
            elif nobody:  # idle time is not counted
                counted_from = time.monotonic()
                with self._tally_lock:
                    self.tally = Tally()
            with self.ready:
                if self.connected == 0 and time.monotonic() - self.idle_since > IDLE_SECONDS:
                    log.info("no instance connected for %g s; the shared process ends", IDLE_SECONDS)
                    return False
        log.info("the server (pid %d) has ended; so does the shared process", server_pid)
        return True

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError as exc:
                log.warning("an instance could not connect: %s", exc)
                continue
            threading.Thread(target=self._serve_instance, args=(conn,), name="tritonpipe-shared-instance", daemon=True).start()

    def _serve_instance(self, conn: Connection) -> None:
        try:  # here, not in accept: a peer that never answers holds up its own thread only
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except (OSError, EOFError, AuthenticationError) as exc:
            log.warning("refused a connection that did not prove the instances' secret: %s", exc)
            conn.close()
            return
        instance = Instance(conn, self.device)
        with self.ready:
            self.connected += 1
        try:
            greeting = conn.recv()
            if greeting[0] != "hello":
                return
            instance.open(greeting[1])
            conn.send(("ready",))
            while True:
                message = conn.recv()
                if message[0] == "run":
                    self._queue(instance, message[1], message[2])
        except (OSError, EOFError):
            pass  # the instance has gone (unloaded, or its stub was killed)
        finally:
            with self.ready:
                self.connected -= 1
                self.idle_since = time.monotonic()
            instance.close()

    def _queue(self, instance: Instance, segment_name: str, layout: list) -> None:
        try:
            segment = instance.open(segment_name)
            job = Job(instance, [index for index, _ in layout], [])
            for _, placed in layout:
                item = {key: view(segment.tensor, offset, dtype_of(dtype), tuple(shape)) for key, dtype, shape, offset in placed}
                job.items.append(item)
                job.inputs.append(dict(item))
        except Exception as exc:  # noqa: BLE001 - a batch that cannot be read goes back to its instance
            instance.send(("failed", f"its inputs could not be read: {type(exc).__name__}: {exc}"))
            return
        with self.ready:
            self.pending.append(job)
            self.ready.notify()

    # -- batches

    def _take(self) -> list[Job]:
        """The oldest waiting batch and those after it that fit one merged batch with it."""
        with self.ready:
            while not self.pending:
                self.ready.wait()
            jobs = [self.pending.popleft()]
            count = len(jobs[0].items)
            while self.pending and count + len(self.pending[0].items) <= self.max_batch:
                count += len(self.pending[0].items)
                jobs.append(self.pending.popleft())
        return jobs

    def _work(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            idle = time.perf_counter()
            jobs = self._take()
            started = time.perf_counter()
            images = sum(len(job.items) for job in jobs)
            with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                try:
                    merged = [item for job in jobs for item in job.items]
                    run_chain(self.head, merged)
                    if self.tail:
                        self._run_tail(merged, stream)
                    ran = time.perf_counter()
                    answers = [self._pack(job) for job in jobs]
                    copied = time.perf_counter()
                    if stream is not None:
                        stream.synchronize()
                except Exception as exc:  # noqa: BLE001 - the instances run this batch themselves
                    log.warning("a merged batch of %d failed in the shared process: %s: %s", images, type(exc).__name__, exc)
                    answers = [("failed", f"{type(exc).__name__}: {exc}")] * len(jobs)
                    ran = copied = time.perf_counter()
            synchronized = time.perf_counter()
            for job, answer in zip(jobs, answers):
                job.instance.send(answer)
            with self._tally_lock:
                tally = self.tally
                tally.batches, tally.images, tally.jobs = tally.batches + 1, tally.images + images, tally.jobs + len(jobs)
                tally.waiting += started - max(idle, tally.began)
                tally.stages += ran - started
                tally.copy += copied - ran
                tally.gpu += synchronized - copied
                tally.answer += time.perf_counter() - synchronized

    def _run_tail(self, items: list[dict[str, Any]], stream) -> None:
        """The model on one merged batch at a time, on the GPU too: a replayed CUDA graph reads and writes fixed
        buffers, so each worker's replay waits on its stream for the one before it, queued on another."""
        with self._tail_lock:
            if stream is not None and self._tail_done is not None:
                stream.wait_event(self._tail_done)
            run_chain(self.tail, items)
            if stream is not None:
                self._tail_done = torch.cuda.Event()
                self._tail_done.record(stream)

    def _pack(self, job: Job) -> tuple:
        """Copy the job's result tensors into its instance's region; the answer that says where they lie.

        The answer is ``("done", region, errors, runs, values)``: each failed item's error; each run of one key's
        tensors of one dtype and shape, back to back from an offset (copied in one launch, read as one view); and
        every other result, equal neighbours together.
        """
        errors, tensors, values = [], {}, []
        for index, item, inputs in zip(job.indexes, job.items, job.inputs):
            if ERROR in item:
                errors.append((index, error_record(item[ERROR])))
                continue
            for key, value in item.items():
                if key == REQUEST_ROWS or value is inputs.get(key):
                    continue
                if isinstance(value, torch.Tensor) and value.device == self.device:
                    tensors.setdefault(key, []).append((index, value))
                elif isinstance(value, torch.Tensor):
                    if not self._warned_host:
                        self._warned_host = True
                        log.warning("the chain leaves %r on %s, not on %s: such results cross as pickled copies",
                                    key, value.device, self.device)
                    values.append((key, "host", value.detach().cpu().numpy(), [index]))
                elif values and values[-1][0] == key and values[-1][1] == "value" and _same(values[-1][2], value):
                    values[-1][3].append(index)
                else:
                    values.append((key, "value", value, [index]))
        runs, placed, offset = [], [], 0
        for key, found in tensors.items():
            for signature, group in itertools.groupby(found, key=lambda pair: (pair[1].dtype, tuple(pair[1].shape))):
                group = list(group)
                offset = aligned(offset)
                runs.append((key, dtype_name(signature[0]), signature[1], offset, [index for index, _ in group]))
                placed.append((offset, [tensor for _, tensor in group]))
                offset += sum(tensor.numel() * tensor.element_size() for _, tensor in group)
        region = job.instance.room(offset)
        for start, group in placed:
            first = group[0]
            torch.stack(group, out=view(job.instance.region, start, first.dtype, (len(group), *first.shape)))
        return ("done", region, errors, runs, values)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared go apart
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonpipe.shared_process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True, help="the shared process's name, from the instances")
    parser.add_argument("--config", required=True, help="the model's config in Triton's JSON form (a file)")
    parser.add_argument("--version-dir", required=True, help="the model's version folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N, where the instances run")
    parser.add_argument("--server-pid", type=int, default=os.getppid(), help="the process to end with")
    parser.add_argument("--workers", type=int, default=WORKERS, help="batches in flight at once")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tritonpipe shared process %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # stopped (SIGTERM), it leaves nothing behind; its instances start another if they still run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return _run(args)
    except SystemExit:
        _remove_files(args.key)
        raise


def _run(args: argparse.Namespace) -> int:
    try:
        config = json.loads(Path(args.config).read_text())
        Path(args.config).unlink(missing_ok=True)
        authkey = authkey_path(args.key).read_bytes()
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # started by a CPU instance pinned to its own cores, it does the work of every instance
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
        runtime = ModelRuntime(config, Path(args.version_dir), device)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():  # as an instance warms up
            count, problem = runtime.warm_up(head_only=runtime.shared_process != "chain")
        if stream is not None:
            stream.synchronize()
        if problem is not None:
            log.warning("warm-up stopped after %d sample requests (%s)", count, problem)
        listener = Listener(address(args.key), family="AF_UNIX")
    except Exception as exc:  # noqa: BLE001 - the instances run their chains themselves
        log.error("could not start: %s: %s", type(exc).__name__, exc)
        _remove_files(args.key)
        return 1
    service = SharedService(runtime, device, authkey, args.workers)
    log.info("%s on %s: %s of every instance, merged batches of up to %d, %d in flight (pid %d)",
             config.get("name", "?"), device, ", ".join(stage.name for stage in service.head + service.tail),
             max(1, runtime.max_batch), args.workers, os.getpid())
    if service.serve(listener, args.server_pid):
        _remove_files(args.key)  # no instance of that server comes back (an idle end keeps them for a reload)
    return 0


def _remove_files(key: str) -> None:
    """The lock and the secret of the instances of ``key``: an instance that still runs makes them again."""
    for path in (authkey_path(key), Path(tempfile.gettempdir()) / f"{PREFIX}{key}.lock"):
        path.unlink(missing_ok=True)
