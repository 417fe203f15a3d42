"""Two real tritonserver replicas on the CPU from one repository, started with the flags the
Kubernetes manifests give the container, as a Deployment with two pods would run them.

A client spreads requests over both; every answer is checked against the same ONNX model run in
ONNX Runtime on independently decoded and resized pixels (PIL, torch).  Each replica must answer
the probe paths the manifests use and expose the metrics the autoscaler's rule reads.
"""

import concurrent.futures
import io
import re
import shutil
import subprocess
import threading
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.deploy import image, k8s
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(1, 3, 1, 1)
LOGIT_ATOL = 2e-3
#: what the owner sets itself (addresses, ports, repository folder, drain time)
OWNED = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=", "--exit-timeout-secs=")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_onnx):
    root = tmp_path_factory.mktemp("replicas")
    graph = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
            "mean": ",".join(map(str, MEAN.ravel())), "std": ",".join(map(str, STD.ravel())),
            "max": 4, "instance_num": 1, "batching_timeout": 2,
        },
        name="cls",
    )
    repo = generate_repository(graph, root / "repo")
    folder = k8s.write_manifests(k8s.build_manifests(repo.configs, repo.path, repo.entry), root / "k8s")
    # the cpu overlay as kubectl apply -k renders it
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the cpu overlay is rendered with `kubectl kustomize`, as `kubectl apply -k` does")
    done = subprocess.run(["kubectl", "kustomize", str(folder / "overlays" / "cpu")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    rules = yaml.safe_load((folder / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return repo, container, rules["rules"]["custom"][0]


@pytest.fixture(scope="module")
def replicas(deployment):
    repo, container, _ = deployment
    args = container["args"]
    assert args[0] == image.SERVER_BINARY
    flags = tuple(a for a in args[1:] if not a.startswith(OWNED))
    assert "--strict-readiness=true" in flags
    servers = [TritonServer(repo.path, exit_timeout=image.EXIT_TIMEOUT_S, extra_args=flags) for _ in range(2)]
    try:
        # one after the other from this thread: a server dies with the thread that started it
        for server in servers:
            server.start(timeout=300)
        yield servers
    finally:
        for server in servers:
            server.close()


def reference_logits(session, jpeg: bytes) -> np.ndarray:
    rgb = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    return session.run(None, {"x": (resized - MEAN) / STD})[0]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def _counter(metrics: str, name: str, model: str) -> float:
    pattern = rf'^{re.escape(name)}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$'
    values = [float(v) for v in re.findall(pattern, metrics, re.M)]
    assert values, f"{name} for model {model!r} is not among the server's metrics"
    return sum(values)


def test_a_client_spread_over_two_replicas_gets_every_answer_right(replicas, deployment, tiny_onnx, jpeg_factory):
    repo, _, _ = deployment
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    clients = [PipelineClient(s.grpc_url, protocol="grpc", model=repo.entry) for s in replicas]
    sizes = [(48, 64), (120, 90), (240, 320), (33, 77), (64, 64), (97, 41)]
    jpegs = [jpeg_factory(h, w, seed=seed) for seed, (h, w) in enumerate(sizes * 4)]
    lock, turn = threading.Lock(), [0]

    def call(jpeg):
        with lock:  # round robin, as a Service spreading new connections would
            index = turn[0] % len(clients)
            turn[0] += 1
        return index, clients[index].infer(jpeg)["scores"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, jpegs))
    for jpeg, (_, got) in zip(jpegs, results):
        np.testing.assert_allclose(got, reference_logits(session, jpeg), atol=LOGIT_ATOL, rtol=0)
    served = [sum(1 for index, _ in results if index == i) for i in range(2)]
    assert served == [len(jpegs) // 2] * 2
    # each replica counted exactly the requests it was sent, under the names the autoscaler reads
    for server, count in zip(replicas, served):
        _, metrics = _get(f"http://{server.client_host}:{server.metrics_port}{image.METRICS_PATH}")
        assert _counter(metrics, image.SUCCESS_METRIC, repo.entry) == count
        assert _counter(metrics, image.QUEUE_METRIC, repo.entry) >= 0


def test_each_replica_answers_the_probes_and_exposes_the_rules_metrics(replicas, deployment):
    repo, container, rule = deployment
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {ports[p["port"]] for p in probes.values()} == {image.PORTS["http"]}
    # the metric names the adapter rule queries, read from the generated rule itself
    names = set(re.findall(r"\bnv_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert names == {image.QUEUE_METRIC, image.SUCCESS_METRIC}
    for server in replicas:
        for probe in probes.values():
            status, _ = _get(f"http://{server.http_url}{probe['path']}")
            assert status == 200, probe
        status, metrics = _get(f"http://{server.client_host}:{server.metrics_port}{image.METRICS_PATH}")
        assert status == 200
        for name in names:
            _counter(metrics, name, repo.entry)
