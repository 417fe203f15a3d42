"""TensorRT engine: build a plan from ONNX (profiles, precision, progress), cache it, run it on torch tensors.

Written against the TensorRT 10 Python API; ``tensorrt`` is imported only when needed, so the rest
of tritonpipe works where it is not installed.  Inputs and outputs are torch CUDA tensors whose
addresses are handed to ``execute_async_v3`` on the current torch stream: nothing goes through
the host.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..choices import PRECISIONS
from ..errors import ConfigError, RequestError
from ..optional import importable, why_missing
from ..spec import TRITON_TO_TORCH, TensorSpec
from . import cache
from .base import TensorIO, describe_onnx
from .profiles import Profile, fmt, pick_profile

log = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed here; use the NGC tritonserver container or pip install tensorrt on a host with CUDA"
PLAN_SUFFIXES = (".plan", ".trt", ".engine")
# trt.DataType member names -> Triton type names
_TRT_TYPES = {"FLOAT": "FP32", "HALF": "FP16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "UINT8": "UINT8"}


def import_tensorrt() -> Any:
    missing = why_missing("tensorrt")  # the PyPI stubs fail with errors of their own
    if missing:
        raise ConfigError(f"{INSTALL_HINT} (import tensorrt: {missing})")
    import tensorrt as trt

    return trt


def available() -> bool:
    return importable("tensorrt")


@functools.lru_cache(maxsize=1)
def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)  # one logger per process, as TensorRT asks


# --- build settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """Everything a plan is built from besides the ONNX file and the GPU."""

    profiles: tuple[Profile, ...]
    precision: str = "fp16"
    #: (layer name, "fp32" | "fp16") forced regardless of ``precision``
    layer_precisions: tuple[tuple[str, str], ...] = ()
    calibrate_input: str = ""
    calibrate_cache: str = ""
    workspace_mb: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "layers": dict(self.layer_precisions),
            "profiles": [p.to_json() for p in self.profiles],
            "calibrate_input": self.calibrate_input,
            "workspace_mb": self.workspace_mb,
        }


def parse_layer_precisions(fp32: str, fp16: str) -> tuple[tuple[str, str], ...]:
    """``precision::fp32="a,b"`` and ``precision::fp16="c"`` -> ``(("a","fp32"),("b","fp32"),("c","fp16"))``."""
    chosen: dict[str, str] = {}
    for precision, text in (("fp32", fp32), ("fp16", fp16)):
        for layer in (part.strip() for part in str(text).split(",")):
            if not layer:
                continue
            if chosen.get(layer, precision) != precision:
                raise ConfigError(f"layer {layer!r} is in both precision::fp32 and precision::fp16")
            chosen[layer] = precision
    return tuple(sorted(chosen.items()))


def resolve_precision(
    requested: str, fast_fp16: bool, fast_int8: bool, calibrated: bool
) -> tuple[tuple[str, ...], str | None]:
    """Builder flags for ``requested`` given what the GPU and the data allow, and a note on any fallback."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    flags: list[str] = []
    notes: list[str] = []
    if requested in ("int8", "best"):
        if not fast_int8:
            notes.append("the GPU has no fast INT8")
        elif not calibrated:
            notes.append("INT8 needs calibrate_input (or an existing calibrate_cache)")
        else:
            flags.append("INT8")
    if requested != "fp32":
        if fast_fp16:
            flags.append("FP16")
        else:
            notes.append("the GPU has no fast FP16")
    if not notes:
        return tuple(flags), None
    effective = "int8" if "INT8" in flags else "fp16" if "FP16" in flags else "fp32"
    return tuple(flags), f"precision={requested}: {'; '.join(notes)}; building in {effective}"


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(name, compute capability) of the GPU a plan is built for."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def build_fingerprint(onnx: Path, settings: BuildSettings, device: torch.device) -> dict[str, Any]:
    trt = import_tensorrt()
    name, capability = gpu_identity(device)
    return cache.fingerprint(cache.file_digest(onnx), name, capability, trt.__version__, settings.to_json())


# --- build --------------------------------------------------------------------------------


def _progress_monitor(trt: Any) -> Any | None:
    """A tqdm bar per build phase, where tqdm and ``trt.IProgressMonitor`` exist."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class TqdmMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}
            self.lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=len(self.bars), leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmMonitor()


def load_calibration(source: str, inputs: list[TensorIO], batch: int) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of ``batch`` samples from a ``.pt`` file or a folder of them.

    Each file holds a tensor (one-input models) or a dict of tensors by input name, batched on dim 0,
    as the engine sees them (after ``mean``/``std``).  A last incomplete batch is dropped.
    """
    path = Path(source)
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"calibrate_input {source!r} is neither a .pt file nor a folder holding .pt files")
    names = [io.name for io in inputs]
    batches: list[dict[str, torch.Tensor]] = []
    for file in files:
        data = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(data, torch.Tensor) and len(names) == 1:
            data = {names[0]: data}
        if not isinstance(data, dict) or set(names) - set(data):
            raise ConfigError(f"{file}: expected a tensor or a dict with tensors for {', '.join(names)}")
        count = min(data[name].shape[0] for name in names)
        for start in range(0, count - batch + 1, batch):
            batches.append({io.name: data[io.name][start : start + batch].to(TRITON_TO_TORCH[io.spec.dtype]) for io in inputs})
    if not batches:
        raise ConfigError(f"calibrate_input {source!r} has fewer than {batch} samples (one batch of the first profile's max)")
    return batches


