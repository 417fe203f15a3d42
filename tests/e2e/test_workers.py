"""Per-stage workers and cores, and pipelines of Python objects, on a real server.

Pinning is read back from each stub's /proc/<pid>/status, thread counts from inside the stub
processes themselves; the example is checked against its function and model called directly.
"""

import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from tritonpipe.client.client import InferError
from tritonpipe.client.pipe import pipe
from tritonpipe.contract import PARAM_CORES, CpuCores
from tritonpipe.examples import sample_jpeg
from tritonpipe.repository.configs import from_text
from tritonpipe.repository.cores import host_cores
from tritonpipe.server.procs import python_stubs
from tritonpipe.stages.function import load_function

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pipeline_from_python"
FUNCTIONS = Path(__file__).resolve().parent / "worker_functions.py"


def allowed_cores(pid: int) -> set[int]:
    """The cores in /proc/<pid>/status Cpus_allowed_list (e.g. "0-2,5")."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    line = next(entry for entry in status if entry.startswith("Cpus_allowed_list"))
    cores: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        low, _, high = part.partition("-")
        cores |= set(range(int(low), int(high or low) + 1))
    return cores


def core_sets(running: pipe, model: str) -> tuple[tuple[int, ...], ...]:
    """The sets the generator wrote for ``model``, by instance index."""
    config = from_text((running.server.repositories[0] / model / "config.pbtxt").read_text())
    return CpuCores.decode(config.parameters[PARAM_CORES].string_value).sets


def stubs_of(running: pipe, model: str):
    return sorted((s for s in python_stubs(running.server.process.pid) if s.model == model), key=lambda s: s.instance)


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from stages import pipeline_stages

        # two cores here: 2 workers x 1 core per stage is 4 cores, so the workers share them on purpose
        stages = pipeline_stages(workers=2, cores_per_worker=1, model_cores=1, oversubscribe=True, max_batch=4)
        with pipe(stages, device="cpu") as running:
            yield running, stages
    finally:
        sys.path.remove(str(EXAMPLE))


def test_example_matches_the_function_and_model_called_directly(example):
    running, stages = example
    preprocess, model = stages[0][1], stages[1][1]
    images = [sample_jpeg(200 + 24 * i, 300 - 16 * i, seed=i) for i in range(10)]
    outputs = running.run(images)
    with torch.no_grad():
        for image, got in zip(images, outputs):  # in input order: each image against its own reference
            want = model(preprocess(image)[None])
            assert got.shape == (1, 1000)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [t.shape for t in running(images[:3])] == [(1, 1000)] * 3  # calling the object is run()


def test_example_workers_are_pinned_as_the_generator_assigned(example):
    running, _ = example
    host = host_cores()
    for model in ("preprocess", "inference"):
        stubs, sets = stubs_of(running, model), core_sets(running, model)
        assert len(stubs) == 2 and len(sets) == 2
        for stub in stubs:
            index = int(stub.instance.rsplit("_", 1)[1])
            assert allowed_cores(stub.pid) == set(sets[index]), (model, stub)
        assert all(len(s) == 1 and set(s) <= set(host) for s in sets)
    # within a stage the workers never share a core on a host of two or more
    if len(host) >= 2:
        assert len({core for s in core_sets(running, "preprocess") for core in s}) == 2


@pytest.fixture(scope="module")
def reporting():
    picky, report = load_function(FUNCTIONS, "picky"), load_function(FUNCTIONS, "report")
    workers = min(2, len(host_cores()))
    stages = [
        ("picky", picky, {"max": 4, "batching_timeout": 1000}),
        ("report", report, {"worker_num": workers, "cores_per_worker": 1}),
    ]
    with pipe(stages, device="cpu") as running:
        yield running


def test_threads_and_cores_read_back_from_the_workers(reporting):
    seen: dict[int, list[int]] = {}
    for attempt in range(40):  # until every worker has answered at least once
        torch_threads, cv_threads, allowed, pid = (int(v) for v in reporting.run([sample_jpeg(64, 64, seed=attempt)])[0][0])
        seen[pid] = [torch_threads, cv_threads, allowed]
        if len(seen) == len(stubs_of(reporting, "report")):
            break
    stubs = {s.pid: s for s in stubs_of(reporting, "report")}
    sets = core_sets(reporting, "report")
    assert set(seen) == set(stubs)
    for pid, (torch_threads, cv_threads, allowed) in seen.items():
        assert (torch_threads, cv_threads, allowed) == (1, 1, 1)
        assert allowed_cores(pid) == set(sets[int(stubs[pid].instance.rsplit("_", 1)[1])])
    assert len({core for s in sets for core in s}) == len(sets)  # disjoint


def test_a_function_that_raises_fails_only_its_request(reporting):
    good = [sample_jpeg(48 + 8 * i, 64, seed=i) for i in range(3)]
    results: dict[int, object] = {}

    def send(index: int, data: bytes) -> None:
        try:
            results[index] = reporting.run([data])[0]
        except InferError as exc:
            results[index] = exc

    threads = [threading.Thread(target=send, args=(i, d)) for i, d in enumerate([*good, b"x" + good[0]])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = results[3]
    assert isinstance(failed, InferError) and failed.status == "INTERNAL"
    assert "function picky raised ValueError: refusing" in str(failed)
    assert all(isinstance(results[i], torch.Tensor) and results[i].shape == (1, 4) for i in range(3))
    inferences, executions = _stats(reporting, "picky")
    assert executions < inferences, "the requests never shared a batch, so nothing shows the failure stayed alone"


def _stats(running: pipe, model: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(running.server.grpc_url).get_inference_statistics(model, as_json=True)
    entry = stats["model_stats"][0]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))


@pytest.mark.parametrize("affinity", [True, False], ids=["affinity", "turns"])
def test_instance_affinity_gives_lone_requests_to_the_first_instance(affinity):
    """One request at a time, each answered with the pid of the process that ran it.  With instance_affinity the
    rate limiter gives every batch to the first instance, but for one first turn of each other instance (it picks
    the fewest runs times the priority, and each starts at none); without it Triton takes the instances in turn."""
    report = load_function(FUNCTIONS, "report")
    workers, requests = 3, 30
    with pipe([("report", report, {"worker_num": workers, "instance_affinity": affinity})], device="cpu") as running:
        pids = Counter(int(running.run([sample_jpeg(32, 32, seed=i)])[0][0][3]) for i in range(requests))
        stubs = {s.pid for s in python_stubs(running.server.process.pid)}  # the one model's
        command = running.server.command()
    assert len(stubs) == workers and set(pids) <= stubs
    assert ("--rate-limit=execution_count" in command) == affinity
    busiest = pids.most_common(1)[0][1]
    if affinity:
        assert busiest >= requests - (workers - 1), pids
    else:
        assert busiest <= requests // 2, pids
