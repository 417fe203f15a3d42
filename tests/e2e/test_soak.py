"""Soak on a real tritonserver: thousands of checked requests, a killed stub, a stop under load.

Nothing here asserts speed; the bounds on time only make sure that no request hangs.
"""

import json
import time

import pytest

from tritonpipe import load_graph
from tritonpipe.client.client import PipelineClient
from tritonpipe.harness.soak import BAD_KINDS, SoakOptions, format_report, run_soak
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer
from tritonpipe.server.procs import is_running
from tritonpipe_tools.soak import main

pytestmark = pytest.mark.server

# a leak shows as steady growth; the allocator's and gRPC's own settling stays far below this
RSS_GROWTH_LIMIT_MB = 50


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    graph = load_graph(
        {
            "backend": "S[DecodeMat,ResizeMat,cvtColorMat]", "resize_h": 48, "resize_w": 64, "color": "rgb",
            "max": 8, "batching_timeout": 2, "instance_num": 2,
        },
        name="soak",
    )
    return generate_repository(graph, tmp_path_factory.mktemp("soak") / "repo").path


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository) as running:
        yield running


def test_soak_loses_nothing_and_does_not_leak(server):
    options = SoakOptions(requests=2000, concurrency=16, bad_fraction=0.05, warmup=300, timeout=60, progress=False)
    report = run_soak(options, server)
    print(format_report(report))

    # DecodeMat reads PNG, so the PNG inputs are good ones for this pipeline, and the reference agrees
    assert report.counts == {"correct": 1925, "rejected": 75, "wrong": 0, "lost": 0}, report.examples
    assert report.by_kind["png"] == {"correct": 25}
    refused = [kind for kind in BAD_KINDS if kind != "png"]
    assert {kind: report.by_kind[kind] for kind in refused} == {kind: {"rejected": 25} for kind in refused}
    assert report.warmup == {"correct": 300, "rejected": 0, "wrong": 0, "lost": 0}
    assert report.memory["after"].stubs == 2
    assert report.rss_growth_mb is not None and report.rss_growth_mb < RSS_GROWTH_LIMIT_MB
    assert report.ok


def test_cli_against_a_running_server(server, tmp_path, capsys):
    out = tmp_path / "soak.json"
    # an owned server does not list its models to clients: name the entry model
    argv = ["--url", server.http_url, "--model", server.entry, "--protocol", "http", "--requests", "300", "--concurrency", "8",
            "--warmup", "20", "--bad-fraction", "0.1", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "rejected as expected" in capsys.readouterr().out
    result = json.loads(out.read_text())
    # 30 bad inputs, kinds in turn: 7 of them PNG, which DecodeMat reads
    assert result["ok"] and result["counts"] == {"correct": 277, "rejected": 23, "wrong": 0, "lost": 0}
    # the server's process was found from the port it listens on
    assert result["memory"]["after"]["server_mb"] > 0 and result["memory"]["after"]["stubs"] == 2


#: what Triton 2.51's Python backend aborts the whole server with when a stub dies holding the lock of its
#: shared-memory queue (a killed stub's usual end is its own requests failing, "not healthy")
TRITON_LOCK_ABORT = "boost::interprocess::lock_exception"


def test_killed_stub_fails_its_requests_without_hanging(repository, jpeg_factory, tmp_path):
    timeout = 15.0
    options = SoakOptions(
        requests=800, concurrency=16, bad_fraction=0.05, warmup=50, timeout=timeout, kill_stub_after=200, progress=False
    )
    # Triton cannot unload a model whose stub died under load: stopping waits out the exit timeout
    with TritonServer(repository, exit_timeout=5, log_file=tmp_path / "server.log") as server:  # kept: the stop times out
        first = server.process.pid
        started = time.monotonic()
        report = run_soak(options, server)
        elapsed = time.monotonic() - started
        aborted = TRITON_LOCK_ABORT in server.logs()
        if aborted:  # then the owner starts the server again: wait for an answer from it
            deadline = time.monotonic() + 120
            while True:
                try:
                    answer = PipelineClient(server.grpc_url, protocol="grpc", model=server.entry).infer(jpeg_factory(48, 64, seed=3))
                    break
                except Exception:  # noqa: BLE001 - refused, reset or unavailable while the server starts again
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            restarted = server.process.pid != first
        alive = server.is_alive()
    print(format_report(report))

    fault = report.fault
    assert fault.target.startswith("soak_") and fault.in_flight > 0
    assert not is_running(fault.target_pid)
    # every request got an answer or an error, none ran into the client timeout
    assert sum(report.counts.values()) == 800 and fault.hung == 0 and report.counts["wrong"] == 0
    assert report.counts["lost"] == fault.errors
    assert elapsed < 800 / 8 + timeout  # even if every batch waited for the 1 s stub health check
    if aborted:
        # requests failed while the server was down, and it came back and serves
        assert all(example["status"] in ("INTERNAL", "UNAVAILABLE") for example in report.examples), report.examples
        assert restarted and alive and answer["OUTPUT"].shape == (1, 48, 64, 3)
        return
    assert all(example["status"] == "INTERNAL" and "not healthy" in example["message"] for example in report.examples)
    # the other instance keeps serving, and the server stays up
    assert fault.ok_after > 0 and alive
    assert isinstance(fault.stub_restarted, bool)


def test_stop_under_load_drains_in_flight_requests(repository, tmp_path):
    options = SoakOptions(
        requests=1500, concurrency=16, bad_fraction=0.05, warmup=50, timeout=30, stop_server_after=400, progress=False
    )
    with TritonServer(repository, exit_timeout=15, log_file=tmp_path / "server.log") as server:
        report = run_soak(options, server)
    print(format_report(report))

    fault = report.fault
    assert fault.in_flight > 0 and fault.not_sent > 0
    assert fault.completed + fault.refused == fault.in_flight
    assert fault.hung == 0 and fault.errors == 0
    assert report.counts["lost"] == 0 and report.counts["wrong"] == 0
    assert fault.server_exit_code == 0 and fault.server_exit_s < 15 + 5
