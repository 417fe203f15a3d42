"""Kubernetes manifests for a generated repository: a kustomize base, repository components and
device overlays, written as plain commented YAML.

Everything here is pure: the manifests are Python dicts built from the repository's protobuf
configs (``GeneratedRepository.configs``) and the sizes of its files; :func:`write_manifests`
only dumps them.  The layout::

    base/                         Deployment, Service, HorizontalPodAutoscaler, ServiceMonitor
    components/repository-*/      where the model repository comes from (pvc, s3, gcs, configmap)
    overlays/cpu|gpu|mig/         what a pod runs on; each picks one repository component
    monitoring/                   the prometheus-adapter rule behind the autoscaler's metric

What the image serves (binary, ports, health paths) is defined once below; the tests compare it
with ``docker/Dockerfile`` and with the server owner (``TritonServer``).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from ..contract import PARAM_PIPELINE, PARAM_WARMUP
from ..errors import ConfigError
from ..pipeline.grammar import parse_backend
from ..repository.generate import swap_into_place
from ..repository.ownership import FILES, check_replaceable, written_files

# --- what the image serves ------------------------------------------------------------------
#: the server the image's CMD starts (docker/Dockerfile)
SERVER_BINARY = "tritonserver"
#: Triton's default ports, which docker/Dockerfile EXPOSEs; the names are the Service's port names
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
LIVE_PATH = "/v2/health/live"
#: ready only when every model is ready (with --strict-readiness=true); TritonServer waits on it too
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
#: where docker/Dockerfile's CMD looks for the repository
MODELS_MOUNT = "/models"
#: seconds Triton drains in-flight requests on SIGTERM (docker/compose.yaml uses the same)
EXIT_TIMEOUT_S = 30
#: the non-root user of NGC Triton images ("triton-server")
RUN_AS_USER = 1000
IMAGE = "tritonpipe"

# --- the autoscaler's metric ------------------------------------------------------------------
QUEUE_METRIC = "nv_inference_queue_duration_us"
SUCCESS_METRIC = "nv_inference_request_success"
#: what the prometheus-adapter rule calls average queue time per request, in microseconds
HPA_METRIC = "tritonpipe_queue_us_per_request"
QUEUE_TARGET_US = 20_000
MIN_REPLICAS = 1
MAX_REPLICAS = 4
RATE_WINDOW = "2m"

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
#: a ConfigMap holds at most 1 MiB; leave room for its metadata
CONFIGMAP_LIMIT = 900 << 10

_DTYPE_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}
_MIB = 1 << 20
STUB_MEMORY_MIB = 512  # one Python-backend instance: its stub process with torch imported


def server_args(repository: str = "$(MODEL_REPOSITORY)") -> list[str]:
    """The container's args: the image's CMD with the flags a replica needs.

    They go to ``args`` (the image's CMD), not ``command``, so the image's entrypoint still runs,
    as it does under ``docker run``.  ``$(MODEL_REPOSITORY)`` is expanded by Kubernetes from the
    container's environment, so a repository component changes one variable, not the args.
    """
    return [
        SERVER_BINARY,
        f"--model-repository={repository}",
        "--strict-readiness=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--http-port={PORTS['http']}",
        f"--grpc-port={PORTS['grpc']}",
        f"--metrics-port={PORTS['metrics']}",
        "--allow-metrics=true",
    ]


# --- estimates ------------------------------------------------------------------------------------


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


def _instances(config: mc.ModelConfig) -> int:
    return sum(max(1, g.count) for g in config.instance_group) or 1


def _on_gpu(config: mc.ModelConfig, gpu: bool) -> bool:
    kinds = {g.kind for g in config.instance_group} or {mc.ModelInstanceGroup.KIND_AUTO}
    return gpu and bool(kinds - {mc.ModelInstanceGroup.KIND_CPU})


def _model_stages(config: mc.ModelConfig) -> list[dict[str, str]]:
    """The params of each model-running stage in a Python model's chain."""
    from ..stages.base import lookup

    text = config.parameters[PARAM_PIPELINE].string_value if PARAM_PIPELINE in config.parameters else ""
    if not text:
        return []
    stages = []
    for node in parse_backend(text).walk():
        try:
            role = lookup(node.name).role
        except ConfigError:  # a plugin stage whose file is not loaded here: it runs no model file
            continue
        if role == "model" and node.params.get("model"):
            stages.append(node.params)
    return stages


def _megabytes(path: Path) -> float:
    try:
        return path.stat().st_size / _MIB
    except OSError:
        return 0.0


def _warmup_buckets(max_batch: int) -> int:
    """Batch sizes the model warms up with: its largest batch and each power of two below it."""
    batches = {max(1, max_batch)} | {1 << k for k in range(max(1, max_batch).bit_length()) if 1 << k < max_batch}
    return len(batches)


def _model_load(name: str, config: mc.ModelConfig, version_dir: Path, gpu: bool, slowdown: float) -> ModelLoad:
    instances = _instances(config)
    on_gpu = _on_gpu(config, gpu)
    parts: list[str] = []
    seconds = 0.0
    if config.platform == "ensemble":
        return ModelLoad(name, 0.0, ())
    if config.backend != "python":  # a native tensorrt_plan / onnxruntime_onnx model
        mb = _megabytes(version_dir / (config.default_model_filename or "model.onnx"))
        each = FILE_LOAD_BASE_S + FILE_LOAD_S_PER_MB * mb
        return ModelLoad(name, instances * each, (f"{instances} x {each:.0f} s to load {mb:.0f} MB",))
    seconds += instances * STUB_START_S
    parts.append(f"{instances} x {STUB_START_S:.0f} s Python stub")
    for params in _model_stages(config):
        model = params["model"]
        mb = _megabytes(version_dir / model)
        engine = params.get("engine", "auto")
        builds_trt = on_gpu and model.lower().endswith(".onnx") and engine in ("auto", "tensorrt")
        if builds_trt:
            build = (TRT_BUILD_BASE_S + TRT_BUILD_S_PER_MB * mb) * slowdown
            if params.get("precision") == "int8":
                build *= INT8_BUILD_FACTOR
            # without model::cache every instance builds its own engine; with it the first builds
            # and the others wait on its lock and read the plan
            builds = 1 if params.get("model::cache") else instances
            seconds += builds * build
            parts.append(f"{builds} x {build:.0f} s TensorRT build of {model} ({mb:.0f} MB)")
        else:
            each = FILE_LOAD_BASE_S + FILE_LOAD_S_PER_MB * mb
            seconds += instances * each
            parts.append(f"{instances} x {each:.0f} s to load {model} ({mb:.0f} MB)")
    warms = PARAM_WARMUP in config.parameters and config.parameters[PARAM_WARMUP].string_value not in ("", "off")
    if on_gpu and warms:  # the generic model warms up on GPU instances only
        buckets = _warmup_buckets(config.max_batch_size)
        each = WARMUP_BUCKET_S * slowdown
        seconds += instances * buckets * each
        parts.append(f"{instances} x {buckets} batch sizes x {each:.0f} s warm-up")
    return ModelLoad(name, seconds, tuple(parts))


def estimate_startup(
    configs: dict[str, mc.ModelConfig], repository: Path, *, gpu: bool, where: str = "", slowdown: float = 1.0
) -> StartupEstimate:
    """How long a pod takes from start to ready: every model's load, TensorRT builds and warm-up."""
    from ..repository.generate import VERSION

    models = tuple(
        _model_load(name, config, Path(repository) / name / VERSION, gpu, slowdown) for name, config in sorted(configs.items())
    )
    return StartupEstimate(where or ("a GPU" if gpu else "the CPU"), models)


@dataclass(frozen=True)
class ShmSize:
    per_model: dict[str, int]
    total: int

    @property
    def quantity(self) -> str:
        return f"{self.total // _MIB}Mi"

    def describe(self) -> list[str]:
        lines = [
            "/dev/shm holds the Python backend's shared-memory regions, one per model instance; tensors cross",
            "the stub boundary through them.  Size =",
            f"  round_up({SHM_SLACK} x sum over Python models of instances x ({SHM_DEFAULT_BYTES // _MIB} MiB + max_batch x "
            f"bytes of all inputs and outputs of one request) + {SHM_HEADROOM // _MIB} MiB, {SHM_ROUND // _MIB} MiB)",
            f"  where a tensor with a -1 dim (an encoded image) counts as {DYNAMIC_TENSOR_BYTES // _MIB} MiB.",
        ]
        lines += [f"  {name}: {size / _MIB:.1f} MiB" for name, size in sorted(self.per_model.items())]
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
    per_model = {}
    for name, config in configs.items():
        if config.backend != "python":
            continue
        request = sum(tensor_bytes(t) for t in list(config.input) + list(config.output))
        per_model[name] = _instances(config) * (SHM_DEFAULT_BYTES + max(1, config.max_batch_size) * request)
    total = SHM_SLACK * sum(per_model.values()) + SHM_HEADROOM
    return ShmSize(per_model, -(-total // SHM_ROUND) * SHM_ROUND)


# --- manifests --------------------------------------------------------------------------------------


def app_name(entry: str) -> str:
    """A DNS-1035 label for the entry model: ``tritonpipe-<entry>``."""
    slug = re.sub(r"[^a-z0-9-]+", "-", entry.lower()).strip("-")
    return f"tritonpipe-{slug}"[:63].rstrip("-") if slug else "tritonpipe"


@dataclass
class Manifest:
    """One YAML file: a dict, a header comment and comments placed above given keys."""

    path: str
    data: dict[str, Any]
    header: list[str] = field(default_factory=list)
    notes: list[tuple[str, list[str]]] = field(default_factory=list)

    def text(self) -> str:
        body = yaml.safe_dump(self.data, sort_keys=False, default_flow_style=False, width=4096)
        out = [f"# {line}".rstrip() for line in self.header]
        pending = list(self.notes)
        for line in body.splitlines():
            stripped = line.lstrip()
            for index, (prefix, comment) in enumerate(pending):
                if stripped.startswith(prefix):
                    indent = line[: len(line) - len(stripped)]
                    out += [f"{indent}# {c}".rstrip() for c in comment]
                    del pending[index]
                    break
            out.append(line)
        return "\n".join(out) + "\n"


@dataclass
class Manifests:
    name: str
    entry: str
    files: list[Manifest]
    startup: dict[str, StartupEstimate]
    shm: ShmSize

    def by_path(self) -> dict[str, Manifest]:
        return {m.path: m for m in self.files}


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tritonpipe"}


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def memory_mib(configs: dict[str, mc.ModelConfig], repository: Path, shm: ShmSize) -> int:
    """The pod's memory request: /dev/shm + per Python instance + twice each instance's model file + 1 GiB."""
    from ..repository.generate import VERSION

    total = shm.total // _MIB + 1024
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        version_dir = repository / name / VERSION
        files = [version_dir / p["model"] for p in _model_stages(config)] if config.backend == "python" else [
            version_dir / (config.default_model_filename or "model.onnx")]
        per_instance = (STUB_MEMORY_MIB if config.backend == "python" else 0) + 2 * sum(_megabytes(f) for f in files)
        total += _instances(config) * per_instance
    return int(math.ceil(total / 256) * 256)


def _deployment(name: str, shm: ShmSize, startup: StartupEstimate, memory: int) -> dict[str, Any]:
    container = {
        "name": "tritonserver",
        "image": IMAGE,
        "args": server_args(),
        "env": [
            {"name": "MODEL_REPOSITORY", "value": MODELS_MOUNT},
            # torch, TensorRT and friends keep caches under HOME; the root filesystem stays read-only
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": port, "containerPort": number, "protocol": "TCP"} for port, number in PORTS.items()],
        "startupProbe": _probe(READY_PATH, PROBE_PERIOD_S, startup.failure_threshold),
        "livenessProbe": _probe(LIVE_PATH, 10, 3),
        "readinessProbe": _probe(READY_PATH, 5, 3),
        "resources": {
            "requests": {"cpu": "2", "memory": f"{memory}Mi"},
            "limits": {"memory": f"{2 * memory}Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "replicas": MIN_REPLICAS,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": _labels(name)},
                "spec": {
                    "terminationGracePeriodSeconds": EXIT_TIMEOUT_S + 15,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm.quantity}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": port, "port": number, "targetPort": port, "protocol": "TCP"} for port, number in PORTS.items()],
        },
    }


def _hpa(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": MIN_REPLICAS,
            "maxReplicas": MAX_REPLICAS,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": HPA_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(QUEUE_TARGET_US)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                },
            },
        },
    }


def _service_monitor(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "labels": _labels(name)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "endpoints": [{"port": "metrics", "path": METRICS_PATH, "interval": "15s"}],
        },
    }


def adapter_rule(entry: str) -> dict[str, Any]:
    """The prometheus-adapter rule: average queue time per request of the entry model, per pod."""
    matchers = f'<<.LabelMatchers>>,model="{entry}"'
    return {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!="",model="{entry}"}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_METRIC}$", "as": HPA_METRIC},
        "metricsQuery": (
            f"sum(rate({QUEUE_METRIC}{{{matchers}}}[{RATE_WINDOW}])) by (<<.GroupBy>>) / "
            f"(sum(rate({SUCCESS_METRIC}{{{matchers}}}[{RATE_WINDOW}])) by (<<.GroupBy>>) + 0.001)"
        ),
    }


