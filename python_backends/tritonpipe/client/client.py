"""Calling a served pipeline with ``tritonclient`` over HTTP or gRPC."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import PROTOCOLS
from ..errors import ConfigError, TritonpipeError

#: tritonclient's status per protocol -> one name for both
_STATUS_NAMES = {
    "StatusCode.INVALID_ARGUMENT": "INVALID_ARG", "400": "INVALID_ARG",
    "StatusCode.DEADLINE_EXCEEDED": "TIMEOUT",
    "StatusCode.UNAVAILABLE": "UNAVAILABLE", "503": "UNAVAILABLE",
    "StatusCode.INTERNAL": "INTERNAL", "500": "INTERNAL",
    "StatusCode.NOT_FOUND": "NOT_FOUND", "404": "NOT_FOUND",
}


class InferError(TritonpipeError):
    """A request failed: the server answered with an error, or no answer came in time.

    ``status`` names the failure alike for both protocols: ``INVALID_ARG``, ``INTERNAL``,
    ``UNAVAILABLE``, ``NOT_FOUND``, ``TIMEOUT``, or the name of an unexpected exception.
    """

    def __init__(self, message: str, status: str = "ERROR"):
        super().__init__(message)
        self.status = status


def status_of(exc: BaseException) -> str:
    """The protocol-neutral status of a failed tritonclient call."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        raw = str(exc.status() or "")
        if raw in _STATUS_NAMES:
            return _STATUS_NAMES[raw]
        if "timed out" in str(exc).lower() or "deadline" in str(exc).lower():
            return "TIMEOUT"
        return raw.replace("StatusCode.", "") or "ERROR"
    # the HTTP client's sockets raise TimeoutError or gevent's own Timeout
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return "TIMEOUT"
    if isinstance(exc, ConnectionError):
        return "UNAVAILABLE"
    return type(exc).__name__


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return module


@dataclass
class TensorInfo:
    name: str
    datatype: str
    dims: list[int]


