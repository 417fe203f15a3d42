"""Work handed to a kernel's own host threads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import torch


def submit_in_callers_mode(pool: Executor, fn: Callable[..., Any], *args: Any) -> Future:
    """``pool.submit(fn, *args)``, with ``fn`` run in the calling thread's ``torch.inference_mode``.

    The mode is per thread, and torch refuses a thread outside it any write into a tensor made under it: a
    buffer the caller made for the work (or one a pooled state made on the caller's thread) would fail the work."""
    inference = torch.is_inference_mode_enabled()

    def run() -> Any:
        with torch.inference_mode(inference):
            return fn(*args)

    return pool.submit(run)
