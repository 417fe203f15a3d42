"""Triton's scheduling keys on a real server: the response cache answers repeats, and
``model_control="explicit"`` lets a client unload and load models."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

from .test_stage_metrics import scrape, value

pytestmark = pytest.mark.server


def test_response_cache_and_open_model_control(tmp_path, jpeg_factory):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 16, "resize_w": 16, "max": 4,
                        "response_cache": True, "max_queue_size": 64}, name="cached")
    repo = generate_repository(graph, tmp_path / "repo").path
    repeated, other = jpeg_factory(48, 64, seed=1), jpeg_factory(48, 64, seed=2)
    with TritonServer(repo, model_control="explicit") as server:
        client = PipelineClient(server.grpc_url, model="cached")
        first = client.infer(repeated)
        answers = [client.infer(repeated) for _ in range(3)] + [client.infer(other)]
        samples = scrape(server.metrics_url)
        for answer in answers[:3]:
            np.testing.assert_array_equal(next(iter(answer.values())), next(iter(first.values())))
        assert value(samples, "nv_cache_num_hits_per_model", model="cached", version="1") == 3
        assert value(samples, "nv_cache_num_misses_per_model", model="cached", version="1") == 2
        # the model-repository API is open: no owner header needed
        control = grpcclient.InferenceServerClient(server.grpc_url)
        control.unload_model("cached")
        assert not control.is_model_ready("cached")
        with pytest.raises(InferError):
            client.infer(other)
        control.load_model("cached")
        assert control.is_model_ready("cached")
        np.testing.assert_array_equal(next(iter(client.infer(repeated).values())), next(iter(first.values())))
