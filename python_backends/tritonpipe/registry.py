"""A case-insensitive table of named things (stages, postprocessors) with helpful errors.

Both registries need the same three answers: where a definition came from (to name both places
when a name is taken twice), which registered names are close to a mistyped one, and the
canonical spelling of a name.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def origin(obj: Any) -> str:
    """``file:line`` of a class or function, or its module when the source is not on disk."""
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (OSError, TypeError):
        return getattr(obj, "__module__", "?")


def did_you_mean(word: str, candidates: list[str]) -> str:
    """``"; did you mean 'A' or 'B'?"`` for up to three close candidates, or ``""``."""
    folded = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(str(word).lower(), list(folded), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(folded[c]) for c in close) + "?"


class Registry(Generic[T]):
    """Names -> entries, matched case-insensitively.

    Args:
        what: what the entries are, for messages ("stage", "postprocessor").
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._canonical: dict[str, str] = {}
        self._identities: dict[str, Any] = {}

    def add(self, names: tuple[str, ...], entry: T, where: str, same: Any = None) -> None:
        """Register ``entry`` under every name; a name taken by something else is a ConfigError.

        ``same`` identifies the definition (defaults to ``entry``): registering the same
        definition again, as a re-imported module does, is allowed.
        """
        same = entry if same is None else same
        for name in names:
            key = name.lower()
            if key in self._entries and self._identities[key] is not same:
                raise ConfigError(
                    f"{self.what} name {name!r} is registered twice: first at {self._origins[key]}, again at {where}"
                )
        for name in names:
            self._entries[name.lower()] = entry
            self._origins[name.lower()] = where
            self._canonical[name.lower()] = names[0]
            self._identities[name.lower()] = same

    def get(self, name: str) -> T | None:
        return self._entries.get(str(name).lower())

    def find(self, name: str) -> T:
        """The entry called ``name``; a ConfigError with close names otherwise."""
        entry = self.get(name)
        if entry is None:
            raise ConfigError(f"unknown {self.what} {name!r}{did_you_mean(name, self.names())}")
        return entry

    def names(self) -> list[str]:
        """Canonical names, sorted."""
        return sorted(set(self._canonical.values()))
