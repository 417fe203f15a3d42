"""Two batches in flight in one model instance (the ``overlap`` key).

Triton hands an instance one batch at a time and, by default, waits for its answers before it
hands over the next, so the instance's decode, its model and its answers take turns.  They use
different parts of the machine: the JPEG engines and host threads decode, the SMs run the model,
and each answer is a round trip between the Python stub and the server.  With ``overlap``,
``execute`` runs the chain's steps before the last one (the *head*: decode, resize, ...) as
usual, hands the batch to a *tail* thread and returns.  The tail runs the last step (the model)
on a CUDA stream of its own, waits for the GPU and answers every request through its response
sender, while Triton hands ``execute`` the next batch.

At most two batches are in flight: one in ``execute``, one in the tail.  ``execute`` waits for
the tail to take its batch, and Triton's queue meanwhile gathers a larger one.  Every request is
answered exactly once, with its result or its own error; a batch whose step fails as a whole
answers each of its requests with that error.  Nothing here imports Triton: ``answer`` sends.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .runtime import ModelRuntime, wait_for_gpu

log = logging.getLogger("tritonpipe")

#: batches one instance holds at once: one in ``execute``, one in the tail
DEPTH = 2
#: seconds :meth:`Overlap.close` waits for the batch in the tail to be answered
CLOSE_SECONDS = 30.0

#: what the tail gives ``answer``: one result or error per request, or one error for the whole batch
Results = list[Any] | BaseException


@dataclass(eq=False)
class Flight:
    """One batch, from ``execute`` to its answers.

    Attributes:
        items: the chain's items, one per request.
        senders: each request's response sender, in the items' order.
        failed: what broke the head for the whole batch, if anything did.
        events: CUDA events around the head's and the tail's GPU work (none on the CPU).
    """

    items: list[dict[str, Any]]
    senders: list[Any]
    failed: BaseException | None = None
    events: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class TailTimes:
    """Seconds the tail spent after the last step, and the GPU time of both halves (0 on the CPU)."""

    outputs: float
    synchronize: float
    respond: float
    gpu: float


class Overlap:
    """The head, run on the caller's thread, and the tail thread of one instance.

    Args:
        runtime: the instance's chain.
        stream: the instance's CUDA stream, which the head runs on; None on the CPU.
        answer: sends each request of a flight its response; called on the tail thread with the
            flight and its :data:`Results`.  It must not raise for one request's failure.
        record: called on the tail thread with each answered flight's :class:`TailTimes`.
        watchdog: a watchdog for the tail thread (its ``watch(context)`` block gets the flight),
            or None for no execution timeout.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        stream: torch.cuda.Stream | None,
        answer: Callable[[Flight, Results], None],
        record: Callable[[Flight, TailTimes], None] | None = None,
        watchdog: Any = None,
    ):
        self.runtime = runtime
        self.head_stream = stream
        self.tail_stream = torch.cuda.Stream(stream.device) if stream is not None else None
        self.answer = answer
        self.record = record
        self.watchdog = watchdog
        self.head, self.tail = runtime.halves()
        #: batches from the start of their head to their last answer (at most two)
        self.in_flight: set[Flight] = set()
        # the batch in the tail holds the one slot: execute, the next batch's head done, waits for it
        self.slots = threading.Semaphore(DEPTH - 1)
        self.ready: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="tritonpipe-tail", daemon=True)
        self.thread.start()

    def run_head(self, flight: Flight) -> None:
        """Run the head on the caller's thread and wait for its GPU work.

        Waiting keeps the requests' own tensors (which Triton frees once ``execute`` returns)
        out of reach of any GPU work still queued; the tail's model meanwhile runs on.
        """
        self.in_flight.add(flight)
        try:
            with _on(self.head_stream):
                self._timed(flight, lambda: self.runtime.run_head(flight.items))
            if flight.events:
                flight.events[-1].synchronize()
        except BaseException as exc:  # noqa: BLE001 - the tail answers every request of the batch with it
            flight.failed = exc

    def submit(self, flight: Flight) -> float:
        """Hand a batch to the tail; returns the seconds spent waiting for the tail to have room."""
        started = time.perf_counter()
        self.slots.acquire()
        self.ready.put(flight)
        return time.perf_counter() - started

    def _loop(self) -> None:
        if self.tail_stream is not None:
            torch.cuda.set_device(self.tail_stream.device)
        while (flight := self.ready.get()) is not None:
            with self.watchdog.watch(flight) if self.watchdog is not None else contextlib.nullcontext():
                self._run_tail(flight)

    def _timed(self, flight: Flight, work: Callable[[], Any]) -> Any:
        """``work()``, between two CUDA events on the current stream, kept in ``flight.events``."""
        if self.head_stream is None:
            return work()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = work()
        end.record()
        flight.events += [start, end]
        return result

    def _run_tail(self, flight: Flight) -> None:
        try:
            results, times = self._finish(flight)
            started = time.perf_counter()
            self.answer(flight, results)
            if self.record is not None and times is not None:
                self.record(flight, TailTimes(*times[:2], time.perf_counter() - started, times[2]))
        except BaseException:  # noqa: BLE001 - the next batch must still be served
            log.exception("answering a batch of %d request(s) failed", len(flight.senders))
        finally:
            self.in_flight.discard(flight)
            self.slots.release()

    def _finish(self, flight: Flight) -> tuple[Results, tuple[float, float, float] | None]:
        """Run the tail's step and shape the outputs; the results, and (outputs, synchronize, GPU) seconds."""
        if flight.failed is not None:
            return flight.failed, None
        try:
            with _on(self.tail_stream):

                def tail() -> tuple[Results, float, float]:
                    self.runtime.run_tail(flight.items)
                    chained = time.perf_counter()
                    if self.tail_stream is not None and self.runtime.gpu_wait != "spin":
                        wait_for_gpu(self.tail_stream, self.runtime.gpu_wait)  # before the outputs' copy spins for it
                    return self.runtime.responses(flight.items), chained, time.perf_counter()

                results, chained, built = self._timed(flight, tail)
                if self.tail_stream is not None:
                    self.tail_stream.synchronize()  # at once where gpu_wait waited above
                synchronized = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - one error for every request of the batch
            return exc, None
        gpu = sum(a.elapsed_time(b) for a, b in zip(flight.events[::2], flight.events[1::2])) / 1e3
        return results, (built - chained, synchronized - built, gpu)

    def close(self) -> None:
        """Answer the batch in the tail (waiting up to :data:`CLOSE_SECONDS`), then end the thread."""
        if not self.slots.acquire(timeout=CLOSE_SECONDS):
            log.warning("a batch was still being answered after %.0f s; it is dropped", CLOSE_SECONDS)
        self.ready.put(None)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
