"""What the image serves and what a replica's container runs: binary, ports, health paths, mounts.

These are defined once here; the tests compare them with ``docker/Dockerfile``,
``docker/compose.yaml`` and the server owner (``TritonServer``), which waits on the same
readiness path (:data:`tritonpipe.contract.READY_PATH`).
"""

from __future__ import annotations

from ..contract import READY_PATH

__all__ = [
    "EXIT_TIMEOUT_S", "IMAGE", "LIVE_PATH", "METRICS_PATH", "MODELS_MOUNT", "PORTS", "QUEUE_METRIC", "READY_PATH",
    "RUN_AS_USER", "SERVER_BINARY", "SUCCESS_METRIC", "server_args",
]

#: the server the image's CMD starts (docker/Dockerfile)
SERVER_BINARY = "tritonserver"
#: Triton's default ports, which docker/Dockerfile EXPOSEs; the names are the Service's port names
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
LIVE_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
#: where docker/Dockerfile's CMD looks for the repository
MODELS_MOUNT = "/models"
#: seconds Triton drains in-flight requests on SIGTERM (docker/compose.yaml uses the same)
EXIT_TIMEOUT_S = 30
#: the non-root user of NGC Triton images ("triton-server")
RUN_AS_USER = 1000
IMAGE = "tritonpipe"

#: Triton's counters behind the autoscaler's metric: cumulative queue time and successful requests
QUEUE_METRIC = "nv_inference_queue_duration_us"
SUCCESS_METRIC = "nv_inference_request_success"


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
