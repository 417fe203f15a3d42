"""ONNX Runtime engine: the CUDA provider where onnxruntime-gpu has it, the CPU provider everywhere.

With the CUDA provider, inputs and outputs are bound to torch CUDA tensors (I/O binding), so they
stay on the GPU.  Output dim 0 is taken to be the batch; outputs with other free dims are left to
ONNX Runtime on the host and copied over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..optional import importable
from ..spec import TRITON_TO_TORCH
from .base import TensorIO, describe_onnx

_NUMPY = {name: torch.empty(0, dtype=dtype).numpy().dtype for name, dtype in TRITON_TO_TORCH.items()}


def available() -> bool:
    return importable("onnxruntime")


def has_cuda() -> bool:
    if not available():
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeEngine:
    def __init__(self, path: Path, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        self.inputs, self.outputs = describe_onnx(path)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and has_cuda():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.on_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.description = f"onnxruntime ({self.session.get_providers()[0]})"
        self.device = device

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on_gpu:
            return self._run_bound(inputs)
        feeds = {io.name: np.ascontiguousarray(t.detach().cpu().numpy()) for io, t in zip(self.inputs, inputs)}
        results = self.session.run([io.name for io in self.outputs], feeds)
        return [torch.from_numpy(np.ascontiguousarray(r)).to(self.device) for r in results]

    def _run_bound(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        index = self.device.index or 0
        feeds = [t.to(self.device, TRITON_TO_TORCH[io.spec.dtype]).contiguous() for io, t in zip(self.inputs, inputs)]
        for io, feed in zip(self.inputs, feeds):
            binding.bind_input(io.name, "cuda", index, _NUMPY[io.spec.dtype], tuple(feed.shape), feed.data_ptr())
        batch = feeds[0].shape[0]
        results: list[torch.Tensor | None] = []
        for io in self.outputs:
            shape = (batch, *io.spec.shape[1:])
            if all(d >= 0 for d in shape[1:]):
                out = torch.empty(shape, dtype=TRITON_TO_TORCH[io.spec.dtype], device=self.device)
                binding.bind_output(io.name, "cuda", index, _NUMPY[io.spec.dtype], shape, out.data_ptr())
                results.append(out)
            else:
                binding.bind_output(io.name, "cpu")
                results.append(None)
        # ONNX Runtime works on its own stream: the inputs must be ready before it starts
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [r if r is not None else torch.from_numpy(np.ascontiguousarray(v.numpy())).to(self.device) for r, v in zip(results, values)]


def describe(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    return describe_onnx(path)
