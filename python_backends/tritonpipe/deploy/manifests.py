"""The Kubernetes objects of the base, and the kustomizations and patches the other folders use,
as plain dicts: Deployment, Service, HorizontalPodAutoscaler, ServiceMonitor and the
prometheus-adapter rule behind the autoscaler's metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .estimates import PROBE_PERIOD_S, ShmSize, StartupEstimate
from .image import (
    EXIT_TIMEOUT_S,
    IMAGE,
    LIVE_PATH,
    METRICS_PATH,
    MODELS_MOUNT,
    PORTS,
    QUEUE_METRIC,
    READY_PATH,
    RUN_AS_USER,
    SUCCESS_METRIC,
    server_args,
)

# --- the autoscaler ---------------------------------------------------------------------------------
#: what the prometheus-adapter rule calls average queue time per request, in microseconds
HPA_METRIC = "tritonpipe_queue_us_per_request"
QUEUE_TARGET_US = 20_000
MIN_REPLICAS = 1
MAX_REPLICAS = 4
RATE_WINDOW = "2m"


def app_name(entry: str) -> str:
    """A DNS-1035 label for the entry model: ``tritonpipe-<entry>``."""
    slug = re.sub(r"[^a-z0-9-]+", "-", entry.lower()).strip("-")
    return f"tritonpipe-{slug}"[:63].rstrip("-") if slug else "tritonpipe"


def labels(name: str) -> dict[str, str]:
    """The labels every object of the app carries."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tritonpipe"}


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def deployment(name: str, shm: ShmSize, startup: StartupEstimate, memory: int, flags: Sequence[str] = ()) -> dict[str, Any]:
    """The base Deployment: one container running the image's server, without a repository; ``flags``: the server
    flags the models need (:func:`~tritonpipe.repository.configs.server_flags`)."""
    container = {
        "name": "tritonserver",
        "image": IMAGE,
        "args": [*server_args(), *flags],
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
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {
            "replicas": MIN_REPLICAS,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels(name)},
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


def service(name: str) -> dict[str, Any]:
    """A ClusterIP Service over the ready pods, one port per Triton endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": port, "port": number, "targetPort": port, "protocol": "TCP"} for port, number in PORTS.items()],
        },
    }


def hpa(name: str) -> dict[str, Any]:
    """The HorizontalPodAutoscaler: scales the Deployment on :data:`HPA_METRIC`."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels(name)},
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


def service_monitor(name: str) -> dict[str, Any]:
    """The Prometheus Operator's ServiceMonitor: scrape every pod's metrics port."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "labels": labels(name)},
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


def kustomization(kind: str = "Kustomization", **fields: Any) -> dict[str, Any]:
    """A ``kustomization.yaml``: a Kustomization, or a Component with ``kind="Component"``."""
    api = "kustomize.config.k8s.io/v1beta1" if kind == "Kustomization" else "kustomize.config.k8s.io/v1alpha1"
    return {"apiVersion": api, "kind": kind, **fields}


def deployment_patch(name: str, container: dict[str, Any] | None = None, **pod: Any) -> dict[str, Any]:
    """A strategic-merge patch of the Deployment: ``container`` merges into the server's container,
    ``pod`` into the pod spec."""
    spec: dict[str, Any] = dict(pod)
    if container is not None:
        spec["containers"] = [{"name": "tritonserver", **container}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"spec": spec}},
    }
