"""``shared_process``: the steps before the model (``head``), or the whole chain (``chain``), run for every instance
in one shared process.

A real shared process (``python -m tritonpipe.shared_process``) is started by the instances' side, as a stub
starts it; its answers must be what the instance's own chain computes, bit for bit on the CPU, with each
bad input failing alone and the same error.  A shared process that is killed costs nothing but time: the
instance runs its chain itself and reaches a new one; and a shared process ends with its server.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.unit.model.test_runtime import chain, triton_json

from tritonpipe.errors import ConfigError, RequestError
from tritonpipe.model import shared_client
from tritonpipe.model.runtime import ModelRuntime
from tritonpipe.model.shared_client import PREFIX, SharedClient
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.procs import command_line, is_running


def served(root: Path, tiny_onnx, part: str, device: str = "cpu") -> tuple[dict, Path, ModelRuntime]:
    """The fused classifier's config and version folder, and its runtime as an instance builds it."""
    repo = generate_repository(load_graph(chain(tiny_onnx, max=8, shared_process=part), name="cls"), root / "repo",
                               device="gpu" if device != "cpu" else "cpu")
    config = triton_json(repo.configs["cls"])
    version = repo.path / "cls" / "1"
    return config, version, ModelRuntime(config, version, device)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_onnx):
    found = served(tmp_path_factory.mktemp("shared"), tiny_onnx, "head")
    yield found
    stop(found[1])


def stop(version: Path) -> None:
    """Stop the shared processes of the model in ``version`` as an operator would (SIGTERM), and wait for them."""
    pids = shared_processes(version)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(is_running(pid) for pid in pids):
        assert time.monotonic() < deadline, "a shared process did not stop on SIGTERM"
        time.sleep(0.05)


