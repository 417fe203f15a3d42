"""Soak a served pipeline: many concurrent requests, some of them bad, every answer checked.

Each request's expected answer comes from running the same stage chains in this process
(read from the served models' configs), so a response is either exactly what the reference
computes, a rejection (INVALID_ARG) of an input the reference also refuses, wrong, or lost
(no answer, a timeout, or an unexpected error).  The server's memory (tritonserver plus its
Python stub processes) is sampled before, after warm-up and after the run.

Two faults can be injected while the load runs: SIGKILL of one Python stub of the model,
and SIGINT of the server itself (which then drains its in-flight requests).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ...client.client import PROTOCOLS, PipelineClient
from ...contract import PARAM_PIPELINE
from ...errors import ConfigError, is_bad_input
from ...model.runtime import ModelRuntime
from ...repository.generate import VERSION
from ...server.owner import TritonServer
from ...server.procs import find_server_pid, python_stubs
from ..corpus import load_corpus
from ..probe import Memory, sample_memory

BAD_KINDS = ("truncated", "random", "png", "empty")
VERDICTS = ("correct", "rejected", "wrong", "lost")


# --- inputs -----------------------------------------------------------------------------


def synthetic_corpus(count: int = 32, seed: int = 0) -> list[bytes]:
    """Deterministic smooth pictures from 64x48 to 160x120, JPEG-encoded by OpenCV."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width = 64 + (index * 8) % 104
        height = width * 3 // 4
        small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        picture = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        images.append(cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 70 + index % 30])[1].tobytes())
    return images


