"""The server's processes, read from /proc: its Python stubs, their state and memory.

The server owner uses these to watch its stubs; the harness uses them to measure. Standard library
only: the watchdog of :mod:`.leftovers` imports this file as a script's neighbour, without the package.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc/<pid>/task/*/children (or a /proc scan)."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in sorted(tasks.iterdir()):
            found += [int(p) for p in (task / "children").read_text().split()]
        return sorted(set(found))
    except OSError:
        found = []  # a thread that ended mid-walk: what it found so far is found again below
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def is_running(pid: int) -> bool:
    """Alive and not a zombie that nobody has reaped."""
    state = _proc_status(pid).get("State", "").strip()
    return bool(state) and not state.startswith(("Z", "X"))


def command_line(pid: int) -> list[str]:
    """``pid``'s argv; empty when it is gone or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def rss_mb(pid: int) -> float:
    value = _proc_status(pid).get("VmRSS", "").split()
    return int(value[0]) / 1024 if value else 0.0


@dataclass
class Stub:
    pid: int
    model: str
    instance: str


def python_stubs(server_pid: int) -> list[Stub]:
    """The server's Python backend stub processes, with the model and instance each serves."""
    stubs = []
    for pid in children(server_pid):
        args = command_line(pid)
        if not args or not args[0].endswith(STUB_NAME) or not is_running(pid):
            continue
        # argv: stub, <repo>/<model>/<version>/model.py, shm region, sizes, parent pid, dir, handle, instance, ...
        model = Path(args[1]).parent.parent.name if len(args) > 1 else "?"
        instance = args[8] if len(args) > 8 else "?"
        stubs.append(Stub(pid, model, instance))
    return stubs


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listening_sockets(port: int) -> set[str]:
    """The inodes (as ``socket:[N]``) of every socket listening on ``port``, IPv4 and IPv6."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    sockets.add(f"socket:[{fields[9]}]")
    return sockets


def _holds_any(pid: int, sockets: set[str]) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):  # closed while we look
            if os.readlink(fd) in sockets:
                return True
    return False


def listens_on(pid: int, port: int) -> bool:
    """Whether ``pid`` itself holds a socket listening on ``port``."""
    sockets = _listening_sockets(port)
    return bool(sockets) and _holds_any(pid, sockets)


def port_holder(port: int) -> int | None:
    """The process (of this user, unless run as root) that listens on ``port``; None if none is found."""
    sockets = _listening_sockets(port)
    if not sockets:
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _holds_any(int(entry.name), sockets):
            return int(entry.name)
    return None


def process_name(pid: int) -> str:
    return _proc_status(pid).get("Name", "").strip() or "?"


def find_server_pid(url: str) -> int | None:
    """The process of this user that listens on ``url``'s port (from /proc/net/tcp*)."""
    port = url.rsplit(":", 1)[-1]
    return port_holder(int(port)) if port.isdigit() else None
