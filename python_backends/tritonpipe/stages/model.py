"""The model stage ``TensorrtTensor``: one interface over the TensorRT, ONNX Runtime and torch engines.

``engine=auto`` picks TensorRT for ONNX files and plans when it is importable and the instance has
a GPU, torch for TorchScript/``torch.export`` files, and ONNX Runtime for ONNX files otherwise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from ..choices import ENGINES, PRECISIONS
from ..engines import onnxruntime_engine, tensorrt_engine, torch_engine
from ..engines.base import NativeModel, TensorIO, describe_onnx
from ..engines.postprocess import lookup_postprocessor
from ..engines.profiles import largest_batch, resolve_profiles
from ..errors import ConfigError, RequestError
from ..spec import TRITON_TO_TORCH, SpecError, TensorSpec
from .base import DATA, RESULT, Param, Role, Stage, register

log = logging.getLogger(__name__)

#: which model files each engine runs
ENGINE_KINDS = {"tensorrt": ("onnx", "plan"), "onnxruntime": ("onnx",), "torch": ("torch",)}
_SUFFIXES = {".onnx": "onnx", **{s: "plan" for s in tensorrt_engine.PLAN_SUFFIXES}, **{s: "torch" for s in torch_engine.TORCH_SUFFIXES}}
_PYTHON_ONLY = ("mean", "std", "postprocessor")


def parse_channels(name: str, text: str) -> tuple[float, ...] | None:
    """``"123.675,116.28,103.53"`` -> floats; ``""`` -> None."""
    text = str(text).strip()
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None


def model_kind(path: Path) -> str:
    """``"onnx"``, ``"plan"`` or ``"torch"``, from the file's suffix."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ConfigError(
            f"model {path.name!r}: unknown file type; use .onnx, a TensorRT plan ({', '.join(tensorrt_engine.PLAN_SUFFIXES)}), "
            f"TorchScript ({', '.join(torch_engine.TORCHSCRIPT_SUFFIXES)}) or torch.export (.pt2)"
        ) from None


def describe_model(path: Path, params: dict[str, Any]) -> tuple[list[TensorIO], list[TensorIO]]:
    """The model file's own inputs and outputs (before any postprocessor)."""
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    kind = model_kind(path)
    if kind == "plan":  # described by its sidecar file, which may change on its own
        inputs, outputs, _ = tensorrt_engine.describe_plan(path)
        return inputs, outputs
    if kind != "onnx":  # the torch engine keeps its own cache of what each file version holds
        return torch_engine.describe_torch(path, params.get("inputs", ""), params.get("outputs", ""))
    stat = path.stat()
    inputs, outputs = _describe_onnx_file(str(path), stat.st_mtime_ns, stat.st_size)
    return list(inputs), list(outputs)


@functools.lru_cache(maxsize=64)
def _describe_onnx_file(name: str, mtime_ns: int, size: int) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]:
    """Planning asks for a model's tensors several times; the file is opened once per version of it."""
    inputs, outputs = describe_onnx(Path(name))
    return tuple(inputs), tuple(outputs)


def pick_engine(kind: str, requested: str, *, tensorrt: bool, cuda: bool, onnxruntime: bool) -> tuple[str, str]:
    """(engine, why) for a model file of ``kind``; ``ConfigError`` saying what to install or choose."""
    if requested != "auto":
        if kind not in ENGINE_KINDS[requested]:
            fits = [e for e, kinds in ENGINE_KINDS.items() if kind in kinds]
            raise ConfigError(f"engine={requested} cannot run a {kind} file; choose engine={' or engine='.join(fits)}")
        if requested == "tensorrt" and not tensorrt:
            raise ConfigError(f"engine=tensorrt: {tensorrt_engine.INSTALL_HINT}")
        if requested == "tensorrt" and not cuda:
            raise ConfigError("engine=tensorrt needs a GPU instance; this one runs on the CPU (use engine=onnxruntime)")
        if requested == "onnxruntime" and not onnxruntime:
            raise ConfigError("engine=onnxruntime: pip install onnxruntime (or onnxruntime-gpu for the CUDA provider)")
        return requested, "it was asked for"
    if kind == "torch":
        return "torch", "the model is a torch file"
    if tensorrt and cuda:
        return "tensorrt", "TensorRT is importable and the instance has a GPU"
    if kind == "plan":
        need = "a GPU instance" if tensorrt else tensorrt_engine.INSTALL_HINT
        raise ConfigError(f"a TensorRT plan runs only on TensorRT: {need}")
    if onnxruntime:
        return "onnxruntime", "TensorRT is not importable" if not tensorrt else "the instance has no GPU"
    raise ConfigError(f"no engine can run this ONNX model here: pip install onnxruntime, or {tensorrt_engine.INSTALL_HINT}")


