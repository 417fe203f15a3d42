"""Model engines end to end on one real tritonserver (CPU): ONNX Runtime with two outputs, a
postprocessor, and the torch engine, each checked against running the same model directly.
"""

import concurrent.futures
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

SIZES = [(48, 64), (120, 90), (33, 77), (64, 64)]
ATOL = 2e-3  # decoders differ slightly on pixels; far below this after the models


class TwoOutputs(torch.nn.Module):
    """FP32 [n,3,32,32] -> scores [n,10], features [n,8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        feat = torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))
        return self.fc(feat), feat


def model_node(model, **extra):
    return {"backend": "SyncTensor[TensorrtTensor]", "model": str(model), "max": 4, "batching_timeout": 50, **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_onnx):
    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    net = TwoOutputs().eval()
    two = root / "two.onnx"
    torch.onnx.export(
        net, (torch.randn(1, 3, 32, 32),), str(two), input_names=["x"], output_names=["scores", "feat"],
        dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}, "feat": {0: "n"}}, opset_version=17, dynamo=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(net, torch.randn(1, 3, 32, 32)).save(str(root / "two.ts"))
    return {"two_onnx": two, "two_ts": root / "two.ts", "tiny_onnx": tiny_onnx, "net": net}


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    # one shared preprocessing node fanning out to three model nodes keeps the Python stubs (and start time) few
    graph = load_graph(
        {
            "name": "engines",
            "pre": {
                "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor]", "resize_h": 32, "resize_w": 32, "color": "rgb",
                "max": 4, "batching_timeout": 50, "next": "two,best,scripted,frozen",
            },
            "two": model_node(models["two_onnx"], engine="onnxruntime"),
            "best": model_node(models["tiny_onnx"], postprocessor="SoftmaxMax", mean="120,115,100", std="60,57,57"),
            "scripted": model_node(models["two_ts"], inputs="x:FP32:3x32x32"),
            "frozen": model_node(models["two_ts"], inputs="x:FP32:3x32x32", freeze=True),
        }
    )
    repo = generate_repository(graph, tmp_path_factory.mktemp("repos") / "engines", device="cpu").path
    with TritonServer(repo) as running:
        yield running


@pytest.fixture(scope="module")
def responses(server, jpeg_factory):
    """Concurrent requests, so that they share batches and extra outputs are split per request."""
    jpegs = [jpeg_factory(h, w, seed=30 + i) for i, (h, w) in enumerate(SIZES)]
    client = PipelineClient(server.grpc_url, protocol="grpc", model="engines")
    with concurrent.futures.ThreadPoolExecutor(len(jpegs)) as pool:
        return list(zip(jpegs, pool.map(client.infer, jpegs)))


def pixels(jpeg: bytes) -> np.ndarray:
    """What the pipeline feeds the model: RGB, bilinear-resized to 32x32, FP32 [1,3,32,32]."""
    rgb = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    return F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).numpy()


def test_outputs_of_every_node_are_served(responses):
    names = {"two_scores", "feat", "best_scores", "scripted_output0", "output1", "frozen_output0", "frozen_output1"}
    for _, got in responses:
        assert set(got) == names


def test_two_outputs_match_onnxruntime(responses, models):
    session = ort.InferenceSession(str(models["two_onnx"]), providers=["CPUExecutionProvider"])
    for jpeg, got in responses:
        scores, feat = session.run(None, {"x": pixels(jpeg)})
        assert got["two_scores"].shape == (1, 10) and got["feat"].shape == (1, 8)
        np.testing.assert_allclose(got["two_scores"], scores, atol=ATOL, rtol=0)
        np.testing.assert_allclose(got["feat"], feat, atol=ATOL, rtol=0)


def test_softmax_max_postprocessor_matches_onnxruntime(responses, models):
    session = ort.InferenceSession(str(models["tiny_onnx"]), providers=["CPUExecutionProvider"])
    mean = np.array([120, 115, 100], np.float32).reshape(1, 3, 1, 1)
    std = np.array([60, 57, 57], np.float32).reshape(1, 3, 1, 1)
    for jpeg, got in responses:
        logits = session.run(None, {"x": (pixels(jpeg) - mean) / std})[0][0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        best = got["best_scores"]
        assert best.shape == (1, 2) and best.dtype == np.float32
        np.testing.assert_allclose(best[0, 0], probs.max(), atol=1e-3)
        top2 = np.sort(probs)[-2:]
        if top2[1] - top2[0] > 1e-3:  # a near tie may flip on decoder rounding
            assert best[0, 1] == probs.argmax()


def test_torchscript_engine_matches_eager_frozen_or_not(responses, models):
    for jpeg, got in responses:
        with torch.no_grad():
            scores, feat = models["net"](torch.from_numpy(pixels(jpeg)))
        np.testing.assert_allclose(got["scripted_output0"], scores.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got["output1"], feat.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got["frozen_output0"], scores.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got["frozen_output1"], feat.numpy(), atol=ATOL, rtol=0)