def bad_input(kind: str, index: int, corpus: list[bytes], seed: int = 0) -> bytes:
    """A deterministic bad input of ``kind`` for request ``index``."""
    source = corpus[index % len(corpus)]
    if kind == "truncated":
        return source[: max(1, len(source) // 2)]
    if kind == "random":
        rng = np.random.default_rng([seed, index])
        return rng.integers(0, 256, int(rng.integers(16, 4096)), dtype=np.uint8).tobytes()
    if kind == "png":
        picture = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR)
        return cv2.imencode(".png", picture if picture is not None else np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    if kind == "empty":
        return b""
    raise ValueError(f"unknown bad input kind {kind!r}; expected one of {BAD_KINDS}")


@dataclass(frozen=True)
class Request:
    index: int
    kind: str  # "good" or one of BAD_KINDS
    payload: bytes


def plan_requests(count: int, bad_fraction: float, corpus: list[bytes], seed: int = 0, start: int = 0) -> list[Request]:
    """``count`` requests; exactly ``round(count * bad_fraction)`` of them bad, kinds in turn."""
    if not 0.0 <= bad_fraction <= 1.0:
        raise ConfigError(f"bad fraction must be in [0, 1], got {bad_fraction}")
    rng = np.random.default_rng(seed)
    bad_at = set(rng.choice(count, size=int(round(count * bad_fraction)), replace=False).tolist()) if count else set()
    requests, turn = [], 0
    for offset in range(count):
        index = start + offset
        if offset in bad_at:
            kind = BAD_KINDS[turn % len(BAD_KINDS)]
            turn += 1
            requests.append(Request(index, kind, bad_input(kind, index, corpus, seed)))
        else:
            requests.append(Request(index, "good", corpus[int(rng.integers(len(corpus)))]))
    return requests


# --- the in-process reference -------------------------------------------------------------


@dataclass
class Expected:
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None  # "INVALID_ARG" or "INTERNAL": what the server should answer
    message: str = ""


class _PythonStep:
    """One generated Python model, run here exactly as ``TritonPythonModel.execute`` runs it."""

    def __init__(self, config: dict, base_dir: Path | None, device: str):
        self.runtime = ModelRuntime(config, base_dir, device)

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        item: dict[str, Any] = {key: torch.from_numpy(np.array(tensors[name])) for name, key in self.runtime.inputs.items()}
        self.runtime.run([item])
        (result,) = self.runtime.responses([item])  # shaped as the served model answers
        if isinstance(result, BaseException):
            raise result
        return {name: tensor.detach().cpu().numpy() for name, tensor in result.items()}


def _served_device(config: dict) -> str:
    """Where the server runs this model, so the reference uses the same decoder and kernels."""
    import torch

    kinds = {group.get("kind", "KIND_AUTO") for group in config.get("instance_group", [])}
    if kinds & {"KIND_GPU", "KIND_AUTO"} and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class Reference:
    """Expected answers for ``model``, computed by the same stage trees in this process.

    Args:
        config: returns a served model's config (JSON form) by name.
        model: the model the soak calls (a Python model or an ensemble of them).
        repository: the served repository folder, needed only when a stage reads files
            (a model stage's weights).
    """

    def __init__(
        self, config: Callable[[str], dict], model: str, repository: Path | None = None, device: str | None = None
    ):
        top = config(model)
        self.input_names = [t["name"] for t in top.get("input", [])]
        self.output_names = [t["name"] for t in top.get("output", [])]
        if top.get("platform") == "ensemble":
            raw_steps = top.get("ensemble_scheduling", {}).get("step", [])
            steps = [
                (s.get("model_name", s.get("modelName")), s.get("input_map", s.get("inputMap", {})),
                 s.get("output_map", s.get("outputMap", {})))
                for s in raw_steps
            ]
        else:
            steps = [(model, {n: n for n in self.input_names}, {n: n for n in self.output_names})]
        self.steps = [(self._runner(config(name), name, repository, device), ins, outs) for name, ins, outs in steps]
        self.python_models = [name for name, _, _ in steps]
        self._cache: dict[bytes, Expected] = {}

    @staticmethod
    def _runner(config: dict, name: str, repository: Path | None, device: str | None):
        version = Path(repository) / name / VERSION if repository else None
        if config.get("backend") == "python" and PARAM_PIPELINE in config.get("parameters", {}):
            return _PythonStep(config, version, device or _served_device(config))
        raise ConfigError(
            f"cannot build an in-process reference for model {name!r} "
            f"(backend {config.get('backend') or config.get('platform')!r}): only tritonpipe Python models are supported"
        )

    def expected(self, payload: bytes) -> Expected:
        key = hashlib.sha1(payload).digest()
        if key not in self._cache:
            self._cache[key] = self._run(payload)
        return self._cache[key]

    def _run(self, payload: bytes) -> Expected:
        tensors = {self.input_names[0]: np.frombuffer(payload, np.uint8).reshape(1, -1)}
        try:
            for runner, input_map, output_map in self.steps:
                produced = runner({inner: tensors[outer] for inner, outer in input_map.items()})
                tensors.update({output_map[name]: value for name, value in produced.items() if name in output_map})
        except Exception as exc:  # noqa: BLE001 - classified as the served model classifies it
            return Expected(error="INVALID_ARG" if is_bad_input(exc) else "INTERNAL", message=str(exc))
        return Expected(outputs={name: tensors[name] for name in self.output_names})


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


# --- the load -----------------------------------------------------------------------------


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


def _status(exc: BaseException) -> str:
    """A protocol-neutral status name for a failed call."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        raw = str(exc.status() or "")
        names = {
            "StatusCode.INVALID_ARGUMENT": "INVALID_ARG", "400": "INVALID_ARG",
            "StatusCode.DEADLINE_EXCEEDED": "TIMEOUT", "StatusCode.UNAVAILABLE": "UNAVAILABLE",
            "503": "UNAVAILABLE", "StatusCode.INTERNAL": "INTERNAL", "500": "INTERNAL",
            "StatusCode.NOT_FOUND": "NOT_FOUND", "404": "NOT_FOUND",
        }
        if raw in names:
            return names[raw]
        if "timed out" in str(exc).lower() or "deadline" in str(exc).lower():
            return "TIMEOUT"
        return raw.replace("StatusCode.", "") or "ERROR"
    if isinstance(exc, (TimeoutError, socket.timeout)) or "timeout" in type(exc).__name__.lower():
        return "TIMEOUT"
    if isinstance(exc, ConnectionError):
        return "UNAVAILABLE"
    return type(exc).__name__


class _Caller:
    """One connection per thread, with a client-side deadline on every request."""

    def __init__(self, url: str, protocol: str, model: str, input_name: str, outputs: list[str], timeout: float):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout
        self.input_name, self.outputs = input_name, outputs
        self._local = threading.local()

    def _client(self):
        if not hasattr(self._local, "client"):
            if self.protocol == "grpc":
                import tritonclient.grpc as module

                self._local.client = module.InferenceServerClient(self.url)
            else:
                import tritonclient.http as module

                self._local.client = module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            self._local.module = module
        return self._local.client, self._local.module

    def __call__(self, payload: bytes) -> dict[str, np.ndarray]:
        client, module = self._client()
        array = np.frombuffer(payload, np.uint8).reshape(1, -1)
        tensor = module.InferInput(self.input_name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        wanted = [module.InferRequestedOutput(name) for name in self.outputs]
        extra = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = client.infer(self.model, [tensor], outputs=wanted, **extra)
        return {name: result.as_numpy(name) for name in self.outputs}

    def close_thread(self) -> None:
        """Close this thread's connection: Triton's shutdown waits for open HTTP connections."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            del self._local.client


@dataclass
class SoakOptions:
    url: str = ""
    protocol: str = "grpc"
    model: str | None = None
    concurrency: int = 16
    requests: int = 1000
    bad_fraction: float = 0.05
    corpus: Path | None = None
    warmup: int = 100
    timeout: float = 30.0  # seconds a single request may take before it counts as lost
    seed: int = 0
    repository: Path | None = None
    server_pid: int | None = None
    atol: float | None = None
    kill_stub_after: int | None = None
    stop_server_after: int | None = None
    progress: bool = True


@dataclass
class FaultReport:
    kind: str  # "kill-stub" or "stop-server"
    after: int  # requests finished when the fault was injected
    at_s: float = 0.0  # seconds into the run
    target: str = ""
    target_pid: int | None = None
    in_flight: int = 0  # requests in flight when the fault was injected
    completed: int = 0  # of those: answered (result or expected rejection)
    errors: int = 0  # requests that failed with an error after the fault
    hung: int = 0  # requests that ran into the client timeout after the fault
    ok_after: int = 0  # requests started after the fault and answered
    first_error_s: float | None = None  # after the fault
    last_error_s: float | None = None
    error_messages: dict[str, int] = field(default_factory=dict)
    stub_restarted: bool | None = None
    recovered: bool | None = None
    not_sent: int = 0
    refused: int = 0  # sent after the stop began and refused
    server_exit_code: int | None = None
    server_exit_s: float | None = None


@dataclass
class SoakReport:
    model: str
    protocol: str
    requests: int
    concurrency: int
    bad: int
    counts: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    latency_ms: dict[str, float | None]
    memory: dict[str, Memory]
    duration_s: float
    warmup: dict[str, int]
    examples: list[dict]  # a few wrong or lost requests, for diagnosis
    fault: FaultReport | None = None

    @property
    def rss_growth_mb(self) -> float | None:
        """Growth from after warm-up to the end; None when unknown or a stub came or went."""
        before, after = self.memory["after_warmup"], self.memory["after"]
        if before.total_mb is None or after.total_mb is None or before.stubs != after.stubs:
            return None
        return after.total_mb - before.total_mb

    @property
    def ok(self) -> bool:
        """Nothing wrong; nothing lost unless a fault was injected on purpose (then nothing hung)."""
        if self.counts["wrong"]:
            return False
        return self.fault.hung == 0 if self.fault else self.counts["lost"] == 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"] = {k: {**asdict(v), "total_mb": v.total_mb} for k, v in self.memory.items()}
        data["rss_growth_mb"] = self.rss_growth_mb
        data["ok"] = self.ok
        return data


class _Run:
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

    def take(self) -> Request | None:
        with self.lock:
            if self.stopping.is_set() or self.next >= len(self.requests):
                return None
            request = self.requests[self.next]
            self.next += 1
            self.in_flight.add(request.index)
            return request

    def done(self, outcome: Outcome) -> None:
        with self.lock:
            self.in_flight.discard(outcome.index)
            self.outcomes.append(outcome)
            self.bar.update(1)


def _judge(request: Request, expected: Expected, call: Callable[[bytes], dict], atol: float | None,
           stopped: threading.Event | None) -> Outcome:
    started = time.monotonic()
    sent_after_stop = stopped is not None and stopped.is_set()
    try:
        got = call(request.payload)
    except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
        ended = time.monotonic()
        status, message = _status(exc), str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if expected.error == "INVALID_ARG" and status == "INVALID_ARG":
            verdict = "rejected"
        elif status == "INVALID_ARG":
            verdict = "wrong"  # a good input refused, or refused for another reason
        elif sent_after_stop and status in ("UNAVAILABLE", "NOT_FOUND"):
            verdict = "refused"
        else:
            verdict = "lost"
        return Outcome(request.index, request.kind, verdict, ended - started, started, ended, status, message)
    ended = time.monotonic()
    if expected.outputs is None:
        return Outcome(request.index, request.kind, "wrong", ended - started, started, ended, "OK",
                       f"accepted an input the reference refuses ({expected.message[:200]})")
    difference = matches(got, expected.outputs, atol)
    verdict = "wrong" if difference else "correct"
    return Outcome(request.index, request.kind, verdict, ended - started, started, ended, "OK", difference)


def _drive(requests: list[Request], reference: Reference, call: _Caller, options: SoakOptions,
           desc: str, controller: Callable[[_Run], None] | None = None) -> _Run:
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not options.progress, leave=False)
    state = _Run(requests, bar)

    def worker() -> None:
        try:
            while (request := state.take()) is not None:
                state.done(_judge(request, reference.expected(request.payload), call, options.atol, state.stopping))
        finally:
            with contextlib.suppress(Exception):
                call.close_thread()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, options.concurrency))]
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=controller, args=(state,), daemon=True) if controller else None
    if watcher:
        watcher.start()
    for thread in threads:
        thread.join()
    if watcher:
        watcher.join()
    bar.close()
    return state


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(values) * 1000
    return {
        "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
    }