def _joined(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.cat(parts)`` on ``device``; where the parts lie one after another in one tensor's memory there
    (a batch resized in one launch), a view of it, nothing copied."""
    first = parts[0]
    if len(parts) == 1 and first.device == device:
        return first
    base, tail, offset = first._base, first.shape[1:], first.storage_offset()
    if base is not None and base.device == device:
        for part in parts:
            if (part._base is not base or part.storage_offset() != offset or not part.is_contiguous()
                    or part.dtype != first.dtype or part.shape[1:] != tail):
                break
            offset += part.numel()
        else:
            rows = sum(part.shape[0] for part in parts)
            return base.as_strided((rows, *tail), first.stride(), first.storage_offset())
    return torch.cat([p.to(device) for p in parts])


def _mismatch_hint(wanted: TensorSpec, given: TensorSpec) -> str:
    """What to change when the stage before the model gives the wrong kind of tensor."""
    if given.dtype == "UINT8" and len(given.shape) == 1:
        return (
            "; encoded images need a decoder and preprocessing before the model, e.g. "
            "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]; for tensor requests put the model first"
        )
    if wanted.dtype != given.dtype:
        return f"; add a stage that gives {wanted.dtype} before the model (ResizeTensor and ResizePadTensor give FP32)"
    return "; resize or reshape before the model to match its input"


def _freezes(setting: str, device: torch.device) -> bool:
    """``freeze`` for a model on ``device``: true, false, or auto (on a GPU only)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def _beside_model(params: dict[str, Any], key: str) -> Path | None:
    """A path parameter; relative paths are taken from the model file's folder."""
    text = str(params[key]).strip()
    if not text:
        return None
    path = Path(text)
    return path if path.is_absolute() else Path(params["model"]).parent / path


def build_settings(params: dict[str, Any], inputs: list[TensorIO]) -> tensorrt_engine.BuildSettings:
    calibrate_input, calibrate_cache = _beside_model(params, "calibrate_input"), _beside_model(params, "calibrate_cache")
    return tensorrt_engine.BuildSettings(
        profiles=tuple(resolve_profiles(params["min"], params["max"], inputs, need_static=True)),
        precision=params["precision"],
        layer_precisions=tensorrt_engine.parse_layer_precisions(params["precision::fp32"], params["precision::fp16"]),
        calibrate_input=str(calibrate_input or ""),
        calibrate_cache=str(calibrate_cache or ""),
    )


@register("TensorrtTensor")
class TensorrtTensor(Stage):
    """Runs a model file on a batch of tensors: TensorRT where present, else ONNX Runtime or torch.

    Requests are concatenated along dim 0, run as one batch, and split back per request.
    The first input is fed from ``data``, other inputs from the item key of their name; the first
    output becomes ``result`` and other outputs are written to the item under their own names.
    """

    role = Role.MODEL
    wants_gpu = True
    params = {
        "model": Param(str, doc="model file: .onnx, a TensorRT plan (.plan/.trt/.engine), TorchScript (.ts/.pt) or torch.export (.pt2)", file=True),
        "engine": Param(str, "auto", choices=ENGINES, doc="which engine runs the model"),
        "max": Param(str, "1", doc="largest batch (4) or shapes (4x3x224x224, one per input with ',', one per profile with ';')"),
        "min": Param(str, "1", doc="smallest batch or shapes, like max"),
        "precision": Param(str, "fp16", choices=PRECISIONS, doc="TensorRT/torch precision; falls back to what the GPU supports"),
        "precision::fp32": Param(str, "", doc="comma-separated layer names TensorRT keeps in FP32"),
        "precision::fp16": Param(str, "", doc="comma-separated layer names TensorRT runs in FP16"),
        "model::cache": Param(str, "", doc="plan file to build once and reuse (rebuilt when the model, GPU, TensorRT or settings change)"),
        "calibrate_input": Param(str, "", doc="INT8 calibration data: a .pt file or a folder of them"),
        "calibrate_cache": Param(str, "", doc="INT8 calibration cache file, read if present and written after calibrating"),
        "postprocessor": Param(str, "", doc="none, cpu, SoftmaxCpu, SoftmaxMax, or a registered name"),
        "cuda_graph": Param(bool, True, doc="torch engine: replay CUDA graphs when shapes are static"),
        "freeze": Param(str, "auto", choices=("auto", "true", "false"), doc=(
            "torch engine only: freeze a TorchScript model (BatchNorm folded into the convolutions; on a GPU "
            "conv+add+relu fused too); one that cannot be frozen runs as it is, with a warning; auto: on a GPU only "
            "(on an H100, ResNet-18 FP16 took 0.30 instead of 0.40 ms of GPU time at batch 1, and served p50 at "
            "concurrency 1 fell 0.09 ms with the same throughput at 128 and 256)"
        )),
        "channels_last": Param(bool, True, doc=(
            "torch engine only: on a GPU, run a model with convolutions and its 4-D floating inputs in channels_last "
            "memory format (served on an H100, 1.02-1.12x the default layout; the CPU ignores it); a model that fails "
            "in it runs in the default layout, with a warning"
        )),
        "inputs": Param(str, "", doc="torch engine: inputs as name:TYPE:DIMS (per request), e.g. x:FP32:3x224x224"),
        "outputs": Param(str, "", doc="torch engine: outputs as name:TYPE:DIMS, when the file cannot describe them"),
        "mean": Param(str, "", doc="per-channel mean subtracted before the model, e.g. 123.675,116.28,103.53"),
        "std": Param(str, "", doc="per-channel std the input is divided by, e.g. 58.395,57.12,57.375"),
        "threads": Param(int, 0, low=0, high=1024, doc="CPU threads for ONNX Runtime; 0 lets it choose"),
    }

    @classmethod
    def io(cls, params: dict[str, Any]) -> tuple[list[TensorIO], list[TensorIO]]:
        """Inputs and outputs as served: the model's, with the postprocessor's changes."""
        inputs, outputs = describe_model(Path(params["model"]), params)
        post = lookup_postprocessor(params["postprocessor"])
        return inputs, (post.specs(outputs) if post else outputs)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        inputs, outputs = cls.io(params)
        # shape mistakes surface before serving; a TensorRT build from ONNX needs every dim known
        building = params["engine"] == "tensorrt" and model_kind(Path(params["model"])) == "onnx"
        resolve_profiles(params["min"], params["max"], inputs, need_static=building)
        tensorrt_engine.parse_layer_precisions(params["precision::fp32"], params["precision::fp16"])
        first = inputs[0].spec
        if not first.accepts(spec):
            raise SpecError(
                f"model input {inputs[0].name!r} expects {first.describe()}, but receives {spec.describe()}"
                f"{_mismatch_hint(first, spec)}"
            )
        return outputs[0].spec

    @classmethod
    def entry_spec(cls, params: dict[str, Any]) -> TensorSpec:
        """First in a pipeline, the model's first input comes straight from the request."""
        return cls.io(params)[0][0].spec

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        _, outputs = cls.io(params)
        return {io.name: io.spec for io in outputs[1:]}

    @classmethod
    def native_model(cls, params: dict[str, Any], native: Collection[str]) -> NativeModel | None:
        """How Triton serves this model with its own backend, when ``native`` allows; else None.

        A plan (or ``engine=tensorrt``) becomes ``tensorrt_plan``; an ONNX file otherwise
        ``onnxruntime_onnx``; torch files always stay on the Python runner.
        """
        path = Path(params["model"])
        kind = model_kind(path)
        if kind == "torch":
            return None
        engine = "tensorrt" if kind == "plan" or params["engine"] == "tensorrt" else "onnxruntime"
        if engine not in native:
            return None
        python_only = [k for k in _PYTHON_ONLY if str(params[k]).strip().lower() not in ("", "none")]
        if python_only:
            raise ConfigError(
                f"{', '.join(python_only)} run in Python and cannot be part of a native {engine} model; "
                f"fold them into the model or drop --native {engine}"
            )
        if engine == "onnxruntime":
            return NativeModel("onnxruntime_onnx", path, "model.onnx")
        plan = path if kind == "plan" else _beside_model(params, "model::cache")
        if plan is None or not plan.is_file():
            raise ConfigError(
                f"--native tensorrt needs a TensorRT plan but {path.name} is ONNX; build one first "
                f"(tritonpipe build-engine {path.name} -o model.plan --max ... ) and set model=model.plan, "
                "or drop --native tensorrt"
            )
        inputs, _, profiles = tensorrt_engine.describe_plan(plan)
        static = all(d >= 0 for io in inputs for d in io.spec.shape[1:])
        max_batch = max(p.max_batch for p in profiles)
        return NativeModel("tensorrt_plan", plan, "model.plan", max_batch, cuda_graphs=params["cuda_graph"] and static)

    def init(self, params: dict[str, Any]) -> None:
        path = Path(params["model"])
        kind = model_kind(path)
        engine, why = pick_engine(
            kind,
            params["engine"],
            tensorrt=tensorrt_engine.available(),
            cuda=self.device.type == "cuda",
            onnxruntime=onnxruntime_engine.available(),
        )
        log.info("TensorrtTensor: %s runs on %s because %s", path.name, engine, why)
        if engine == "tensorrt":
            settings = build_settings(params, describe_onnx(path)[0]) if kind == "onnx" else None
            data = tensorrt_engine.plan_bytes(path, settings, self.device, _beside_model(params, "model::cache"))
            self.engine = tensorrt_engine.TensorRTEngine(data, self.device)
        elif engine == "onnxruntime":
            self.engine = onnxruntime_engine.OnnxRuntimeEngine(path, self.device, params["threads"])
        else:
            self.engine = torch_engine.TorchEngine(
                path, self.device, params["inputs"], params["outputs"], params["precision"], params["cuda_graph"],
                freeze=_freezes(params["freeze"], self.device), channels_last=params["channels_last"],
            )
        log.info("TensorrtTensor runs %s with %s", path.name, self.engine.description)
        self.post = lookup_postprocessor(params["postprocessor"])
        self.output_ios = self.post.specs(self.engine.outputs) if self.post else self.engine.outputs
        self.mean_values, self.std_values = parse_channels("mean", params["mean"]), parse_channels("std", params["std"])
        self.mean = None if self.mean_values is None else torch.tensor(self.mean_values, device=self.device).view(1, -1, 1, 1)
        self.std = None if self.std_values is None else torch.tensor(self.std_values, device=self.device).view(1, -1, 1, 1)
        self._max = largest_batch(params["max"])

    def max(self) -> int:
        return self._max

    def hand_over_input(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, torch.dtype] | None:
        """For a stage just before this one that can do it on its way (``ResizeTensor``'s one launch): the
        per-channel mean and std, and the dtype the engine is fed; this stage then leaves them to it.  None
        where the model takes more than one input or a non-floating one."""
        if len(self.engine.inputs) != 1:
            return None
        declared = TRITON_TO_TORCH[self.engine.inputs[0].spec.dtype]
        if not declared.is_floating_point:
            return None
        compute = getattr(self.engine, "compute", None)  # the torch engine feeds floating inputs at its precision
        handed = (self.mean_values, self.std_values, compute or declared)
        self.mean = self.std = None
        return handed

    def forward(self, batch: list[dict[str, Any]]) -> None:
        columns = []
        for index, io in enumerate(self.engine.inputs):
            key = DATA if index == 0 else io.name
            try:
                parts = [item[key] for item in batch]
            except KeyError:
                raise RequestError(f"model input {io.name!r} is missing from the request") from None
            columns.append(_joined(parts, self.device))
        if self.mean is not None:
            columns[0] = columns[0] - self.mean
        if self.std is not None:
            columns[0] = columns[0] / self.std
        sizes = [item[DATA].shape[0] for item in batch]
        results = self.engine.run(columns)
        if self.post is not None:
            results = self.post.run(results)
        if len(results) != len(self.output_ios):
            raise RuntimeError(f"the model gave {len(results)} outputs, {len(self.output_ios)} expected")
        for out_index, (io, tensor) in enumerate(zip(self.output_ios, results)):
            for item, part in zip(batch, tensor.split(sizes)):
                item[RESULT if out_index == 0 else io.name] = part