class PipelineClient:
    """A thread-safe client for one model: each thread gets its own connection.

    Close it (``close()``, or use it in a ``with`` block) before the server stops: Triton's
    shutdown waits for open HTTP connections. A connection of another thread closes when that
    thread ends.

    Args:
        url: ``host:port`` of the server's HTTP or gRPC endpoint.
        protocol: ``"grpc"`` or ``"http"``.
        model: the model to call; by default the one entry point among the served models.
        timeout: seconds one request may take; a request that takes longer fails with
            :class:`InferError` status ``TIMEOUT``.
    """

    def __init__(self, url: str, protocol: str = "grpc", model: str | None = None, timeout: float = 60.0):
        self.url, self.protocol, self.timeout = url, protocol, timeout
        self._module = _module(protocol)
        self._local = threading.local()
        try:
            self.model = model or self.entry_model()
            self.inputs, self.outputs = self._io()
        except BaseException:
            self.close()
            raise

    @property
    def connection(self):
        if not hasattr(self._local, "client"):
            if self.protocol == "http":
                self._local.client = self._module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            else:
                self._local.client = self._module.InferenceServerClient(self.url)
        return self._local.client

    def close(self) -> None:
        """Close this thread's connection: Triton's shutdown waits for open HTTP connections."""
        client = getattr(self._local, "client", None)
        if client is not None:
            del self._local.client
            client.close()

    def __enter__(self) -> PipelineClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self) -> dict:
        """gRPC answers protobuf messages unless asked for JSON; HTTP always answers JSON."""
        return {"as_json": True} if self.protocol == "grpc" else {}

    def config(self, name: str) -> dict:
        """A served model's config in Triton's JSON form."""
        if self.protocol == "grpc":
            return self.connection.get_model_config(name, as_json=True)["config"]
        return self.connection.get_model_config(name)

    def served_models(self) -> list[str]:
        """The models the server has ready, by name.

        They come from the repository index; a server that keeps that API to its owner
        (``tritonpipe serve`` does) still names every loaded model in its statistics.
        """
        from tritonclient.utils import InferenceServerException

        try:
            index = self.connection.get_model_repository_index(**self._json())
        except InferenceServerException:
            stats = self.connection.get_inference_statistics(**self._json())
            return sorted({entry["name"] for entry in stats.get("model_stats", [])})
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted({m["name"] for m in models if m.get("state", "READY") == "READY"})

    def entry_model(self) -> str:
        """The model that no ensemble uses as a step: the pipeline's entry point.

        ``InferError`` when the server serves no model, or several pipelines.
        """
        names = self.served_models()
        used: set[str] = set()
        for name in names:
            for step in self.config(name).get("ensemble_scheduling", {}).get("step", []):
                used.add(step["model_name"])
        entries = [n for n in names if n not in used]
        if not entries:
            raise InferError(f"the server at {self.url} serves no model; start it on a model repository", "NOT_FOUND")
        if len(entries) > 1:
            raise InferError(
                f"the server at {self.url} serves {len(entries)} pipelines ({_listing(entries)}); choose one "
                "with --model NAME (model= in Python)", "INVALID_ARG",
            )
        return entries[0]

    def _io(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        from tritonclient.utils import InferenceServerException

        try:
            config = self.config(self.model)
        except InferenceServerException as exc:
            if status_of(exc) != "NOT_FOUND":
                raise
            raise InferError(
                f"the server at {self.url} has no model {self.model!r}; it serves {_listing(self.served_models())}",
                "NOT_FOUND",
            ) from None

        def infos(key: str) -> list[TensorInfo]:
            return [
                TensorInfo(t["name"], t.get("data_type", "TYPE_FP32").replace("TYPE_", ""), [int(d) for d in t.get("dims", [])])
                for t in config.get(key, [])
            ]

        return infos("input"), infos("output")

    def infer(
        self, data: bytes | np.ndarray, input_name: str | None = None, extra: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Send one request and return every output by name.

        ``data`` (an encoded image or an array) goes to the first input, or to ``input_name``;
        ``extra`` holds the arrays of the model's other inputs, by input name.
        """
        tensors = [self._input(input_name or self.inputs[0].name, data)]
        tensors += [self._input(name, value) for name, value in (extra or {}).items()]
        outputs = [self._module.InferRequestedOutput(o.name) for o in self.outputs]
        deadline = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}  # HTTP's is the socket's
        try:
            result = self.connection.infer(self.model, tensors, outputs=outputs, **deadline)
        except Exception as exc:  # tritonclient raises its own exception type per protocol
            raise InferError(str(exc) or type(exc).__name__, status_of(exc)) from None
        return {o.name: result.as_numpy(o.name) for o in self.outputs}

    def infer_file(self, path: str | Path) -> dict[str, np.ndarray]:
        return self.infer(Path(path).read_bytes())

    def _input(self, name: str, data: bytes | np.ndarray):
        """One input of a request, with the request's batch dimension added where ``data`` lacks it."""
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
        dims = next((i.dims for i in self.inputs if i.name == name), None)
        if dims is not None and array.ndim == len(dims):
            array = array[None]
        tensor = self._module.InferInput(name, list(array.shape), _triton_type(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        return tensor


def _triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


def _listing(names: list[str], shown: int = 10) -> str:
    if not names:
        return "no model"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


#: outputs of at most this many values are printed in full
SMALL_OUTPUT = 8


def summarize(outputs: dict[str, np.ndarray], top_k: int = 5) -> list[str]:
    """Readable lines for a response, one per output: its name, dtype and shape, then

    - top-k for the first output when it is one row of class scores (float, ``[1, classes]``);
    - the values of an output of at most ``SMALL_OUTPUT`` values (``inverse_transform``, say);
    - min, max and mean of any other.
    """
    lines = []
    for position, (name, value) in enumerate(outputs.items()):
        line = f"{name}: {value.dtype}{list(value.shape)}"
        if position == 0 and value.dtype.kind == "f" and value.ndim == 2 and value.shape[0] == 1 and value.shape[1] > 1:
            scores = value[0]
            order = np.argsort(-scores)[:top_k]
            line += f"  top-{len(order)}: " + ", ".join(f"{i}={scores[i]:.4f}" for i in order)
        elif value.dtype.kind in "OSU":  # Triton's BYTES
            line += "  values: " + ", ".join(repr(v)[:40] for v in value.reshape(-1)[:SMALL_OUTPUT])
        elif value.size <= SMALL_OUTPUT:
            line += "  values: " + (", ".join(f"{v:.4g}" for v in value.reshape(-1).astype(np.float64)) or "none")
        else:
            stats: Any = value.astype(np.float64)
            line += f"  min={stats.min():.4g} max={stats.max():.4g} mean={stats.mean():.4g}"
        lines.append(line)
    return lines
