"""Two batches in flight in one model instance (the ``overlap`` key).

Triton hands an instance one batch at a time and, by default, waits for its answers before it
hands over the next, so the instance's decode, its model and its answers take turns.  They use
different parts of the machine: the JPEG engines and host threads decode, the SMs run the model,
the host copies the answers out.  With ``overlap``, ``execute`` reads its batch, hands it to a
*head* thread and returns.  The head runs the chain's steps before the last one on the instance's
CUDA stream and passes the batch to a *tail* thread, which runs the last step (the model) on a
stream of its own, waits for the GPU and answers every request through its response sender.
While the tail works on one batch the head takes the next.

At most two batches are in flight: a third ``execute`` waits for a slot, and Triton's queue
meanwhile gathers a larger batch.  Every request is answered exactly once, with its result or
its own error; a batch whose step fails as a whole answers each of its requests with that error.
Nothing here imports Triton: ``answer`` does the sending.
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

from .runtime import ModelRuntime

log = logging.getLogger("tritonpipe")

#: batches one instance holds at once: one in the head, one in the tail
DEPTH = 2
#: seconds :meth:`Overlap.close` waits for the batches in flight to be answered
CLOSE_SECONDS = 30.0

#: what the tail gives ``answer``: one result or error per request, or one error for the whole batch
Results = list[Any] | BaseException


@dataclass(eq=False)
class Flight:
    """One batch on its way through the two threads.

    Attributes:
        items: the chain's items, one per request, their inputs owned by the batch (Triton frees
            the requests' own tensors once ``execute`` returns).
        senders: each request's response sender, in the items' order.
        ready: a CUDA event after the inputs' copies, which the head's stream waits for; None on the CPU.
    """

    items: list[dict[str, Any]]
    senders: list[Any]
    ready: Any = None
    failed: BaseException | None = None
    #: CUDA events around the head's and the tail's GPU work
    events: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class TailTimes:
    """Seconds the tail spent after the last step, and the GPU time of both halves (0 on the CPU)."""

    outputs: float
    synchronize: float
    respond: float
    gpu: float


class Overlap:
    """The head and tail threads of one instance.

    Args:
        runtime: the instance's chain.
        stream: the instance's CUDA stream, which the head runs on (and ``execute`` copies the
            inputs on); None on the CPU.
        answer: sends each request of a flight its response; called on the tail thread with the
            flight and its :data:`Results`.  It must not raise for one request's failure.
        record: called on the tail thread with each answered flight's :class:`TailTimes`.
        watchdog: makes a watchdog for one thread (its ``watch(context)`` block gets the flight),
            or None for no execution timeout.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        stream: torch.cuda.Stream | None,
        answer: Callable[[Flight, Results], None],
        record: Callable[[Flight, TailTimes], None] | None = None,
        watchdog: Callable[[], Any] | None = None,
    ):
        self.runtime = runtime
        self.head_stream = stream
        self.tail_stream = torch.cuda.Stream(stream.device) if stream is not None else None
        self.answer = answer
        self.record = record
        self.slots = threading.Semaphore(DEPTH)
        self.pending: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()
        self.ready: queue.SimpleQueue[Flight | None] = queue.SimpleQueue()
        self.head, self.tail = runtime.halves()
        self.threads = [
            threading.Thread(target=self._loop, args=(self.pending, self._run_head, watchdog), name="tritonpipe-head", daemon=True),
            threading.Thread(target=self._loop, args=(self.ready, self._run_tail, watchdog), name="tritonpipe-tail", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, flight: Flight) -> float:
        """Queue a batch for the head; returns the seconds spent waiting for a slot."""
        started = time.perf_counter()
        self.slots.acquire()
        self.pending.put(flight)
        return time.perf_counter() - started

    def inputs(self) -> contextlib.AbstractContextManager:
        """Where ``execute`` copies a batch's inputs: the head's stream."""
        return _on(self.head_stream)

    def mark_ready(self, flight: Flight) -> None:
        """Called after the inputs' copies: the head's GPU work on them waits for these."""
        if self.head_stream is not None:
            flight.ready = torch.cuda.Event()
            flight.ready.record(self.head_stream)

    def _loop(self, source: queue.SimpleQueue, step: Callable[[Flight], None], watchdog: Callable[[], Any] | None) -> None:
        if self.head_stream is not None:
            torch.cuda.set_device(self.head_stream.device)
        guard = watchdog() if watchdog is not None else None
        while (flight := source.get()) is not None:
            with guard.watch(flight) if guard is not None else contextlib.nullcontext():
                step(flight)

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

    def _run_head(self, flight: Flight) -> None:
        try:
            with _on(self.head_stream):
                if flight.ready is not None:
                    self.head_stream.wait_event(flight.ready)
                self._timed(flight, lambda: self.runtime.run_head(flight.items))
        except BaseException as exc:  # noqa: BLE001 - the tail answers every request of the batch with it
            flight.failed = exc
        self.ready.put(flight)

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
            self.slots.release()

    def _finish(self, flight: Flight) -> tuple[Results, tuple[float, float, float] | None]:
        """Run the tail's step and shape the outputs; the results, and (outputs, synchronize, GPU) seconds."""
        if flight.failed is not None:
            return flight.failed, None
        try:
            with _on(self.tail_stream):
                if self.tail_stream is not None:
                    # the event after this batch's head work: the head may be on the next batch already
                    self.tail_stream.wait_event(flight.events[-1])

                def tail() -> tuple[Results, float, float]:
                    self.runtime.run_tail(flight.items)
                    chained = time.perf_counter()
                    return self.runtime.responses(flight.items), chained, time.perf_counter()

                results, chained, built = self._timed(flight, tail)
                if self.tail_stream is not None:
                    self.tail_stream.synchronize()
                synchronized = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - one error for every request of the batch
            return exc, None
        gpu = sum(a.elapsed_time(b) for a, b in zip(flight.events[::2], flight.events[1::2])) / 1e3
        return results, (built - chained, synchronized - built, gpu)

    def close(self) -> None:
        """Answer the batches in flight (waiting up to :data:`CLOSE_SECONDS`), then end the threads."""
        deadline = time.monotonic() + CLOSE_SECONDS
        taken = 0
        while taken < DEPTH and self.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            taken += 1
        if taken < DEPTH:
            log.warning("%d batch(es) still in flight after %.0f s; they are dropped", DEPTH - taken, CLOSE_SECONDS)
        self.pending.put(None)
        self.ready.put(None)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
