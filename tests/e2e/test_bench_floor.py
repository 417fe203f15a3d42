"""The benchmark's floor on a real server: the pipeline's signature, zeros out, any JPEG length in one batch."""

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tritonpipe import load_graph
from tritonpipe.harness.bench import runner
from tritonpipe.harness.bench.peers import FLOOR
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_onnx):
    graph = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "model": str(tiny_onnx), "max": 4, "batching_timeout": 200,
            "instance_num": 1, "fuse": True,
        },
        name="cls",
    )
    work = tmp_path_factory.mktemp("floor")
    options = runner.BenchOptions(output=work, device="cpu", systems=("ensemble", "floor"))
    repo, _ = runner.build_bench_repository(graph, work / "repo", options)
    with TritonServer(repo.path) as running:
        yield running, repo


def ask(url: str, model: str, jpeg: bytes) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    request = grpcclient.InferInput("INPUT", [1, len(jpeg)], "UINT8")
    request.set_data_from_numpy(np.frombuffer(jpeg, dtype=np.uint8)[None])
    result = client.infer(model, [request])
    return {out.name: result.as_numpy(out.name) for out in result.get_response().outputs}


def test_the_floor_answers_what_the_pipeline_answers_in_shape_and_type_with_zeros(served, jpeg_factory):
    server, repo = served
    jpeg = jpeg_factory(48, 64, seed=1)
    pipeline, floor = ask(server.grpc_url, repo.entry, jpeg), ask(server.grpc_url, FLOOR, jpeg)
    assert sorted(floor) == sorted(pipeline) and pipeline
    for name, answer in pipeline.items():
        assert floor[name].shape == answer.shape and floor[name].dtype == answer.dtype, name
        assert not np.any(floor[name]) and np.any(answer), name


def test_requests_of_different_lengths_share_the_floors_batches(served, jpeg_factory):
    server, _ = served
    jpegs = [jpeg_factory(24 + 8 * i, 40 + 4 * i, seed=i) for i in range(8)]
    assert len({len(j) for j in jpegs}) == 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: ask(server.grpc_url, FLOOR, j), jpegs))
    assert all(a and not any(np.any(v) for v in a.values()) for a in answers)
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(FLOOR, as_json=True)
    model = stats["model_stats"][0]
    # eight requests in fewer executions: requests of different lengths were batched together
    assert int(model["inference_count"]) >= 8 and int(model["execution_count"]) < int(model["inference_count"])
