"""The one-launch resize with the colour order, the model's normalisation and dtype folded in, on a real server.

The fold happens where the Triton kernel runs.  Here that is a CPU instance with ``TRITON_INTERPRET=1``
in the server's environment, so the stub runs the kernel under Triton's interpreter.  The answers are
checked against PIL, torch's interpolate and ONNX Runtime, computed apart from tritonpipe.
"""

import concurrent.futures
import io
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.e2e.statistics import settled_statistics

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(1, 3, 1, 1)
LOGIT_ATOL = 2e-3  # libjpeg-turbo against PIL's decode, through the classifier


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_onnx):
    pytest.importorskip("triton")
    graph = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "model": str(tiny_onnx), "cvtColorTensor::color": "bgr",
            "mean": ",".join(map(str, MEAN.ravel())), "std": ",".join(map(str, STD.ravel())),
            "max": 8, "batching_timeout": 300, "instance_num": 1, "fuse": True,
        },
        name="folded",
    )
    repo = generate_repository(graph, tmp_path_factory.mktemp("fold") / "repo", device="cpu").path
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")  # the stub's resize runs the kernel, under Triton's interpreter
        with TritonServer(repo) as running:
            yield running


def reference_logits(session, jpeg: bytes) -> np.ndarray:
    """PIL's RGB, resized by torch, channels reversed to BGR, normalised, through ONNX Runtime."""
    rgb = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1)[None].float()
    bgr = F.interpolate(rgb, size=(32, 32), mode="bilinear", align_corners=False).flip(1).numpy()
    return session.run(None, {"x": (bgr - MEAN) / STD})[0]


def test_a_served_batch_is_folded_and_answers_as_the_stages_would(server, tiny_onnx, jpeg_factory):
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    goods = [jpeg_factory(h, w, seed=i) for i, (h, w) in enumerate([(48, 64), (120, 90), (33, 77), (64, 64), (90, 120)])]
    jpegs = goods[:2] + [goods[0][: len(goods[0]) // 2]] + goods[2:]
    barrier = threading.Barrier(len(jpegs))

    def call(jpeg):
        barrier.wait()
        try:
            return PipelineClient(server.grpc_url, protocol="grpc", model="folded").infer(jpeg)["scores"]
        except InferError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(jpegs)) as pool:
        results = list(pool.map(call, jpegs))
    bad = results.pop(2)
    assert isinstance(bad, InferError) and bad.status == "INVALID_ARG" and "truncated" in str(bad), bad
    for jpeg, got in zip(goods, results):
        np.testing.assert_allclose(got, reference_logits(session, jpeg), atol=LOGIT_ATOL, rtol=0)
    stats = settled_statistics(server, "folded", len(jpegs))  # a failed image is still an inference to Triton
    executions, inferences = int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))
    assert inferences == len(jpegs) and 0 < executions < inferences, f"the requests were expected to share batches: {stats}"
    log = server.logs()
    assert "ResizeTensor on cpu does colour order bgr, the model's mean and std, float32 output in its one launch" in log
