"""Readings of the host a served repository runs on: GPU memory, and the server's memory.

The benchmark and the soak both report them; process discovery comes from the server owner's
own :mod:`tritonpipe.server.procs`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from ..server.procs import is_running, python_stubs, rss_mb


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
