"""Stages that save tensors to disk or load them from it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .base import MapStage, Param, register


@register("SaveTensor")
class SaveTensor(MapStage):
    """Writes each input to a new uniquely named ``.pt`` file in ``save_dir``; passes it on unchanged.

    File names are generated here, never taken from a request, so files land only inside ``save_dir``.
    """

    input_doc = "tensor"
    output_doc = "the input, unchanged; `saved_path` set"

    params = {"save_dir": Param(str, doc="an existing folder")}

    def init(self, params: dict[str, Any]) -> None:
        self.save_dir = Path(params["save_dir"]).resolve()
        if not self.save_dir.is_dir():
            raise ConfigError(f"SaveTensor: save_dir {str(self.save_dir)!r} does not exist; create it first")

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        path = self.save_dir / f"{uuid.uuid4().hex}.pt"
        torch.save(data.detach().cpu() if isinstance(data, torch.Tensor) else data, path)
        item["saved_path"] = str(path)
        return data


@register("LoadTensor")
class LoadTensor(MapStage):
    """Answers every request with the tensor stored in ``tensor_name`` (loaded once, tensors only)."""

    input_doc = "ignored"
    output_doc = "the stored tensor"

    params = {"tensor_name": Param(str, doc="path of a .pt file holding one tensor", file=True)}

    def init(self, params: dict[str, Any]) -> None:
        path = Path(params["tensor_name"])
        if not path.is_file():
            raise ConfigError(f"LoadTensor: tensor_name {str(path)!r} is not a file")
        # weights_only refuses arbitrary pickled objects, so a crafted file cannot run code
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - refused pickles and broken files alike
            raise ConfigError(f"LoadTensor: cannot load {str(path)!r} as plain tensors: {exc}") from None
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"LoadTensor: {str(path)!r} holds a {type(value).__name__}, not a tensor")
        self.value = value.to(self.device)

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return self.value

    @classmethod
    def infer(cls, params: dict[str, Any], spec):
        from ..spec import TORCH_TO_TRITON, TensorSpec

        value = torch.load(params["tensor_name"], map_location="cpu", weights_only=True)
        return TensorSpec(TORCH_TO_TRITON[value.dtype], tuple(value.shape), batched=value.dim() == 4)
