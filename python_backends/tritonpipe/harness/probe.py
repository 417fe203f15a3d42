"""Readings of the host a served repository runs on: GPU memory, the server's memory, the cores the host,
the server and its stubs keep busy, and how busy the GPU's SMs and JPEG engines are.

The benchmark and the soak both report them; process discovery comes from the server owner's
own :mod:`tritonpipe.server.procs`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..server.procs import cpu_seconds, is_running, python_stubs, rss_mb


def gpu_memory_mb() -> float | None:
    """Memory in use on all GPUs (MiB) by nvidia-smi, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        values = [float(v) for v in out.stdout.split()] if out.returncode == 0 else []
    except ValueError:
        return None
    return sum(values) if values else None


@dataclass
class Memory:
    server_mb: float | None = None
    stubs_mb: float | None = None
    stubs: int = 0
    gpu_mb: float | None = None

    @property
    def total_mb(self) -> float | None:
        return None if self.server_mb is None else self.server_mb + (self.stubs_mb or 0.0)


def sample_memory(server_pid: int | None) -> Memory:
    memory = Memory(gpu_mb=gpu_memory_mb())
    if server_pid is None or not is_running(server_pid):
        return memory
    stubs = python_stubs(server_pid)
    memory.server_mb = rss_mb(server_pid)
    memory.stubs_mb = sum(rss_mb(s.pid) for s in stubs)
    memory.stubs = len(stubs)
    return memory


def host_busy_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU time the host's cores have spent busy since boot (every state but idle and iowait), or None where
    ``/proc/stat`` cannot be read."""
    try:
        first = stat.read_text().split("\n", 1)[0].split()
        ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if first[0] != "cpu" or len(ticks) < 5:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far, at one moment: by the host's cores, the server process and each of its stubs."""

    wall: float
    host: float | None
    server: float = 0.0
    stubs: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CoresBusy:
    """Cores kept busy on average between two samples: the whole host, the server process (all its threads) and
    its Python stubs together."""

    host: float | None
    server: float
    stubs: float


def sample_cpu(server_pid: int | None) -> CpuSample:
    if server_pid is None or not is_running(server_pid):
        return CpuSample(time.monotonic(), host_busy_seconds())
    stubs = {stub.pid: cpu_seconds(stub.pid) for stub in python_stubs(server_pid)}
    return CpuSample(time.monotonic(), host_busy_seconds(), cpu_seconds(server_pid), stubs)


def cores_busy(before: CpuSample, after: CpuSample) -> CoresBusy | None:
    """What was busy between two samples; a stub that started in between counts from its start."""
    wall = after.wall - before.wall
    if wall <= 0:
        return None
    host = None if before.host is None or after.host is None else (after.host - before.host) / wall
    stubs = sum(max(seconds - before.stubs.get(pid, 0.0), 0.0) for pid, seconds in after.stubs.items())
    return CoresBusy(host, max(after.server - before.server, 0.0) / wall, stubs / wall)


@dataclass(frozen=True)
class GpuBusy:
    """The GPUs' SMs and hardware JPEG engines busy on average (%), over ``samples`` one-second samples; None for a
    unit nvidia-smi does not report (the ``jpg`` column is missing on GPUs and drivers without it)."""

    sm: float | None
    jpeg: float | None
    samples: int


def parse_dmon(lines: list[str]) -> GpuBusy | None:
    """The averages of ``nvidia-smi dmon -s u`` output (every GPU's rows together), or None without a sample."""
    columns: list[str] | None = None
    sums: dict[str, float] = {"sm": 0.0, "jpg": 0.0}
    counts: dict[str, int] = {"sm": 0, "jpg": 0}
    rows = 0
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if fields[0].startswith("#"):
            names = [name.lower() for name in (fields[1:] if fields[0] == "#" else [fields[0][1:], *fields[1:]])]
            if columns is None and "sm" in names:
                columns = names
            continue
        if columns is None or len(fields) != len(columns):
            continue
        rows += 1
        for name in sums:
            if name in columns:
                try:
                    sums[name] += float(fields[columns.index(name)])
                    counts[name] += 1
                except ValueError:  # "-": nothing reported for this unit
                    pass
    if not rows:
        return None
    sm, jpeg = (sums[name] / counts[name] if counts[name] else None for name in ("sm", "jpg"))
    return GpuBusy(sm, jpeg, rows)


class GpuBusyMeter:
    """``with GpuBusyMeter() as meter: ...`` samples the GPUs once a second (``nvidia-smi dmon -s u``) while the
    block runs; ``meter.result`` is then its :class:`GpuBusy`, or None where there is no nvidia-smi, it fails, or the
    block ran under a second.  :meth:`between` reads only the samples of a timed part of the block (its warm-up
    left out)."""

    #: a sample reports the second before it is printed: one that arrives this long after a window opens covers
    #: only the window, and one that arrives up to ``_LATE`` seconds after it closes still mostly does
    _SAMPLE, _LATE = 1.0, 0.25

    def __init__(self, smi: str | None = None) -> None:
        self.smi = smi if smi is not None else shutil.which("nvidia-smi")
        self.result: GpuBusy | None = None
        self._lines: list[tuple[float, str]] = []  # (when it arrived, time.perf_counter(); the line)
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuBusyMeter:
        if self.smi is None:
            return self
        try:
            self._process = subprocess.Popen([self.smi, "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._reader = threading.Thread(target=self._read, name="gpu-busy", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append((time.perf_counter(), line))

    def __exit__(self, *exc_info) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.result = parse_dmon([line for _, line in self._lines])

    def between(self, start: float, end: float) -> GpuBusy | None:
        """The averages of the samples taken inside ``start`` to ``end`` (``time.perf_counter()`` values), or None
        where none was (a window under about a second, or no nvidia-smi)."""
        inside = [line for at, line in self._lines
                  if line.lstrip().startswith("#") or start + self._SAMPLE <= at <= end + self._LATE]
        return parse_dmon(inside)