def _kustomization(kind: str = "Kustomization", **fields: Any) -> dict[str, Any]:
    api = "kustomize.config.k8s.io/v1beta1" if kind == "Kustomization" else "kustomize.config.k8s.io/v1alpha1"
    return {"apiVersion": api, "kind": kind, **fields}


def _deployment_patch(name: str, container: dict[str, Any] | None = None, **pod: Any) -> dict[str, Any]:
    spec: dict[str, Any] = dict(pod)
    if container is not None:
        spec["containers"] = [{"name": "tritonserver", **container}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"spec": spec}},
    }


def _repository_files(root: Path) -> list[tuple[str, bytes]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.read_bytes())
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _configmap_key(relative: str, taken: set[str]) -> str:
    key = re.sub(r"[^-._a-zA-Z0-9]", "_", relative.replace("/", "__"))
    base, index = key, 1
    while key in taken:
        key, index = f"{base}.{index}", index + 1
    taken.add(key)
    return key


def _repository_components(name: str, entry: str, repository: Path) -> tuple[list[Manifest], list[str]]:
    files = _repository_files(repository)
    size = sum(len(data) for _, data in files)
    mount = {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}
    out: list[Manifest] = []
    header = "components/repository-{}/{}"

    # PVC: a shared volume many pods read; fill it once (README, "Scaling out")
    claim = f"{name}-models"
    storage = max(1, math.ceil(2 * size / (1 << 30)))
    out.append(Manifest(header.format("pvc", "kustomization.yaml"), _kustomization(
        "Component", resources=["pvc.yaml"], patches=[{"path": "patch.yaml"}]),
        ["The repository on a PersistentVolumeClaim, mounted read-only at " + MODELS_MOUNT + ".",
         "Copy the generated repository into it once (README, 'Scaling out'); every replica reads the same files."]))
    out.append(Manifest(header.format("pvc", "pvc.yaml"), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "labels": _labels(name)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{storage}Gi"}}},
    }, [f"The repository is {size / _MIB:.1f} MiB; the claim asks for twice that, at least 1 GiB.",
        "ReadWriteMany lets pods on different nodes mount it (NFS, EFS, Filestore, CephFS...):",
        "add spec.storageClassName for a class that offers it where the default class does not."]))
    out.append(Manifest(header.format("pvc", "patch.yaml"), _deployment_patch(
        name, {"volumeMounts": [mount]},
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}])))

    # object storage: tritonserver reads s3:// and gs:// itself; no volume
    for scheme, component in (("s3", "s3"), ("gs", "gcs")):
        url = f"{scheme}://CHANGE-ME-bucket/{entry}"
        if scheme == "s3":
            container: dict[str, Any] = {
                "env": [{"name": "MODEL_REPOSITORY", "value": url}],
                "envFrom": [{"secretRef": {"name": f"{name}-s3", "optional": True}}],
            }
            pod: dict[str, Any] = {}
            notes = [("- name: MODEL_REPOSITORY", [
                "s3://bucket/prefix, or s3://host:port/bucket/prefix for MinIO and other S3-compatible stores.",
                f"Credentials: a Secret {name}-s3 with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and",
                "AWS_DEFAULT_REGION, or none where the node or service account already grants access."])]
        else:
            container = {
                "env": [
                    {"name": "MODEL_REPOSITORY", "value": url},
                    {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/run/secrets/gcs/key.json"},
                ],
                "volumeMounts": [{"name": "gcs-credentials", "mountPath": "/var/run/secrets/gcs", "readOnly": True}],
            }
            pod = {"volumes": [{"name": "gcs-credentials", "secret": {"secretName": f"{name}-gcs", "optional": True}}]}
            notes = [("- name: MODEL_REPOSITORY", [
                "gs://bucket/prefix.  Credentials: a Secret " + f"{name}-gcs with a service-account key as key.json,",
                "or Workload Identity (then drop GOOGLE_APPLICATION_CREDENTIALS and the volume)."])]
        out.append(Manifest(header.format(component, "kustomization.yaml"), _kustomization(
            "Component", patches=[{"path": "patch.yaml"}]),
            [f"The repository in object storage: tritonserver --model-repository={scheme}://... reads it itself.",
             f"Upload the generated folder so that {scheme}://<bucket>/<prefix>/{entry}/config.pbtxt exists."]))
        out.append(Manifest(header.format(component, "patch.yaml"), _deployment_patch(name, container, **pod), [], notes))

    # ConfigMap: only while the whole repository fits one
    skipped: list[str] = []
    if size <= CONFIGMAP_LIMIT:
        taken: set[str] = set()
        data, binary, items = {}, {}, []
        for relative, content in files:
            key = _configmap_key(relative, taken)
            try:
                data[key] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(content).decode("ascii")
            items.append({"key": key, "path": relative})
        configmap: dict[str, Any] = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-repository", "labels": _labels(name)}, "data": data,
        }
        if binary:
            configmap["binaryData"] = binary
        copy = {
            "name": "copy-repository",
            "image": IMAGE,
            "command": ["sh", "-c", f"cp -RL /repository-files/* {MODELS_MOUNT}/"],
            "securityContext": {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "repository-files", "mountPath": "/repository-files", "readOnly": True},
                {"name": "models", "mountPath": MODELS_MOUNT},
            ],
        }
        out.append(Manifest(header.format("configmap", "kustomization.yaml"), _kustomization(
            "Component", resources=["configmap.yaml"], patches=[{"path": "patch.yaml"}]),
            [f"The whole repository ({size / 1024:.0f} KiB) in a ConfigMap, copied into an emptyDir at start.",
             "A ConfigMap volume lists hidden ..data entries Triton would take for models; the copy leaves them out."]))
        out.append(Manifest(header.format("configmap", "configmap.yaml"), configmap,
                            ["Generated from the repository's files; regenerate instead of editing."]))
        out.append(Manifest(header.format("configmap", "patch.yaml"), _deployment_patch(
            name, {"volumeMounts": [mount]},
            initContainers=[copy],
            volumes=[
                {"name": "repository-files", "configMap": {"name": f"{name}-repository", "items": items}},
                {"name": "models", "emptyDir": {"sizeLimit": f"{max(1, math.ceil(2 * size / _MIB))}Mi"}},
            ])))
    else:
        skipped.append(
            f"no repository-configmap component: the repository is {size / _MIB:.1f} MiB, more than a ConfigMap holds"
        )
    return out, skipped


