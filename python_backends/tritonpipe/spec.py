"""Static tensor descriptions used to check a pipeline before anything is served.

A ``TensorSpec`` describes what one request carries between two steps: its Triton
data type and its per-request shape (``-1`` for a free dimension).  ``batched`` says
whether the shape starts with torchpipe's leading batch dimension of 1 (``1x3xHxW``
tensors) or not (``HxWx3`` mats and raw bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

# Triton data type name -> torch dtype.
TRITON_TO_TORCH = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
TORCH_TO_TRITON = {v: k for k, v in TRITON_TO_TORCH.items()}


class SpecError(ConfigError):
    """A step cannot accept what the previous step produces."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    batched: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_TO_TORCH:
            raise SpecError(f"unknown data type {self.dtype!r}; expected one of {sorted(TRITON_TO_TORCH)}")

    @property
    def triton_dims(self) -> tuple[int, ...]:
        """Per-request dims as written in a config with ``max_batch_size > 0``."""
        return self.shape[1:] if self.batched else self.shape

    def describe(self) -> str:
        dims = "x".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"

    def accepts(self, other: TensorSpec) -> bool:
        """True when a tensor described by ``other`` fits where ``self`` is expected."""
        if self.dtype != other.dtype or len(self.triton_dims) != len(other.triton_dims):
            return False
        return all(a < 0 or b < 0 or a == b for a, b in zip(self.triton_dims, other.triton_dims))


ENCODED_IMAGE = TensorSpec("UINT8", (-1,), batched=False)
