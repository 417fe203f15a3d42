"""Safety on a real tritonserver: outputs checked against the config, a hung stage timed out, more than JPEG decoded."""

import io
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tritonpipe import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server
STAGES = str(Path(__file__).resolve().parent / "safety_stages.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    graphs = [
        load_graph({"name": "wrong", "backend": "WrongOutput", "plugins": [STAGES]}),
        load_graph({"name": "hang", "backend": "Hang", "plugins": [STAGES], "execution_timeout": 2}),
        # two batches in flight: the hang is in the tail thread's step, the last one
        load_graph({"name": "hang_tail", "backend": "S[Identity,Hang]", "plugins": [STAGES], "execution_timeout": 2,
                    "overlap": True}),
        load_graph({"name": "mat", "backend": "DecodeMat", "max_pixels": 40 * 50}),
    ]
    repos = [generate_repository(graph, root / graph.name).path for graph in graphs]
    with TritonServer(repos) as running:
        yield running


def infer(server, model: str, data: bytes) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    request = grpcclient.InferInput("INPUT", [1, len(data)], "UINT8")
    request.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
    return client.infer(model, [request], client_timeout=120).as_numpy("OUTPUT")


@pytest.mark.parametrize("first_byte, got", [(1, "FP64[1x4]"), (2, "INT64[1x4]"), (3, "FP32[1x5]"), (4, "FP32[2x4]")])
def test_an_output_unlike_the_config_is_an_internal_error(server, first_byte, got):
    with pytest.raises(InferenceServerException) as info:
        infer(server, "wrong", bytes([first_byte, 7, 7]))
    assert info.value.status() == "StatusCode.INTERNAL"
    assert f"stage WrongOutput gave output 'OUTPUT' as {got}, but the model config declares FP32[1x4]" in str(info.value)
    np.testing.assert_array_equal(infer(server, "wrong", bytes([0, 7, 7])), np.full((1, 4), 3, np.float32))


def pillow(fmt: str, rgb: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **options)
    return out.getvalue()


def test_decode_mat_serves_png_bmp_and_webp_and_refuses_hostile_ones(server):
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for fmt, options in (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 70})):
        data = pillow(fmt, rgb, **options)
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(infer(server, "mat", data), want[None])
    hostile = {
        pillow("PNG", rgb)[:200]: "truncated PNG",
        pillow("PNG", np.zeros((50, 40, 3), np.uint8)): "image is 40x50 (2000 pixels); the limit is 2000 pixels",
        b"\x00" + pillow("BMP", rgb)[1:]: "not a JPEG, PNG, BMP or WebP image",
        pillow("WEBP", rgb)[:100]: "truncated WebP",
    }
    for data, words in hostile.items():
        with pytest.raises(InferenceServerException) as info:
            infer(server, "mat", data)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and words in str(info.value)


@pytest.mark.parametrize("model", ["hang", "hang_tail"])
def test_a_hung_batch_fails_with_the_timeout_instead_of_blocking(server, model):
    np.testing.assert_array_equal(infer(server, model, bytes([0, 1, 2])), np.full((1, 4), 3, np.float32))
    heals = server.heals
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        infer(server, model, bytes([1, 2]))  # the stage sleeps for an hour
    assert info.value.status() == "StatusCode.INTERNAL"
    assert "ran past execution_timeout=2s; the instance's stub exits so that it is replaced" in str(info.value)
    assert time.monotonic() - started < 100  # answered, not left waiting for the hour
    assert f"{model}_0_0: the batch of 1 request(s) ran past execution_timeout=2s" in server.logs()
    # the exited stub is replaced by the owner, and the model answers again
    deadline = time.monotonic() + 120
    while server.heals <= heals and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.heals > heals
    np.testing.assert_array_equal(infer(server, model, bytes([0, 1, 2, 3])), np.full((1, 4), 4, np.float32))