def build_manifests(configs: dict[str, mc.ModelConfig], repository: str | os.PathLike, entry: str) -> Manifests:
    """Every manifest for the repository at ``repository`` (already generated) whose entry model is ``entry``."""
    repository = Path(repository)
    if entry not in configs:
        raise ConfigError(f"entry model {entry!r} is not in the repository")
    name = app_name(entry)
    shm = shm_size(configs)
    startup = {
        "cpu": estimate_startup(configs, repository, gpu=False, where="the CPU (overlays/cpu)"),
        "gpu": estimate_startup(configs, repository, gpu=True, where="one GPU (overlays/gpu)"),
        "mig": estimate_startup(configs, repository, gpu=True, where="a MIG slice (overlays/mig)", slowdown=MIG_SLOWDOWN),
    }
    memory = memory_mib(configs, repository, shm)
    gpu_only = sorted(n for n, c in configs.items() if any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in c.instance_group))
    files: list[Manifest] = []
    components, skipped = _repository_components(name, entry, repository)

    files.append(Manifest("base/kustomization.yaml", _kustomization(
        resources=["deployment.yaml", "service.yaml", "hpa.yaml", "servicemonitor.yaml"]),
        [f"Kubernetes manifests for the tritonpipe repository whose entry model is {entry!r}.",
         "Generated by tritonpipe generate --k8s; regenerate rather than edit, and change values in overlays/.",
         "The base has no repository: apply an overlay, e.g. kubectl apply -k overlays/cpu",
         "servicemonitor.yaml needs the Prometheus Operator's CRDs; drop it from resources where there is none.",
         *skipped]))
    files.append(Manifest("base/deployment.yaml", _deployment(name, shm, startup["cpu"], memory),
        [f"Triton serving the tritonpipe repository (entry model {entry!r}) from the image docker/Dockerfile builds.",
         "Every replica is a whole server with every model; the Service spreads clients over the ready ones."],
        [
            ("args:", ["the image's CMD (its entrypoint still runs); $(MODEL_REPOSITORY) comes from env below"]),
            ("- name: MODEL_REPOSITORY", ["a repository component (components/) sets where the repository is"]),
            ("startupProbe:", [*startup["cpu"].describe(), "overlays/gpu and overlays/mig raise failureThreshold for their own estimate"]),
            ("livenessProbe:", ["restarts a server that stopped answering; starts only after the startup probe passed"]),
            ("readinessProbe:", ["with --strict-readiness=true: ready only while every model is ready"]),
            ("resources:", [
                f"memory request = /dev/shm + {STUB_MEMORY_MIB} MiB per Python instance + twice each instance's model file",
                "+ 1 GiB, rounded up to 256 MiB; the limit is twice that.  The memory-backed /dev/shm counts against it."]),
            ("medium: Memory", shm.describe()),
            ("readOnlyRootFilesystem:", ["where something must write, mount an emptyDir there (as /tmp is) rather than turn this off"]),
            ("terminationGracePeriodSeconds:", [f"--exit-timeout-secs={EXIT_TIMEOUT_S} to drain in-flight requests, plus time to exit"]),
        ]))
    files.append(Manifest("base/service.yaml", _service(name),
        ["HTTP 8000, gRPC 8001, metrics 8002.  The Service balances connections, not requests: a gRPC client",
         "keeps one connection to one pod, so open several channels or use a headless Service and client-side",
         "balancing when one client drives many replicas."]))
    files.append(Manifest("base/hpa.yaml", _hpa(name),
        [f"Scales on the entry model's average queue time per request ({HPA_METRIC}, microseconds), which",
         f"monitoring/prometheus-adapter-values.yaml derives from {QUEUE_METRIC} / {SUCCESS_METRIC}."],
        [("averageValue:", [f"{QUEUE_TARGET_US} us = {QUEUE_TARGET_US / 1000:.0f} ms waiting per request before another replica starts"]),
         ("scaleUp:", [f"a new pod serves only after its startup (estimate above, up to {startup['gpu'].seconds:.0f} s on a GPU);",
                       "adding one pod a minute keeps the autoscaler from overshooting while pods load"])]))
    files.append(Manifest("base/servicemonitor.yaml", _service_monitor(name),
        ["Prometheus Operator: scrape every pod behind the Service on its metrics port.",
         "Your Prometheus may select ServiceMonitors by a label (often release: <its Helm release>): add it here."]))
    files.extend(components)

    overlays = {
        "cpu": ("CPU-only pods.", None),
        "gpu": ("One whole GPU per pod (NVIDIA device plugin).", {"nvidia.com/gpu": 1}),
        "mig": ("One MIG slice per pod (device plugin with the 'mixed' MIG strategy; with 'single' use overlays/gpu).",
                {"nvidia.com/mig-1g.10gb": 1}),
    }
    for overlay, (what, limits) in overlays.items():
        estimate = startup[overlay]
        lines = [what, "Repository: components/repository-pvc; switch to repository-s3, repository-gcs"
                 + (" or repository-configmap" if not skipped else "") + " by changing the components line.",
                 "Set the image you pushed under images; set a namespace with namespace: <name>."]
        if overlay == "cpu" and gpu_only:
            lines.append(f"WARNING: {', '.join(gpu_only)} ask for GPU instances (--device gpu); they cannot load on CPU-only pods.")
        files.append(Manifest(f"overlays/{overlay}/kustomization.yaml", _kustomization(
            resources=["../../base"],
            components=["../../components/repository-pvc"],
            patches=[{"path": "patch.yaml"}],
            images=[{"name": IMAGE, "newName": f"registry.example.com/{IMAGE}", "newTag": "latest"}]), lines))
        container: dict[str, Any] = {"startupProbe": {"failureThreshold": estimate.failure_threshold}}
        pod: dict[str, Any] = {}
        notes = [("startupProbe:", estimate.describe())]
        if limits:
            container["resources"] = {"limits": dict(limits)}
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            key = next(iter(limits))
            notes.append((f"{key}:", ["GPUs are requested as limits; requests follow them"] if overlay == "gpu" else
                          ["the slice profile your nodes offer: mig-1g.10gb (H100 80GB), mig-1g.5gb (A100 40GB), ..."]))
        files.append(Manifest(f"overlays/{overlay}/patch.yaml", _deployment_patch(name, container, **pod), [], notes))

    files.append(Manifest("monitoring/prometheus-adapter-values.yaml", {
        "rules": {"default": False, "custom": [adapter_rule(entry)]},
    }, ["Values for the prometheus-adapter Helm chart (or the rules: section of its config.yaml):",
        f"serves {HPA_METRIC} per pod to the HPA in base/hpa.yaml through the custom metrics API.",
        "Set prometheus.url and prometheus.port to your Prometheus.  The +0.001 keeps an idle pod at 0, not NaN."]))
    return Manifests(name, entry, files, startup, shm)


