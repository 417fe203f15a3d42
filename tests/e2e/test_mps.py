"""``TritonServer(mps=True)`` on a real server: its processes get the daemon's folders, and it stops after them.

The control program is a stand-in (this host has no GPU); the variables it receives and those the
real tritonserver process holds are read back from the operating system.
"""

import os

import cv2
import numpy as np
import pytest

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server


def _environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in raw if b"=" in entry)


def test_server_processes_join_the_daemon_and_it_quits_after_them(tmp_path, monkeypatch, jpeg_factory, fake_mps_control):
    _, record = fake_mps_control()
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8, "max": 2}, name="small")
    repo = generate_repository(graph, tmp_path / "repo")
    server = TritonServer(repo.path, mps=True)
    with server:
        pipe_dir = server.mps.environment()["CUDA_MPS_PIPE_DIRECTORY"]
        assert _environ(server.process.pid)["CUDA_MPS_PIPE_DIRECTORY"] == pipe_dir
        jpeg = jpeg_factory(16, 24)
        client = PipelineClient(server.grpc_url, "grpc", model=server.entry)
        (out,) = client.infer(jpeg).values()
        client.close()
        expected = cv2.resize(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), (8, 8), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(out[0], expected)
        assert record.read_text().splitlines() == [f"args=-d pipe={pipe_dir} log={server.mps.log_dir} stdin="]
    calls = record.read_text().splitlines()
    assert calls[-1].endswith("stdin=quit") and len(calls) == 2
    assert server.mps is None
