"""``pipe(config)``: torchpipe's Python API, backed by a real Triton server.

    models = pipe({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 224, "resize_w": 224})
    item = {"data": open("cat.jpg", "rb").read()}
    models(item)             # item["result"] now holds the output tensor

``data`` is encoded bytes, or a torch tensor (CPU or GPU), a numpy array, or a list of them
(their rows make one request); a model's other inputs are read from the item under their
names.  Results are torch tensors on the device ``data`` came from.

A list of ``(name, stage, config)`` entries builds a pipeline of Python objects, each entry a node
linked to the next (see :func:`tritonpipe.load_graph`); ``run`` sends many inputs at once::

    pipeline = pipe([("preprocess", preprocess, {"worker_num": 4}), ("inference", model, {"inputs": "input:FP32:3x224x224"})])
    outputs = pipeline.run([open(p, "rb").read() for p in paths])   # or pipeline([...])

Without ``url`` the configuration is generated into a temporary repository and served by a
server that lives as long as the ``pipe`` object (or its ``with`` block). With ``url`` an
already running server is called.  Calls are safe from many threads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline.graph import load_graph
from ..repository.generate import generate_repository
from ..server.owner import TritonServer
from ..stages.base import DATA, RESULT
from .client import InferError, PipelineClient, TensorInfo


class pipe:  # noqa: N801 - torchpipe's spelling
    def __init__(
        self,
        config: dict[str, Any] | list | str | Path | None = None,
        *,
        url: str | None = None,
        protocol: str = "grpc",
        model: str | None = None,
        device: str = "auto",
        plugins: tuple[str | Path, ...] = (),
    ):
        self.server: TritonServer | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        if url is None:
            if config is None:
                raise ValueError("pipe() needs a configuration, or url= of a running server")
            graph = load_graph(config, plugins=list(plugins))
            self._tmp = tempfile.TemporaryDirectory(prefix="tritonpipe-repo-")
            repository = generate_repository(graph, Path(self._tmp.name) / "repository", device=device)
            self.server = TritonServer(repository.path)
            try:
                self.server.start()
            except BaseException:
                self.close()
                raise
            url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
            model = model or repository.entry
        self.client = PipelineClient(url, protocol=protocol, model=model)

    def __call__(self, inputs: dict[str, Any] | list[Any]) -> list[torch.Tensor] | None:
        """Run one dict (or a list of dicts, concurrently); results are written back into them.

        A list of anything else is :meth:`run`: its results are returned.
        """
        if isinstance(inputs, list):
            if not all(isinstance(item, dict) for item in inputs):
                return self.run(inputs)
            with ThreadPoolExecutor(max_workers=_in_flight(inputs)) as pool:
                list(pool.map(self, inputs))
            return None
        first, *named = self.client.inputs
        missing = [info.name for info in named if info.name not in inputs]
        if missing:
            raise InferError(
                f"the model also takes {', '.join(map(repr, missing))}; put each in the dict under its name",
                "INVALID_ARG",
            )
        data = inputs[DATA]
        outputs = self.client.infer(
            request_array(data, first), extra={info.name: request_array(inputs[info.name], info) for info in named}
        )
        device = _device_of(data)
        primary, *extras = self.client.outputs
        inputs[RESULT] = _tensor(outputs[primary.name], device)
        for extra in extras:
            inputs[extra.name.lower()] = _tensor(outputs[extra.name], device)

    def run(self, samples: Iterable[Any]) -> list[torch.Tensor]:
        """The result of each sample, in input order; many are in flight at once, so every stage works.

        A sample is what ``data`` may be: bytes, a tensor or an array.  When samples fail, the others
        still finish, then the first failure is raised with its index.
        """
        items = [{DATA: sample} for sample in samples]
        failures: dict[int, InferError] = {}

        def send(index: int) -> None:
            try:
                self(items[index])
            except InferError as exc:
                failures[index] = exc

        with ThreadPoolExecutor(max_workers=_in_flight(items)) as pool:
            list(pool.map(send, range(len(items))))
        if failures:
            first = min(failures)
            more = f" ({len(failures) - 1} more of {len(items)} failed)" if len(failures) > 1 else ""
            raise InferError(f"input {first}: {failures[first]}{more}", failures[first].status)
        return [item[RESULT] for item in items]

    def close(self) -> None:
        client = getattr(self, "client", None)  # absent when __init__ failed
        if client is not None:
            client.close()  # first: the server's shutdown waits for open HTTP connections
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> pipe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _in_flight(inputs: list) -> int:
    """Requests sent at once: enough to keep dozens of instances busy, without a thread per input."""
    return min(32, max(1, len(inputs)))


def request_array(value: Any, info: TensorInfo) -> bytes | np.ndarray:
    """One input of a request: bytes as they are, tensors and arrays as numpy, a list as its rows together."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value):
            raise InferError(f"input {info.name!r}: a list must hold tensors or arrays, got {value!r:.80}", "INVALID_ARG")
        # each element is one request's rows; those without the batch dimension are one row
        rows = [part if part.ndim > len(info.dims) else part[None] for part in map(_host_array, value)]
        return np.concatenate(rows)
    return _host_array(value)


def _host_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # responses arrive in read-only buffers; the caller owns its result and may write to it
    return torch.from_numpy(np.require(array, requirements=("C", "W"))).to(device)


def _device_of(data: Any) -> torch.device:
    """Where results go back: the device of ``data``, or of the first tensor of a list; else the CPU."""
    first = data[0] if isinstance(data, (list, tuple)) and data else data
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
