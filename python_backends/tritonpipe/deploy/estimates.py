"""What a pod needs, estimated from the repository's configs and files: how long it takes to start
(the startup probe's budget), how large ``/dev/shm`` must be, and how much memory to request.

Every figure comes with the lines that explain it (``describe``); the manifests carry them as
comments above the values they set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ..contract import PARAM_PIPELINE, PARAM_WARMUP, warmup_batches
from ..errors import ConfigError
from ..pipeline.grammar import parse_backend
from ..repository.generate import VERSION

# --- startup estimate (seconds) -----------------------------------------------------------------
SERVER_START_S = 10.0  # tritonserver, its backends and endpoints
STUB_START_S = 20.0  # one Python-backend instance: stub process, import torch and tritonpipe, build the chain
FILE_LOAD_BASE_S = 5.0  # an ONNX Runtime session, a torch module or a plan deserialised, per instance ...
FILE_LOAD_S_PER_MB = 0.2  # ... plus this per MB of model file
TRT_BUILD_BASE_S = 60.0  # a TensorRT build from ONNX, per build ...
TRT_BUILD_S_PER_MB = 2.0  # ... plus this per MB of ONNX
INT8_BUILD_FACTOR = 2.0  # INT8 calibrates before it builds
WARMUP_BUCKET_S = 3.0  # one warm-up batch size on one GPU instance (samples + CUDA graph capture)
MIG_SLOWDOWN = 2.0  # a small MIG slice builds and warms up more slowly than a whole GPU
STARTUP_SAFETY = 1.5  # the startup probe allows this many times the estimate
PROBE_PERIOD_S = 10

# --- /dev/shm -----------------------------------------------------------------------------------
SHM_DEFAULT_BYTES = 1 << 20  # the Python backend's shm-default-byte-size: each instance's region starts there
DYNAMIC_TENSOR_BYTES = 4 << 20  # a tensor with a -1 dim (an encoded image) is assumed to be at most this
SHM_SLACK = 2  # the regions grow in steps and hold requests and responses at once
SHM_HEADROOM = 64 << 20
SHM_ROUND = 64 << 20

_DTYPE_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}
MIB = 1 << 20
STUB_MEMORY_MIB = 512  # one Python-backend instance: its stub process with torch imported


# --- what the configs say -------------------------------------------------------------------------


def instances(config: mc.ModelConfig) -> int:
    """The model's instance count over all its instance groups (at least 1)."""
    return sum(max(1, g.count) for g in config.instance_group) or 1


def _on_gpu(config: mc.ModelConfig, gpu: bool) -> bool:
    kinds = {g.kind for g in config.instance_group} or {mc.ModelInstanceGroup.KIND_AUTO}
    return gpu and bool(kinds - {mc.ModelInstanceGroup.KIND_CPU})


def model_stages(config: mc.ModelConfig) -> list[dict[str, str]]:
    """The params of each model-running stage in a Python model's chain."""
    from ..stages.base import Role, lookup

    text = config.parameters[PARAM_PIPELINE].string_value if PARAM_PIPELINE in config.parameters else ""
    if not text:
        return []
    stages = []
    for node in parse_backend(text).walk():
        try:
            role = lookup(node.name).role
        except ConfigError:  # a plugin stage whose file is not loaded here: it runs no model file
            continue
        if role == Role.MODEL and node.params.get("model"):
            stages.append(node.params)
    return stages


def megabytes(path: Path) -> float:
    """The file's size in MiB; 0 where it cannot be read."""
    try:
        return path.stat().st_size / MIB
    except OSError:
        return 0.0


# --- startup --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLoad:
    """How long one model takes to load on a pod, and why."""

    name: str
    seconds: float
    parts: tuple[str, ...]


@dataclass(frozen=True)
class StartupEstimate:
    where: str
    models: tuple[ModelLoad, ...]

    @property
    def seconds(self) -> float:
        return SERVER_START_S + sum(m.seconds for m in self.models)

    @property
    def failure_threshold(self) -> int:
        return max(6, math.ceil(STARTUP_SAFETY * self.seconds / PROBE_PERIOD_S))

    def describe(self) -> list[str]:
        lines = [
            f"startup estimate on {self.where}: {self.seconds:.0f} s, summed as if models loaded one after another "
            f"(Triton loads them in parallel, so this is an upper bound)",
            f"  tritonserver itself: {SERVER_START_S:.0f} s",
        ]
        lines += [f"  {m.name}: {m.seconds:.0f} s = {' + '.join(m.parts) or 'nothing to load'}" for m in self.models]
        lines.append(
            f"the probe allows {STARTUP_SAFETY} x that: failureThreshold {self.failure_threshold} x periodSeconds "
            f"{PROBE_PERIOD_S} = {self.failure_threshold * PROBE_PERIOD_S} s"
        )
        return lines


