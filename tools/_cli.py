"""What every command shares: expected errors print one line and exit 2, Ctrl-C exits 130."""

from __future__ import annotations

import sys
from typing import Callable

from tritonpipe.errors import ConfigError


def run(body: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> int:
    try:
        return body() or 0
    except (ConfigError, FileExistsError, FileNotFoundError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
