"""``pipe(config)``: torchpipe's Python API, backed by a real Triton server.

    models = pipe({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 224, "resize_w": 224})
    item = {"data": open("cat.jpg", "rb").read()}
    models(item)             # item["result"] now holds the output tensor

Without ``url`` the configuration is generated into a temporary repository and served by a
server that lives as long as the ``pipe`` object (or its ``with`` block). With ``url`` an
already running server is called.  Calls are safe from many threads.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline.graph import load_graph
from ..repository.generate import generate_repository
from ..server.owner import TritonServer
from .client import PipelineClient


class pipe:  # noqa: N801 - torchpipe's spelling
    def __init__(
        self,
        config: dict[str, Any] | str | Path | None = None,
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

    def __call__(self, inputs: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Run one dict (or a list of dicts, concurrently); results are written back into them."""
        if isinstance(inputs, list):
            with ThreadPoolExecutor(max_workers=min(32, max(1, len(inputs)))) as pool:
                list(pool.map(self, inputs))
            return
        data = inputs["data"]
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        outputs = self.client.infer(data)
        primary, *extras = self.client.outputs
        inputs["result"] = torch.from_numpy(np.ascontiguousarray(outputs[primary.name]))
        for extra in extras:
            inputs[extra.name.lower()] = torch.from_numpy(np.ascontiguousarray(outputs[extra.name]))

    def close(self) -> None:
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
