"""A CUDA MPS daemon of the server's own, so that its instances share the GPU at once.

Every Python-backend instance is a process with its own CUDA context, and without MPS the GPU
runs one context at a time, switching between them: four instances that each decode, resize and
run a model take turns instead of overlapping.  Under MPS their kernels and copies run
concurrently, as one process's streams would.

The daemon gets private pipe and log folders (inside the server's working folder), so it neither
needs nor disturbs a system-wide MPS setup, and it is stopped with the server.  Nothing about the
GPU itself is changed: no compute mode, no persistence setting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError, TritonpipeError

CONTROL = "nvidia-cuda-mps-control"
#: where NVIDIA's container images and driver packages put the tool when it is not on PATH
_EXTRA_DIRS = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/local/bin")


class MpsError(TritonpipeError):
    """The MPS daemon could not be started or stopped."""


def find_control() -> str:
    """Path of ``nvidia-cuda-mps-control``, or ConfigError saying what to install."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_DIRS])
    found = shutil.which(CONTROL, path=search)
    if found is None:
        raise ConfigError(
            f"--mps needs NVIDIA's {CONTROL}, which comes with the driver's utilities; it is not on PATH "
            f"nor in {', '.join(_EXTRA_DIRS)}. Install the driver utilities, or serve without --mps"
        )
    return found


class MpsDaemon:
    """``nvidia-cuda-mps-control -d`` with pipe and log folders under ``folder``.

    Args:
        folder: a private folder for the daemon's pipes and logs (created if missing).
        control: the control program (default: :func:`find_control`).
    """

    def __init__(self, folder: str | os.PathLike, control: str | None = None):
        self.folder = Path(folder)
        self.pipe_dir = self.folder / "mps-pipe"
        self.log_dir = self.folder / "mps-log"
        self.control = control or find_control()
        self.running = False

    def environment(self) -> dict[str, str]:
        """What every CUDA process that should join this daemon needs in its environment."""
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _run(self, args: list[str], stdin: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.environment()}
        try:
            return subprocess.run(
                [self.control, *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise MpsError(f"{self.control} {' '.join(args)} did not finish within {timeout:g} s; see {self.log_dir}") from None

    def _why(self, result: subprocess.CompletedProcess) -> str:
        """What the control program said, else the end of its log."""
        said = (result.stderr or result.stdout).strip()
        if said:
            return said
        try:
            return "\n".join((self.log_dir / "control.log").read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return ""

    def start(self) -> MpsDaemon:
        for folder in (self.pipe_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        result = self._run(["-d"])
        if result.returncode != 0:
            raise MpsError(f"the MPS daemon did not start ({self.control} -d exited with {result.returncode}): {self._why(result)}")
        self.running = True
        return self

    def stop(self) -> None:
        """Ask the daemon to quit (its MPS server goes with it once no client is left)."""
        if not self.running:
            return
        self.running = False
        result = self._run([], stdin="quit\n")
        if result.returncode != 0:
            raise MpsError(f"the MPS daemon did not stop: {self._why(result)}")
