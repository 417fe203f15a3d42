"""The README's custom stage, from its file to a served pipeline."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from tritonpipe.client.client import PipelineClient
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer
from tritonpipe.stages import load_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_stage"
pytestmark = pytest.mark.server


def test_custom_stage_served_end_to_end(tmp_path, jpeg_factory):
    repo = generate_repository(load_graph(EXAMPLE / "pipeline.toml"), tmp_path / "repo")
    assert (repo.path / "bright" / "1" / "plugins" / "my_stages.py").is_file()
    jpeg = jpeg_factory(90, 120, seed=5)
    with TritonServer(repo.path) as server:
        got = PipelineClient(server.grpc_url, protocol="grpc", model=server.entry).infer(jpeg)["OUTPUT"]
    decoded = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
    want = (F.interpolate(decoded[None].float(), size=(64, 64), mode="bilinear", align_corners=False) * 1.25).clamp(0, 255)
    assert got.shape == (1, 3, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=1e-3)


def test_registering_a_name_twice_names_both_places(tmp_path):
    load_plugin(EXAMPLE / "my_stages.py")
    copy = tmp_path / "again.py"
    copy.write_text((EXAMPLE / "my_stages.py").read_text())
    with pytest.raises(ConfigError) as info:
        load_plugin(copy)
    assert "my_stages.py" in str(info.value) and "again.py" in str(info.value)
