"""``Function``: a user's Python function as a stage, called once per request.

The function is looked up by name in its file, which the generator copies into the model's folder
as it copies plugin files; the server imports that copy, so it runs what the generator checked.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engines.torch_engine import parse_io
from ..errors import ConfigError, InternalError, RequestError
from ..spec import ENCODED_IMAGE, TORCH_TO_TRITON, TRITON_TO_TORCH, SpecError, TensorSpec
from .base import MapStage, Param, register

#: what the function is handed: the request's bytes, or each row of a tensor
MODES = ("bytes", "tensor")
#: free dimensions of a sample tensor for the dry run that finds the output's description
_SAMPLE_SIDE = 64


def load_function(path: str | Path, name: str):
    """The plain function ``name`` of the file at ``path``, imported as the server imports it."""
    from . import load_plugin

    module = load_plugin(path)
    function = getattr(module, name, None)
    if not inspect.isfunction(function):
        found = "nothing" if function is None else type(function).__name__
        raise ConfigError(f"{Path(path).name} defines no function {name!r} at its top level (found {found})")
    return function


def _tensor_spec(text: str, what: str) -> TensorSpec:
    """``"FP32:3x224x224"`` -> a batched description of one request's rows."""
    return parse_io(what, f"data:{text}")[0].spec


def _as_tensor(value: Any, label: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor) or value.dtype not in TORCH_TO_TRITON:
        kind = f"a tensor of {value.dtype}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise InternalError(f"{label} returned {kind}; return a torch tensor or numpy array of {', '.join(TRITON_TO_TORCH)}")
    return value


@functools.lru_cache(maxsize=64)
def _dry_run(path: str, mtime_ns: int, name: str, mode: str, spec: TensorSpec) -> TensorSpec:
    """The output description, from one call of the function on a sample of ``spec``."""
    function = load_function(path, name)
    if mode == "bytes":
        from ..examples import sample_jpeg

        sample: Any = sample_jpeg(480, 640, seed=0)
    else:
        shape = [d if d > 0 else _SAMPLE_SIDE for d in spec.triton_dims]
        sample = torch.zeros(shape, dtype=TRITON_TO_TORCH[spec.dtype])
    label = f"function {name} ({Path(path).name})"
    try:
        result = _as_tensor(function(sample), label)
    except Exception as exc:  # noqa: BLE001 - user code: say what failed and how to avoid the dry run
        given = "a sample JPEG" if mode == "bytes" else f"a sample {spec.dtype} tensor of {'x'.join(map(str, shape))}"
        raise ConfigError(
            f"{label} raised on {given}, called once to find its output: {type(exc).__name__}: {exc}; "
            "describe its result instead, e.g. output = \"FP32:3x224x224\""
        ) from None
    return TensorSpec(TORCH_TO_TRITON[result.dtype], (-1, *result.shape), batched=True)


@register("Function")
class Function(MapStage):
    """Calls a Python function on each request: bytes or a tensor in, a tensor or array out.

    With ``input=bytes`` the function gets the request's bytes; with ``input=tensor`` (or a
    ``TYPE:DIMS`` description) each row of the request, without the batch dimension, and the
    results are stacked.  An exception fails only its own request.
    """

    input_doc = "encoded bytes (input=bytes) or a tensor with a leading batch dim"
    output_doc = "the function's result, one row per request row"
    params = {
        "function_file": Param(str, doc="the .py file that defines the function; copied into the model folder", file=True),
        "function": Param(str, doc="name of the function in function_file; it takes one item and returns one"),
        "input": Param(
            str, "bytes",
            doc="bytes: the request's bytes; tensor: each row of the tensor it is fed; TYPE:DIMS (FP32:3x224x224): "
            "first in a pipeline, the tensor each request row carries",
        ),
        "output": Param(
            str, "", doc="TYPE:DIMS of the result per row, -1 for a free dim; empty: found by calling it once on a sample",
        ),
    }

    @classmethod
    def _mode(cls, params: dict[str, Any]) -> str:
        text = str(params["input"]).strip().lower()
        if text in MODES:
            return text
        _tensor_spec(params["input"], "Function input")
        return "tensor"

    @classmethod
    def entry_spec(cls, params: dict[str, Any]) -> TensorSpec:
        text = str(params["input"]).strip().lower()
        if text == "bytes":
            return ENCODED_IMAGE
        if text == "tensor":
            raise ConfigError(
                "Function first in a pipeline takes tensors only with their description: "
                "input = \"FP32:3x224x224\" (per request row), or input = bytes"
            )
        return _tensor_spec(params["input"], "Function input")

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        mode = cls._mode(params)
        if mode == "bytes" and spec != ENCODED_IMAGE:
            raise SpecError(f"Function {params['function']} takes bytes (input=bytes) but receives {spec.describe()}; set input = tensor")
        if mode == "tensor" and spec != ENCODED_IMAGE and not spec.batched:
            raise SpecError(
                f"Function {params['function']} takes tensor rows but receives {spec.describe()}, which has no batch "
                "dimension; put Mat2Tensor before it"
            )
        if params["output"]:
            return _tensor_spec(params["output"], "Function output")
        path = Path(params["function_file"])
        if not path.is_file():
            raise ConfigError(f"function_file {str(path)!r} does not exist")
        return _dry_run(str(path), path.stat().st_mtime_ns, params["function"], mode, spec)

    def init(self, params: dict[str, Any]) -> None:
        self.function = load_function(params["function_file"], params["function"])
        self.takes_bytes = self._mode(params) == "bytes"
        self.label = f"function {params['function']}"

    def apply(self, data: Any, item: dict[str, Any]) -> torch.Tensor:
        if self.takes_bytes:
            return self._call(data.cpu().numpy().tobytes())[None]
        return torch.stack([self._call(row) for row in data])

    def _call(self, value: Any) -> torch.Tensor:
        try:
            result = self.function(value)
        except RequestError:  # the function's own verdict on a bad request
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure of user code is the function's
            raise InternalError(f"{self.label} raised {type(exc).__name__}: {exc}") from exc
        return _as_tensor(result, self.label).to(self.device)
