"""``overlap = true`` on a real tritonserver: two batches in flight per instance, each request answered once.

Many concurrent requests, with corrupt JPEGs among them, go to one fused classifier instance that
keeps two batches in flight; every good answer must match ONNX Runtime on Pillow's pixels, and
every corrupt one must fail alone with INVALID_ARG, through both protocols.
"""

import concurrent.futures
import io
import re
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.e2e.statistics import settled_statistics

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.model.metrics import IMAGES, STEP_PREFIX, WAIT_STEP
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

LOGIT_ATOL = 2e-3  # decoders agree to within a level or two; through the classifier far below this


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_onnx):
    config = {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
        "max": 8, "batching_timeout": 2, "instance_num": 1, "fuse": True, "overlap": True,
    }
    repo = generate_repository(load_graph(config, name="ovl"), tmp_path_factory.mktemp("overlap") / "repo").path
    with TritonServer(repo) as running:
        yield running


def reference(session, jpeg: bytes) -> np.ndarray:
    rgb = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1)[None].float()
    resized = F.interpolate(rgb, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    return session.run(None, {"x": resized})[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_every_request_gets_its_own_answer(server, tiny_onnx, jpeg_factory, protocol):
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    jpegs = [jpeg_factory(30 + 7 * (i % 9), 40 + 5 * (i % 11), seed=i) for i in range(60)]
    corrupt = {5, 23, 41}
    for i in corrupt:
        jpegs[i] = jpegs[i][: len(jpegs[i]) // 3]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = PipelineClient(url, protocol=protocol, model="ovl")
    before = settled_statistics(server, "ovl")
    handed_before = handed_over(server, until=0)

    check_answers(client, session, jpegs, corrupt, threads=16)

    count = lambda stats, key: int(stats.get(key, 0))  # noqa: E731
    after = settled_statistics(server, "ovl", count(before, "inference_count") + len(jpegs))
    requests = count(after, "inference_count") - count(before, "inference_count")
    batches = count(after, "execution_count") - count(before, "execution_count")
    assert requests == len(jpegs)
    assert batches < requests  # the corrupt ones shared batches with good ones
    # the requests went the overlapping way: execute counted them as handed over
    assert handed_over(server, until=handed_before + len(jpegs)) == handed_before + len(jpegs)


def check_answers(client, session, jpegs: list[bytes], corrupt, threads: int) -> None:
    """Send every JPEG at once from ``threads`` threads: each corrupt one must fail alone with INVALID_ARG, and
    every other answer match ONNX Runtime on Pillow's pixels."""

    def call(jpeg):
        try:
            return client.infer(jpeg)["scores"]
        except InferError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(call, jpegs))
    for i, (jpeg, got) in enumerate(zip(jpegs, answers)):
        if i in corrupt:
            assert isinstance(got, InferError) and got.status == "INVALID_ARG", (i, got)
            assert "JPEG" in str(got)
        else:
            assert not isinstance(got, InferError), (i, got)
            np.testing.assert_allclose(got, reference(session, jpeg), atol=LOGIT_ATOL, rtol=0)


def handed_over(server, until: int) -> int:
    """Requests the model's execute handed to its head thread, once the count reaches ``until`` (or 15 s)."""
    pattern = re.compile(rf'^{IMAGES}{{[^}}]*stage="{re.escape(STEP_PREFIX + WAIT_STEP)}"[^}}]*}} (\S+)$', re.M)
    deadline = time.monotonic() + 15
    while True:
        page = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        found = int(sum(float(v) for v in pattern.findall(page)))
        if found >= until or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
