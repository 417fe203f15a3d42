"""The rule for pipeline, node and entry names: each becomes a folder or file name, so it stays plain."""

from __future__ import annotations

import re

from ..errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")


def check_name(what: str, name: str) -> str:
    """``name`` if it is letters, digits, ``_`` and ``-`` (at most 128 characters); a ConfigError naming ``what`` otherwise."""
    if name == "":
        raise ConfigError(f"{what} is empty; give a name of letters, digits, '_' and '-', at most 128 characters")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not allowed: use letters, digits, '_' and '-' only "
            "(no paths, '..', '/', or NUL), at most 128 characters"
        )
    return name
