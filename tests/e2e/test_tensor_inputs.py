"""Tensor requests end to end: model-first pipelines, two-input models, and torchpipe-style graphs.

References: the same ONNX files run directly in ONNX Runtime, and PIL for decoding.
"""

import concurrent.futures
import io
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import tritonpipe as tp
from tritonpipe.client.client import InferError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

SEED_MODEL = "resnet18_-1x3x224x224.onnx"
ATOL = 1e-4


def export_classifier(path):
    """A ResNet-shaped classifier: FP32 input [n,3,224,224] -> logits FP32 [n,10]."""
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "fc_w": rng.standard_normal((10, 8)).astype(np.float32),
        "fc_b": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def seed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seed")
    export_classifier(folder / SEED_MODEL)
    return folder


@pytest.fixture(scope="module")
def models(seed_folder):
    """The seeds' example, written as torchpipe users write it; the model file is in the working folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(seed_folder)
        config = {"instance_num": 2, "batching_timeout": 5, "backend": "SyncTensor[TensorrtTensor]",
                  "model": SEED_MODEL, "max": 4}
        models = tp.pipe(config)
    with models:
        yield models


def run_direct(path, **inputs) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: np.asarray(value) for name, value in inputs.items()})


def test_seed_example_through_pipe_matches_onnxruntime(models, seed_folder):
    input = {"data": torch.ones(1, 3, 224, 224)}
    models(input)
    result = torch.from_dlpack(input["result"])
    assert result.shape == (1, 10) and result.dtype == torch.float32 and result.device.type == "cpu"
    want = run_direct(seed_folder / SEED_MODEL, input=np.ones((1, 3, 224, 224), np.float32))[0]
    np.testing.assert_allclose(result.numpy(), want, atol=ATOL, rtol=0)


def test_pipe_takes_arrays_lists_and_unbatched_tensors_from_many_threads(models, seed_folder):
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((3, 224, 224)).astype(np.float32) for _ in range(12)]
    want = run_direct(seed_folder / SEED_MODEL, input=np.stack(images))[0]
    items = [{"data": torch.from_numpy(image)} for image in images[:4]]  # no batch dimension
    items += [{"data": image[None]} for image in images[4:8]]  # numpy
    items += [{"data": [torch.from_numpy(images[8]), images[9][None]]}, {"data": [images[10], images[11]]}]  # lists

    def call(item):
        models(item)
        return item["result"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, items))
    assert [tuple(r.shape) for r in results] == [(1, 10)] * 8 + [(2, 10)] * 2
    np.testing.assert_allclose(torch.cat(results).numpy(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_seed_example_over_raw_tritonclient(models, seed_folder, protocol):
    if protocol == "http":
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(models.server.http_url)
    else:
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(models.server.grpc_url)
    batch = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)
    tensor = client_module.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    got = client.infer("pipeline", [tensor]).as_numpy("logits")
    client.close()
    np.testing.assert_allclose(got, run_direct(seed_folder / SEED_MODEL, input=batch)[0], atol=ATOL, rtol=0)


def test_a_wrong_tensor_shape_is_refused_clearly(models):
    with pytest.raises(InferError, match=r"input") as caught:
        models({"data": torch.ones(1, 3, 100, 100)})
    assert caught.value.status == "INVALID_ARG"


GRAPH_TOML = """
[global]
instance_num = 1
max = 4
batching_timeout = 2

[letterbox]
backend = "S[DecodeTensor,ResizePadTensor]"
max_h = 32
max_w = 32
next = "model"

[model]
backend = "SyncTensor[TensorrtTensor]"
model = "pair.onnx"
map = "letterbox[result:data,inverse_transform:y]"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, pair_onnx):
    root = tmp_path_factory.mktemp("tensor-repos")
    pair = load_graph({"backend": "SyncTensor[TensorrtTensor]", "model": str(pair_onnx), "max": 4}, name="pair")
    shutil.copy(pair_onnx, root / "pair.onnx")
    (root / "graph.toml").write_text(GRAPH_TOML)
    graph = load_graph(root / "graph.toml", name="detector")
    repos = [generate_repository(g, root / g.name).path for g in (pair, graph)]
    with TritonServer(repos) as running:
        yield running


def test_a_two_input_model_matches_onnxruntime(server, pair_onnx):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = rng.standard_normal((2, 4)).astype(np.float32)
    with tp.pipe(url=server.grpc_url, model="pair") as models:
        item = {"data": torch.from_numpy(x), "y": torch.from_numpy(y)}
        models(item)
        with pytest.raises(InferError, match="the model also takes 'y'"):
            models({"data": torch.from_numpy(x)})
    scores, shifted = run_direct(pair_onnx, x=x, y=y)
    np.testing.assert_allclose(item["result"].numpy(), scores, atol=ATOL, rtol=0)
    np.testing.assert_allclose(item["shifted"].numpy(), shifted, atol=ATOL, rtol=0)


def test_torchpipe_graph_with_global_and_map_matches_onnxruntime(server, pair_onnx, jpeg_factory):
    jpeg = jpeg_factory(16, 32, seed=4)  # fits 32x32 at scale 1: the letterbox only pads below the image
    image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))).permute(2, 0, 1).float()
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, :16, :] = image
    y = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)  # scale 1, no offset
    with tp.pipe(url=server.http_url, protocol="http", model="detector") as models:
        item = {"data": jpeg}
        models(item)
    scores, shifted = run_direct(pair_onnx, x=x.numpy(), y=y)
    np.testing.assert_allclose(item["inverse_transform"].numpy(), y, atol=1e-6, rtol=0)
    np.testing.assert_allclose(item["shifted"].numpy(), shifted, atol=1e-6, rtol=0)
    np.testing.assert_allclose(item["result"].numpy(), scores, atol=ATOL, rtol=0)