# --- writing ------------------------------------------------------------------------------------------


#: written into every manifests folder: every file written with its sha256 (what ``--force`` may
#: replace); kustomize reads only the files a kustomization names, so it does not see it
MARKER = "tritonpipe-k8s.json"


def check_target(folder: str | os.PathLike, repository: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Refuse a manifests folder that cannot be written, before anything is written.

    ``overwrite`` (``--force``) replaces an empty folder or a manifests folder tritonpipe wrote and
    nobody changed since, never a symbolic link, the root, the home folder, or the current folder or
    one of its parents (the same rules as the repository's ``-o``).
    """
    check_replaceable(folder, overwrite, marker=MARKER, what="manifests folder")
    folder = Path(folder).resolve()
    if repository is not None:
        repository = Path(repository).resolve()
        if folder == repository or repository in folder.parents or folder in repository.parents:
            raise ConfigError(f"the manifests folder {folder} and the repository {repository} must not contain each other")
    return folder


def write_manifests(manifests: Manifests, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every file to ``folder`` atomically (a staging folder moved into place), with its marker."""
    folder = check_target(folder, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for manifest in manifests.files:
            target = staging / manifest.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(manifest.text())
        marker = {"entry": manifests.entry, FILES: written_files(staging, MARKER)}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        swap_into_place(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"cannot write the manifests to {folder}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def summary(manifests: Manifests) -> Iterable[str]:
    """What the CLI prints after writing."""
    yield f"  /dev/shm {manifests.shm.quantity}; startup estimate " + ", ".join(
        f"{k} {v.seconds:.0f} s" for k, v in manifests.startup.items()
    )
    yield "  apply with: kubectl apply -k <folder>/overlays/cpu (or overlays/gpu, overlays/mig)"
