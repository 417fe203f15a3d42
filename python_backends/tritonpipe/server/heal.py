"""Self-healing for a running ``tritonserver``: replace dead or hung Python stubs, restart a crashed server.

Triton 2.51's Python backend does not restart a stub that died: the instance stays in rotation and
its batches fail with ``Stub process ... is not healthy`` while the model reports READY. In explicit
model-control mode a ``load`` request for a loaded model whose files changed builds fresh instances
(fresh stubs) beside the old ones and swaps them in, so the model's other instances and every other
model keep serving; an ensemble keeps calling the reloaded model by name.  Where neither the files
nor the config changed, the load only updates the instance group and keeps every instance, dead
stubs included (the first heal of a model may still work: its first load wrote ``__pycache__`` into
its folder).  So a heal first sets the modification time of the model's version folders to now;
where it cannot (a read-only repository), it unloads the model before loading it again.

Each heal is one WARNING line on the ``tritonpipe.server`` logger, in this form::

    heal model=cls_pre instance=cls_pre_0_1 pid=4711 reason=exited new_pids=4790,4791 took=6.42s

A server that receives a fatal signal prints ``Signal (6) received.`` and a backtrace, then dies of
the signal.  Under load Triton 2.51 has been seen to live on for minutes after an abort, serving
nothing (it prints the backtrace inside its signal handler, where a lock that another thread holds
can stop it).  One that still runs :data:`CRASH_GRACE_S` after that line is killed, and then
restarted as a crashed one (one that still answers is left alone: the line was not its own).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..errors import TritonpipeError
from .procs import Stub, is_running, python_stubs

log = logging.getLogger("tritonpipe.server")

#: seconds a heal watches tritonserver when the reload says ready but no new stub came up (what a server going
#: down answers): if it exits or stops being ready meanwhile, the heal is the server's restart's to do
GOING_DOWN_S = 5.0
#: seconds a tritonserver that printed a fatal signal gets to die before it is taken as stuck in its crash handler
CRASH_GRACE_S = 10.0
#: seconds each of the supervisor's health and model-state calls may take: a stuck server must not stop its watch
CALL_TIMEOUT_S = 10.0
#: the signals whose line in tritonserver's log means it is going down (2 and 15 print the same line and drain)
FATAL_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
#: seconds between two log lines of a check that keeps failing with the same error
REPEAT_LOG_S = 60.0
_SIGNAL_LINE = re.compile(rb"^Signal \((\d+)\) received\.", re.M)

_METRIC = re.compile(r'^(nv_inference_pending_request_count|nv_inference_request_success|nv_inference_request_failure)'
                     r'\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', re.M)


@dataclass
class HealPolicy:
    """How the owner heals.

    Args:
        poll_s: how often stubs and the server are checked.
        hang_timeout_s: a model with requests pending and none finished for this long is hung;
            ``None`` turns hang detection off.
        reload_attempts: loads tried for one heal, with ``backoff_s`` doubling between them.
        retire_after_s: stubs of a healed model's earlier load that still run this long after the heal are
            ended (Triton 2.51 never finishes unloading a model one of whose stubs died under load, and its
            other stubs would run on, holding their memory, until the server stops).
        max_restarts, restart_window_s: a crashed ``tritonserver`` is started again, after ``backoff_s``
            doubling with each crash in the window, unless it crashed more than ``max_restarts`` times
            within the last ``restart_window_s`` seconds (then it is crash-looping, and the supervisor
            gives up). Crashes further apart are absorbed for as long as the server runs.
    """

    poll_s: float = 0.5
    hang_timeout_s: float | None = 60.0
    reload_attempts: int = 3
    retire_after_s: float = 30.0
    backoff_s: float = 1.0
    max_restarts: int = 5
    restart_window_s: float = 60.0


@dataclass
class Heal:
    model: str
    instance: str
    pid: int
    reason: str  # "exited", "unready" or "hung"
    new_pids: list[int]
    took_s: float
    ok: bool


@dataclass
class _Progress:
    finished: float = -1.0
    since: float = field(default_factory=time.monotonic)


def read_progress(metrics_url: str, timeout: float) -> dict[str, tuple[float, float]] | None:
    """:func:`parse_progress` of the server's metrics page; None where it cannot be read whole (the server
    is down, or closed the connection mid-answer as it stops)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            return parse_progress(response.read().decode(errors="replace"))
    except (OSError, http.client.HTTPException):
        return None


