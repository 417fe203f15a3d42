"""End to end on a real tritonserver process, called with the real tritonclient.

References are computed independently: PIL / OpenCV decode and resize, torch interpolate,
and the same ONNX model run directly in ONNX Runtime.
"""

import concurrent.futures
import io
import threading

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.client.pipe import pipe
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import ServerError, TritonServer

pytestmark = pytest.mark.server

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(1, 3, 1, 1)
SIZES = [(48, 64), (120, 90), (240, 320), (33, 77)]
# decoders agree to within this on pixels; through the classifier it stays far below 1e-3 per logit
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_onnx):
    root = tmp_path_factory.mktemp("repos")
    classifier = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
            "mean": ",".join(map(str, MEAN.ravel())), "std": ",".join(map(str, STD.ravel())),
            "max": 8, "batching_timeout": 200, "instance_num": 1,
        },
        name="cls",
    )
    mats = load_graph(
        {"backend": "S[DecodeMat,ResizeMat,cvtColorMat]", "resize_h": 40, "resize_w": 56, "color": "rgb", "max": 4},
        name="mat",
    )
    fused = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
            "mean": ",".join(map(str, MEAN.ravel())), "std": ",".join(map(str, STD.ravel())),
            "max": 4, "fuse": True,
        },
        name="fused",
    )
    repos = [generate_repository(g, root / g.name).path for g in (classifier, mats, fused)]
    with TritonServer(repos) as running:
        yield running


@pytest.fixture(scope="module")
def session(tiny_onnx):
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


def reference_logits(session, jpeg: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    return session.run(None, {"x": (resized - MEAN) / STD})[0]


def reference_mat(jpeg: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(bgr, (56, 40), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classifier_matches_onnxruntime(server, session, jpeg_factory, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = PipelineClient(url, protocol=protocol, model="cls")
    for seed, (h, w) in enumerate(SIZES):
        jpeg = jpeg_factory(h, w, seed=seed)
        got = client.infer(jpeg)["scores"]
        want = reference_logits(session, jpeg)
        assert got.shape == (1, 10)
        np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


def test_fused_model_matches_onnxruntime(server, session, jpeg_factory):
    client = PipelineClient(server.grpc_url, protocol="grpc", model="fused")
    jpeg = jpeg_factory(77, 55, seed=9)
    np.testing.assert_allclose(client.infer(jpeg)["scores"], reference_logits(session, jpeg), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cpu_stages_match_opencv_exactly(server, jpeg_factory, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    client = PipelineClient(url, protocol=protocol, model="mat")
    for seed, (h, w) in enumerate(SIZES):
        jpeg = jpeg_factory(h, w, seed=seed)
        got = client.infer(jpeg)["OUTPUT"]
        assert got.shape == (1, 40, 56, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[0], reference_mat(jpeg))


def _stats(server, model):
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    entry = stats["model_stats"][0]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


def test_corrupt_jpeg_fails_alone_in_its_batch(server, session, jpeg_factory):
    good = [jpeg_factory(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES * 2)]
    corrupt = good[3][: len(good[3]) // 2]  # truncated
    requests = good[:3] + [corrupt] + good[4:]
    before = _stats(server, "cls_pre")
    barrier = threading.Barrier(len(requests))

    def call(jpeg):
        client = PipelineClient(server.grpc_url, protocol="grpc", model="cls")
        barrier.wait()
        try:
            return client.infer(jpeg)["scores"]
        except InferError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(call, requests))

    assert isinstance(results[3], InferError)
    assert "INVALID_ARG" in str(results[3]) or "Invalid argument" in str(results[3]) or "JPEG" in str(results[3])
    for index, result in enumerate(results):
        if index != 3:
            np.testing.assert_allclose(result, reference_logits(session, requests[index]), atol=LOGIT_ATOL, rtol=0)
    inferences, executions = (a - b for a, b in zip(_stats(server, "cls_pre"), before))
    assert inferences == len(requests)
    assert executions < inferences, "the requests were expected to share batches"
    # the instance and the server are still serving
    assert server.is_alive()
    np.testing.assert_allclose(
        PipelineClient(server.http_url, protocol="http", model="cls").infer(good[0])["scores"],
        reference_logits(session, good[0]), atol=LOGIT_ATOL, rtol=0,
    )


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "PNG"),
        (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), "JPEG"),
    ],
)
def test_bad_inputs_get_clear_errors(server, payload, words):
    client = PipelineClient(server.grpc_url, protocol="grpc", model="mat")
    with pytest.raises(InferError) as info:
        client.infer(payload)
    assert words.lower() in str(info.value).lower()


def test_pipe_api_from_many_threads(server, jpeg_factory):
    models = pipe(url=server.grpc_url, model="mat")
    jpegs = [jpeg_factory(h, w, seed=20 + i) for i, (h, w) in enumerate(SIZES * 3)]
    items = [{"data": j} for j in jpegs]
    models(items)
    for item, jpeg in zip(items, jpegs):
        assert isinstance(item["result"], torch.Tensor)
        np.testing.assert_array_equal(item["result"][0].numpy(), reference_mat(jpeg))


def test_pipe_serves_a_config_of_its_own(jpeg_factory):
    jpeg = jpeg_factory(60, 80, seed=3)
    with pipe({"backend": "S[DecodeMat,PillowResizeMat]", "resize_h": 30, "resize_w": 20}) as models:
        item = {"data": jpeg}
        models(item)
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    want = np.asarray(Image.fromarray(bgr).resize((20, 30), Image.BILINEAR))
    np.testing.assert_array_equal(item["result"][0].numpy(), want)


def test_model_load_failure_names_the_model(tmp_path):
    repo = generate_repository(load_graph({"backend": "DecodeMat"}, name="broken"), tmp_path / "repo").path
    config = repo / "broken" / "config.pbtxt"
    config.write_text(config.read_text().replace("DecodeMat(", "DecodeMatt("))
    with pytest.raises(ServerError) as info:
        # the failed start keeps its log, here in the test's own folder
        TritonServer(repo, log_file=tmp_path / "server.log").start(timeout=120)
    assert "broken" in str(info.value) and "DecodeMatt" in str(info.value)
