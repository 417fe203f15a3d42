"""tritonpipe bench end to end at tiny scale: real tritonserver, real perf_analyzer, CPU only.

Only that it measures and reports is checked; speeds are never asserted.
"""

import csv
import subprocess
import sys

import pytest

from tritonpipe.harness.bench.profile import find_pyspy
from tritonpipe.harness.bench.report import BATCH_COLUMNS, BREAKDOWN_COLUMNS, ROW_COLUMNS, STAGE_COLUMNS

pytestmark = pytest.mark.server


def test_bench_measures_all_three_systems(tmp_path, tiny_onnx):
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "cls"\n'
        'backend = "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]"\n'
        f'resize_h = 32\nresize_w = 32\nmodel = "{tiny_onnx}"\nmax = 4\nbatching_timeout = 1\n'
    )
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "tritonpipe_tools.bench", "--config", str(config), "--corpus-count", "3",
        "--concurrency", "1,2", "--measurement-interval", "1000", "--stability-percentage", "100",
        "--baseline-instances", "1", "--inprocess-batch", "4", "--inprocess-seconds", "1",
        "--device", "cpu", "--no-progress", "-o", str(out), *(["--profile"] if find_pyspy() else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with open(out / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ROW_COLUMNS
        rows = list(reader)
    assert [(r["system"], r["concurrency"]) for r in rows] == [
        ("ensemble", "1"), ("ensemble", "2"), ("baseline", "1"), ("baseline", "2"), ("floor", "1"), ("floor", "2"), ("inprocess", "4"),
        ("inprocess-pre", "4"), ("inprocess-pre-2", "4"),
    ]
    for row in rows:
        assert float(row["throughput"]) > 0, row
        if not row["system"].startswith("inprocess-pre"):  # derived, or timed as a rate only: no latencies
            assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"]), row
        if row["system"] in ("ensemble", "baseline", "floor"):  # the stubs did the work the server was asked for
            assert 0 < float(row["stub_cores"]) <= float(row["host_cores"]) + 0.1, row

    with open(out / "breakdown.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == BREAKDOWN_COLUMNS
        steps = [r for r in reader if int(r["requests"]) > 0]
    models = {(r["system"], r["model"]) for r in steps}
    assert {("ensemble", "cls_pre"), ("ensemble", "cls_model"), ("baseline", "baseline_pre"), ("baseline", "cls_model")} <= models
    assert ("inprocess", "cls_pre") in models
    assert {r["concurrency"] for r in steps if r["system"] == "ensemble"} == {"1", "2"}  # each level apart

    # the batches by size, from Triton's per-batch-size statistics: at each level they hold the requests that
    # Triton's per-request statistics count, and at concurrency 1 every batch holds one request
    with open(out / "batches.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == BATCH_COLUMNS
        batches = list(reader)
    served_models = [step for step in steps if step["system"] != "inprocess" and step["queue_ms"]]  # an ensemble has no phases
    assert len(served_models) >= 8  # cls_pre, cls_model, baseline_pre, cls_model, floor: each at 1 and 2
    for step in served_models:
        held = [r for r in batches if (r["system"], r["concurrency"], r["model"]) == (step["system"], step["concurrency"], step["model"])]
        assert sum(int(r["batch_size"]) * int(r["batches"]) for r in held) == int(step["requests"]), (step, held)
        assert sum(int(r["batches"]) for r in held) == int(step["executions"]), (step, held)
        if step["concurrency"] == "1":
            assert {r["batch_size"] for r in held} == {"1"}, held
    assert not [r for r in batches if r["model"] == "cls"]  # the ensemble has no instance to be busy

    # inside each model: its stages per level, against Triton's own compute-infer time of the model
    with open(out / "stages.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == STAGE_COLUMNS
        stages = {(r["system"], r["concurrency"], r["model"], r["stage"]): r for r in reader}
    for system, model, names in (("ensemble", "cls_pre", ("DecodeTensor", "ResizeTensor", "cvtColorTensor")),
                                 ("ensemble", "cls_model", ("TensorrtTensor",)), ("baseline", "cls_model", ("TensorrtTensor",))):
        level = [stages[(system, "1", model, name)] for name in names]
        # one request in flight: every batch holds one image, and the stages run inside Triton's compute infer
        assert all(int(r["images"]) == int(r["batches"]) > 0 for r in level), level
        assert 0 < sum(float(r["ms_per_batch"]) for r in level) < float(level[0]["compute_infer_ms"]), level
        # and Triton's per-batch-size statistics give the same compute infer per batch as per request
        assert float(level[0]["compute_infer_batch_ms"]) == pytest.approx(float(level[0]["compute_infer_ms"]), rel=0.02), level
    assert ("ensemble", "2", "cls_pre", "DecodeTensor") in stages

    report = (out / "report.md").read_text()
    assert "## Inside the models" in report and "unexplained" in report and "execute:read" in report
    assert "| concurrency | ensemble img/s |" in report and "ensemble/baseline" in report and "ensemble/in-process" in report
    assert "ensemble p50 over floor" in report and "ensemble/floor" not in report
    assert "## Where the time goes" in report and "- corpus: 3 synthetic JPEGs" in report
    assert "## The batches Triton formed" in report
    # DALI is not installed here: the report says so once, and it is not a failed measurement
    assert "- DALI: not measured: " in report and "Failed measurements" not in report
    assert report.strip() in done.stdout
    assert (out / "perf_logs" / "ensemble_c2.log").is_file()
    server_log = (out / "server.log").read_text()
    assert "successfully loaded 'cls_pre'" in server_log  # the server's log, kept
    assert "tritonpipe INFO: cls_pre: Sequential[DecodeTensor(" in server_log  # with what each stub said at load
    assert "## What the models said" in report and "\n- cls_pre: Sequential[DecodeTensor(" in report

    # py-spy on the stubs at every level: the tables name the models' own code
    if not find_pyspy():
        return
    profiled = (out / "profile.md").read_text()
    assert "- profile: profile.md" in report
    sections = dict(part.split("\n", 1) for part in profiled.split("### ")[1:])
    assert list(sections) == [f"{system}, concurrency {c}" for system in ("ensemble", "baseline", "floor") for c in (1, 2)]
    if "Permission" in profiled or "ptrace" in profiled:
        pytest.skip("py-spy may not read other processes here")
    assert "TritonPythonModel.execute (tritonpipe/model/triton_model.py)" in sections["ensemble, concurrency 2"]
    assert "DecodeTensor.forward (tritonpipe/stages/image.py)" in sections["ensemble, concurrency 2"]
    assert "TritonPythonModel._preprocess (model.py)" in sections["baseline, concurrency 2"]  # the PIL model
    assert any((out / "profile").glob("ensemble_c2_*.txt"))


def test_bench_compares_variants_by_turns(tmp_path, tiny_onnx):
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "cls"\nbackend = "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]"\n'
        f'resize_h = 32\nresize_w = 32\nmodel = "{tiny_onnx}"\nmax = 4\nfuse = true\n'
    )
    out = tmp_path / "turns"
    command = [
        sys.executable, "-m", "tritonpipe_tools.bench", "--config", str(config), "--corpus-count", "3",
        "--systems", "ensemble", "--concurrency", "2", "--measurement-interval", "1000", "--stability-percentage", "100",
        "--device", "cpu", "--no-progress", "-o", str(out), "--variant", "plain:", "--variant", "small:max=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # each variant ran with a server of its own, and its own report says which variant it was
    assert "[variant plain, round 1: the configuration as given]" in (out / "plain-1" / "report.md").read_text()
    assert "[variant small, round 1: max=1]" in (out / "small-1" / "report.md").read_text()
    with open(out / "small-1" / "breakdown.csv") as handle:
        batches = [float(r["avg_batch"]) for r in csv.DictReader(handle) if r["model"] == "cls" and int(r["requests"]) > 0]
    assert batches and all(b == 1.0 for b in batches)  # max=1 reached the server: never more than one request per batch
    with open(out / "variants.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["system"], r["concurrency"], r["runs"]) for r in rows] == [
        ("plain", "ensemble", "2", "1"), ("small", "ensemble", "2", "1")]
    assert all(float(r["median"]) > 0 for r in rows)
    # the batches Triton formed, per variant: under max=1 every batch held one request, so the average image sat in
    # a batch of one too; with max 4 and 2 in flight, batches of 1 or 2
    small = rows[1]
    assert (float(small["mean_batch"]), float(small["biased_batch"])) == (1.0, 1.0)
    assert 1.0 <= float(rows[0]["mean_batch"]) <= float(rows[0]["biased_batch"]) <= 2.0
    assert (out / "variants.md").read_text().strip() in done.stdout
