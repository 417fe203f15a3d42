"""Driving the load: many threads send the planned requests and every answer is judged.

A request's expected answer comes from the repository's chain run in this process, so a
response is either exactly what the reference computes (``correct``), a rejection
(INVALID_ARG) of an input the reference also refuses (``rejected``), ``wrong``, or ``lost``
(no answer, a timeout, or an unexpected error).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...client.client import InferError, PipelineClient
from ...errors import is_bad_input
from ..chain import Chain
from .plan import Request

VERDICTS = ("correct", "rejected", "wrong", "lost")


@dataclass
class Expected:
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None  # "INVALID_ARG" or "INTERNAL": what the server should answer
    message: str = ""


class Reference:
    """Expected answers, computed once per distinct payload by the served models' own chain."""

    def __init__(self, chain: Chain):
        self.chain = chain
        self._cache: dict[bytes, Expected] = {}

    def expected(self, payload: bytes) -> Expected:
        key = hashlib.sha1(payload).digest()
        if key not in self._cache:
            self._cache[key] = self._run(payload)
        return self._cache[key]

    def _run(self, payload: bytes) -> Expected:
        # through numpy: torch.frombuffer refuses the empty payload
        request = {self.chain.inputs[0]: torch.from_numpy(np.frombuffer(payload, np.uint8).copy()).reshape(1, -1)}
        with torch.inference_mode():
            (answer,) = self.chain.run([request])
        if isinstance(answer, BaseException):  # classified as the served model classifies it
            return Expected(error="INVALID_ARG" if is_bad_input(answer) else "INTERNAL", message=str(answer))
        return Expected(outputs={name: tensor.cpu().numpy() for name, tensor in answer.items()})


def matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float | None = None) -> str:
    """'' when every output matches; otherwise what differs.

    Integer outputs must be equal; float outputs may differ by ``atol`` (default 1e-4),
    because batching can change the order of floating-point sums.
    """
    for name, expected in want.items():
        value = got.get(name)
        if value is None or value.shape != expected.shape or value.dtype != expected.dtype:
            have = "nothing" if value is None else f"{value.dtype}{list(value.shape)}"
            return f"{name}: got {have}, expected {expected.dtype}{list(expected.shape)}"
        tolerance = atol if atol is not None else (1e-4 if expected.dtype.kind == "f" else 0.0)
        if not np.allclose(value, expected, rtol=0, atol=tolerance, equal_nan=True):
            diff = np.nan_to_num(np.abs(value.astype(np.float64) - expected.astype(np.float64)), nan=np.inf)
            return f"{name}: max difference {diff.max():.6g} > {tolerance:g}"
    return ""


@dataclass
class Outcome:
    index: int
    kind: str
    verdict: str  # one of VERDICTS, or "refused" for requests sent after a server stop began
    latency_s: float
    started: float
    ended: float
    status: str = ""  # "", "INVALID_ARG", "INTERNAL", "UNAVAILABLE", "TIMEOUT", ...
    message: str = ""


def verdict_of_failure(status: str, expected: Expected, after_stop: bool) -> str:
    """The verdict on a request that failed with ``status``."""
    if status == "INVALID_ARG":
        # a good input refused, or refused for another reason than the reference's, is wrong
        return "rejected" if expected.error == "INVALID_ARG" else "wrong"
    if after_stop and status in ("UNAVAILABLE", "NOT_FOUND"):
        return "refused"
    return "lost"


def judge(request: Request, expected: Expected, call: Callable[[bytes], dict], atol: float | None = None,
          stopped: threading.Event | None = None, started: float | None = None) -> Outcome:
    """Send ``request`` through ``call`` and judge the answer against ``expected``.

    ``started`` is when the request left the queue (now if not given); the latency counts from
    the send, so the reference's own work between the two is not in it. A failure is judged
    "refused" only if the stop had begun before the request was sent: one sent earlier and then
    dropped by the server is lost, whatever the status.
    """
    sent = time.monotonic()
    started = sent if started is None else started
    after_stop = stopped is not None and stopped.is_set()
    try:
        got = call(request.payload)
    except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
        ended = time.monotonic()
        status = exc.status if isinstance(exc, InferError) else type(exc).__name__
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        verdict = verdict_of_failure(status, expected, after_stop)
        return Outcome(request.index, request.kind, verdict, ended - sent, started, ended, status, message)
    ended = time.monotonic()
    if expected.outputs is None:
        return Outcome(request.index, request.kind, "wrong", ended - sent, started, ended, "OK",
                       f"accepted an input the reference refuses ({expected.message[:200]})")
    difference = matches(got, expected.outputs, atol)
    verdict = "wrong" if difference else "correct"
    return Outcome(request.index, request.kind, verdict, ended - sent, started, ended, "OK", difference)


class LoadRun:
    """Shared state of one timed phase: the queue of requests, the outcomes, the in-flight set."""

    def __init__(self, requests: list[Request], bar):
        self.requests = requests
        self.next = 0
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.in_flight: set[int] = set()
        self.stopping = threading.Event()
        self.bar = bar
        self.t0 = time.monotonic()

    def take(self) -> tuple[Request, float] | None:
        """The next request and the moment it left the queue, or None once stopping or empty.

        The moment is read under the lock a stop is declared under, so every request taken
        before a stop started before it, and none is taken after.
        """
        with self.lock:
            if self.stopping.is_set() or self.next >= len(self.requests):
                return None
            request = self.requests[self.next]
            self.next += 1
            self.in_flight.add(request.index)
            return request, time.monotonic()

    def stop(self) -> tuple[float, int]:
        """Take no more requests; returns the stop's moment (seconds into the run) and how many were never sent.

        The moment is read before the flag is set, under the lock ``take`` holds: a request taken
        before the stop started before that moment, and one sent after the flag ends after it.
        """
        with self.lock:
            at_s = time.monotonic() - self.t0
            self.stopping.set()
            return at_s, len(self.requests) - self.next

    def done(self, outcome: Outcome) -> None:
        with self.lock:
            self.in_flight.discard(outcome.index)
            self.outcomes.append(outcome)
            self.bar.update(1)

    def wait_for(self, finished: int) -> bool:
        """Block until ``finished`` requests are done; False if the run ended first."""
        while True:
            with self.lock:
                done, remaining = len(self.outcomes), self.next < len(self.requests) or self.in_flight
            if done >= finished:
                return True
            if not remaining:
                return False
            time.sleep(0.002)


def drive(requests: list[Request], reference: Reference, client: PipelineClient, *, concurrency: int,
          atol: float | None = None, progress: bool = True, desc: str = "soak",
          controller: Callable[[LoadRun], None] | None = None) -> LoadRun:
    """Send ``requests`` from ``concurrency`` threads; ``controller`` runs beside them (a fault)."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
    state = LoadRun(requests, bar)

    def worker() -> None:
        try:
            while (taken := state.take()) is not None:
                request, started = taken
                state.done(judge(request, reference.expected(request.payload), client.infer, atol, state.stopping,
                                 started))
        finally:
            with contextlib.suppress(Exception):
                client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    if controller:
        threads.append(threading.Thread(target=controller, args=(state,), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    return state
