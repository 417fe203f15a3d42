"""ONNX Runtime engine: the CUDA provider where onnxruntime-gpu has it, the CPU provider everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import TensorIO, describe_onnx


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxRuntimeEngine:
    def __init__(self, path: Path, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        self.inputs, self.outputs = describe_onnx(path)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.description = f"onnxruntime ({self.session.get_providers()[0]})"
        self.device = device

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {io.name: np.ascontiguousarray(t.detach().cpu().numpy()) for io, t in zip(self.inputs, inputs)}
        results = self.session.run([io.name for io in self.outputs], feeds)
        return [torch.from_numpy(np.ascontiguousarray(r)).to(self.device) for r in results]


def describe(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    return describe_onnx(path)
