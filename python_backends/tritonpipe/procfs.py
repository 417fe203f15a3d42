"""Whether a process runs, and its command line, read from /proc.

Standard library only, and below every other folder: Triton's stubs (the shared process's clients), the server
owner and the watchdog of :mod:`tritonpipe.server.leftovers`, which loads this file by its path without the
package, all ask these two questions.
"""

from __future__ import annotations

from pathlib import Path


def status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict; empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def is_running(pid: int) -> bool:
    """Alive and not a zombie that nobody has reaped."""
    state = status(pid).get("State", "").strip()
    return bool(state) and not state.startswith(("Z", "X"))


def command_line(pid: int) -> list[str]:
    """``pid``'s argv; empty when it is gone or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []
