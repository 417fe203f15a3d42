"""What every command shares: tritonpipe's errors print one line and exit 2, Ctrl-C exits 130; a list of positive
integers as an argument."""

from __future__ import annotations

import argparse
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


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: ``"1,8,64"`` -> ``(1, 8, 64)``; anything else is a usage error."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