def parse_progress(metrics: str) -> dict[str, tuple[float, float]]:
    """Per model, from Triton's Prometheus text: (requests pending, requests finished)."""
    pending: dict[str, float] = {}
    finished: dict[str, float] = {}
    for name, model, value in _METRIC.findall(metrics):
        target = pending if name == "nv_inference_pending_request_count" else finished
        target[model] = target.get(model, 0.0) + float(value)
    return {model: (pending.get(model, 0.0), finished.get(model, 0.0)) for model in pending.keys() | finished.keys()}


class LogWatch:
    """Reads a tritonserver log from an offset on, a piece at a time, for the line of a fatal signal.

    Args:
        path: the log file (it may not exist yet).
        offset: where the server's latest launch starts writing.
    """

    def __init__(self, path: Any, offset: int):
        self.path, self.offset = path, offset
        self._partial = b""  # the start of a line the server has not finished writing

    def fatal_signal(self) -> int | None:
        """The number of a fatal signal the server said it received since the last call, or None."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                new = log.read()
        except (OSError, TypeError):  # no log (yet), or a server without one
            return None
        self.offset += len(new)
        text = self._partial + new
        end = text.rfind(b"\n") + 1
        self._partial = text[end:][-4096:]
        numbers = [int(n) for n in _SIGNAL_LINE.findall(text[:end])]
        return next((n for n in numbers if n in FATAL_SIGNALS), None)


def _is_not_ready(exc: BaseException) -> bool:
    """Whether a control call failed because the server is not ready (it is starting or draining)."""
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    return "UNAVAILABLE" in str(status or "") and "not ready" in str(exc).lower()


class Supervisor:
    """A thread that watches one :class:`~tritonpipe.server.owner.TritonServer` and heals it.

    Args:
        server: the owner; the supervisor calls its ``control()`` client, ``metrics_url``,
            ``process``, ``restart()``, ``clean_up_after_exit()`` and ``stop_requested``.
        policy: timings and limits.

    After a crash it reaps what the server left (``server.clean_up_after_exit()``) before starting
    it again.
    """

    def __init__(self, server: Any, policy: HealPolicy):
        self.server = server
        self.policy = policy
        self.heals: list[Heal] = []
        self.restarts = 0
        self._crashes: list[float] = []
        self.failed_models: set[str] = set()
        self._stubs: dict[str, list[Stub]] = {}
        self._retired: list[tuple[float, str, list[Stub]]] = []  # when to end them, the model, an earlier load's stubs
        self._progress: dict[str, _Progress] = {}
        self._stop = threading.Event()
        self._not_ready = False
        self._log = LogWatch(None, 0)
        self._crash: tuple[int, float] | None = None  # a fatal signal the server printed, and when it was seen
        self._failing: tuple[str, float, int] | None = None  # a check's error, when it was last logged, repeats since
        self._thread = threading.Thread(target=self._run, name="tritonpipe-supervisor", daemon=True)

    def start(self) -> None:
        self._rebase()
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_s):
            try:
                code = self.server.process.poll()
                if code == 0:
                    # a clean exit: someone stopped the server (SIGINT, SIGTERM) and it drained; not a crash
                    log.info("tritonserver exited cleanly; not restarting it")
                    return
                if code is not None:
                    if not self._restart_server():
                        return
                    continue
                if self._going_down():
                    continue
                self._check_models()
                self._end_retired()
                self._not_ready, self._failing = False, None
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad check
                if not _is_not_ready(exc):
                    self._check_failed(exc)
                elif not self._not_ready:
                    # a draining server (SIGINT, SIGTERM) answers this until it exits: say so once
                    self._not_ready = True
                    log.info("tritonserver is not ready (stopping?); the supervisor waits for it")

    def _check_failed(self, exc: Exception) -> None:
        """Log a failed check: with its traceback the first time, then the same error once per :data:`REPEAT_LOG_S`."""
        what, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        if self._failing is None or self._failing[0] != what:
            self._failing = (what, now, 0)
            log.exception("supervisor check failed")
            return
        _, logged, repeats = self._failing
        if now - logged < REPEAT_LOG_S:
            self._failing = (what, logged, repeats + 1)
            return
        log.error("supervisor check: the same failure %d more time(s) in %.0f s: %s", repeats + 1, now - logged, what)
        self._failing = (what, now, 0)

    def _going_down(self) -> bool:
        """Whether the server printed a fatal signal: it is left to die for :data:`CRASH_GRACE_S`, then killed
        unless it still answers (then the line was not its own: a model may print anything)."""
        if self._crash is None:
            number = self._log.fatal_signal()
            if number is None:
                return False
            self._crash = (number, time.monotonic())
        number, seen = self._crash
        if time.monotonic() - seen < CRASH_GRACE_S:
            return True
        if self._ready():
            log.warning("the server's log says 'Signal (%d) received.', but tritonserver still answers %.0f s later: "
                        "not taken as a crash", number, time.monotonic() - seen)
            self._crash = None
            return False
        log.error("tritonserver printed 'Signal (%d) received.' %.0f s ago, still runs and does not answer: it hangs "
                  "in its crash handler, so it is killed and started again", number, time.monotonic() - seen)
        self._crash = (number, time.monotonic())  # its exit is the restart's to see; killed again if it lives on
        self.server.kill()
        return True

    def _rebase(self) -> None:
        self._log = LogWatch(getattr(self.server, "log_path", None), getattr(self.server, "launched_at_byte", 0))
        self._crash = None
        self._stubs = {}
        for stub in python_stubs(self.server.process.pid):
            self._stubs.setdefault(stub.model, []).append(stub)
        self._progress = {}
        self._retired = []

    def _check_models(self) -> None:
        states = self._model_states()
        progress = self._read_progress() if self.policy.hang_timeout_s else {}
        for model, stubs in list(self._stubs.items()):
            if model in self.failed_models or self._stop.is_set():
                continue
            dead = [s for s in stubs if not is_running(s.pid)]
            if dead:
                self._heal(model, dead[0], "exited")
            elif states.get(model, "READY") != "READY":
                self._heal(model, stubs[0], "unready")
            elif model in progress and self._is_hung(model, *progress[model]):
                for stub in stubs:  # its in-flight requests fail with INTERNAL instead of waiting forever
                    _kill(stub.pid)
                self._heal(model, stubs[0], "hung")

    def _end_retired(self) -> None:
        """End the stubs of a healed model's earlier load that still run :attr:`HealPolicy.retire_after_s` after
        the heal: that load no longer serves, and Triton 2.51 may never unload it."""
        now = time.monotonic()
        due = [r for r in self._retired if r[0] <= now]
        self._retired = [r for r in self._retired if r[0] > now]
        for _, model, stubs in due:
            pids = {s.pid for s in stubs}
            left = [s for s in python_stubs(self.server.process.pid) if s.pid in pids and s.model == model]
            for stub in left:
                _kill(stub.pid)
            if left:
                log.info("ended %d stub(s) of model=%s's earlier load, still running %.0f s after its heal: pids=%s",
                         len(left), model, self.policy.retire_after_s, ",".join(str(s.pid) for s in left))

    def _model_states(self) -> dict[str, str]:
        index = self.server.control().get_model_repository_index(
            headers=self.server.control_headers, as_json=True, client_timeout=CALL_TIMEOUT_S)
        return {entry["name"]: entry.get("state", "") for entry in index.get("models", [])}

    def _read_progress(self) -> dict[str, tuple[float, float]]:
        return read_progress(self.server.metrics_url, timeout=2) or {}

    def _is_hung(self, model: str, pending: float, finished: float) -> bool:
        now = time.monotonic()
        seen = self._progress.setdefault(model, _Progress(finished, now))
        if finished != seen.finished or pending == 0:
            seen.finished, seen.since = finished, now
            return False
        return now - seen.since > self.policy.hang_timeout_s

    # --- healing -------------------------------------------------------------------------

    def _heal(self, model: str, culprit: Stub, reason: str) -> None:
        started = time.monotonic()
        previous = self._stubs[model]
        old = {s.pid for s in previous}
        ok = self._reload(model)
        fresh = [s for s in python_stubs(self.server.process.pid) if s.model == model and s.pid not in old]
        if self._server_went_down(wait=ok and not fresh):
            # its stubs died with it (Triton 2.51 now and then aborts when a stub is killed under load): no heal of
            # one model to record or to count as failed; the server's restart brings every model back
            log.warning("tritonserver went down while model=%s was healed; its restart takes over", model)
            return
        took = time.monotonic() - started
        heal = Heal(model, culprit.instance, culprit.pid, reason, [s.pid for s in fresh], took, ok)
        self.heals.append(heal)
        self._progress.pop(model, None)
        if ok:
            self._stubs[model] = fresh
            self._retired.append((time.monotonic() + self.policy.retire_after_s, model, previous))
            log.warning("heal model=%s instance=%s pid=%d reason=%s new_pids=%s took=%.2fs", model, culprit.instance,
                        culprit.pid, reason, ",".join(map(str, heal.new_pids)), took)
            return
        self.failed_models.add(model)
        log.error("HEAL FAILED model=%s instance=%s pid=%d reason=%s after %d attempts in %.2fs: the model is unloaded "
                  "and stays unready; see %s", model, culprit.instance, culprit.pid, reason, self.policy.reload_attempts,
                  took, self.server.log_path)
        self.server.keep_log = True

    def _server_went_down(self, wait: bool) -> bool:
        """Whether tritonserver has exited; with ``wait`` (a reload that says ready but brought up no new stub,
        what a server going down answers), whether it exits or stops being ready within :data:`GOING_DOWN_S`.
        A server going down is healed by its restart, not model by model."""
        if self.server.process.poll() is not None:
            return True
        if not wait:
            return False
        deadline = time.monotonic() + GOING_DOWN_S
        while not self._stop.wait(0.25):
            if self.server.process.poll() is not None or not self._ready():
                return True
            if time.monotonic() >= deadline:
                break
        return False

    def _ready(self) -> bool:
        try:
            return bool(self.server.control().is_server_ready(client_timeout=CALL_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - tritonclient raises its own error type for every failure
            return False

    def _reload(self, model: str) -> bool:
        client, headers = self.server.control(), self.server.control_headers
        delay = self.policy.backoff_s
        if not _mark_changed(self._version_folders(model)):
            # a load of a model whose files and config are unchanged keeps its instances, dead stubs included
            log.warning("the folders of model=%s cannot be marked as changed (a read-only repository?): it is unloaded "
                        "before its reload, and its requests fail until the reload is done", model)
            try:
                client.unload_model(model, headers=headers)
            except Exception as exc:  # noqa: BLE001 - the load below says whether the model comes back
                log.warning("unloading %s before its reload failed: %s", model, exc)
        for attempt in range(1, self.policy.reload_attempts + 1):
            try:
                client.load_model(model, headers=headers)
                if client.is_model_ready(model, client_timeout=CALL_TIMEOUT_S):
                    return True
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own error type for every failure
                log.warning("reload of %s failed (attempt %d of %d): %s", model, attempt, self.policy.reload_attempts, exc)
            if attempt < self.policy.reload_attempts and not self._stop.wait(delay):
                delay *= 2
        # a model whose reload failed may still hold the broken instances: unload it so it is plainly unready
        try:
            client.unload_model(model, headers=headers)
        except Exception as exc:  # noqa: BLE001
            log.error("unloading %s after its failed reload failed too: %s", model, exc)
        return False

    def _version_folders(self, model: str) -> list[Any]:
        """The model's version folders, in the server's repositories (none where they cannot be listed)."""
        try:
            return [v for repository in getattr(self.server, "repositories", ()) if (repository / model).is_dir()
                    for v in (repository / model).iterdir() if v.name.isdigit() and v.is_dir()]
        except OSError:
            return []

    def _restart_server(self) -> bool:
        code = self.server.process.returncode
        self.server.keep_log = True
        self.server.clean_up_after_exit()
        now = time.monotonic()
        window = self.policy.restart_window_s
        self._crashes = [t for t in self._crashes if now - t < window] + [now]
        if len(self._crashes) > self.policy.max_restarts:
            log.error("TRITONSERVER EXITED with code %s, %d times within %gs: it is crash-looping, so the supervisor gives "
                      "up; see %s", code, len(self._crashes), window, self.server.log_path)
            return False
        self.restarts += 1
        delay = self.policy.backoff_s * 2 ** (len(self._crashes) - 1)
        log.error("tritonserver exited with code %s; restarting in %.1fs (crash %d of at most %d within %gs); see %s",
                  code, delay, len(self._crashes), self.policy.max_restarts, window, self.server.log_path)
        if self._stop.wait(delay):
            return False
        started = time.monotonic()
        try:
            self.server.restart()
        except TritonpipeError as exc:
            if not (self._stop.is_set() or self.server.stop_requested):
                log.error("tritonserver did not come back, so the supervisor gives up: %s", exc)
            return False
        self.failed_models.clear()
        self._rebase()
        log.warning("restart of tritonserver done pid=%d took=%.2fs", self.server.process.pid, time.monotonic() - started)
        return True


def _mark_changed(folders: list[Any]) -> bool:
    """Set the folders' modification times to now, so that Triton takes the model's files as changed and its load
    builds fresh instances; False where there is no folder, or one cannot be changed."""
    try:
        for folder in folders:
            os.utime(folder)
    except OSError:
        return False
    return bool(folders)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
