"""`tritonpipe client` on real servers: finding the entry model, naming what is wrong, printing outputs, closing."""

import io
import re
import shutil
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.repository.generate import MARKER, generate_repository
from tritonpipe.server.owner import TritonServer, free_ports
from tritonpipe_tools.client import main

pytestmark = pytest.mark.server

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def repositories(tmp_path_factory, tiny_onnx):
    """Two pipelines: "cls", an ensemble of preprocessing and a classifier; "pad", one model with two outputs."""
    root = tmp_path_factory.mktemp("client-repos")
    cls = load_graph(
        {
            "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
            "resize_h": 32, "resize_w": 32, "color": "rgb", "model": str(tiny_onnx),
            "mean": ",".join(map(str, MEAN.ravel())), "std": ",".join(map(str, STD.ravel())), "max": 4,
        },
        name="cls",
    )
    pad = load_graph({"backend": "S[DecodeTensor,ResizePadTensor]", "max_h": 16, "max_w": 16, "max": 4}, name="pad")
    return {graph.name: generate_repository(graph, root / graph.name).path for graph in (cls, pad)}


@pytest.fixture(scope="module")
def server(repositories):
    """Owned as `tritonpipe serve` owns it: the model-repository API is the owner's alone."""
    with TritonServer(list(repositories.values())) as running:
        yield running


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory, jpeg_factory):
    path = tmp_path_factory.mktemp("jpeg") / "sample.jpg"
    path.write_bytes(jpeg_factory(48, 64, seed=4))
    return path


def _url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


def reference_logits(tiny_onnx, jpeg_bytes: bytes) -> np.ndarray:
    rgb = np.array(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": (resized - MEAN) / STD})[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_several_pipelines_are_listed_with_how_to_choose(server, jpeg, capsys, protocol):
    assert main([str(jpeg), "--url", _url(server, protocol), "--protocol", protocol]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the server at {_url(server, protocol)} serves 2 pipelines (cls, pad); choose one with "
                   "--model NAME (model= in Python)\n")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_the_server_lacks_is_named_with_those_it_has(server, jpeg, capsys, protocol):
    assert main([str(jpeg), "--url", _url(server, protocol), "--protocol", protocol, "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: the server at {_url(server, protocol)} has no model 'nope'; it serves cls, cls_model, cls_pre, pad\n"


def test_no_server_is_told_apart_from_a_missing_model(jpeg, capsys):
    (port,) = free_ports("127.0.0.1", 1)
    assert main([str(jpeg), "--url", f"127.0.0.1:{port}", "--model", "cls"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no server answers at 127.0.0.1:{port} over grpc")


def test_only_the_classifiers_scores_get_top_k(server, jpeg, capsys, tiny_onnx):
    assert main([str(jpeg), "--url", server.grpc_url, "--model", "cls", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    top = re.search(r"scores: float32\[1, 10\]  top-3: (\d+)=(\S+), ", out)
    want = reference_logits(tiny_onnx, jpeg.read_bytes())[0]
    assert top and int(top.group(1)) == int(want.argmax()) and abs(float(top.group(2)) - want.max()) < 3e-3

    assert main([str(jpeg), "--url", server.grpc_url, "--model", "pad"]) == 0
    out = capsys.readouterr().out
    with PipelineClient(server.grpc_url, model="pad") as client:
        inverse = client.infer(jpeg.read_bytes())["inverse_transform"]
    assert inverse.shape == (1, 4) and "top-" not in out
    assert "OUTPUT: float32[1, 3, 16, 16]  min=" in out
    assert f"inverse_transform: float32[1, 4]  values: {', '.join(f'{v:.4g}' for v in inverse[0])}\n" in out


def test_serve_over_http_finds_the_entry_and_stops_at_once(repositories, jpeg, tmp_path, capsys, monkeypatch):
    # without the marker the owner cannot name the entry: the client asks the server
    repository = shutil.copytree(repositories["cls"], tmp_path / "unmarked")
    (repository / MARKER).unlink()
    stops = []
    original_stop = TritonServer.stop

    def timed_stop(self):
        started = time.monotonic()
        try:
            return original_stop(self)
        finally:
            stops.append(time.monotonic() - started)

    monkeypatch.setattr(TritonServer, "stop", timed_stop)
    assert main([str(jpeg), "--serve", str(repository), "--protocol", "http"]) == 0
    out = capsys.readouterr().out
    assert "model cls\n" in out and "scores: float32[1, 10]  top-5: " in out
    # an HTTP connection left open holds Triton's shutdown for its whole exit timeout (30 s)
    assert stops and stops[0] < 10, stops