def _calibrator(trt: Any, batches: list[dict[str, torch.Tensor]], cache_file: str, device: torch.device) -> Any:
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.pending = iter(batches)
            self.current: list[torch.Tensor] = []  # kept alive while TensorRT reads them

        def get_batch_size(self) -> int:
            return next(iter(batches[0].values())).shape[0] if batches else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.pending, None)
            if batch is None:
                return None
            self.current = [batch[name].to(device).contiguous() for name in names]
            torch.cuda.synchronize(device)
            return [t.data_ptr() for t in self.current]

        def read_calibration_cache(self) -> bytes | None:
            path = Path(cache_file) if cache_file else None
            return path.read_bytes() if path is not None and path.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache_file:
                Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
                Path(cache_file).write_bytes(bytes(data))

    return Calibrator()


def _force_layers(trt: Any, network: Any, layers: dict[str, str]) -> None:
    types = {"fp32": trt.float32, "fp16": trt.float16}
    floats = (trt.float32, trt.float16)
    found: set[str] = set()
    names = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        names.append(layer.name)
        if layer.name not in layers:
            continue
        dtype = types[layers[layer.name]]
        layer.precision = dtype
        for out in range(layer.num_outputs):
            if layer.get_output(out).dtype in floats:  # shape tensors stay integers
                layer.set_output_type(out, dtype)
        found.add(layer.name)
    missing = sorted(set(layers) - found)
    if missing:
        import difflib

        close = sorted({c for m in missing for c in difflib.get_close_matches(m, names, n=3)})
        raise ConfigError(
            f"precision:: names layers the network does not have: {', '.join(missing)}"
            + (f"; close: {', '.join(close)}" if close else "")
        )


def build_plan(
    onnx: Path, settings: BuildSettings, device: torch.device, *, progress: bool = True, wanted: dict | None = None
) -> tuple[bytes, dict[str, Any]]:
    """Build a serialized engine from ``onnx``; returns it and the sidecar to store beside it."""
    trt = import_tensorrt()
    if device.type != "cuda":
        raise ConfigError("building a TensorRT engine needs a CUDA GPU")
    inputs, outputs = describe_onnx(onnx)
    wanted = wanted or build_fingerprint(onnx, settings, device)
    logger = _logger(trt)
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT cannot parse {onnx.name}: {errors}")
        config = builder.create_builder_config()
        if settings.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
        optimization_profiles = []
        for profile in settings.profiles:
            trt_profile = builder.create_optimization_profile()
            for io, lo, hi in zip(inputs, profile.min, profile.max):
                trt_profile.set_shape(io.name, lo, hi, hi)  # opt = max: batches fill up under load
            config.add_optimization_profile(trt_profile)
            optimization_profiles.append(trt_profile)

        calibrated = bool(settings.calibrate_input) or bool(settings.calibrate_cache and Path(settings.calibrate_cache).is_file())
        flags, note = resolve_precision(
            settings.precision,
            getattr(builder, "platform_has_fast_fp16", True),
            getattr(builder, "platform_has_fast_int8", True),
            calibrated,
        )
        if note:
            log.warning(note)
        layers = dict(settings.layer_precisions)
        if "fp16" in layers.values() and "FP16" not in flags:
            flags += ("FP16",)
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if layers:
            _force_layers(trt, network, layers)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        if "INT8" in flags:
            batches = (
                load_calibration(settings.calibrate_input, inputs, settings.profiles[0].max_batch)
                if settings.calibrate_input
                else []
            )
            config.int8_calibrator = _calibrator(trt, batches, settings.calibrate_cache, device)
            if hasattr(config, "set_calibration_profile"):
                config.set_calibration_profile(optimization_profiles[0])
        monitor = _progress_monitor(trt) if progress else None
        if monitor is not None:
            config.progress_monitor = monitor  # ``monitor`` outlives the build, as TensorRT requires
        log.info("building a TensorRT engine from %s (flags: %s)", onnx.name, ", ".join(flags) or "fp32")
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"TensorRT could not build {onnx.name}; its log above says why")
    return bytes(serialized), cache.sidecar_content(wanted, inputs, outputs, list(settings.profiles))


