"""The engine interface and static description of model files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ConfigError
from ..spec import TensorSpec

# onnx.TensorProto element types -> Triton type names
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64"}


@dataclass(frozen=True)
class TensorIO:
    """One named model input or output; ``spec.shape`` includes the batch dimension."""

    name: str
    spec: TensorSpec


class Engine(Protocol):
    inputs: list[TensorIO]
    outputs: list[TensorIO]
    #: what actually runs, e.g. "onnxruntime (CPUExecutionProvider)", for logs
    description: str

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run one batch; tensors are batched along dim 0."""
        ...


def describe_onnx(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    """Inputs and outputs of an ONNX file, read without loading its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same to the user
        raise ConfigError(f"cannot read ONNX model {str(path)!r}: {exc}") from None
    initializers = {init.name for init in model.graph.initializer}

    def convert(value) -> TensorIO:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _ONNX_TYPES:
            raise ConfigError(f"ONNX tensor {value.name!r} has an unsupported element type {tensor_type.elem_type}")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        return TensorIO(value.name, TensorSpec(_ONNX_TYPES[tensor_type.elem_type], dims, batched=True))

    inputs = [convert(v) for v in model.graph.input if v.name not in initializers]
    outputs = [convert(v) for v in model.graph.output]
    return inputs, outputs


@dataclass(frozen=True)
class NativeModel:
    """A model step that Triton serves with one of its own backends instead of the Python runner."""

    platform: str  # "tensorrt_plan" or "onnxruntime_onnx"
    source: Path  # the file copied into the version folder
    filename: str  # its name there (default_model_filename)
    max_batch: int | None = None  # None: the node's ``max``
    cuda_graphs: bool = False
