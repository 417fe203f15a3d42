"""Faults injected while the load runs, and what they did to the requests around them.

``kill-stub`` SIGKILLs one Python stub of the model; ``stop-server`` sends the server SIGINT,
after which it drains its in-flight requests and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ...server.owner import TritonServer
from ...server.procs import python_stubs
from ..probe import Memory, sample_memory
from .load import LoadRun, Outcome

ANSWERED = ("correct", "rejected")
#: seconds between the stop (no request is sent after it) and the server's SIGINT
SEND_GRACE_S = 0.05


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
    refused: int = 0  # of those in flight: refused (UNAVAILABLE) once the stop had begun
    server_exit_code: int | None = None
    server_exit_s: float | None = None
    # kill-stub recovery: requests that failed or hung after the kill, and seconds from the kill until
    # the last of them ended (every later request was answered)
    affected: int | None = None
    recovery_s: float | None = None


def stub_killer(fault: FaultReport, server_pid: int, models: list[str]) -> Callable[[LoadRun], None]:
    """A controller that SIGKILLs the first live stub of ``models`` after ``fault.after`` requests."""

    def control(state: LoadRun) -> None:
        if not state.wait_for(fault.after):
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


def server_stopper(fault: FaultReport, server: TritonServer, memory: dict[str, Memory]) -> Callable[[LoadRun], None]:
    """A controller that stops sending and SIGINTs the server after ``fault.after`` requests."""

    def control(state: LoadRun) -> None:
        if not state.wait_for(fault.after):
            return
        memory["after"] = sample_memory(server.process.pid)
        fault.at_s, fault.not_sent = state.stop()  # no new requests; the ones in flight must drain
        # a request sent just before the stop may still be on its way: let it reach the server first
        time.sleep(SEND_GRACE_S)
        signaled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        fault.target, fault.target_pid = f"tritonserver (pid {server.process.pid})", server.process.pid
        try:
            fault.server_exit_code = server.process.wait(server.exit_timeout + 5)
            fault.server_exit_s = time.monotonic() - signaled
        except subprocess.TimeoutExpired:
            fault.server_exit_code = None

    return control


def summarise_fault(fault: FaultReport, outcomes: list[Outcome], t0: float) -> None:
    """Count what happened to the requests that ended after the fault (``t0``: the run's start)."""
    if not fault.target:
        return  # the run ended before the fault point
    at = t0 + fault.at_s
    affected = [o for o in outcomes if o.ended >= at]
    failed = [o for o in affected if o.verdict not in ANSWERED and o.verdict != "refused"]
    fault.in_flight = sum(1 for o in affected if o.started < at)
    fault.completed = sum(1 for o in affected if o.started < at and o.verdict in ANSWERED)
    fault.errors = sum(1 for o in failed if o.status != "TIMEOUT")
    fault.hung = sum(1 for o in failed if o.status == "TIMEOUT")
    fault.ok_after = sum(1 for o in affected if o.started >= at and o.verdict in ANSWERED)
    fault.refused = sum(1 for o in affected if o.verdict == "refused")
    if failed:
        fault.first_error_s = min(o.ended for o in failed) - at
        fault.last_error_s = max(o.ended for o in failed) - at
    for o in failed:
        key = f"{o.status}: {o.message[:120]}"
        fault.error_messages[key] = fault.error_messages.get(key, 0) + 1


def check_stub_recovery(fault: FaultReport, outcomes: list[Outcome], t0: float, server_pid: int) -> None:
    """After a stub kill: did the instance come back, and did the last quarter of later requests all succeed?"""
    if fault.kind != "kill-stub" or not fault.target_pid:
        return
    at = t0 + fault.at_s
    instance = fault.target.split(" (pid")[0]
    fault.stub_restarted = any(s.instance == instance and s.pid != fault.target_pid for s in python_stubs(server_pid))
    later = sorted((o for o in outcomes if o.started >= at), key=lambda o: o.started)
    tail = later[len(later) * 3 // 4 :]
    fault.recovered = fault.stub_restarted and all(o.verdict in ANSWERED for o in tail)
    measure_recovery(fault)


def measure_recovery(fault: FaultReport) -> None:
    """How many requests the kill cost, and how long until requests stopped failing."""
    fault.affected = fault.errors + fault.hung
    fault.recovery_s = (fault.last_error_s or 0.0) if fault.recovered else None
