"""Optional dependencies: whether one imports here, and if not, why (one idiom for all of them)."""

from __future__ import annotations

import importlib


def why_missing(module: str) -> str | None:
    """None when ``module`` imports, else the reason in one line.

    Any exception counts: some optional wheels install stubs that fail with errors of their own.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import means the feature is absent
        return f"{type(exc).__name__}: {exc}"
    return None


def importable(module: str) -> bool:
    """Whether ``module`` imports here."""
    return why_missing(module) is None
