"""Stages that arrange other stages: Sequential, SyncTensor, Torch, and the trivial ones."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import torch

from ..errors import InternalError, RequestError
from .base import DATA, ERROR, RESULT, MapStage, Param, Role, Stage, register

log = logging.getLogger("tritonpipe")


class StageSink(Protocol):
    """Where :func:`run_chain` reports each leaf stage's work (the served model's metrics)."""

    def record(self, stage: str, seconds: float, images: int, errors: list[BaseException]) -> None: ...


#: one model instance per process (a Triton stub), so one sink per process; None costs nothing
_sink: StageSink | None = None


def set_stage_sink(sink: StageSink | None) -> None:
    global _sink
    _sink = sink


def _versions(item: dict[str, Any]) -> list[int]:
    """The version counters of an item's tensors: torch bumps them on every in-place change.

    Tensors made under ``torch.inference_mode`` keep no counter and are left out.
    """
    return [value._version for value in item.values() if isinstance(value, torch.Tensor) and not value.is_inference()]


def run_isolated(stage: Stage, items: list[dict[str, Any]]) -> None:
    """Run ``stage`` on ``items``; if the batch call fails, retry each item alone.

    A batch-level exception cannot say which request caused it, so the retry pins the
    failure on the request(s) that fail alone and lets the rest of the batch succeed.
    Each retry starts from the item as it was before the batch: keys the stage set are undone,
    and a request whose tensors the stage changed in place is not retried (its answer would be
    computed twice over) but fails with an InternalError.  A stage seen changing its inputs
    in place is given copies from then on, as one that declares ``mutates_inputs`` is always.
    """
    before = [dict(item) for item in items]
    if stage.mutates_inputs:
        for item in items:
            for key, value in item.items():
                if isinstance(value, torch.Tensor):
                    item[key] = value.clone()
    versions = [_versions(item) for item in before]
    # under torch.inference_mode (the in-process runs) no tensor keeps a counter: nothing to compare after the call
    counted = any(versions)
    try:
        stage.forward(items)
    except Exception as exc:  # noqa: BLE001 - attributed to requests below
        if len(items) == 1:
            items[0][ERROR] = exc
            return
        _say_batch_failed(stage, len(items), exc)
        for item, original, version in zip(items, before, versions):
            item.clear()
            item.update(original)
            if _versions(item) != version:
                _caught_mutating(stage)
                item[ERROR] = InternalError(
                    f"stage {stage.name} changed this request's input in place and then failed on its batch "
                    f"({type(exc).__name__}: {exc}); it is not retried from a changed input. Stages must not "
                    "modify their inputs in place, or must declare mutates_inputs = True"
                )
                continue
            try:
                stage.forward([item])
            except Exception as single_exc:  # noqa: BLE001
                item[ERROR] = single_exc
        return
    if counted and any(_versions(original) != version for original, version in zip(before, versions)):
        _caught_mutating(stage)


_batch_failures_said: set[tuple[str, str]] = set()


def _say_batch_failed(stage: Stage, size: int, exc: Exception) -> None:
    """Log, once per stage and kind of error, that a batch failed whole and its requests are retried alone: each
    then costs a call of its own, so a stage that fails every batch so serves, but slowly, and should be fixed."""
    said = (stage.name, type(exc).__name__)
    if said not in _batch_failures_said:
        _batch_failures_said.add(said)
        log.warning("stage %s failed a batch of %d (%s: %s); its requests are retried one at a time (logged once "
                    "for this error)", stage.name, size, type(exc).__name__, str(exc)[:300])


def _caught_mutating(stage: Stage) -> None:
    if not stage.mutates_inputs:
        log.warning("stage %s changed its inputs in place; it gets copies of them from now on", stage.name)
        stage.mutates_inputs = True


def run_chain(stages: list[Stage], batch: list[dict[str, Any]]) -> None:
    """Feed each stage's ``result`` to the next as ``data``; failed items drop out."""
    for stage in stages:
        alive = [item for item in batch if ERROR not in item]
        if not alive:
            return
        # wrappers are timed through their children, so each second is counted once
        sink = _sink if not getattr(stage, "children", None) else None
        started = time.perf_counter() if sink is not None else 0.0
        # as torchpipe's Sequential: a stage never gets more items at once than its max() says
        size = max(1, stage.max())
        for start in range(0, len(alive), size):
            run_isolated(stage, alive[start : start + size])
        for item in alive:
            if ERROR in item:
                continue
            if RESULT not in item:
                item[ERROR] = RuntimeError(f"stage {stage.name} produced no result")
                continue
            item[DATA] = item.pop(RESULT)
        if sink is not None:
            # the time of the stage's Python calls: GPU work it only queued counts where it is waited for
            sink.record(stage.name, time.perf_counter() - started, len(alive), [i[ERROR] for i in alive if ERROR in i])


class Container(Stage):
    """A stage made of child stages; its result is the last child's."""

    role = Role.WRAPPER

    def forward(self, batch: list[dict[str, Any]]) -> None:
        run_chain(self.children, batch)
        for item in batch:
            if ERROR not in item:
                item[RESULT] = item[DATA]


@register("Sequential", "S")
class Sequential(Container):
    """Runs its children one after another."""

    input_doc = "the first child's input"
    output_doc = "the last child's output"

    role = Role.SEQUENCE


@register("SyncTensor")
class SyncTensor(Container):
    """Marks a chain that runs on the instance's CUDA stream.

    The model instance synchronises its stream once, after the whole chain, so nesting
    SyncTensor adds no extra synchronisation.
    """

    input_doc = "the wrapped stage's input"
    output_doc = "the wrapped stage's output (Identity when bare)"

    wants_gpu = True


@register("Torch")
class Torch(Container):
    """Moves each input tensor to ``cuda:device_id`` (when that GPU exists), then runs its children."""

    input_doc = "tensor"
    output_doc = "the wrapped stage's output"

    wants_gpu = True
    params = {"device_id": Param(int, 0, low=0, high=1023, doc="GPU index")}

    def init(self, params: dict[str, Any]) -> None:
        self.target = self.device
        if torch.cuda.is_available() and params["device_id"] < torch.cuda.device_count():
            self.target = torch.device("cuda", params["device_id"])

    def forward(self, batch: list[dict[str, Any]]) -> None:
        for item in batch:
            if isinstance(item.get(DATA), torch.Tensor):
                item[DATA] = item[DATA].to(self.target, non_blocking=True)
        super().forward(batch)


@register("Identity")
class Identity(MapStage):
    """Passes its input through unchanged."""

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return data


@register("C10Exception", "FailStage")
class C10Exception(MapStage):
    """Fails every request on purpose, to exercise error paths."""

    input_doc = "any"
    output_doc = "an INVALID_ARG error"

    params = {"message": Param(str, "deliberate failure", doc="the error text each request gets")}

    def init(self, params: dict[str, Any]) -> None:
        self.message = params["message"]

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        raise RequestError(f"C10Exception: {self.message}")
