"""The model stage: ``TensorrtTensor`` and the engines that can run its model file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..engines import onnxruntime_engine
from ..engines.base import TensorIO
from ..errors import ConfigError, StageError
from ..pipeline.spec import SpecError, TensorSpec
from .base import Param, Stage, register

log = logging.getLogger(__name__)

ENGINES = ("auto", "tensorrt", "onnxruntime", "torch")


def parse_channels(name: str, text: str) -> tuple[float, ...] | None:
    """``"123.675,116.28,103.53"`` -> floats; ``""`` -> None."""
    text = str(text).strip()
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None


def describe_model(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    if path.suffix.lower() == ".onnx":
        return onnxruntime_engine.describe(path)
    raise ConfigError(f"model {str(path)!r}: only .onnx files are supported by the engines installed here")


def choose_engine(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    if path.suffix.lower() == ".onnx" and onnxruntime_engine.available():
        return "onnxruntime"
    raise ConfigError(f"no installed engine can run {str(path)!r}; install onnxruntime or choose engine=")


@register("TensorrtTensor")
class TensorrtTensor(Stage):
    """Runs a model file on a batch of tensors: TensorRT where present, else ONNX Runtime or torch.

    Requests are concatenated along dim 0, run as one batch, and split back per request.
    The first input is fed from ``data``; the first output becomes ``result`` and other
    outputs are written to the item under their own names.
    """

    role = "model"
    wants_gpu = True
    params = {
        "model": Param(str, doc="model file: .onnx", file=True),
        "engine": Param(str, "auto", choices=ENGINES, doc="which engine runs the model"),
        "max": Param(int, 1, low=1, high=1 << 20, doc="largest batch"),
        "min": Param(int, 1, low=1, high=1 << 20, doc="smallest batch"),
        "mean": Param(str, "", doc="per-channel mean subtracted before the model, e.g. 123.675,116.28,103.53"),
        "std": Param(str, "", doc="per-channel std the input is divided by, e.g. 58.395,57.12,57.375"),
        "threads": Param(int, 0, low=0, high=1024, doc="CPU threads for ONNX Runtime; 0 lets it choose"),
    }

    @classmethod
    def io(cls, params: dict[str, Any]) -> tuple[list[TensorIO], list[TensorIO]]:
        return describe_model(Path(params["model"]))

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        inputs, outputs = cls.io(params)
        first = inputs[0].spec
        if not first.accepts(spec):
            hint = " (ResizeTensor gives FP32)" if first.dtype != spec.dtype else ""
            raise SpecError(
                f"model input {inputs[0].name!r} expects {first.describe()}, but receives {spec.describe()}{hint}"
            )
        return outputs[0].spec

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        _, outputs = cls.io(params)
        return {io.name: io.spec for io in outputs[1:]}

    def init(self, params: dict[str, Any]) -> None:
        path = Path(params["model"])
        kind = choose_engine(path, params["engine"])
        if kind != "onnxruntime":
            raise ConfigError(f"engine {kind!r} is not available on this host")
        self.engine = onnxruntime_engine.OnnxRuntimeEngine(path, self.device, params["threads"])
        log.info("TensorrtTensor runs %s with %s", path.name, self.engine.description)
        mean, std = parse_channels("mean", params["mean"]), parse_channels("std", params["std"])
        self.mean = None if mean is None else torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self._max = params["max"]

    def max(self) -> int:
        return self._max

    def forward(self, batch: list[dict[str, Any]]) -> None:
        names = [io.name for io in self.engine.inputs]
        columns = []
        for index, name in enumerate(names):
            key = "data" if index == 0 else name
            try:
                parts = [item[key] for item in batch]
            except KeyError:
                raise StageError(f"model input {name!r} is missing from the request") from None
            columns.append(torch.cat([p.to(self.device) for p in parts]))
        if self.mean is not None:
            columns[0] = columns[0] - self.mean
        if self.std is not None:
            columns[0] = columns[0] / self.std
        sizes = [item["data"].shape[0] for item in batch]
        results = self.engine.run(columns)
        for out_index, (io, tensor) in enumerate(zip(self.engine.outputs, results)):
            for item, part in zip(batch, tensor.split(sizes)):
                item["result" if out_index == 0 else io.name] = part
