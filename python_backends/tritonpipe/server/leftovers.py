"""What a tritonserver leaves behind when it does not stop cleanly, and a watchdog that removes it.

A server that crashed or was killed leaves:

- its Python stubs, running on with parent 1 (seen ignoring SIGTERM, and one that imported torch holds
  hundreds of MB);
- their shared-memory regions in /dev/shm;
- the Python backend's ``/tmp/python_env_*`` folder;
- the owner's working folder, and the server's log unless it is to be kept.

The owner names a server's leftovers before it starts: the stubs run from the copy of the Python
backend in its working folder, and their shared-memory regions carry a prefix the owner chose
(``--backend-config=python,shm-region-prefix-name=...``). :meth:`Leftovers.reap` removes exactly those.

When the owner itself dies without cleaning up (SIGKILL, the OOM killer), its :class:`Watchdog` does:
a small process that runs this file as a script and reads what the owner tells it on a pipe. When the
pipe closes without a goodbye, the owner is gone. So that the script starts in milliseconds, this file
and :mod:`.procs` import the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__:
    from .procs import command_line, is_running
else:  # run as the watchdog's script, from this folder
    from procs import command_line, is_running

SHM_DIR = Path("/dev/shm")
#: Triton 2.51's Python backend makes this folder with mkdtemp("/tmp/python_env_XXXXXX"), whatever TMPDIR says
PYTHON_ENV_GLOB = "python_env_*"
PYTHON_ENV_DIR = Path("/tmp")


def python_env_folders() -> set[str]:
    return {str(path) for path in PYTHON_ENV_DIR.glob(PYTHON_ENV_GLOB)}


def new_python_env(before: set[str], since: float) -> str | None:
    """The one ``python_env_*`` folder made since ``since`` that was not in ``before``.

    The folder's name says nothing about which server made it, so when two servers started at once
    (two new folders), neither is claimed: a folder of a live server is never removed.
    """
    made = []
    for path in python_env_folders() - before:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ctime >= since - 1:
                made.append(path)
    return made[0] if len(made) == 1 else None


@dataclass
class Leftovers:
    """What one owner's server may leave behind."""

    workdir: str
    shm_prefix: str
    log: str
    keep_log: bool = False
    python_envs: list[str] = field(default_factory=list)

    def processes(self) -> list[int]:
        """The server and its stubs: their command lines name the working folder or a region of ours."""
        found, inside = [], f"{self.workdir}{os.sep}"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            args = command_line(int(entry.name))
            # a stub's argv: the program (in the working folder), model.py, its shm region, ...
            ours = any(inside in arg for arg in args) or (len(args) > 2 and args[2].startswith(self.shm_prefix))
            if ours and is_running(int(entry.name)):
                found.append(int(entry.name))
        return found

    def reap(self, timeout: float = 10.0) -> None:
        """SIGKILL the server's processes that are still running, then remove its regions and python_env folders.

        ``/proc`` is read again until two readings in a row find none of ours alive (or ``timeout``
        passes): a stub the server started while a reading went on, or one a reading missed, is
        killed too.
        """
        deadline, empty = time.monotonic() + timeout, 0
        while empty < 2 and time.monotonic() < deadline:
            pids = self.processes()
            empty = 0 if pids else empty + 1
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05 if empty < 2 else 0)
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        for folder in self.python_envs:
            shutil.rmtree(folder, ignore_errors=True)
        self.python_envs = []

    def remove_files(self) -> None:
        """The working folder, and the log unless it is to be kept."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        if not self.keep_log:
            Path(self.log).unlink(missing_ok=True)


class Watchdog:
    """A process that reaps ``leftovers`` and removes their files if the owner dies without :meth:`close`.

    It runs in a session of its own, so the terminal's Ctrl-C reaches the owner only.
    """

    def __init__(self, leftovers: Leftovers):
        read, self._pipe = os.pipe()
        try:
            # -E -s: no PYTHON* variables nor user site; this folder stays first on sys.path for .procs
            self.process = subprocess.Popen(
                [sys.executable, "-E", "-s", __file__], stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(self._pipe)
            raise
        finally:
            os.close(read)
        self.tell(leftovers=asdict(leftovers))

    def tell(self, **event) -> None:
        """Pass the watchdog what changed: ``python_envs``, ``keep_log``."""
        if self._pipe >= 0:
            with contextlib.suppress(OSError):  # a watchdog that is gone has nothing left to do
                os.write(self._pipe, (json.dumps(event) + "\n").encode())

    def close(self) -> None:
        """The owner has cleaned up itself: the watchdog leaves."""
        if self._pipe < 0:
            return
        self.tell(done=True)
        os.close(self._pipe)
        self._pipe = -1
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _watch() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    leftovers = None
    for line in sys.stdin:  # ends when the owner closes the pipe, or dies
        event = json.loads(line)
        if event.get("done"):
            return
        if "leftovers" in event:
            leftovers = Leftovers(**event["leftovers"])
        elif leftovers is not None:
            leftovers.python_envs += event.get("python_envs", [])
            leftovers.keep_log = event.get("keep_log", leftovers.keep_log)
    if leftovers is not None:
        leftovers.reap()
        leftovers.remove_files()


if __name__ == "__main__":
    _watch()