def _model_load(name: str, config: mc.ModelConfig, version_dir: Path, gpu: bool, slowdown: float) -> ModelLoad:
    count = instances(config)
    on_gpu = _on_gpu(config, gpu)
    parts: list[str] = []
    seconds = 0.0
    if config.platform == "ensemble":
        return ModelLoad(name, 0.0, ())
    if config.backend != "python":  # a native tensorrt_plan / onnxruntime_onnx model
        mb = megabytes(version_dir / (config.default_model_filename or "model.onnx"))
        each = FILE_LOAD_BASE_S + FILE_LOAD_S_PER_MB * mb
        return ModelLoad(name, count * each, (f"{count} x {each:.0f} s to load {mb:.0f} MB",))
    seconds += count * STUB_START_S
    parts.append(f"{count} x {STUB_START_S:.0f} s Python stub")
    for params in model_stages(config):
        model = params["model"]
        mb = megabytes(version_dir / model)
        engine = params.get("engine", "auto")
        builds_trt = on_gpu and model.lower().endswith(".onnx") and engine in ("auto", "tensorrt")
        if builds_trt:
            build = (TRT_BUILD_BASE_S + TRT_BUILD_S_PER_MB * mb) * slowdown
            if params.get("precision") == "int8":
                build *= INT8_BUILD_FACTOR
            # without model::cache every instance builds its own engine; with it the first builds
            # and the others wait on its lock and read the plan
            builds = 1 if params.get("model::cache") else count
            seconds += builds * build
            parts.append(f"{builds} x {build:.0f} s TensorRT build of {model} ({mb:.0f} MB)")
        else:
            each = FILE_LOAD_BASE_S + FILE_LOAD_S_PER_MB * mb
            seconds += count * each
            parts.append(f"{count} x {each:.0f} s to load {model} ({mb:.0f} MB)")
    warms = PARAM_WARMUP in config.parameters and config.parameters[PARAM_WARMUP].string_value not in ("", "off")
    if on_gpu and warms:  # the generic model warms up on GPU instances only
        buckets = len(warmup_batches(config.max_batch_size))
        each = WARMUP_BUCKET_S * slowdown
        seconds += count * buckets * each
        parts.append(f"{count} x {buckets} batch sizes x {each:.0f} s warm-up")
    return ModelLoad(name, seconds, tuple(parts))


def estimate_startup(
    configs: dict[str, mc.ModelConfig], repository: Path, *, gpu: bool, where: str = "", slowdown: float = 1.0
) -> StartupEstimate:
    """How long a pod takes from start to ready: every model's load, TensorRT builds and warm-up."""
    models = tuple(
        _model_load(name, config, Path(repository) / name / VERSION, gpu, slowdown) for name, config in sorted(configs.items())
    )
    return StartupEstimate(where or ("a GPU" if gpu else "the CPU"), models)


# --- /dev/shm and memory --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShmSize:
    per_model: dict[str, int]
    total: int

    @property
    def quantity(self) -> str:
        return f"{self.total // MIB}Mi"

    def describe(self) -> list[str]:
        lines = [
            "/dev/shm holds the Python backend's shared-memory regions, one per model instance; tensors cross",
            "the stub boundary through them.  Size =",
            f"  round_up({SHM_SLACK} x sum over Python models of instances x ({SHM_DEFAULT_BYTES // MIB} MiB + max_batch x "
            f"bytes of all inputs and outputs of one request) + {SHM_HEADROOM // MIB} MiB, {SHM_ROUND // MIB} MiB)",
            f"  where a tensor with a -1 dim (an encoded image) counts as {DYNAMIC_TENSOR_BYTES // MIB} MiB.",
        ]
        lines += [f"  {name}: {size / MIB:.1f} MiB" for name, size in sorted(self.per_model.items())]
        lines.append(f"  total: {self.quantity}")
        return lines


def tensor_bytes(tensor: mc.ModelInput | mc.ModelOutput) -> int:
    """Bytes of one request's tensor; -1 dims or strings count as DYNAMIC_TENSOR_BYTES."""
    dtype = mc.DataType.Name(tensor.data_type).removeprefix("TYPE_")
    size = _DTYPE_BYTES.get(dtype)
    if size is None or any(d < 0 for d in tensor.dims):
        return DYNAMIC_TENSOR_BYTES
    return size * math.prod(tensor.dims)


def shm_size(configs: dict[str, mc.ModelConfig]) -> ShmSize:
    """The memory-backed ``/dev/shm`` the Python backend's regions need (see :meth:`ShmSize.describe`)."""
    per_model = {}
    for name, config in configs.items():
        if config.backend != "python":
            continue
        request = sum(tensor_bytes(t) for t in list(config.input) + list(config.output))
        per_model[name] = instances(config) * (SHM_DEFAULT_BYTES + max(1, config.max_batch_size) * request)
    total = SHM_SLACK * sum(per_model.values()) + SHM_HEADROOM
    return ShmSize(per_model, -(-total // SHM_ROUND) * SHM_ROUND)


def memory_mib(configs: dict[str, mc.ModelConfig], repository: Path, shm: ShmSize) -> int:
    """The pod's memory request: /dev/shm + per Python instance + twice each instance's model file + 1 GiB."""
    total = shm.total // MIB + 1024
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        version_dir = repository / name / VERSION
        files = [version_dir / p["model"] for p in model_stages(config)] if config.backend == "python" else [
            version_dir / (config.default_model_filename or "model.onnx")]
        per_instance = (STUB_MEMORY_MIB if config.backend == "python" else 0) + 2 * sum(megabytes(f) for f in files)
        total += instances(config) * per_instance
    return int(math.ceil(total / 256) * 256)
