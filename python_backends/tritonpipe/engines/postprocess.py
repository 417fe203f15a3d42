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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import Registry, did_you_mean, origin
from ..spec import TensorSpec
from .base import TensorIO

Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]
Specs = Callable[[list[TensorIO]], list[TensorIO]]


@dataclass(frozen=True)
class Postprocessor:
    name: str
    run: Run
    specs: Specs
    origin: str


_POSTPROCESSORS: Registry[Postprocessor] = Registry("postprocessor")
NONE = ("", "none")


def _same(outputs: list[TensorIO]) -> list[TensorIO]:
    return outputs


def register_postprocessor(name: str, specs: Specs | None = None) -> Callable[[Run], Run]:
    """Decorator: make ``fn`` usable as ``postprocessor=name`` (case-insensitive).

    ``specs`` maps the model's output descriptions to what ``fn`` returns; by default they are
    unchanged.  A name registered twice raises ``ConfigError`` naming both definitions.
    """

    def decorate(fn: Run) -> Run:
        here = origin(fn)
        if name.lower() in NONE:
            raise ConfigError(f"postprocessor name {name!r} is reserved for 'no postprocessor'")
        _POSTPROCESSORS.add((name,), Postprocessor(name, fn, specs or _same, here), here, same=fn)
        return fn

    return decorate


def lookup_postprocessor(name: str) -> Postprocessor | None:
    """The postprocessor called ``name``; None for ``""``/``"none"``; ``ConfigError`` if unknown."""
    if name.strip().lower() in NONE:
        return None
    found = _POSTPROCESSORS.get(name.strip())
    if found is None:
        names = _POSTPROCESSORS.names()
        raise ConfigError(
            f"unknown postprocessor {name!r}{did_you_mean(name.strip(), names)} (known: none, {', '.join(names)}; "
            "register your own with tritonpipe.engines.postprocess.register_postprocessor in a plugin)"
        )
    return found


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
