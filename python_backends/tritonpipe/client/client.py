"""Calling a served pipeline with ``tritonclient`` over HTTP or gRPC."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TritonpipeError

PROTOCOLS = ("grpc", "http")


class InferError(TritonpipeError):
    """The server answered a request with an error."""


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


@dataclass
class TensorInfo:
    name: str
    datatype: str
    dims: list[int]


class PipelineClient:
    """A thread-safe client for one model: each thread gets its own connection.

    Args:
        url: ``host:port`` of the server's HTTP or gRPC endpoint.
        protocol: ``"grpc"`` or ``"http"``.
        model: the model to call; by default the one entry point of the repository.
    """

    def __init__(self, url: str, protocol: str = "grpc", model: str | None = None, timeout: float = 60.0):
        self.url, self.protocol, self.timeout = url, protocol, timeout
        self._module = _module(protocol)
        self._local = threading.local()
        self.model = model or self.entry_model()
        self.inputs, self.outputs = self._io()

    @property
    def connection(self):
        if not hasattr(self._local, "client"):
            if self.protocol == "http":
                self._local.client = self._module.InferenceServerClient(self.url, network_timeout=self.timeout)
            else:
                self._local.client = self._module.InferenceServerClient(self.url)
        return self._local.client

    def _config(self, name: str) -> dict:
        if self.protocol == "grpc":
            return self.connection.get_model_config(name, as_json=True)["config"]
        return self.connection.get_model_config(name)

    def entry_model(self) -> str:
        """The model that no ensemble uses as a step: the pipeline's entry point."""
        index = self.connection.get_model_repository_index(**({"as_json": True} if self.protocol == "grpc" else {}))
        models = index["models"] if isinstance(index, dict) else index
        names = [m["name"] for m in models if m.get("state", "READY") == "READY"]
        used: set[str] = set()
        for name in names:
            for step in self._config(name).get("ensemble_scheduling", {}).get("step", []):
                used.add(step.get("model_name", step.get("modelName", "")))
        entries = [n for n in names if n not in used]
        if len(entries) != 1:
            raise InferError(f"cannot tell which model to call (candidates: {', '.join(entries) or 'none'}); pass model=")
        return entries[0]

    def _io(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        config = self._config(self.model)

        def infos(key: str) -> list[TensorInfo]:
            return [
                TensorInfo(t["name"], t.get("data_type", "TYPE_FP32").replace("TYPE_", ""), [int(d) for d in t.get("dims", [])])
                for t in config.get(key, [])
            ]

        return infos("input"), infos("output")

    def infer(self, data: bytes | np.ndarray, input_name: str | None = None) -> dict[str, np.ndarray]:
        """Send one request (an encoded image or an array) and return every output by name."""
        name = input_name or self.inputs[0].name
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
        if array.ndim == len(self.inputs[0].dims):
            array = array[None]  # the request's batch dimension
        tensor = self._module.InferInput(name, list(array.shape), _triton_type(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        outputs = [self._module.InferRequestedOutput(o.name) for o in self.outputs]
        try:
            result = self.connection.infer(self.model, [tensor], outputs=outputs)
        except Exception as exc:  # tritonclient raises its own exception type per protocol
            raise InferError(str(exc)) from None
        return {o.name: result.as_numpy(o.name) for o in self.outputs}

    def infer_file(self, path: str | Path) -> dict[str, np.ndarray]:
        return self.infer(Path(path).read_bytes())


def _triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


def summarize(outputs: dict[str, np.ndarray], top_k: int = 5) -> list[str]:
    """Readable lines for a response: shape and dtype, and top-k for classifier-like outputs."""
    lines = []
    for name, value in outputs.items():
        line = f"{name}: {value.dtype}{list(value.shape)}"
        flat = value.reshape(value.shape[0], -1) if value.ndim >= 2 else value.reshape(1, -1)
        if value.dtype.kind == "f" and value.ndim == 2 and value.shape[1] > 1:
            order = np.argsort(-flat[0])[:top_k]
            line += f"  top-{len(order)}: " + ", ".join(f"{i}={flat[0, i]:.4f}" for i in order)
        else:
            stats: Any = flat.astype(np.float64)
            line += f"  min={stats.min():.4g} max={stats.max():.4g} mean={stats.mean():.4g}"
        lines.append(line)
    return lines
