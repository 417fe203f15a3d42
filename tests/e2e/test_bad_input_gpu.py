"""Bad input among good on a GPU instance: nvjpeg's decoder, the one-launch resize with the colour order and the
model's normalisation folded in, and the torch engine in FP16 with CUDA graphs, on a real server.

Every bad request fails alone with INVALID_ARG, naming what is wrong; the good ones sent in the same batches
answer as they do when sent alone (within the FP16 model's spread between batch sizes); the server serves on.
"""

import concurrent.futures
import threading

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tests.e2e.test_bad_input import bad_cases

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = [pytest.mark.server, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-gpu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.jit.trace(net, torch.randn(1, 3, 32, 32)).save(str(root / "net.ts"))
    graph = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "model": str(root / "net.ts"), "inputs": "x:FP32:3x32x32",
            "mean": "123.675,116.28,103.53", "std": "58.395,57.12,57.375", "cvtColorTensor::color": "bgr",
            "max": 16, "batching_timeout": 300, "instance_num": 1, "fuse": True, "warmup": "240x320",
        },
        name="gpu",
    )
    with TritonServer(generate_repository(graph, root / "repo", device="gpu").path) as running:
        yield running


def _answer(server, data):
    try:
        return PipelineClient(server.grpc_url, protocol="grpc", model="gpu").infer(data)["output0"]
    except InferError as exc:
        return exc


def test_bad_requests_fail_alone_in_shared_batches_on_the_gpu(server, jpeg_factory):
    sizes = [(48, 64), (120, 90), (33, 77), (64, 64), (100, 150), (31, 45), (90, 120), (60, 80)]
    goods = [jpeg_factory(h, w, seed=60 + i) for i, (h, w) in enumerate(sizes)]
    alone = [_answer(server, jpeg) for jpeg in goods]
    assert all(isinstance(a, np.ndarray) and a.shape == (1, 8) for a in alone), alone
    cases = bad_cases(goods[0])
    requests = []
    for index, (name, (array, _)) in enumerate(cases.items()):
        requests += [(f"good {index}", goods[index]), (name, array)]
    barrier = threading.Barrier(len(requests))

    def call(data):
        barrier.wait()
        return _answer(server, data)

    stats = lambda: grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("gpu", as_json=True)  # noqa: E731
    before = stats()["model_stats"][0]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = dict(zip((name for name, _ in requests), pool.map(call, (data for _, data in requests))))
    for name, (_, word) in cases.items():
        error = results[name]
        assert isinstance(error, InferError) and error.status == "INVALID_ARG", f"{name}: {error!r}"
        assert word.lower() in str(error).lower(), f"{name}: {error}"
    for index in range(len(cases)):
        np.testing.assert_allclose(results[f"good {index}"], alone[index], atol=2e-2, rtol=2e-2)
    after = stats()["model_stats"][0]
    assert int(after["execution_count"]) - int(before["execution_count"]) < len(requests), "expected shared batches"
    assert server.is_alive()
    np.testing.assert_allclose(_answer(server, goods[1]), alone[1], atol=2e-2, rtol=2e-2)
    assert "ResizeTensor on cuda:0 does colour order bgr, the model's mean and std, float16 output" in server.logs()
