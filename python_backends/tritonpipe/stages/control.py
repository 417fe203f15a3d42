"""Stages that arrange other stages: Sequential, SyncTensor, Torch, and the trivial ones."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StageError
from .base import MapStage, Param, Stage, register


def run_isolated(stage: Stage, items: list[dict[str, Any]]) -> None:
    """Run ``stage`` on ``items``; if the batch call fails, retry each item alone.

    A batch-level exception cannot say which request caused it, so the retry pins the
    failure on the request(s) that fail alone and lets the rest of the batch succeed.
    """
    try:
        stage.forward(items)
    except Exception as exc:  # noqa: BLE001 - attributed to requests below
        if len(items) == 1:
            items[0]["error"] = exc
            return
        for item in items:
            item.pop("result", None)
            try:
                stage.forward([item])
            except Exception as single_exc:  # noqa: BLE001
                item["error"] = single_exc


def run_chain(stages: list[Stage], batch: list[dict[str, Any]]) -> None:
    """Feed each stage's ``result`` to the next as ``data``; failed items drop out."""
    for stage in stages:
        alive = [item for item in batch if "error" not in item]
        if not alive:
            return
        run_isolated(stage, alive)
        for item in alive:
            if "error" in item:
                continue
            if "result" not in item:
                item["error"] = RuntimeError(f"stage {stage.name} produced no result")
                continue
            item["data"] = item.pop("result")


class Container(Stage):
    """A stage made of child stages; its result is the last child's."""

    role = "wrapper"

    def forward(self, batch: list[dict[str, Any]]) -> None:
        run_chain(self.children, batch)
        for item in batch:
            if "error" not in item:
                item["result"] = item["data"]


@register("Sequential", "S")
class Sequential(Container):
    """Runs its children one after another."""

    input_doc = "the first child's input"
    output_doc = "the last child's output"

    role = "sequence"


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
            if isinstance(item.get("data"), torch.Tensor):
                item["data"] = item["data"].to(self.target, non_blocking=True)
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
        raise StageError(f"C10Exception: {self.message}")
