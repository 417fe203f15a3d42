"""Postprocessors: what a model stage does with the engine's outputs before splitting them per request.

A postprocessor is a function ``outputs -> outputs`` on the batched tensors, registered under a
name, plus ``specs``, which says how it changes the output descriptions so that the generated
configs stay right::

    from tritonpipe.engines.postprocess import register_postprocessor

    @register_postprocessor("Sigmoid")
    def sigmoid(outputs):
        return [outputs[0].sigmoid(), *outputs[1:]]

Built in: ``cpu`` (move outputs to the host), ``SoftmaxCpu`` (softmax over dim 1 in FP32, then
to the host) and ``SoftmaxMax`` (one ``[N, 2]`` FP32 tensor per batch: the highest probability
and its class index, exact as a float below 2**24 classes).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..pipeline.spec import TensorSpec
from .base import TensorIO

Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]
Specs = Callable[[list[TensorIO]], list[TensorIO]]


@dataclass(frozen=True)
class Postprocessor:
    name: str
    run: Run
    specs: Specs
    origin: str


_REGISTRY: dict[str, Postprocessor] = {}
NONE = ("", "none")


def _same(outputs: list[TensorIO]) -> list[TensorIO]:
    return outputs


def _origin(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__module__", "?")


def register_postprocessor(name: str, specs: Specs | None = None) -> Callable[[Run], Run]:
    """Decorator: make ``fn`` usable as ``postprocessor=name`` (case-insensitive).

    ``specs`` maps the model's output descriptions to what ``fn`` returns; by default they are
    unchanged.  A name registered twice raises ``ConfigError`` naming both definitions.
    """

    def decorate(fn: Run) -> Run:
        key, here = name.lower(), _origin(fn)
        if key in NONE:
            raise ConfigError(f"postprocessor name {name!r} is reserved for 'no postprocessor'")
        old = _REGISTRY.get(key)
        if old is not None and old.run is not fn:
            raise ConfigError(f"postprocessor {name!r} is registered twice: first at {old.origin}, again at {here}")
        _REGISTRY[key] = Postprocessor(name, fn, specs or _same, here)
        return fn

    return decorate


def lookup_postprocessor(name: str) -> Postprocessor | None:
    """The postprocessor called ``name``; None for ``""``/``"none"``; ``ConfigError`` if unknown."""
    if name.strip().lower() in NONE:
        return None
    try:
        return _REGISTRY[name.strip().lower()]
    except KeyError:
        names = sorted(p.name for p in _REGISTRY.values())
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(n) for n in names if n.lower() in close)}?" if close else ""
        raise ConfigError(
            f"unknown postprocessor {name!r}{hint} (known: none, {', '.join(names)}; "
            "register your own with tritonpipe.engines.postprocess.register_postprocessor in a plugin)"
        ) from None


def postprocessor_names() -> list[str]:
    return sorted(p.name for p in _REGISTRY.values())


# --- built-ins ----------------------------------------------------------------------------


@register_postprocessor("cpu")
def to_cpu(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.cpu() for t in outputs]


def _class_scores(outputs: list[TensorIO], what: str, rank2: bool) -> TensorIO:
    first = outputs[0]
    if len(first.spec.shape) < 2 or rank2 and len(first.spec.shape) != 2:
        need = "[N, classes]" if rank2 else "[N, classes, ...]"
        raise ConfigError(f"{what} needs the first output to be {need}; {first.name!r} is {first.spec.describe()}")
    return first


def _softmax_specs(outputs: list[TensorIO]) -> list[TensorIO]:
    first = _class_scores(outputs, "SoftmaxCpu", rank2=False)
    return [TensorIO(first.name, TensorSpec("FP32", first.spec.shape, first.spec.batched)), *outputs[1:]]


@register_postprocessor("SoftmaxCpu", specs=_softmax_specs)
def softmax_cpu(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    # softmax in FP32 even for FP16 engines: probabilities near 1 lose their digits in FP16
    return [torch.softmax(outputs[0].float(), dim=1).cpu(), *(t.cpu() for t in outputs[1:])]


def _softmax_max_specs(outputs: list[TensorIO]) -> list[TensorIO]:
    first = _class_scores(outputs, "SoftmaxMax", rank2=True)
    return [TensorIO(first.name, TensorSpec("FP32", (first.spec.shape[0], 2), first.spec.batched)), *outputs[1:]]


@register_postprocessor("SoftmaxMax", specs=_softmax_max_specs)
def softmax_max(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    score, index = torch.softmax(outputs[0].float(), dim=1).max(dim=1)
    return [torch.stack([score, index.float()], dim=1).cpu(), *(t.cpu() for t in outputs[1:])]
