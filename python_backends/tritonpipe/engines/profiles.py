"""The ``max`` and ``min`` settings of a model stage, parsed into optimization profiles.

Grammar::

    setting := profile (";" profile)*      one profile per ';' (TensorRT optimization profiles)
    profile := entry ("," entry)*          one entry per model input, or one for all inputs
    entry   := INT ("x" INT)*              "4" is a batch size, "4x3x224x224" a full shape

A batch size takes the model's other dimensions; a full shape gives them all, batch first.
A single ``min`` applies to every ``max`` profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .base import TensorIO

Shape = tuple[int, ...]


def fmt(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


@dataclass(frozen=True)
class Profile:
    """Per model input, the smallest and the largest shape (batch first; -1 where unknown)."""

    min: tuple[Shape, ...]
    max: tuple[Shape, ...]

    @property
    def max_batch(self) -> int:
        return max(shape[0] for shape in self.max)

    def fits(self, shapes: Sequence[Sequence[int]]) -> bool:
        """True when every input shape lies within [min, max] (unknown bounds accept anything)."""
        if len(shapes) != len(self.max):
            return False
        for shape, lo, hi in zip(shapes, self.min, self.max):
            if len(shape) != len(hi):
                return False
            if any(a >= 0 and d < a or b >= 0 and d > b for d, a, b in zip(shape, lo, hi)):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"min": [list(s) for s in self.min], "max": [list(s) for s in self.max]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(tuple(tuple(s) for s in data["min"]), tuple(tuple(s) for s in data["max"]))


def parse_setting(name: str, text: object) -> list[list[Shape]]:
    """``"4x3x224x224,4x10;8x3x224x224,8x10"`` -> ``[[(4,3,224,224),(4,10)], [(8,...),(8,10)]]``."""
    text = str(text).strip()
    if not text:
        raise ConfigError(f"{name} is empty; give a batch size (4) or a shape (4x3x224x224)")
    profiles: list[list[Shape]] = []
    for profile_text in text.split(";"):
        entries: list[Shape] = []
        for entry in profile_text.split(","):
            entry = entry.strip().lower()
            try:
                dims = tuple(int(part) for part in entry.split("x"))
            except ValueError:
                raise ConfigError(
                    f"{name}={text!r}: {entry!r} is neither a batch size (4) nor a shape (4x3x224x224)"
                ) from None
            if any(d <= 0 for d in dims):
                raise ConfigError(f"{name}={text!r}: dimensions must be positive, got {entry!r}")
            entries.append(dims)
        profiles.append(entries)
    return profiles


def largest_batch(text: object) -> int:
    """The batch (first) dimension of the largest profile: what Triton's ``max_batch_size`` gets."""
    return max(entry[0] for profile in parse_setting("max", text) for entry in profile)


def _expand(name: str, entries: list[Shape], inputs: list[TensorIO], need_static: bool) -> tuple[Shape, ...]:
    names = ", ".join(io.name for io in inputs)
    if len(entries) == 1 and len(entries[0]) == 1:
        entries = entries * len(inputs)  # one batch size for every input
    if len(entries) != len(inputs):
        raise ConfigError(
            f"{name}: {len(entries)} shapes given but the model has {len(inputs)} inputs ({names}); "
            "give one per input, separated by ','"
        )
    shapes = []
    for io, entry in zip(inputs, entries):
        model = io.spec.shape
        shape = (entry[0], *model[1:]) if len(entry) == 1 else entry
        if len(shape) != len(model):
            raise ConfigError(
                f"{name}: shape {fmt(entry)} has {len(entry)} dims but input {io.name!r} has "
                f"{len(model)} ({io.spec.describe()})"
            )
        for axis, (given, fixed) in enumerate(zip(shape, model)):
            if fixed >= 0 and given >= 0 and given != fixed:
                what = "a fixed batch" if axis == 0 else f"dim {axis} fixed"
                raise ConfigError(
                    f"{name}: input {io.name!r} ({io.spec.describe()}) has {what} at {fixed}, "
                    f"but {name} asks for {fmt(shape)}"
                    + ("; export the model with a dynamic batch axis" if axis == 0 else "")
                )
        if need_static and any(d < 0 for d in shape):
            raise ConfigError(
                f"{name}: input {io.name!r} ({io.spec.describe()}) has free dims; give full shapes, "
                f"e.g. {name}={fmt((entry[0], *(d if d > 0 else 224 for d in model[1:])))}"
            )
        shapes.append(shape)
    return tuple(shapes)


def resolve_profiles(
    min_text: object, max_text: object, inputs: list[TensorIO], *, need_static: bool = False
) -> list[Profile]:
    """Check ``min``/``max`` against the model's inputs and return one :class:`Profile` per ``;``.

    ``need_static`` (TensorRT builds) demands that every dimension be known.
    """
    maxes, mins = parse_setting("max", max_text), parse_setting("min", min_text)
    if len(mins) not in (1, len(maxes)):
        raise ConfigError(
            f"min gives {len(mins)} profiles but max gives {len(maxes)}; give one min for all, or one per profile"
        )
    mins = mins * len(maxes) if len(mins) == 1 else mins
    profiles = []
    for index, (lo_entries, hi_entries) in enumerate(zip(mins, maxes)):
        where = f"profile {index}: " if len(maxes) > 1 else ""
        try:
            lo = _expand("min", lo_entries, inputs, need_static)
            hi = _expand("max", hi_entries, inputs, need_static)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
        for io, a, b in zip(inputs, lo, hi):
            if any(x >= 0 and y >= 0 and x > y for x, y in zip(a, b)):
                raise ConfigError(f"{where}input {io.name!r}: min {fmt(a)} exceeds max {fmt(b)}")
        if len({shape[0] for shape in hi}) > 1 or len({shape[0] for shape in lo}) > 1:
            raise ConfigError(f"{where}all inputs of a profile must share the batch size (the first dim)")
        profiles.append(Profile(lo, hi))
    return profiles


def pick_profile(profiles: Sequence[Profile], shapes: Sequence[Sequence[int]]) -> int | None:
    """The profile that fits ``shapes`` with the smallest max batch; None if none does."""
    fits = [i for i, profile in enumerate(profiles) if profile.fits(shapes)]
    return min(fits, key=lambda i: profiles[i].max_batch) if fits else None
