"""``shared_process`` on a real tritonserver: two instances, one shared process, each request answered right.

Concurrent requests, corrupt JPEGs among them, go to a fused classifier of two instances whose decode and
resize (``head``), or whole chain (``chain``), run in the shared process; every good answer must match ONNX
Runtime on Pillow's pixels and every corrupt one must fail alone with INVALID_ARG.  The shared process is then
killed: the instances go on answering (running their chains themselves) and start another; and it ends with
the server.
"""

import os
import re
import signal
import time
import urllib.request

import onnxruntime as ort
import pytest
from tests.e2e.test_overlap import check_answers
from tests.unit.model.test_shared_process import shared_processes

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.model import shared_client
from tritonpipe.model.metrics import IMAGES
from tritonpipe.model.shared_client import SHARED_STAGE
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server


@pytest.fixture(scope="module", params=["head", "chain"])
def served(request, tmp_path_factory, tiny_onnx):
    config = {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
        "max": 8, "batching_timeout": 2, "instance_num": 2, "fuse": True, "shared_process": request.param,
    }
    repo = generate_repository(load_graph(config, name="shh"), tmp_path_factory.mktemp("shared_process") / "repo").path
    version = repo / "shh" / "1"
    with TritonServer(repo) as running:
        yield running, version
    deadline = time.monotonic() + 20
    while shared_processes(version):
        assert time.monotonic() < deadline, "the shared process outlived its server"
        time.sleep(0.2)


def ask(server, tiny_onnx, jpeg_factory, count=40, corrupt=(3, 17, 30)):
    """Send ``count`` JPEGs at once, those at ``corrupt`` truncated; check every answer."""
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    jpegs = [jpeg_factory(30 + 7 * (i % 9), 40 + 5 * (i % 11), seed=i) for i in range(count)]
    for i in corrupt:
        jpegs[i] = jpegs[i][: len(jpegs[i]) // 3]
    check_answers(PipelineClient(server.grpc_url, protocol="grpc", model="shh"), session, jpegs, corrupt, threads=12)


def shared_images(server) -> int:
    """Images that went to the shared process, by the instances' stage metrics."""
    pattern = re.compile(rf'^{IMAGES}{{[^}}]*stage="{SHARED_STAGE}"[^}}]*}} (\S+)$', re.M)
    page = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return int(sum(float(v) for v in pattern.findall(page)))


def test_one_shared_process_answers_for_both_instances(served, tiny_onnx, jpeg_factory):
    server, version = served
    assert len(shared_processes(version)) == 1
    before = shared_images(server)
    ask(server, tiny_onnx, jpeg_factory)
    deadline = time.monotonic() + 15
    while shared_images(server) < before + 40:  # metrics are published a moment after the answers
        assert time.monotonic() < deadline, f"only {shared_images(server) - before} of 40 images went to the shared process"
        time.sleep(0.2)


def test_a_killed_shared_process_costs_no_request(served, tiny_onnx, jpeg_factory):
    server, version = served
    (first,) = shared_processes(version)
    os.kill(first, signal.SIGKILL)
    while shared_client.alive(first):
        time.sleep(0.05)
    ask(server, tiny_onnx, jpeg_factory)  # the instances run their chains themselves meanwhile
    deadline = time.monotonic() + 120
    while True:
        started = [pid for pid in shared_processes(version) if pid != first]
        before = shared_images(server)
        ask(server, tiny_onnx, jpeg_factory, count=12, corrupt=(5,))
        time.sleep(0.5)
        if started and shared_images(server) > before:
            break
        assert time.monotonic() < deadline, "no new shared process took the instances' batches"
        time.sleep(shared_client.RETRY_SECONDS / 2)
