"""``shared_head``: the steps before the model, run for every instance in one head process of their own.

A real head process (``python -m tritonpipe.head_process``) is started by the instances' side, as a stub
starts it; its answers must be what the instance's own chain computes, bit for bit on the CPU, with each
bad input failing alone and the same error.  A head process that is killed costs nothing but time: the
instance runs its head itself and reaches a new one; and a head process ends with its server.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.unit.model.test_runtime import chain, triton_json

from tritonpipe.errors import ConfigError, RequestError
from tritonpipe.model import shared_head
from tritonpipe.model.runtime import ModelRuntime
from tritonpipe.model.shared_head import PREFIX, SharedHead
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_onnx):
    """The fused classifier's config and version folder, and its runtime as an instance builds it."""
    root = tmp_path_factory.mktemp("shared_head")
    repo = generate_repository(load_graph(chain(tiny_onnx, max=8, shared_head=True), name="cls"), root / "repo", device="cpu")
    config = triton_json(repo.configs["cls"])
    version = repo.path / "cls" / "1"
    yield config, version, ModelRuntime(config, version, "cpu")
    for pid in head_processes(version):
        os.kill(pid, signal.SIGKILL)


def head_processes(version: Path) -> list[int]:
    """The pids of the head processes started for the model in ``version``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tritonpipe.head_process" in cmdline and str(version).encode() in cmdline and shared_head.alive(int(entry)):
                found.append(int(entry))
    return found


def instance(model, server_pid=None) -> SharedHead:
    config, version, runtime = model
    return SharedHead(json.dumps(config), version, torch.device("cpu"), list(runtime.inputs.values()),
                      os.getpid() if server_pid is None else server_pid, start_seconds=120)


def requests(jpeg_factory, sizes=((40, 56), (64, 48), (33, 33), (120, 90))) -> list[dict]:
    items = [{"data": torch.frombuffer(bytearray(jpeg_factory(h, w, seed=h)), dtype=torch.uint8).reshape(1, -1)} for h, w in sizes]
    truncated = jpeg_factory(50, 50, seed=9)
    items.insert(1, {"data": torch.zeros(1, 10, dtype=torch.uint8)})  # not a JPEG
    items.append({"data": torch.frombuffer(bytearray(truncated[: len(truncated) // 3]), dtype=torch.uint8).reshape(1, -1)})
    return items


def assert_same(local: list[dict], shared: list[dict]) -> None:
    for mine, theirs in zip(local, shared):
        if "error" in mine:
            assert type(theirs["error"]) is RequestError and str(theirs["error"]) == str(mine["error"])
            assert theirs["error"].reason == mine["error"].reason
        else:
            assert "error" not in theirs, theirs["error"]
            assert torch.equal(theirs["data"], mine["data"])


def test_answers_what_the_instance_computes(model, jpeg_factory):
    runtime = model[2]
    head = instance(model)
    try:
        assert head.connected
        local, shared = requests(jpeg_factory), requests(jpeg_factory)
        runtime.run(local)
        runtime.run(shared, head.run)
        assert_same(local, shared)
        assert sum("error" in item for item in shared) == 2
        # the head's results lie in the region the head process wrote: the instance did not decode them
        assert shared[0]["color"] == "rgb"
        # a batch larger than the first segment: it grows, and the answers stay right
        big = [{"data": torch.frombuffer(bytearray(jpeg_factory(900, 1200, seed=3, quality=100)), dtype=torch.uint8).reshape(1, -1)}
               for _ in range(3)]
        assert sum(item["data"].numel() for item in big) > 1 << 20
        local_big = [dict(item) for item in big]
        runtime.run(local_big)
        runtime.run(big, head.run)
        assert_same(local_big, big)
        owners = [os.getpid(), *head_processes(model[1])]  # the instance's segments, and the head process's regions
    finally:
        head.close()
    assert not [name for name in os.listdir("/dev/shm") if any(name.startswith(f"{PREFIX}{pid}-") for pid in owners)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_through_cuda_ipc(tmp_path, tiny_onnx, jpeg_factory):
    repo = generate_repository(load_graph(chain(tiny_onnx, max=8, shared_head=True), name="cls"), tmp_path / "repo", device="gpu")
    config, version = triton_json(repo.configs["cls"]), repo.path / "cls" / "1"
    device = torch.device("cuda", 0)
    runtime = ModelRuntime(config, version, device)
    head = SharedHead(json.dumps(config), version, device, list(runtime.inputs.values()), os.getpid(), start_seconds=120)
    try:
        assert head.connected
        for _ in range(3):  # the region is mapped once, then reused
            local, shared = requests(jpeg_factory), requests(jpeg_factory)
            runtime.run(local)
            runtime.run(shared, head.run)
            torch.cuda.synchronize()
            assert_same(local, shared)
            assert all(item["data"].device == device for item in shared if "error" not in item)
    finally:
        head.close()
        for pid in head_processes(version):
            os.kill(pid, signal.SIGKILL)


def test_instances_side_by_side(model, jpeg_factory):
    runtime = model[2]
    heads = [instance(model) for _ in range(3)]
    assert len(head_processes(model[1])) == 1  # one head process for all of them
    failures = []

    def serve(head):
        try:
            for _ in range(10):
                local, shared = requests(jpeg_factory), requests(jpeg_factory)
                runtime.run(local)
                runtime.run(shared, head.run)
                assert_same(local, shared)
        except AssertionError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=serve, args=(head,)) for head in heads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for head in heads:
        head.close()
    assert not failures, failures[0]


def test_a_killed_head_process_is_replaced(model, jpeg_factory, monkeypatch):
    runtime = model[2]
    monkeypatch.setattr(shared_head, "RETRY_SECONDS", 0.0)
    head = instance(model)
    try:
        (first,) = head_processes(model[1])
        os.kill(first, signal.SIGKILL)
        while shared_head.alive(first):
            time.sleep(0.05)
        local, shared = requests(jpeg_factory), requests(jpeg_factory)
        runtime.run(local)
        assert not head.run(shared)  # gone: the caller runs the head itself
        runtime.run(shared)
        assert_same(local, shared)
        deadline = time.monotonic() + 120
        while not head.run(shared := requests(jpeg_factory)):
            assert time.monotonic() < deadline, "no new head process answered"
            time.sleep(0.5)
        runtime.run(shared, lambda items: True)  # the head ran there: only the model runs here
        assert_same(local, shared)
        assert [pid for pid in head_processes(model[1]) if pid != first]
    finally:
        head.close()


def test_the_head_process_ends_with_its_server(model):
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        head = instance(model, server_pid=server.pid)
        assert head.connected
        (started,) = [pid for pid in head_processes(model[1]) if f"{server.pid}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 20
    while shared_head.alive(started):
        assert time.monotonic() < deadline, "the head process outlived its server"
        time.sleep(0.1)
    head.close()


def test_settings(tiny_onnx, tmp_path):
    repo = generate_repository(load_graph(chain(tiny_onnx, shared_head=True), name="cls"), tmp_path / "a", device="gpu")
    assert repo.configs["cls"].parameters["tritonpipe.shared_head"].string_value == "yes"
    repo = generate_repository(load_graph(chain(tiny_onnx), name="cls"), tmp_path / "b", device="gpu")
    assert "tritonpipe.shared_head" not in repo.configs["cls"].parameters
    with pytest.raises(ConfigError, match="shared_head and overlap cannot be used together"):
        generate_repository(load_graph(chain(tiny_onnx, shared_head=True, overlap=True), name="cls"), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_views_and_errors_cross_as_they_were():
    region = torch.arange(4096, dtype=torch.int32).view(torch.uint8)
    got = shared_head.view(region, 256, torch.int32, (2, 3))
    np.testing.assert_array_equal(got.numpy(), np.arange(64, 70).reshape(2, 3))
    error = shared_head.error_from(shared_head.error_record(RequestError("bad bytes", reason="truncated")))
    assert type(error) is RequestError and str(error) == "bad bytes" and error.reason == "truncated"
    error = shared_head.error_from(shared_head.error_record(KeyError("x")))
    assert "KeyError" in str(error) and not isinstance(error, RequestError)


def test_the_head_process_says_how_its_merged_batches_went():
    from tritonpipe.head_process.service import Tally

    line = Tally(batches=2, images=100, jobs=6, waiting=1.0, head=0.02, copy=0.002, gpu=0.01, answer=0.001).line(10.0, 2)
    assert line == ("last 10 s: 10 img/s in 2 merged batches of 50.0 images from 3.0 instance batches each; per merged "
                    "batch: stages 10.00 ms, copies 1.00, waiting for the GPU 5.00, answers 0.50; workers idle 5%")