def build_plan_file(onnx: Path, plan: Path, settings: BuildSettings, device: torch.device, *, progress: bool = True) -> Path:
    """Build ``onnx`` into ``plan`` and write the fingerprint sidecar ``plan.json`` beside it."""
    data, sidecar = build_plan(onnx, settings, device, progress=progress)
    cache.write_plan(plan, data, sidecar)
    return plan


def plan_bytes(model: Path, settings: BuildSettings | None, device: torch.device, cache_file: Path | None) -> bytes:
    """A serialized engine for ``model``: read (a plan), reused from ``cache_file``, or built."""
    if model.suffix.lower() in PLAN_SUFFIXES:
        return model.read_bytes()
    if settings is None:
        raise ConfigError(f"building {model.name} needs build settings (profiles, precision)")
    if cache_file is None:
        return build_plan(model, settings, device, progress=False)[0]
    wanted = build_fingerprint(model, settings, device)
    return cache.load_or_build(cache_file, wanted, lambda: build_plan(model, settings, device, progress=False, wanted=wanted))


# --- describe and run ---------------------------------------------------------------------


def _engine_io(trt: Any, engine: Any) -> tuple[list[TensorIO], list[TensorIO]]:
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        dtype = _TRT_TYPES.get(engine.get_tensor_dtype(name).name)
        if dtype is None:
            raise ConfigError(f"engine tensor {name!r} has type {engine.get_tensor_dtype(name)}, which Triton cannot carry")
        io = TensorIO(name, TensorSpec(dtype, tuple(engine.get_tensor_shape(name)), batched=True))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(io)
    return inputs, outputs


def _engine_profiles(engine: Any, inputs: list[TensorIO]) -> list[Profile]:
    profiles = []
    for index in range(engine.num_optimization_profiles):
        shapes = [engine.get_tensor_profile_shape(io.name, index) for io in inputs]
        profiles.append(Profile(tuple(tuple(s[0]) for s in shapes), tuple(tuple(s[2]) for s in shapes)))
    return profiles


def _deserialize(trt: Any, data: bytes) -> tuple[Any, Any]:
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ConfigError("TensorRT cannot load the plan: it was built by another TensorRT version or for another GPU; rebuild it")
    return runtime, engine


def describe_plan(path: Path) -> tuple[list[TensorIO], list[TensorIO], list[Profile]]:
    """Inputs, outputs and profiles of a plan: from its sidecar, else by loading it with TensorRT."""
    described = cache.describe_from_sidecar(path)
    if described is not None:
        return described
    if not available():
        raise ConfigError(
            f"cannot describe {path.name}: it has no {cache.sidecar_path(path).name} beside it and TensorRT is not "
            "installed here; build it with tritonpipe build-engine (which writes that file) or run where TensorRT is"
        )
    trt = import_tensorrt()
    _, engine = _deserialize(trt, path.read_bytes())
    inputs, outputs = _engine_io(trt, engine)
    return inputs, outputs, _engine_profiles(engine, inputs)


class TensorRTEngine:
    """Runs a serialized engine; picks the profile that fits each batch."""

    def __init__(self, plan: bytes, device: torch.device):
        if device.type != "cuda":
            raise ConfigError("TensorRT runs on a GPU but this instance is on the CPU; use engine=onnxruntime or a GPU instance")
        trt = import_tensorrt()
        self.device = device
        with torch.cuda.device(device):
            self.runtime, self.engine = _deserialize(trt, plan)
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = _engine_io(trt, self.engine)
        self.profiles = _engine_profiles(self.engine, self.inputs)
        self.profile = 0
        largest = max(p.max_batch for p in self.profiles)
        self.description = f"tensorrt {trt.__version__} ({len(self.profiles)} profile(s), max batch {largest})"

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        shapes = [tuple(t.shape) for t in inputs]
        index = pick_profile(self.profiles, shapes)
        if index is None:
            ranges = "; ".join(f"{fmt(p.min[0])} .. {fmt(p.max[0])}" for p in self.profiles)
            raise RequestError(f"input shapes {', '.join(map(fmt, shapes))} fit no engine profile ({ranges})")
        if index != self.profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self.profile = index
        feeds = []  # keeps converted inputs alive until the call is queued
        for io, tensor in zip(self.inputs, inputs):
            feed = tensor.to(self.device, TRITON_TO_TORCH[io.spec.dtype]).contiguous()
            feeds.append(feed)
            self.context.set_input_shape(io.name, tuple(feed.shape))
            self.context.set_tensor_address(io.name, feed.data_ptr())
        results = []
        for io in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(io.name)), dtype=TRITON_TO_TORCH[io.spec.dtype], device=self.device)
            self.context.set_tensor_address(io.name, out.data_ptr())
            results.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; its log says why")
        return results
