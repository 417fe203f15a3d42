"""The server's own MPS daemon, driven through a stand-in for nvidia-cuda-mps-control.

The stand-in records its arguments, its stdin and the MPS variables it was given, as the real
control program would receive them; a GPU host runs the real one in the benchmark.
"""

import os
import stat

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.server import mps
from tritonpipe.server.owner import TritonServer


def test_start_and_stop_use_private_folders(tmp_path, fake_mps_control):
    program, record = fake_mps_control()
    daemon = mps.MpsDaemon(tmp_path / "server", str(program)).start()
    env = daemon.environment()
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "server" / "mps-pipe")
    for folder in env.values():
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    daemon.stop()
    daemon.stop()  # a second stop does nothing
    start, quit_ = record.read_text().splitlines()
    pipe, log = env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]
    assert start == f"args=-d pipe={pipe} log={log} stdin="
    assert quit_ == f"args= pipe={pipe} log={log} stdin=quit"


def test_a_daemon_that_does_not_start_says_why(tmp_path, fake_mps_control):
    program, _ = fake_mps_control('echo "An instance of this daemon is already running" >&2; exit 1')
    with pytest.raises(mps.MpsError, match="did not start .*exited with 1.*already running"):
        mps.MpsDaemon(tmp_path / "server", str(program)).start()


def test_a_missing_control_program_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "_EXTRA_DIRS", ())
    with pytest.raises(ConfigError, match="--mps needs NVIDIA's nvidia-cuda-mps-control"):
        TritonServer(tmp_path, mps=True)


def test_the_control_program_is_found_on_path(tmp_path, monkeypatch, fake_mps_control):
    program, _ = fake_mps_control()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert mps.find_control() == str(program)
