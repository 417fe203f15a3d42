"""What every command shares: tritonpipe's errors print one line and exit 2, Ctrl-C exits 130."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tritonpipe.errors import TritonpipeError


def run(body: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> int:
    try:
        return body() or 0
    except (TritonpipeError, OSError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