def _count(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {verdict: 0 for verdict in VERDICTS}
    for outcome in outcomes:
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
    return counts


def run_soak(options: SoakOptions, server: TritonServer | None = None) -> SoakReport:
    """Drive the model, check every answer, inject the asked-for fault, and report."""
    if options.stop_server_after is not None and server is None:
        raise ConfigError("stopping the server during the load needs a server started for the run (--serve)")
    if options.kill_stub_after is not None and options.stop_server_after is not None:
        raise ConfigError("inject one fault per run: --kill-stub-after or --stop-server-after")
    url = options.url or (server.grpc_url if options.protocol == "grpc" else server.http_url)
    repository = options.repository or (server.repository if server else None)
    server_pid = server.process.pid if server and server.process else options.server_pid or find_server_pid(url)

    client = PipelineClient(url, protocol=options.protocol, model=options.model, timeout=options.timeout)
    reference = Reference(client._config, client.model, repository)
    call = _Caller(url, options.protocol, client.model, client.inputs[0].name, [o.name for o in client.outputs],
                   options.timeout)
    client.connection.close()  # an idle HTTP connection would hold up a server's shutdown
    corpus = load_corpus(options.corpus).images if options.corpus else synthetic_corpus(seed=options.seed)

    warmup = plan_requests(options.warmup, 0.0, corpus, options.seed + 1, start=-options.warmup)
    requests = plan_requests(options.requests, options.bad_fraction, corpus, options.seed)
    for request in warmup + requests:  # references first, so the load measures the server only
        reference.expected(request.payload)

    memory = {"before": sample_memory(server_pid)}
    warm = _drive(warmup, reference, call, options, "warm-up")
    memory["after_warmup"] = sample_memory(server_pid)
    fault: FaultReport | None = None
    controller = None
    if options.kill_stub_after is not None:
        if server_pid is None:
            raise ConfigError("--kill-stub-after needs the server's process id (--serve or --server-pid)")
        fault = FaultReport("kill-stub", options.kill_stub_after)
        controller = _stub_killer(fault, server_pid, reference.python_models)
    elif options.stop_server_after is not None:
        fault = FaultReport("stop-server", options.stop_server_after)
        controller = _server_stopper(fault, server, memory)

    state = _drive(requests, reference, call, options, "soak", controller)
    if "after" not in memory:
        memory["after"] = sample_memory(server_pid)
    outcomes = sorted(state.outcomes, key=lambda o: o.index)
    if fault is not None:
        _summarise_fault(fault, outcomes, state, server_pid)

    by_kind: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        by_kind.setdefault(outcome.kind, {}).setdefault(outcome.verdict, 0)
        by_kind[outcome.kind][outcome.verdict] += 1
    answered = [o.latency_s for o in outcomes if o.verdict in ("correct", "rejected", "wrong")]
    problems = [o for o in outcomes if o.verdict in ("wrong", "lost")]
    return SoakReport(
        model=client.model, protocol=options.protocol, requests=len(requests), concurrency=options.concurrency,
        bad=sum(r.kind != "good" for r in requests), counts=_count(outcomes), by_kind=by_kind,
        latency_ms=_percentiles(answered), memory=memory,
        duration_s=max((o.ended for o in outcomes), default=state.t0) - state.t0,
        warmup=_count(warm.outcomes), examples=[asdict(o) for o in problems[:10]], fault=fault,
    )


def _wait_for(state: _Run, finished: int) -> bool:
    """Block until ``finished`` requests are done; False if the run ended first."""
    while True:
        with state.lock:
            done, remaining = len(state.outcomes), state.next < len(state.requests) or state.in_flight
        if done >= finished:
            return True
        if not remaining:
            return False
        time.sleep(0.002)


def _stub_killer(fault: FaultReport, server_pid: int, models: list[str]) -> Callable[[_Run], None]:
    def control(state: _Run) -> None:
        if not _wait_for(state, fault.after):
            return
        stubs = [s for s in python_stubs(server_pid) if s.model in models]
        if not stubs:
            fault.target = "no live Python stub found"
            return
        victim = stubs[0]
        fault.at_s = time.monotonic() - state.t0
        os.kill(victim.pid, signal.SIGKILL)
        fault.target, fault.target_pid = f"{victim.instance} (pid {victim.pid})", victim.pid

    return control


def _server_stopper(fault: FaultReport, server: TritonServer, memory: dict) -> Callable[[_Run], None]:
    def control(state: _Run) -> None:
        if not _wait_for(state, fault.after):
            return
        memory["after"] = sample_memory(server.process.pid)
        with state.lock:
            state.stopping.set()  # no new requests; the ones in flight must drain
            fault.at_s = time.monotonic() - state.t0
            fault.not_sent = len(state.requests) - state.next
        signaled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        fault.target, fault.target_pid = f"tritonserver (pid {server.process.pid})", server.process.pid
        try:
            fault.server_exit_code = server.process.wait(server.exit_timeout + 5)
            fault.server_exit_s = time.monotonic() - signaled
        except subprocess.TimeoutExpired:
            fault.server_exit_code = None

    return control


def _summarise_fault(fault: FaultReport, outcomes: list[Outcome], state: _Run, server_pid: int | None) -> None:
    if not fault.target:
        return  # the run ended before the fault point
    at = state.t0 + fault.at_s
    affected = [o for o in outcomes if o.ended >= at]
    answered = ("correct", "rejected")
    failed = [o for o in affected if o.verdict not in answered and o.verdict != "refused"]
    fault.in_flight = sum(1 for o in affected if o.started < at)
    fault.completed = sum(1 for o in affected if o.started < at and o.verdict in answered)
    fault.errors = sum(1 for o in failed if o.status != "TIMEOUT")
    fault.hung = sum(1 for o in failed if o.status == "TIMEOUT")
    fault.ok_after = sum(1 for o in affected if o.started >= at and o.verdict in answered)
    fault.refused = sum(1 for o in affected if o.verdict == "refused")
    if failed:
        fault.first_error_s = min(o.ended for o in failed) - at
        fault.last_error_s = max(o.ended for o in failed) - at
    for o in failed:
        key = f"{o.status}: {o.message[:120]}"
        fault.error_messages[key] = fault.error_messages.get(key, 0) + 1
    if fault.kind == "kill-stub" and server_pid is not None:
        instance = fault.target.split(" (pid")[0]
        fault.stub_restarted = any(s.instance == instance and s.pid != fault.target_pid for s in python_stubs(server_pid))
        # recovered: the instance is back, and the last quarter of the later requests all got their answer
        later = sorted((o for o in affected if o.started >= at), key=lambda o: o.started)
        tail = later[len(later) * 3 // 4 :]
        fault.recovered = fault.stub_restarted and all(o.verdict in answered for o in tail)


# --- the report -----------------------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_report(report: SoakReport) -> str:
    """A plain-text table of the run."""
    c = report.counts
    lines = [
        f"soak of {report.model!r} over {report.protocol}: {report.requests} requests "
        f"({report.bad} bad) at concurrency {report.concurrency} in {report.duration_s:.1f} s",
        "",
        f"  {'correct':<22}{c['correct']:>8}",
        f"  {'rejected as expected':<22}{c['rejected']:>8}",
        f"  {'wrong':<22}{c['wrong']:>8}",
        f"  {'lost':<22}{c['lost']:>8}",
    ]
    if c.get("refused"):
        lines.append(f"  {'refused (stopping)':<22}{c['refused']:>8}")
    kinds = ", ".join(f"{kind}: {counts}" for kind, counts in sorted(report.by_kind.items()))
    lines += [f"  by input: {kinds}", ""]
    lat = report.latency_ms
    lines.append(f"  latency ms   p50 {_ms(lat['p50'])}   p90 {_ms(lat['p90'])}   p99 {_ms(lat['p99'])}")
    lines += ["", f"  {'memory MB':<14}{'server':>10}{'stubs':>10}{'total':>10}{'GPU':>10}"]
    for name, label in (("before", "before"), ("after_warmup", "after warm-up"), ("after", "after")):
        m = report.memory.get(name, Memory())
        lines.append(
            f"  {label:<14}{_mb(m.server_mb):>10}{_mb(m.stubs_mb):>10}{_mb(m.total_mb):>10}{_mb(m.gpu_mb):>10}"
            + (f"   ({m.stubs} stubs)" if m.stubs else "")
        )
    lines.append(f"  RSS growth after warm-up: {_mb(report.rss_growth_mb)} MB")
    fault = report.fault
    if fault is not None:
        lines += ["", f"  fault: {fault.kind} after {fault.after} requests ({fault.target or 'not reached'})"]
        if fault.target:
            lines.append(f"    in flight then {fault.in_flight}; of those answered {fault.completed}")
            lines.append(f"    failed with an error {fault.errors}; hung (client timeout) {fault.hung}")
            if fault.kind == "kill-stub":
                lines.append(f"    answered after the kill {fault.ok_after}; stub restarted: {fault.stub_restarted}; "
                             f"recovered: {fault.recovered}")
            else:
                lines.append(f"    not sent {fault.not_sent}; refused while stopping {fault.refused}; "
                             f"server exit code {fault.server_exit_code} after {_ms(fault.server_exit_s)} s")
            for message, count in sorted(fault.error_messages.items(), key=lambda kv: -kv[1])[:3]:
                lines.append(f"    {count} x {message}")
    for example in report.examples[:5]:
        lines.append(f"  {example['verdict']}: request {example['index']} ({example['kind']}) "
                     f"{example['status']} {example['message'][:160]}")
    if not report.ok:
        verdict = "FAILED"
    elif fault is not None and (report.counts["lost"] or fault.errors):
        verdict = "OK: nothing wrong, nothing hung; the failures above came from the injected fault"
    else:
        verdict = "OK"
    return "\n".join(lines + ["", verdict])
