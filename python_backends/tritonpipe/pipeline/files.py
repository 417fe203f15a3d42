"""Configuration files in, and the command line's ways of composing a configuration.

:func:`read_config_file` reads a TOML or JSON file into a dict (duplicate JSON keys are an error);
:func:`parse_overrides` reads ``--set KEY=VALUE`` pairs; :func:`compose_config` joins a file or a
backend string with those pairs.  Nothing here checks what the keys mean: :mod:`.graph` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON configuration; duplicate keys in JSON are an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":

        def no_duplicates(pairs):
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise ConfigError(f"{path}: key {key!r} appears twice (duplicate node names are not allowed)")
                seen[key] = value
            return seen

        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["resize_h=224", ...]`` (the CLI's ``--set``) -> a dict of node keys."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def compose_config(
    path: str | Path | None, backend: str | None, overrides: dict[str, Any]
) -> tuple[dict[str, Any], Path | None]:
    """A configuration from a file or a backend string, with top-level keys overridden.

    Returns the configuration and the folder its relative file names are resolved against.
    """
    if bool(path) == bool(backend):
        raise ConfigError("give either a configuration file or a backend string")
    if backend:
        return {"backend": backend, **overrides}, None
    return {**read_config_file(path), **overrides}, Path(path).resolve().parent