def shared_processes(version: Path) -> list[int]:
    """The pids of the shared processes started for the model in ``version``."""
    pids = (int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    return [pid for pid in pids
            if shared_client.is_shared_process(pid) and str(version) in command_line(pid) and is_running(pid)]


def instance(model, server_pid=None) -> SharedClient:
    config, version, runtime = model
    return SharedClient(json.dumps(config), version, torch.device("cpu"), list(runtime.inputs.values()),
                      os.getpid() if server_pid is None else server_pid, start_seconds=120)


def requests(jpeg_factory, sizes=((40, 56), (64, 48), (33, 33), (120, 90))) -> list[dict]:
    items = [{"data": torch.frombuffer(bytearray(jpeg_factory(h, w, seed=h)), dtype=torch.uint8).reshape(1, -1)} for h, w in sizes]
    truncated = jpeg_factory(50, 50, seed=9)
    items.insert(1, {"data": torch.zeros(1, 10, dtype=torch.uint8)})  # not a JPEG
    items.append({"data": torch.frombuffer(bytearray(truncated[: len(truncated) // 3]), dtype=torch.uint8).reshape(1, -1)})
    return items


def assert_same(local: list[dict], shared: list[dict], atol: float = 0.0) -> None:
    for mine, theirs in zip(local, shared):
        if "error" in mine:
            assert type(theirs["error"]) is RequestError and str(theirs["error"]) == str(mine["error"])
            assert theirs["error"].reason == mine["error"].reason
        else:
            assert "error" not in theirs, theirs["error"]
            torch.testing.assert_close(theirs["data"], mine["data"], atol=atol, rtol=0)


def run_both(runtime: ModelRuntime, client: SharedClient, jpeg_factory, atol: float = 0.0) -> list[dict]:
    """The same requests through the instance's own chain and through the shared process: the latter's items,
    checked to match the former's."""
    local, shared = requests(jpeg_factory), requests(jpeg_factory)
    runtime.run(local)
    runtime.run(shared, client.run)
    assert_same(local, shared, atol)
    return shared


def test_answers_what_the_instance_computes(model, jpeg_factory):
    runtime = model[2]
    head = instance(model)
    try:
        assert head.connected
        shared = run_both(runtime, head, jpeg_factory)
        assert sum("error" in item for item in shared) == 2
        # the head's other results cross too; the model ran here, not in the region the shared process wrote
        assert shared[0]["color"] == "rgb" and not head.holds(shared[0]["data"])
        # a batch larger than the first segment: it grows, and the answers stay right
        big = [{"data": torch.frombuffer(bytearray(jpeg_factory(900, 1200, seed=3, quality=100)), dtype=torch.uint8).reshape(1, -1)}
               for _ in range(3)]
        assert sum(item["data"].numel() for item in big) > 1 << 20
        local_big = [dict(item) for item in big]
        runtime.run(local_big)
        runtime.run(big, head.run)
        assert_same(local_big, big)
        owners = [os.getpid(), *shared_processes(model[1])]  # the instance's segments, and the shared process's regions
    finally:
        head.close()
    assert not [name for name in os.listdir("/dev/shm") if any(name.startswith(f"{PREFIX}{pid}-") for pid in owners)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("part", ["head", "chain"])
def test_on_the_gpu_through_cuda_ipc(tmp_path, tiny_onnx, jpeg_factory, part):
    device = torch.device("cuda", 0)
    config, version, runtime = served(tmp_path, tiny_onnx, part, device)
    head = SharedClient(json.dumps(config), version, device, list(runtime.inputs.values()), os.getpid(), start_seconds=120)
    try:
        assert head.connected
        for _ in range(3):  # the region is mapped once, then reused
            shared = run_both(runtime, head, jpeg_factory, atol=1e-5)  # another process's kernels, maybe in another order
            assert all(item["data"].device == device for item in shared if "error" not in item)
            assert all(head.holds(item["data"]) == (part == "chain") for item in shared if "error" not in item)
    finally:
        head.close()
        stop(version)


def test_the_whole_chain_in_the_shared_process(tmp_path, tiny_onnx, jpeg_factory):
    config, version, runtime = served(tmp_path, tiny_onnx, "chain")
    client = SharedClient(json.dumps(config), version, torch.device("cpu"), list(runtime.inputs.values()), os.getpid(),
                          start_seconds=120)
    try:
        assert client.connected
        shared = run_both(runtime, client, jpeg_factory)
        # the scores were computed there and lie in the region it wrote; the output checks still hold here
        assert all(client.holds(item["data"]) for item in shared if "error" not in item)
        assert all(tuple(runtime.output(item, "scores").shape) == (1, 10) for item in shared if "error" not in item)
        # answered, they leave the region, which the next batch overwrites
        answers = [client.copied_out(r) for r in runtime.responses(shared) if isinstance(r, dict)]
        assert answers and not any(client.holds(tensor) for answer in answers for tensor in answer.values())
    finally:
        client.close()
        stop(version)
    # stopped (SIGTERM), it left nothing behind
    assert not list(Path(tempfile.gettempdir()).glob(f"{PREFIX}{client.key}.*"))


def test_only_the_instances_secret_connects(model, jpeg_factory):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    head = instance(model)
    try:
        with pytest.raises(AuthenticationError):
            Client(shared_client.address(head.key), family="AF_UNIX", authkey=b"a guess")
        assert oct(shared_client.authkey_path(head.key).stat().st_mode & 0o777) == "0o600"
        local, shared = requests(jpeg_factory), requests(jpeg_factory)
        runtime = model[2]
        runtime.run(local)
        assert head.run(shared)  # the refused peer cost the instances nothing
        runtime.run_tail(shared)
        assert_same(local, shared)
    finally:
        head.close()


def test_instances_side_by_side(model, jpeg_factory):
    runtime = model[2]
    heads = [instance(model) for _ in range(3)]
    assert len(shared_processes(model[1])) == 1  # one shared process for all of them
    failures = []

    def serve(head):
        try:
            for _ in range(10):
                run_both(runtime, head, jpeg_factory)
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
    monkeypatch.setattr(shared_client, "RETRY_SECONDS", 0.0)
    head = instance(model)
    try:
        (first,) = shared_processes(model[1])
        os.kill(first, signal.SIGKILL)
        while is_running(first):
            time.sleep(0.05)
        local, shared = requests(jpeg_factory), requests(jpeg_factory)
        runtime.run(local)
        assert not head.run(shared)  # gone: the caller runs the head itself
        runtime.run(shared)
        assert_same(local, shared)
        deadline = time.monotonic() + 120
        while not head.run(shared := requests(jpeg_factory)):
            assert time.monotonic() < deadline, "no new shared process answered"
            time.sleep(0.5)
        runtime.run(shared, lambda items: True)  # the head ran there: only the model runs here
        assert_same(local, shared)
        assert [pid for pid in shared_processes(model[1]) if pid != first]
    finally:
        head.close()


def test_the_head_process_ends_with_its_server(model):
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        head = instance(model, server_pid=server.pid)
        assert head.connected
        (started,) = [pid for pid in shared_processes(model[1]) if f"{server.pid}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 20
    while is_running(started):
        assert time.monotonic() < deadline, "the shared process outlived its server"
        time.sleep(0.1)
    head.close()
    # nothing of that server's is left in the temporary folder
    assert not shared_client.authkey_path(head.key).exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"{PREFIX}{head.key}.*"))


def test_settings(tiny_onnx, tmp_path):
    for part in ("head", "chain"):
        repo = generate_repository(load_graph(chain(tiny_onnx, shared_process=part), name="cls"), tmp_path / part, device="gpu")
        assert repo.configs["cls"].parameters["tritonpipe.shared_process"].string_value == part
    repo = generate_repository(load_graph(chain(tiny_onnx), name="cls"), tmp_path / "b", device="gpu")
    assert "tritonpipe.shared_process" not in repo.configs["cls"].parameters
    with pytest.raises(ConfigError, match="shared_process and overlap cannot be used together"):
        generate_repository(load_graph(chain(tiny_onnx, shared_process="head", overlap=True), name="cls"), tmp_path / "c")
    with pytest.raises(ConfigError, match="shared_process.*must be one of off, head, chain"):
        generate_repository(load_graph(chain(tiny_onnx, shared_process="yes please"), name="cls"), tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_views_and_errors_cross_as_they_were():
    region = torch.arange(4096, dtype=torch.int32).view(torch.uint8)
    got = shared_client.view(region, 256, torch.int32, (2, 3))
    np.testing.assert_array_equal(got.numpy(), np.arange(64, 70).reshape(2, 3))
    error = shared_client.error_from(shared_client.error_record(RequestError("bad bytes", reason="truncated")))
    assert type(error) is RequestError and str(error) == "bad bytes" and error.reason == "truncated"
    error = shared_client.error_from(shared_client.error_record(KeyError("x")))
    assert "KeyError" in str(error) and not isinstance(error, RequestError)


def test_the_shared_process_says_how_its_merged_batches_went():
    from tritonpipe.shared_process.service import Tally

    line = Tally(batches=2, images=100, jobs=6, waiting=1.0, stages=0.02, copy=0.002, gpu=0.01, answer=0.001).line(10.0, 2)
    assert line == ("last 10 s: 10 img/s in 2 merged batches of 50.0 images from 3.0 instance batches each; per merged "
                    "batch: stages 10.00 ms, copies 1.00, waiting for the GPU 5.00, answers 0.50; workers idle 5%")


def test_a_shared_process_that_cannot_start_is_not_waited_for(model, tmp_path):
    config, _, runtime = model
    started = time.monotonic()
    client = SharedClient(json.dumps(config), tmp_path / "no model here", torch.device("cpu"), list(runtime.inputs.values()),
                          os.getpid(), start_seconds=120)
    assert not client.connected and time.monotonic() - started < 60
    assert not client.run([{"data": torch.zeros(1, 4, dtype=torch.uint8)}])  # the caller runs its chain itself
    client.close()
