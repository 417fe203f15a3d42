"""Where the served models' Python stubs spend their CPU time, sampled with py-spy during each level.

``tritonpipe bench --profile`` starts one ``py-spy record`` per stub of the measured system's models a
measurement window into each concurrency level, and stops it when the level ends.  py-spy reads the
stubs' memory from outside (``--nonblocking``: the stubs are never paused) and keeps only samples of
threads that are on a CPU, so the tables say what the stubs' cores did: the share of all samples in
each function and its callees, and the share where each function was the innermost Python frame.  A
thread on a CPU with no Python frame at all is the stub's own C++ work (reading requests, writing
responses) or a native thread, shown as ``(no Python frame)``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...server.procs import python_stubs

#: samples per second and process
RATE = 500
#: rows of each table
TOP = 25
NATIVE = "(no Python frame)"
#: ``function (path:line)`` as py-spy writes a frame
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
#: the part of a path kept in the tables: from the package folder on
_PACKAGES = ("site-packages/", "dist-packages/", "python_backends/")


def find_pyspy() -> str | None:
    """py-spy beside the running interpreter (a virtual environment's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def short_frame(frame: str) -> str:
    """``function (path:line)`` as ``function (package/path)``: one row per function, not per line."""
    match = _FRAME.match(frame)
    if not match:
        return frame or NATIVE
    path = match["path"]
    for marker in _PACKAGES:
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['function']} ({path})"


@dataclass
class Profile:
    """The samples of one system at one concurrency level."""

    system: str
    concurrency: int
    samples: int = 0
    processes: int = 0
    inclusive: Counter = field(default_factory=Counter)
    innermost: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add_raw(self, text: str) -> None:
        """Add one process's ``py-spy record -f raw`` output: a stack of ``;``-joined frames and a count per line."""
        self.processes += 1
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = [short_frame(f) for f in stack.split(";") if f] or [NATIVE]
            n = int(count)
            self.samples += n
            for frame in set(frames):
                self.inclusive[frame] += n
            self.innermost[frames[-1]] += n

    def markdown(self, top: int = TOP) -> str:
        lines = [f"### {self.system}, concurrency {self.concurrency}", ""]
        if not self.samples:
            why = "; ".join(self.problems) or "the stubs were not on a CPU while sampled"
            return "\n".join([*lines, f"No samples: {why}.", ""])
        lines.append(f"{self.samples:,} samples from {self.processes} stub(s) at {RATE} Hz.")
        lines += ["", "| share | in the function or below | share | innermost Python frame |", "|---:|---|---:|---|"]
        first, second = self.inclusive.most_common(top), self.innermost.most_common(top)
        for i in range(max(len(first), len(second))):
            left = f"{100 * first[i][1] / self.samples:.1f}% | `{first[i][0]}`" if i < len(first) else " | "
            right = f"{100 * second[i][1] / self.samples:.1f}% | `{second[i][0]}`" if i < len(second) else " | "
            lines.append(f"| {left} | {right} |")
        if self.problems:
            lines += ["", f"Not sampled: {'; '.join(self.problems)}."]
        return "\n".join([*lines, ""])


class LevelProfiler:
    """Samples every stub of ``models`` from ``delay`` seconds after :meth:`start` until :meth:`finish`.

    ``pids`` stands in for the server's stubs (the tests give a process of their own).
    """

    def __init__(self, binary: str, system: str, concurrency: int, workdir: Path, *, delay: float,
                 server_pid: int | None = None, models: list[str] | None = None, pids: list[int] | None = None):
        self.binary, self.workdir, self.delay = binary, workdir, delay
        self.server_pid, self.models, self.pids = server_pid, set(models or ()), pids
        self.profile = Profile(system, concurrency)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: list[tuple[subprocess.Popen, Path]] = []
        self._thread = threading.Thread(target=self._begin, name="tritonpipe-profile", daemon=True)

    def start(self) -> LevelProfiler:
        self._thread.start()
        return self

    def _targets(self) -> list[int]:
        if self.pids is not None:
            return list(self.pids)
        return [s.pid for s in python_stubs(self.server_pid) if s.model in self.models]

    def _begin(self) -> None:
        if self._stop.wait(self.delay):
            self.profile.problems.append(f"the level ended within {self.delay:g} s, before sampling began")
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._stop.is_set():
                self.profile.problems.append("the level ended as sampling began")
                return
            for pid in self._targets():
                out = self.workdir / f"{self.profile.system}_c{self.profile.concurrency}_{pid}.txt"
                command = [self.binary, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
                           "--output", str(out), "--nonblocking"]
                try:
                    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                except OSError as exc:
                    self.profile.problems.append(f"py-spy did not start: {exc}")
                    return
                self._running.append((process, out))

    def finish(self, timeout: float = 20.0) -> Profile:
        """Stop sampling (py-spy writes what it has on SIGINT) and read the samples."""
        with self._lock:
            self._stop.set()
        self._thread.join()
        for process, out in self._running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                _, errors = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                _, errors = process.communicate()
            if out.is_file() and out.stat().st_size:
                self.profile.add_raw(out.read_text(errors="replace"))
            else:
                said = [line.strip() for line in (errors or "").splitlines() if line.strip()]
                self.profile.problems.append(f"pid {process.args[3]}: {said[-1] if said else f'py-spy exited {process.returncode}'}")
        return self.profile


def write_profiles(profiles: list[Profile], path: Path) -> Path:
    """``profile.md``: one section per system and level."""
    head = [
        "# Where the stubs' CPU time went",
        "",
        "Sampled with py-spy (`--nonblocking`, threads on a CPU only) from one measurement window into each "
        "level until its end. Left: the share of samples in each function or the functions it called; right: "
        "the share where it was the innermost Python frame. The raw stacks (`py-spy record -f raw`, one file "
        "per stub) are in `profile/` beside this file, for a flame graph.",
        "",
    ]
    path.write_text("\n".join(head + [p.markdown() for p in profiles]))
    return path
