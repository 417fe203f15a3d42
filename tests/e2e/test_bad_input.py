"""Bad input on a real tritonserver: each bad request fails alone with INVALID_ARG.

The bad requests are sent together with good ones so that they share dynamic batches
(checked with the statistics endpoint); the good ones must still match OpenCV / Pillow, and
the instance must keep serving afterwards.
"""

import concurrent.futures
import io
import struct
import threading

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tests.e2e.statistics import settled_statistics
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tritonpipe import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

OUT_H, OUT_W = 40, 56
INVALID_ARG = "StatusCode.INVALID_ARGUMENT"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    batching = {"max": 8, "batching_timeout": 200}
    mat = load_graph(
        {"backend": "S[DecodeMat,ResizeMat,cvtColorMat]", "resize_h": OUT_H, "resize_w": OUT_W, "color": "rgb", **batching},
        name="mat",
    )
    # two nodes: the ensemble "tns" runs "dec" (bytes -> 1x3xHxW) then "post", whose input is a tensor
    tns = load_graph(
        {
            "name": "tns",
            "dec": {"backend": "DecodeTensor", "next": "post", **batching},
            "post": {"backend": "S[PillowResizeTensor]", "resize_h": OUT_H, "resize_w": OUT_W, "max": 8},
        }
    )
    repos = [generate_repository(graph, root / graph.name).path for graph in (mat, tns)]
    with TritonServer(repos) as running:
        yield running


def reference(model: str, jpeg: bytes) -> np.ndarray:
    if model == "mat":
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        resized = cv2.resize(bgr, (OUT_W, OUT_H), interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)[None]
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((OUT_W, OUT_H), Image.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)[None]


def with_frame_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The same file with its frame header (SOF) declaring another size."""
    pos = 2
    while pos < len(jpeg):
        marker, length = jpeg[pos + 1], struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xC3:
            return jpeg[: pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9 :]
        pos += 2 + length
    raise AssertionError("no frame header")


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 60)).save(buffer, fmt)
    return buffer.getvalue()


def bad_cases(jpeg: bytes) -> dict[str, tuple[np.ndarray, str]]:
    """Bad payloads for the encoded-image input, each with a word its error must name."""
    as_row = lambda data: np.frombuffer(data, np.uint8)[None]  # noqa: E731
    return {
        "empty": (np.zeros((1, 0), np.uint8), "empty"),
        "truncated": (as_row(jpeg[: len(jpeg) * 2 // 3]), "truncated"),
        "random": (as_row(np.random.default_rng(5).integers(0, 256, 700, dtype=np.uint8).tobytes()), "not a JPEG"),
        "tiff": (as_row(encoded("TIFF")), "TIFF"),  # DecodeMat reads PNG, BMP and WebP; neither decoder reads TIFF
        "gif": (as_row(encoded("GIF")), "GIF"),
        "huge": (as_row(with_frame_size(jpeg, 60000, 60000)), "limit"),
        "zero-height": (as_row(with_frame_size(jpeg, 0, 64)), "zero"),
        "two images in one request": (np.stack([np.frombuffer(jpeg, np.uint8)] * 2), "1-D"),
    }


def infer(url: str, model: str, array: np.ndarray, input_name: str = "INPUT"):
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor], client_timeout=60).as_numpy("OUTPUT")


def stats(server, model: str, inferences: int = 0) -> tuple[int, int]:
    entry = settled_statistics(server, model, inferences)
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


@pytest.mark.parametrize("model, batched_model", [("mat", "mat"), ("tns", "dec")])
def test_bad_requests_fail_alone_in_shared_batches(server, jpeg_factory, model, batched_model):
    sizes = [(48, 64), (120, 90), (33, 77), (64, 64), (100, 150), (31, 45), (90, 120), (60, 80)]
    goods = [jpeg_factory(h, w, seed=40 + i) for i, (h, w) in enumerate(sizes)]
    cases = bad_cases(goods[0])
    # good and bad interleaved, of ragged lengths, all sent at once
    requests: list[tuple[str, np.ndarray]] = []
    for index, (name, (array, _)) in enumerate(cases.items()):
        requests += [(f"good {index}", np.frombuffer(goods[index], np.uint8)[None]), (name, array)]
    before = stats(server, batched_model)
    barrier = threading.Barrier(len(requests))

    def call(array):
        barrier.wait()
        try:
            return infer(server.grpc_url, model, array)
        except InferenceServerException as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = dict(zip((name for name, _ in requests), pool.map(call, (array for _, array in requests))))

    for name, (_, word) in cases.items():
        error = results[name]
        assert isinstance(error, InferenceServerException), f"{name}: accepted, got {error!r}"
        assert error.status() == INVALID_ARG, f"{name}: {error.status()} {error.message()}"
        assert word.lower() in error.message().lower(), f"{name}: {error.message()}"
    for index in range(len(cases)):
        np.testing.assert_array_equal(results[f"good {index}"], reference(model, goods[index]))

    settled = stats(server, batched_model, before[0] + len(requests) + 1)
    inferences, executions = (after - earlier for after, earlier in zip(settled, before))
    assert inferences == len(requests) + 1  # the two-image request counts twice
    assert executions < inferences, "the requests were expected to share batches"
    assert server.is_alive()
    np.testing.assert_array_equal(infer(server.grpc_url, model, np.frombuffer(goods[1], np.uint8)[None]), reference(model, goods[1]))


TENSOR_CASES = [
    # model, array, what the error names; Triton checks the type and shape against the config,
    # and the stage checks what the config leaves open (sizes)
    ("mat", np.zeros((1, 100), np.float32), "FP32"),
    ("tns", np.zeros((1, 100), np.int32), "INT32"),
    ("mat", np.zeros((1, 10, 3), np.uint8), "shape"),
    ("post", np.zeros((1, 3, 20, 30), np.float32), "FP32"),
    ("post", np.zeros((2, 30), np.uint8), "shape"),
    ("post", np.zeros((1, 4, 20, 30), np.uint8), "shape"),
    ("post", np.zeros((1, 3, 0, 30), np.uint8), "empty"),
]


@pytest.mark.parametrize("model, array, word", TENSOR_CASES, ids=lambda v: getattr(v, "shape", v))
def test_wrong_dtype_or_rank_is_refused_cleanly(server, jpeg_factory, model, array, word):
    with pytest.raises(InferenceServerException) as info:
        infer(server.grpc_url, model, array)
    assert info.value.status() == INVALID_ARG, info.value.message()
    assert word.lower() in info.value.message().lower()
    # the tensor-input model still serves a proper 1x3xHxW uint8 request
    image = np.asarray(Image.open(io.BytesIO(jpeg_factory(50, 70, seed=1))).convert("RGB"))
    got = infer(server.grpc_url, "post", np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    want = np.asarray(Image.fromarray(image).resize((OUT_W, OUT_H), Image.BILINEAR)).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("payload, word", [(b"", "empty"), (encoded("TIFF"), "TIFF"), (b"\xff\xd8\xff", "truncated")])
def test_http_reports_bad_input_as_400(server, payload, word):
    client = httpclient.InferenceServerClient(server.http_url)
    array = np.frombuffer(payload, np.uint8).reshape(1, -1)
    tensor = httpclient.InferInput("INPUT", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("mat", [tensor])
    finally:
        client.close()  # an open keep-alive connection holds up the server's shutdown
    assert info.value.status() == "400" and word.lower() in info.value.message().lower()
