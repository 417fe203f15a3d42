"""The benchmark's pieces without a server: CSV parsing, input data, configs, report."""

import base64
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.errors import ConfigError, is_bad_input
from tritonpipe.harness import chain as inprocess
from tritonpipe.harness import corpus, probe
from tritonpipe.harness.bench import perf, report, runner, stats
from tritonpipe.model.runtime import pick_device
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.configs import from_text, to_text, validate_repository
from tritonpipe.repository.generate import generate_repository
from tritonpipe_tools import bench as cli

# written by perf_analyzer 2.51 (-f), trimmed to two levels
PERF_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,239.36,5,2577,2,61,1306,213,2,3917,4182,5111,8141
2,422.442,5,2583,2,75,1740,315,1,4521,5201,6378,8809

Concurrency,Avg GPU Utilization,Avg GPU Power Usage
1,0,0
"""


def model_chain(tiny_onnx, **extra):
    return {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "model": str(tiny_onnx), "max": 8, **extra,
    }


# --- perf_analyzer ------------------------------------------------------------------------


def test_perf_csv_is_parsed_into_milliseconds():
    rows = perf.parse_perf_csv(PERF_CSV)
    assert [r.concurrency for r in rows] == [1, 2]
    first = rows[0]
    assert first.throughput == pytest.approx(239.36)
    assert (first.p50_ms, first.p90_ms, first.p95_ms, first.p99_ms) == pytest.approx((3.917, 4.182, 5.111, 8.141))
    assert first.columns["Server Compute Infer"] == "1306"


@pytest.mark.parametrize("text", ["", "\n\n", "Concurrency,Inferences/Second\n1,2\n"])
def test_perf_csv_without_the_needed_columns_is_an_error(text):
    with pytest.raises(perf.PerfError):
        perf.parse_perf_csv(text)


def test_perf_command_has_grpc_input_data_and_passthroughs(tmp_path):
    settings = perf.PerfSettings(
        measurement_interval_ms=2000, measurement_mode="count_windows", measurement_request_count=80,
        percentile=99, shared_memory="system", extra_args=("--async",),
    )
    command = perf.perf_command("/bin/pa", "cls", "127.0.0.1:8001", tmp_path / "in.json", 32, tmp_path / "o.csv", settings)
    joined = " ".join(command)
    assert command[0] == "/bin/pa"
    assert "-i grpc" in joined and "-m cls" in joined and "-u 127.0.0.1:8001" in joined
    assert f"--input-data {tmp_path / 'in.json'}" in joined and f"-f {tmp_path / 'o.csv'}" in joined
    assert "--concurrency-range 32:32:1" in joined
    assert "--measurement-interval 2000" in joined and "--measurement-mode count_windows" in joined
    assert "--measurement-request-count 80" in joined and "--percentile 99" in joined
    assert "--shared-memory system" in joined and command[-1] == "--async"
    plain = perf.perf_command("pa", "m", "u", "i", 1, "o", perf.PerfSettings())
    assert "--shared-memory" not in plain and "--percentile" not in plain and "--measurement-request-count" not in plain


def test_gpu_memory_is_none_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(probe.shutil, "which", lambda name: None)
    assert probe.gpu_memory_mb() is None


def test_gpu_memory_sums_every_gpu(monkeypatch):
    monkeypatch.setattr(probe.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(probe.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "1024\n512\n", ""))
    assert probe.gpu_memory_mb() == 1536.0


def test_host_busy_seconds_reads_every_busy_state_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    stat.write_text("cpu  700 10 200 5000 90 30 40 20 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert probe.host_busy_seconds(stat) == pytest.approx(1000 / os.sysconf("SC_CLK_TCK"))
    stat.write_text("garbage\n")
    assert probe.host_busy_seconds(stat) is None
    assert probe.host_busy_seconds(tmp_path / "missing") is None


def test_cores_busy_matches_the_process_clock_of_a_spinning_process():
    """A process that spins is measured as the server would be: its cores times the wall time are its CPU time by
    Python's own clock (to the kernel's tick), and the host was at least that busy."""
    before, clock = probe.sample_cpu(os.getpid()), time.process_time()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        pass
    after, used = probe.sample_cpu(os.getpid()), time.process_time() - clock
    busy = probe.cores_busy(before, after)
    wall = after.wall - before.wall
    assert busy.server * wall == pytest.approx(used, abs=0.05)
    assert busy.stubs == 0.0 and busy.host * wall >= used - 0.05
    # a stub that started between the samples counts from its start; one that ended counts nothing
    stubs = probe.cores_busy(probe.CpuSample(0.0, 1.0, 0.0, {1: 2.0, 2: 5.0}), probe.CpuSample(2.0, 5.0, 1.0, {1: 3.0, 3: 1.0}))
    assert (stubs.host, stubs.server, stubs.stubs) == (2.0, 0.5, 1.0)
    assert probe.cores_busy(after, before) is None


def test_markdown_gives_the_cores_each_level_kept_busy():
    rows = [report.Row("ensemble", 1, 100.0, 1.0, 1.0, 1.0, 2.0, host_cores=3.5, server_cores=0.5, stub_cores=2.25),
            report.Row("ensemble", 8, 300.0, 2.0, 2.0, 2.0, 4.0)]
    lines = report.markdown(rows, [], {}).splitlines()
    assert "| ensemble | 1 | 3.50 | 0.50 | 2.25 | 0.75 |" in lines
    assert not [line for line in lines if line.startswith("| ensemble | 8 | —")]
    assert "Host CPU" not in report.markdown(rows[1:], [], {})


DMON = """# gpu     sm    mem    enc    dec    jpg    ofa
# Idx      %      %      %      %      %      %
    0     20     10      0      0     98      0
    0     30     12      0      0     94      0
    1      -      -      -      -      -      -
"""


def test_dmon_output_averages_the_sms_and_the_jpeg_engines_over_every_sample():
    found = probe.parse_dmon(DMON.splitlines())
    assert (found.sm, found.jpeg, found.samples) == (25.0, 96.0, 3)  # the third row reports nothing, but is a sample
    old_driver = ["# gpu   sm   mem   enc   dec", "# Idx    %     %     %     %", "    0   40    5    0    0"]
    assert probe.parse_dmon(old_driver) == probe.GpuBusy(40.0, None, 1)
    assert probe.parse_dmon(DMON.splitlines()[:2]) is None and probe.parse_dmon([]) is None
    assert probe.parse_dmon(["#gpu sm jpg", "0 50 60"]) == probe.GpuBusy(50.0, 60.0, 1)


def test_the_gpu_meter_reads_nvidia_smi_while_its_block_runs_and_nothing_without_it(tmp_path):
    smi = tmp_path / "nvidia-smi"
    lines = "".join(f"echo '{line}'\n" for line in DMON.splitlines()[:3])
    smi.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = 'dmon -s u' ] || exit 3\n{lines}while true; do echo '    0     40     1      0      0     90      0'; sleep 0.05; done\n")
    smi.chmod(0o755)
    with probe.GpuBusyMeter(str(smi)) as meter:
        time.sleep(0.5)
    assert meter.result is not None and meter.result.samples >= 2 and 20.0 <= meter.result.sm <= 40.0
    assert 90.0 <= meter.result.jpeg <= 98.0
    with probe.GpuBusyMeter(str(tmp_path / "missing")) as missing:
        pass
    assert missing.result is None


def test_the_gpu_meter_reads_a_timed_window_apart_from_the_warm_up(tmp_path):
    smi = tmp_path / "nvidia-smi"
    header = "".join(f"echo '{line}'\n" for line in DMON.splitlines()[:2])
    warm, timed = "    0     10     1      0      0     20      0", "    0     70     1      0      0     90      0"
    smi.write_text(f"#!/bin/sh\n{header}for i in 1 2 3 4 5 6 7 8 9 10; do echo '{warm}'; sleep 0.05; done\n"
                   f"while true; do echo '{timed}'; sleep 0.05; done\n")
    smi.chmod(0o755)
    with probe.GpuBusyMeter(str(smi)) as meter:
        opened = time.perf_counter()
        time.sleep(2.0)
        closed = time.perf_counter()
    # the warm-up's samples (the first half second) count in the whole block, not in the window a second after it
    assert meter.result is not None and 10.0 < meter.result.sm < 70.0
    assert meter.between(opened, closed) == probe.GpuBusy(70.0, 90.0, meter.between(opened, closed).samples)
    assert meter.between(closed, closed + 5.0) is None  # nothing came a second after the block's end


def test_markdown_says_how_busy_the_sms_and_jpeg_engines_were():
    rows = [report.Row("ensemble", 128, 7000.0, 16.0, 20.0, 30.0, 40.0, sm_busy=33.4, jpeg_busy=87.6),
            report.Row("inprocess-pre-2", 64, 10000.0, jpeg_busy=98.0), report.Row("ensemble", 1, 400.0, 2.0, 2.0, 2.0, 3.0)]
    lines = report.markdown(rows, [], {}).splitlines()
    assert "| ensemble | 128 | 33 | 88 |" in lines and "| inprocess-pre-2 | 64 | — | 98 |" in lines
    assert not [line for line in lines if line.startswith("| ensemble | 1 | —")]
    assert "GPU busy" not in report.markdown(rows[2:], [], {})


# --- corpus and input data ------------------------------------------------------------------


def test_input_data_round_trips_through_base64(tmp_path):
    images = [b"\xff\xd8abc", bytes(range(256)) * 3, b"\xff\xd8"]
    path = corpus.write_input_data(images, tmp_path / "in.json")
    raw = json.loads(path.read_text())
    assert set(raw) == {"data"} and len(raw["data"]) == 3
    step = raw["data"][1]["INPUT"]
    assert step["shape"] == [768] and base64.b64decode(step["content"]["b64"]) == images[1]
    assert corpus.read_input_data(path) == images


def test_synthetic_corpus_is_deterministic_and_mixes_sizes():
    import cv2
    import numpy as np

    first, again = corpus.synthetic_corpus(4, seed=3), corpus.synthetic_corpus(4, seed=3)
    assert first.images == again.images
    assert corpus.synthetic_corpus(4, seed=4).images != first.images
    shapes = [cv2.imdecode(np.frombuffer(i, np.uint8), cv2.IMREAD_COLOR).shape[:2] for i in first.images]
    assert shapes == [(480, 640), (720, 1280), (1080, 1920), (480, 640)]
    assert "4 synthetic JPEGs" in first.description


def test_the_distinct_size_corpus_has_one_size_per_image_and_mixed_chroma():
    from io import BytesIO

    from PIL import Image, JpegImagePlugin

    photos = corpus.photo_corpus(12, seed=1)
    assert photos.images == corpus.photo_corpus(12, seed=1).images
    opened = [Image.open(BytesIO(data)) for data in photos.images]
    sizes = [image.size for image in opened]
    assert len(set(sizes)) == 12
    low, high = corpus.PHOTO_PIXELS
    assert all(low * 0.99 <= w * h <= high * 1.01 for w, h in sizes)
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)  # portrait and landscape
    # Pillow's names for 4:4:4, 4:2:2 and 4:2:0
    assert {JpegImagePlugin.get_sampling(image) for image in opened} == {0, 1, 2}
    assert "12 photo-like JPEGs of 12 distinct sizes" in photos.description


def test_bench_takes_the_distinct_size_corpus():
    options = cli.options_from(cli.parse_args(["--corpus-sizes", "distinct", "--corpus-count", "5"]))
    assert options.corpus_sizes == "distinct" and options.corpus_count == 5


def test_corpus_folder(tmp_path, jpeg_factory):
    (tmp_path / "b.JPG").write_bytes(jpeg_factory(20, 30))
    (tmp_path / "a.jpeg").write_bytes(jpeg_factory(10, 10))
    (tmp_path / "notes.txt").write_text("skip me")
    loaded = corpus.load_corpus(tmp_path)
    assert loaded.images == [(tmp_path / "a.jpeg").read_bytes(), (tmp_path / "b.JPG").read_bytes()]
    (tmp_path / "c.jpg").write_bytes(b"PNG?")
    with pytest.raises(ConfigError, match="c.jpg"):
        corpus.load_corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .jpg"):
        corpus.load_corpus(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        corpus.load_corpus(tmp_path / "missing")


# --- baseline repository --------------------------------------------------------------------


def bench_options(tmp_path, **changes):
    changes.setdefault("systems", ("ensemble", "baseline", "inprocess"))
    return runner.BenchOptions(output=tmp_path, device="cpu", baseline_instances=3, **changes)


def test_baseline_joins_the_repository_written_once(tmp_path, tiny_onnx):
    graph = load_graph(model_chain(tiny_onnx), name="cls")
    repo, peers = runner.build_bench_repository(graph, tmp_path / "repo", bench_options(tmp_path))
    assert list(peers) == ["baseline"] and peers["baseline"].models == ["baseline", "baseline_pre", "cls_model"]
    on_disk = {p.parent.name: from_text(p.read_text()) for p in repo.path.glob("*/config.pbtxt")}
    assert set(on_disk) == {"cls", "cls_pre", "cls_model", "baseline", "baseline_pre"}
    validate_repository(on_disk)
    pre, ensemble = on_disk["baseline_pre"], on_disk["baseline"]
    assert pre.backend == "python" and pre.max_batch_size == 8
    assert pre.instance_group[0].count == 3 and pre.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(pre.output[0].dims) == [3, 32, 32] and pre.output[0].data_type == mc.TYPE_FP32
    assert (pre.parameters["height"].string_value, pre.parameters["width"].string_value) == ("32", "32")
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["baseline_pre", "cls_model"]
    assert steps[1].input_map["x"] == steps[0].output_map["OUTPUT"]
    assert [o.name for o in ensemble.output] == [o.name for o in on_disk["cls"].output] == ["scores"]
    model_py = (repo.path / "baseline_pre" / "1" / "model.py").read_text()
    assert "PIL" in model_py and "tritonpipe" not in model_py.split('"""')[2]
    # the shared model stage is the pipeline's own, and the repository is the atomic writer's
    alone = generate_repository(graph, tmp_path / "alone", device="cpu")
    assert to_text(on_disk["cls_model"]) == to_text(alone.configs["cls_model"])
    assert json.loads((repo.path / "tritonpipe.json").read_text())["entry"] == "cls"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_fused_pipeline_gets_its_unfused_model_stage_and_nothing_else(tmp_path, tiny_onnx):
    graph = load_graph(model_chain(tiny_onnx, fuse=True), name="cls")
    repo, peers = runner.build_bench_repository(graph, tmp_path / "repo", bench_options(tmp_path))
    assert peers["baseline"].model == "cls_unfused_model"
    assert sorted(p.name for p in repo.path.iterdir() if p.is_dir()) == ["baseline", "baseline_pre", "cls", "cls_unfused_model"]
    assert (repo.path / "cls_unfused_model" / "1" / Path(tiny_onnx).name).is_file()
    assert graph.entry.settings.fuse and graph.name == "cls", "the graph itself is not changed"


def test_a_fused_pipelines_preprocessing_is_timed_from_its_stages(tmp_path, tiny_onnx):
    """Fused, no model of the chain runs the preprocessing alone: its in-process row adds the stage times of every
    stage before the model stage, and leaves the model stage's out."""
    graph = load_graph(model_chain(tiny_onnx, fuse=True), name="cls")
    options = bench_options(tmp_path, systems=("inprocess",), inprocess_batch=4, inprocess_seconds=0.2, progress=False)
    repo, _ = runner.build_bench_repository(graph, tmp_path / "repo", options)
    rows, steps, stages = runner._measure_inprocess(repo, corpus.synthetic_corpus(4, sizes=((48, 64),)), options, print)
    (pre,) = runner._inprocess_pre(repo, rows, steps, stages)
    per_image = {s.stage: s.ms_per_image for s in stages}
    assert {"DecodeTensor", "ResizeTensor", "cvtColorTensor", "TensorrtTensor"} <= set(per_image)
    want = 1000.0 / (per_image["DecodeTensor"] + per_image["ResizeTensor"] + per_image["cvtColorTensor"])
    assert pre.system == "inprocess-pre" and pre.concurrency == 4 and pre.throughput == pytest.approx(want)
    assert per_image["TensorrtTensor"] > 0 and "fused" in pre.note


@pytest.mark.parametrize("fuse, what", [(True, "cls's stages before the model stage"), (False, "the cls_pre model")])
def test_the_preprocessing_alone_runs_with_two_batches_in_flight(tmp_path, tiny_onnx, fuse, what):
    graph = load_graph(model_chain(tiny_onnx, fuse=fuse), name="cls")
    options = bench_options(tmp_path, systems=("inprocess",), inprocess_batch=4, inprocess_seconds=0.3, progress=False)
    repo, _ = runner.build_bench_repository(graph, tmp_path / "repo", options)
    (row,) = runner._measure_pre_in_flight(repo, corpus.synthetic_corpus(6, sizes=((48, 64),)), options, print)
    assert row.system == "inprocess-pre-2" and row.concurrency == 4 and row.throughput > 0
    assert row.note.startswith(what) and "2 batches in flight" in row.note


def test_stages_that_take_one_batch_at_a_time_are_not_run_two_at_once(monkeypatch):
    from tritonpipe.harness.chain import _one_batch_at_a_time
    from tritonpipe.pipeline.grammar import parse_backend
    from tritonpipe.stages import build_stage
    from tritonpipe.stages.base import Stage
    from tritonpipe.stages.image import DecodeTensor

    root = build_stage(parse_backend("S[DecodeTensor,cvtColorTensor]"), "cpu", None)
    decode = next(child for child in root.children if isinstance(child, DecodeTensor))
    assert _one_batch_at_a_time([root]) is None
    for keys, said in (({"decoder": "dali"}, "decoder=dali"), ({"decoder": "nvimgcodec"}, "decoder=nvimgcodec"),
                       ({"balance": object()}, "balance")):
        with monkeypatch.context() as patch:
            for name, value in keys.items():
                patch.setattr(decode, name, value)
            assert said in _one_batch_at_a_time([root])  # found inside the sequence, on the stage that says so
    with monkeypatch.context() as patch:
        patch.setattr(decode, "cuda_decoder_share", 0.25)  # the side decodes of two batches take turns
        assert _one_batch_at_a_time([root]) is None
    assert Stage.one_batch_at_a_time(decode) is None  # any other stage can take two at once


def test_without_the_baseline_only_the_pipeline_is_written(tmp_path, tiny_onnx):
    graph = load_graph(model_chain(tiny_onnx), name="cls")
    repo, peers = runner.build_bench_repository(graph, tmp_path / "repo", bench_options(tmp_path, systems=("ensemble",)))
    assert peers == {} and sorted(repo.configs) == ["cls", "cls_model", "cls_pre"]


def test_dali_served_shares_the_model_stage_with_the_baseline(tmp_path, tiny_onnx):
    graph = load_graph(model_chain(tiny_onnx, fuse=True, instance_num=3), name="cls")
    options = bench_options(tmp_path, systems=("ensemble", "baseline", "dali-served"))
    options.device = "gpu"
    repo, peers = runner.build_bench_repository(graph, tmp_path / "repo", options)
    assert list(peers) == ["baseline", "dali-served"]
    assert peers["dali-served"].models == ["dali_served", "dali_served_pre", "cls_unfused_model"]
    on_disk = {p.parent.name: from_text(p.read_text()) for p in repo.path.glob("*/config.pbtxt")}
    assert set(on_disk) == {"cls", "cls_unfused_model", "baseline", "baseline_pre", "dali_served", "dali_served_pre"}
    validate_repository(on_disk)
    pre, model = on_disk["dali_served_pre"], on_disk["cls_unfused_model"]
    # the same instances, batch size and batching as the shared model stage, on the GPU, any JPEG length per batch
    assert pre.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert pre.instance_group[0].count == sum(g.count for g in model.instance_group) == 3
    assert pre.max_batch_size == model.max_batch_size == 8
    assert pre.dynamic_batching == model.dynamic_batching and pre.HasField("dynamic_batching")
    assert pre.input[0].allow_ragged_batch and list(pre.output[0].dims) == [3, 32, 32]
    assert float(pre.parameters["hw_decoder_load"].string_value) == 0.65
    assert int(pre.parameters["threads"].string_value) >= 2 and pre.parameters["output_device"].string_value == "cpu"
    # the GPU output reaches the model stage on the GPU
    assert model.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    steps = on_disk["dali_served"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["dali_served_pre", "cls_unfused_model"]
    model_py = (repo.path / "dali_served_pre" / "1" / "model.py").read_text()
    assert "prefetch_queue_depth=1" in model_py and "import tritonpipe" not in model_py and "from tritonpipe" not in model_py


@pytest.mark.parametrize("fuse", [False, True])
def test_the_floor_has_the_pipelines_signature_and_its_front_models_instances(tmp_path, tiny_onnx, fuse):
    graph = load_graph(model_chain(tiny_onnx, fuse=fuse, instance_num=3, batching_timeout=2), name="cls")
    options = bench_options(tmp_path, systems=("ensemble", "floor"))
    repo, peers = runner.build_bench_repository(graph, tmp_path / "repo", options)
    assert peers == {}
    on_disk = {p.parent.name: from_text(p.read_text()) for p in repo.path.glob("*/config.pbtxt")}
    assert "python_floor" in on_disk
    validate_repository(on_disk)
    floor, entry = on_disk["python_floor"], on_disk["cls"]
    front = entry if fuse else on_disk["cls_pre"]
    assert floor.backend == "python" and floor.max_batch_size == entry.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in floor.input] == [(i.name, i.data_type, list(i.dims)) for i in entry.input]
    assert [(o.name, o.data_type, list(o.dims)) for o in floor.output] == [(o.name, o.data_type, list(o.dims)) for o in entry.output]
    assert all(i.allow_ragged_batch for i in floor.input)
    assert list(floor.instance_group) == list(front.instance_group) and floor.instance_group[0].count == 3
    assert floor.dynamic_batching == front.dynamic_batching and floor.HasField("dynamic_batching")
    model_py = (repo.path / "python_floor" / "1" / "model.py").read_text()
    assert "import tritonpipe" not in model_py and "from tritonpipe" not in model_py


def test_the_floor_needs_no_model_stage_and_refuses_a_name_clash(tmp_path):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}, name="pre")
    repo, _ = runner.build_bench_repository(graph, tmp_path / "r", bench_options(tmp_path, systems=("ensemble", "floor")))
    assert sorted(repo.configs) == ["pre", "python_floor"]
    clash = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}, name="python_floor")
    with pytest.raises(ConfigError, match="already has a model named 'python_floor'"):
        runner.build_bench_repository(clash, tmp_path / "r2", bench_options(tmp_path, systems=("ensemble", "floor")))
    assert not (tmp_path / "r2").exists()


def test_the_floor_refuses_outputs_it_cannot_answer_zeros_of(tmp_path):
    from tritonpipe.harness.bench import peers

    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}, name="pre")
    plan, configs, _ = runner.build_repository(graph, "cpu")
    assert peers.floor_config(plan, configs).output[0].data_type == configs["pre"].output[0].data_type
    configs["pre"].output[0].data_type = mc.TYPE_STRING
    with pytest.raises(ConfigError, match="is TYPE_STRING: leave 'floor' out of --systems"):
        peers.floor_config(plan, configs)


def test_dali_systems_are_left_out_with_one_line_where_dali_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_dali_missing", lambda options: "DALI is not installed")
    header, said = {}, []
    options = runner._without_missing_dali(bench_options(tmp_path, systems=runner.SYSTEMS), header, said.append)
    assert options.systems == ("ensemble", "baseline", "floor", "inprocess")
    assert header == {"DALI": "not measured: DALI is not installed"} and len(said) == 1


def test_baseline_needs_a_model_stage(tmp_path):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8})
    with pytest.raises(ConfigError, match="the baseline system needs .* exactly one model stage.*leave 'baseline' out"):
        runner.build_bench_repository(graph, tmp_path / "r", bench_options(tmp_path))
    assert not (tmp_path / "r").exists(), "a refused configuration writes nothing"
    with pytest.raises(ConfigError, match="leave 'dali-served' out of --systems"):
        runner.build_bench_repository(graph, tmp_path / "r", bench_options(tmp_path, systems=("ensemble", "dali-served")))


def test_baseline_name_clash_is_reported(tmp_path, tiny_onnx):
    graph = load_graph(model_chain(tiny_onnx), name="baseline")
    with pytest.raises(ConfigError, match="rename the pipeline"):
        runner.build_bench_repository(graph, tmp_path / "r", bench_options(tmp_path))


# --- overrides ------------------------------------------------------------------------------


def test_overrides_reach_single_node_configs(tiny_onnx, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(Path(tiny_onnx).read_bytes())
    config = runner.apply_overrides(model_chain(tiny_onnx), model=str(other), engine="onnxruntime", instance_num=3, max=16, batching_timeout=None)
    graph = load_graph(config)
    node = graph.entry
    assert (node.settings.instance_num, node.settings.max) == (3, 16)
    model = next(s for s in node.tree.walk() if s.name == "TensorrtTensor")
    assert model.params["model"] == str(other) and model.params["engine"] == "onnxruntime" and str(model.params["max"]) == "16"


def test_overrides_reach_each_node_of_a_graph(tiny_onnx):
    config = {
        "pre": {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 32, "resize_w": 32, "instance_num": 1, "next": "net"},
        "net": {"backend": "S[Mat2Tensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "model": "missing.onnx", "resize_h": 32, "resize_w": 32},
    }
    updated = runner.apply_overrides(config, model=str(tiny_onnx), instance_num=4)
    assert config["pre"]["instance_num"] == 1, "the caller's dict is not changed"
    assert "model" not in updated["pre"] and updated["net"]["model"] == str(tiny_onnx)
    graph = load_graph(updated)
    assert [n.settings.instance_num for n in graph.nodes.values()] == [4, 4]


def test_model_override_without_a_model_stage_is_an_error():
    with pytest.raises(ConfigError, match="no stage"):
        runner.apply_overrides({"backend": "S[DecodeMat]"}, model="x.onnx")


# --- statistics -----------------------------------------------------------------------------


def _stats(entries, batches=None):
    """Triton's statistics JSON; ``batches``: model -> [(batch size, executions, compute infer ns[, compute input ns,
    compute output ns])]."""
    return {
        "model_stats": [
            {
                "name": name, "inference_count": str(n), "execution_count": str(e),
                "inference_stats": {
                    "success": {"count": str(n), "ns": str(int(total))}, "queue": {"count": str(n), "ns": str(int(q))},
                    "compute_input": {"count": str(n), "ns": str(int(ci))}, "compute_infer": {"count": str(n), "ns": str(int(cf))},
                    "compute_output": {"count": str(n), "ns": str(int(co))}, "fail": {},
                },
                "batch_stats": [
                    {"batch_size": str(size), "compute_infer": {"count": str(count), "ns": str(int(ns))},
                     "compute_input": {"count": str(count), "ns": str(int(io[0] if io else 0))},
                     "compute_output": {"count": str(count), "ns": str(int(io[1] if io else 0))}}
                    for size, count, ns, *io in (batches or {}).get(name, [])
                ],
            }
            for name, n, e, total, q, ci, cf, co in entries
        ]
    }


def test_breakdown_is_per_request_over_the_level_only():
    before = stats.parse_stats(_stats([("e", 10, 10, 10e6, 0, 0, 0, 0), ("pre", 10, 5, 5e6, 1e6, 0, 3e6, 0)]))
    after = stats.parse_stats(_stats([
        ("e", 110, 110, 10e6 + 100 * 9e6, 0, 0, 0, 0),
        ("pre", 110, 30, 5e6 + 100 * 8e6, 1e6 + 100 * 2e6, 100 * 0.5e6, 3e6 + 100 * 5e6, 100 * 0.25e6),
    ]))
    rows = stats.breakdown("ensemble", ["e", "pre"], before, after, ensemble="e", concurrency=16)
    e, pre = rows
    assert e.concurrency == pre.concurrency == 16
    assert (pre.requests, pre.executions, pre.avg_batch) == (100, 25, 4.0)
    assert (pre.total_ms, pre.queue_ms, pre.compute_input_ms, pre.compute_infer_ms, pre.compute_output_ms) == pytest.approx((8, 2, 0.5, 5, 0.25))
    assert pre.other_ms == pytest.approx(0.25)
    assert e.total_ms == pytest.approx(9) and e.queue_ms is None and e.other_ms == pytest.approx(1)
    missing = stats.breakdown("x", ["gone"], before, after)
    assert missing[0].requests == 0 and missing[0].total_ms == 0


# a page as Triton 2.51 serves it, trimmed: two stages of one model, another model, and Triton's own series
METRICS_PAGE = """\
# HELP tritonpipe_stage_images images (requests) that entered the stage
# TYPE tritonpipe_stage_images counter
tritonpipe_stage_images{model="pre",stage="DecodeTensor"} 40
tritonpipe_stage_images{model="pre",stage="ResizeTensor"} 38
tritonpipe_stage_images{model="cls",stage="TensorrtTensor"} 38
# TYPE tritonpipe_stage_duration_us counter
tritonpipe_stage_duration_us{model="pre",stage="DecodeTensor"} 20000
tritonpipe_stage_duration_us{model="pre",stage="ResizeTensor"} 5000
tritonpipe_stage_duration_us{model="cls",stage="TensorrtTensor"} 9000
# TYPE tritonpipe_stage_batch_duration_seconds histogram
tritonpipe_stage_batch_duration_seconds_count{model="pre",stage="DecodeTensor"} 10
tritonpipe_stage_batch_duration_seconds_sum{model="pre",stage="DecodeTensor"} 0.02
tritonpipe_stage_batch_duration_seconds_bucket{model="pre",stage="DecodeTensor",le="0.005"} 10
tritonpipe_stage_batch_duration_seconds_count{model="pre",stage="ResizeTensor"} 10
tritonpipe_stage_batch_duration_seconds_count{model="cls",stage="TensorrtTensor"} 5
nv_inference_count{model="pre",version="1"} 40
"""


def test_stage_metrics_are_read_per_model_and_stage():
    tallies = stats.parse_stage_metrics(METRICS_PAGE)
    assert tallies == {
        ("pre", "DecodeTensor"): stats.StageTally(40, 20000, 10),
        ("pre", "ResizeTensor"): stats.StageTally(38, 5000, 10),
        ("cls", "TensorrtTensor"): stats.StageTally(38, 9000, 5),
    }


def test_stage_breakdown_is_per_batch_and_per_image_over_the_level_only():
    before = {("pre", "DecodeTensor"): stats.StageTally(8, 4000, 2), ("pre", "ResizeTensor"): stats.StageTally(8, 1000, 2)}
    after = stats.parse_stage_metrics(METRICS_PAGE)
    counters = (stats.parse_stats(_stats([("pre", 8, 2, 0, 0, 0, 0, 0)])),
                stats.parse_stats(_stats([("pre", 40, 10, 0, 0, 0, 32 * 3e6, 0)])))
    rows = stats.stage_breakdown("ensemble", 4, ["pre"], before, after, counters)
    decode, resize = rows
    assert (decode.stage, decode.images, decode.batches) == ("DecodeTensor", 32, 8)
    assert decode.ms_per_batch == pytest.approx(2.0) and decode.ms_per_image == pytest.approx(0.5)
    assert (resize.images, resize.batches, resize.ms_per_batch) == (30, 8, pytest.approx(0.5))
    assert decode.compute_infer_ms == pytest.approx(3.0) and decode.concurrency == 4
    assert decode.compute_infer_batch_ms is None  # no per-batch-size statistics in these snapshots
    # the stages come in the order the model's chain runs them
    ordered = stats.stage_breakdown("ensemble", 4, ["pre"], before, after, order={"pre": ["S", "ResizeTensor", "DecodeTensor"]})
    assert [r.stage for r in ordered] == ["ResizeTensor", "DecodeTensor"]
    assert [(r.model, r.stage) for r in stats.stage_breakdown("e", 1, ["cls", "pre"], {}, after)][0] == ("cls", "TensorrtTensor")
    # a level in which a model ran no batch gives it no row
    assert stats.stage_breakdown("ensemble", 4, ["pre"], after, after) == []


def test_compute_infer_per_batch_counts_each_batch_once_where_per_request_counts_it_per_request():
    # one batch of 1 request taking 2 ms and one of 9 requests taking 12 ms: per request the large batch
    # counts 9 times ((2 + 9 * 12) / 10 = 11 ms), per batch once ((2 + 12) / 2 = 7 ms), as the stages are averaged
    before = stats.parse_stats(_stats([("pre", 0, 0, 0, 0, 0, 0, 0)]))
    after = stats.parse_stats(_stats([("pre", 10, 2, 0, 0, 0, 2e6 + 9 * 12e6, 0)], {"pre": [(1, 1, 2e6), (9, 1, 12e6)]}))
    assert (after["pre"] - before["pre"]).infer_ms_per_batch == pytest.approx(7.0)
    tallies = {("pre", "DecodeTensor"): stats.StageTally(10, 6000, 2)}
    (decode,) = stats.stage_breakdown("ensemble", 8, ["pre"], {}, tallies, (before, after))
    assert decode.compute_infer_ms == pytest.approx(11.0) and decode.compute_infer_batch_ms == pytest.approx(7.0)
    assert decode.ms_per_batch == pytest.approx(3.0)
    lines = report.markdown(_rows(), [], {}, [decode]).splitlines()
    assert "| ensemble | 8 | pre | 11.0 | 7.00 | 3.00 | — | 4.00 | — |" in lines  # unexplained: 7 - 3, per batch


def test_batches_by_size_are_differenced_over_the_level_and_fitted():
    before = stats.parse_stats(_stats([("pre", 5, 3, 0, 0, 0, 0, 0)], {"pre": [(1, 1, 2e6, 1e6, 1e6), (2, 2, 8e6)]}))
    after = stats.parse_stats(_stats(
        [("pre", 45, 9, 0, 0, 0, 0, 0), ("e", 40, 40, 0, 0, 0, 0, 0)],
        {"pre": [(1, 3, 2e6 + 2 * 3e6, 1e6 + 2 * 0.5e6, 1e6 + 2 * 0.5e6), (2, 2, 8e6), (8, 2, 2 * 8e6, 2 * 1e6, 2 * 2e6),
                 (16, 2, 2 * 15e6, 2 * 1.5e6, 2 * 2.5e6)]},
    ))
    rows = stats.batch_times("ensemble", 32, ["e", "pre"], before, after)
    # only what ran over the level: size 2 ran before it and not in it; the ensemble has no batch statistics
    assert [(r.model, r.batch_size, r.batches) for r in rows] == [("pre", 1, 2), ("pre", 8, 2), ("pre", 16, 2)]
    assert sum(r.batch_size * r.batches for r in rows) == 50
    one, eight, sixteen = rows
    assert (one.compute_input_ms, one.compute_infer_ms, one.compute_output_ms) == pytest.approx((0.5, 3.0, 0.5))
    assert (sixteen.compute_input_ms, sixteen.compute_infer_ms, sixteen.compute_output_ms) == pytest.approx((1.5, 15, 2.5))
    assert eight.compute_infer_ms == pytest.approx(8)
    # the whole times 4, 11 and 19 ms lie on 3 + 1 x size, which numpy's weighted fit agrees with
    fixed, per_image = stats.per_batch_fit(rows)
    assert (fixed, per_image) == pytest.approx((3.0, 1.0))
    numpy = pytest.importorskip("numpy")
    sizes = [r.batch_size for r in rows]
    times = [r.compute_input_ms + r.compute_infer_ms + r.compute_output_ms for r in rows]
    slope, intercept = numpy.polyfit(sizes, [t + d for t, d in zip(times, (0.5, -1.0, 0.25))], 1,
                                     w=[numpy.sqrt(r.batches) for r in rows])
    off = [stats.BatchTimes("e", 1, "m", r.batch_size, r.batches, r.compute_input_ms + d, r.compute_infer_ms,
                            r.compute_output_ms) for r, d in zip(rows, (0.5, -1.0, 0.25))]
    assert stats.per_batch_fit(off) == pytest.approx((intercept, slope))
    assert stats.per_batch_fit(rows[:1]) is None  # one size fits no line
    # nor do batches nearly all of one size: 99 of 16 and one of 15 say nothing of the cost per image
    nearly = [stats.BatchTimes("e", 1, "m", 16, 99, 0.0, 20.0, 0.0), stats.BatchTimes("e", 1, "m", 15, 1, 0.0, 30.0, 0.0)]
    assert stats.per_batch_fit(nearly) is None

    lines = report.markdown(_rows(), [], {}, batches=rows).splitlines()
    assert "| ensemble | 32 | pre | 1 | 2 | 4% | 1.0 | 0.50 | 3.00 | 0.50 |" in lines
    assert "| ensemble | 32 | pre | 16-31 | 2 | 64% | 16.0 | 1.50 | 15.0 | 2.50 |" in lines
    # 6 batches hold 50 images (mean 8.3); the average image sits in a batch of (2 + 2 x 64 + 2 x 256) / 50 = 12.8
    assert stats.batch_means(rows) == pytest.approx((50 / 6, 642 / 50))
    assert "| ensemble | 32 | pre | 8.3 | 12.8 | 3.00 | 1.00 |" in lines
    assert any(line.startswith("**Uneven batches**") and "ensemble at concurrency 32 (pre: 12.8 against 8.3)" in line
               for line in lines)
    assert "The batches Triton formed" not in report.markdown(_rows(), [], {})
    # batches all of one size: no line to fit, and even (the size-biased batch is the mean)
    even = [stats.BatchTimes("ensemble", 8, "pre", 16, 4, 1.0, 20.0, 1.0)]
    assert stats.batch_means(even) == (16.0, 16.0) and stats.batch_means([]) is None
    lines = report.markdown(_rows(), [], {}, batches=even).splitlines()
    assert "| ensemble | 8 | pre | 16.0 | 16.0 | — | — |" in lines
    assert not any(line.startswith("**Uneven batches**") for line in lines)


def test_batches_csv_has_every_size(tmp_path):
    rows = [stats.BatchTimes("ensemble", 8, "pre", size, 3, 0.25, 1.5, 0.125) for size in (1, 5)]
    with open(report.write_batches(rows, tmp_path / "batches.csv")) as handle:
        read = list(csv.DictReader(handle))
    assert [(r["concurrency"], r["batch_size"], r["batches"], r["compute_infer_ms"]) for r in read] == [
        ("8", "1", "3", "1.5000"), ("8", "5", "3", "1.5000")]


# --- report ---------------------------------------------------------------------------------


def _rows(with_memory=False):
    mem = {"gpu_mem_before_mb": 1000.0, "gpu_mem_mb": 1010.0} if with_memory else {}
    return [
        report.Row("ensemble", 1, 200.0, 5.0, 6.0, 7.0, 8.0, **mem),
        report.Row("ensemble", 8, 800.0, 10.0, 12.0, 13.0, 150.0, **mem),
        report.Row("baseline", 1, 100.0, 10.0, 11.0, 12.0, 13.0, **mem),
        report.Row("baseline", 8, None, note="perf_analyzer exited with code 2"),
        report.Row("inprocess", 64, 1000.0, 60.0, 61.0, 62.0, 63.0, note="batch 64 on cpu"),
    ]


def test_ratios_and_formatting():
    assert report.ratio(200, 100) == 2.0 and report.ratio(None, 1) is None and report.ratio(1, 0) is None
    assert report.fmt_ratio(2.0) == "2.00×" and report.fmt_ratio(None) == "—"
    assert report.fmt_rate(1234.56) == "1,234.6" and report.fmt_ms(123.4) == "123"
    assert report.fmt_ms(12.34) == "12.3" and report.fmt_ms(1.234) == "1.23" and report.fmt_ms(None) == "—"


def test_markdown_has_header_ratios_and_breakdown():
    steps = [stats.StepTimes("ensemble", "e", 100, 100, 9.0, other_ms=1.0, concurrency=8),
             stats.StepTimes("ensemble", "pre", 100, 25, 8.0, 2.0, 0.5, 5.0, 0.25, 0.25, concurrency=8),
             stats.StepTimes("inprocess", "pre", 64, 1, 3.5)]
    text = report.markdown(_rows(), steps, {"device": "CPU only", "command": "`tritonpipe bench`"})
    lines = text.splitlines()
    assert "- device: CPU only" in lines and "- command: `tritonpipe bench`" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == (
        "| concurrency | ensemble img/s | ensemble p50 | ensemble p99 | baseline img/s | baseline p50 | baseline p99 "
        "| ensemble/baseline | ensemble/in-process |"
    )
    assert table[1] == "| 1 | 200.0 | 5.00 | 8.00 | 100.0 | 10.0 | 13.0 | 2.00× | 0.20× |"
    assert table[2] == "| 8 | 800.0 | 10.0 | 150 | — | — | — | — | 0.80× |"
    assert "- baseline at 8: perf_analyzer exited with code 2" in lines
    assert "| 64 | 1,000.0 | 60.0 | 63.0 |" in lines
    assert "| ensemble | 8 | e | 100 | 1.0 | 9.00 | — | — | — | — | 1.00 |" in lines
    assert "| ensemble | 8 | pre | 100 | 4.0 | 8.00 | 2.00 | 0.50 | 5.00 | 0.25 | 0.25 |" in lines
    assert "| inprocess | — | pre | 64 | 64.0 | 3.50 | — | — | — | — | — |" in lines  # no level in one process
    assert "GPU MiB" not in text


def test_markdown_gives_the_floor_and_what_the_pipeline_adds_to_it():
    rows = _rows() + [report.Row("floor", 1, 900.0, 1.25, 1.5, 1.75, 2.0), report.Row("floor", 8, 3000.0, 2.5, 3.0, 3.5, 4.0)]
    table = [line for line in report.markdown(rows, [], {}).splitlines() if line.startswith("| ")]
    assert table[0] == (
        "| concurrency | ensemble img/s | ensemble p50 | ensemble p99 | baseline img/s | baseline p50 | baseline p99 "
        "| floor img/s | floor p50 | floor p99 | ensemble/baseline | ensemble p50 over floor | ensemble/in-process |"
    )
    # no throughput ratio against the floor: it does none of the work
    assert table[1] == "| 1 | 200.0 | 5.00 | 8.00 | 100.0 | 10.0 | 13.0 | 900.0 | 1.25 | 2.00 | 2.00× | 3.75 | 0.20× |"
    assert table[2] == "| 8 | 800.0 | 10.0 | 150 | — | — | — | 3,000.0 | 2.50 | 4.00 | — | 7.50 | 0.80× |"


def test_markdown_has_the_stage_table_with_the_time_outside_the_stages():
    stages = [stats.StageTimes("ensemble", 1, "pre", "DecodeTensor", 100, 100, 0.8, 0.8, 2.0, 2.0),
              stats.StageTimes("ensemble", 1, "pre", "ResizeTensor", 100, 100, 0.2, 0.2, 2.0, 2.0)]
    text = report.markdown(_rows(), [], {}, stages)
    lines = text.splitlines()
    assert "## Inside the models (ms, from tritonpipe's stage metrics, per concurrency level)" in lines
    assert "| ensemble | 1 | pre | DecodeTensor | 100 | 100 | 1.0 | 0.80 | 0.80 |" in lines
    assert "| ensemble | 1 | pre | 2.00 | 2.00 | 1.00 | — | 1.00 | — |" in lines  # no execute rows: none timed
    # execute's steps are not stages: they have a column of their own, and the GPU time overlaps the rest
    steps = [stats.StageTimes("ensemble", 1, "pre", "execute:" + step, 100, 100, ms, ms, 2.0, 2.0)
             for step, ms in (("read", 0.1), ("outputs", 0.05), ("synchronize", 0.4), ("respond", 0.05), ("gpu", 0.7))]
    lines = report.markdown(_rows(), [], {}, stages + steps).splitlines()
    assert "| ensemble | 1 | pre | 2.00 | 2.00 | 1.00 | 0.60 | 0.40 | 0.70 |" in lines
    assert "Inside the models" not in report.markdown(_rows(), [], {})


def test_markdown_shows_gpu_memory_when_measured():
    text = report.markdown(_rows(with_memory=True), [], {})
    assert "ensemble GPU MiB" in text and "1000→1010" in text
    assert "(torch" not in text and "tritonpipe_gpu_cache_bytes" not in text  # no gauge read: nothing to split


def test_markdown_splits_a_rise_in_gpu_memory_into_torchs_cache_and_the_rest():
    rows = _rows(with_memory=True)
    rows[0].torch_cache_before_mb, rows[0].torch_cache_mb = 600.0, 604.0
    text = report.markdown(rows, [], {})
    assert "| 1 | 200.0 | 5.00 | 8.00 | 1000→1010 (torch 600→604) |" in text
    assert "tritonpipe_gpu_cache_bytes" in text  # the note that says what the brackets hold


def test_the_torch_cache_gauges_of_every_instance_add_up():
    page = """# HELP tritonpipe_gpu_cache_bytes device memory torch's caching allocator holds in the instance, in bytes
# TYPE tritonpipe_gpu_cache_bytes gauge
tritonpipe_gpu_cache_bytes{instance="resnet18_0_0",model="resnet18"} 1073741824
tritonpipe_gpu_cache_bytes{instance="resnet18_0_1",model="resnet18"} 5.36870912e+08
tritonpipe_stage_images{model="resnet18",stage="DecodeTensor"} 40
"""
    assert stats.parse_gpu_cache_mb(page) == pytest.approx(1536.0)
    assert stats.parse_gpu_cache_mb(METRICS_PAGE) is None  # a CPU server: no gauge at all


def test_csv_files_have_the_expected_columns(tmp_path):
    path = report.write_rows(_rows(), tmp_path / "results.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["system", "concurrency", "throughput", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "gpu_mem_before_mb", "gpu_mem_mb",
                            "torch_cache_before_mb", "torch_cache_mb", "note", "host_cores", "server_cores", "stub_cores",
                            "sm_busy", "jpeg_busy"]
    assert rows[0]["throughput"] == "200.0000" and rows[3]["throughput"] == "" and rows[0]["gpu_mem_mb"] == ""
    steps = [stats.StepTimes("inprocess", "cls_pre", 64, 1, 3.5)]
    rows = list(csv.DictReader(report.write_breakdown(steps, tmp_path / "b.csv").open()))
    assert list(rows[0]) == report.BREAKDOWN_COLUMNS and rows[0]["total_ms"] == "3.5000" and rows[0]["queue_ms"] == ""
    stages = [stats.StageTimes("ensemble", 8, "pre", "DecodeTensor", 64, 8, 1.5, 0.1875)]
    rows = list(csv.DictReader(report.write_stages(stages, tmp_path / "s.csv").open()))
    assert list(rows[0]) == report.STAGE_COLUMNS and rows[0]["ms_per_batch"] == "1.5000" and rows[0]["compute_infer_ms"] == ""


def test_plot_is_written_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.plot(_rows(), tmp_path / "p.png").stat().st_size > 1000


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    assert report.plot(_rows(), tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


# --- in-process chain and CLI ----------------------------------------------------------------


def test_inprocess_chain_runs_the_generated_models(tmp_path, tiny_onnx, jpeg_factory):
    repo = generate_repository(load_graph(model_chain(tiny_onnx), name="cls"), tmp_path / "repo")
    images = [jpeg_factory(40, 60, seed=i) for i in range(3)]
    result = inprocess.run_inprocess(repo, images, device="cpu", batch=4, seconds=0.0, warmup=1, min_batches=2, progress=False)
    assert result.images == 8 and len(result.batch_ms) == 2 and result.throughput > 0
    assert set(result.model_ms) == {"cls_pre", "cls_model"} and result.device == "cpu"
    assert result.chunks == {"cls_model": 8}
    chain = inprocess.Chain.of_repository(repo, torch.device("cpu"))
    first = torch.frombuffer(bytearray(images[0]), dtype=torch.uint8)[None]
    truncated, whole = chain.run([{"INPUT": first[:, :20]}, {"INPUT": first}])
    assert isinstance(truncated, BaseException) and is_bad_input(truncated), "a bad image fails alone"
    assert set(whole) == {"scores"} and whole["scores"].shape == (1, 10)
    with pytest.raises(RuntimeError, match="corpus image"):
        inprocess.run_inprocess(repo, [images[0][:20]], device="cpu", batch=1, seconds=0.0, progress=False)


def test_inprocess_times_every_leaf_stage_apart_and_leaves_no_sink(tmp_path, tiny_onnx, jpeg_factory, monkeypatch):
    from tritonpipe.stages import control

    repo = generate_repository(load_graph(model_chain(tiny_onnx), name="cls"), tmp_path / "repo")
    images = [jpeg_factory(40, 60, seed=i) for i in range(3)]
    result = inprocess.run_inprocess(repo, images, device="cpu", batch=4, seconds=0.0, warmup=1, min_batches=1,
                                     progress=False, stage_batches=2)
    got = [(t.model, t.stage, t.images, t.calls) for t in result.stages]
    # the leaves of each model's stage tree, in the order the chain runs them; wrappers (SyncTensor) are not timed
    assert got == [("cls_pre", "DecodeTensor", 8, 2), ("cls_pre", "ResizeTensor", 8, 2), ("cls_pre", "cvtColorTensor", 8, 2),
                   ("cls_model", "TensorrtTensor", 8, 2)]
    assert all(t.seconds > 0 for t in result.stages) and control._sink is None
    # the device is synchronised after every stage: the clock asks for it once per start and once per stage
    syncs = []
    clock = inprocess.StageClock(lambda: syncs.append(1))
    clock.start("m")
    clock.record("A", 0.0, 4, [])
    clock.record("B", 0.0, 4, [])
    assert len(syncs) == 3 and [t.stage for t in clock.tallies.values()] == ["A", "B"]
    # a chain that fails during the timed batches still leaves no sink behind
    chain = inprocess.Chain.of_repository(repo, torch.device("cpu"))
    monkeypatch.setattr(chain, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        inprocess._stage_times(chain, lambda index: chain.run([]), 1)
    assert control._sink is None and chain.clock is None


def test_inprocess_feeds_the_model_stage_at_most_its_max_batch(tmp_path, tiny_onnx, jpeg_factory):
    small = generate_repository(load_graph(model_chain(tiny_onnx, max=2), name="cls"), tmp_path / "small")
    large = generate_repository(load_graph(model_chain(tiny_onnx, max=8), name="cls"), tmp_path / "large")
    inputs = [torch.frombuffer(bytearray(jpeg_factory(40, 60, seed=i)), dtype=torch.uint8)[None] for i in range(5)]
    cpu = torch.device("cpu")
    chunked, whole = inprocess.Chain.of_repository(small, cpu), inprocess.Chain.of_repository(large, cpu)
    assert chunked.chunks() == {"cls_model": 2}
    calls = []
    model_stage = chunked.steps[1].runtime.root
    original = model_stage.forward
    model_stage.forward = lambda batch: (calls.append(len(batch)), original(batch))[1]
    requests = [{"INPUT": tensor} for tensor in inputs]
    got, want = chunked.run(requests), whole.run(requests)
    assert calls == [2, 2, 1]
    assert all(g["scores"].shape == (1, 10) for g in got)
    torch.testing.assert_close(torch.cat([g["scores"] for g in got]), torch.cat([w["scores"] for w in want]))


def test_device_choice():
    assert pick_device("cpu").type == pick_device("KIND_CPU").type == "cpu"
    if torch.cuda.is_available():
        assert pick_device("GPU", 0) == pick_device("auto") == torch.device("cuda", 0)
    else:
        assert pick_device("auto").type == pick_device("KIND_GPU").type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            pick_device("gpu", strict=True)
    # torch's spelling is the GPU too, never a silent CPU run; a kind nobody knows is refused where a user named it
    assert pick_device("cuda") == pick_device("gpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        pick_device("tpu", strict=True)


def test_cli_parses_lists_and_builds_options(tmp_path):
    args = cli.parse_args(["--concurrency", "1,8,32", "--systems", "ensemble,inprocess", "--shared-memory", "system",
                           "--perf-arg=--async", "--instances", "2", "-o", str(tmp_path)])
    options = cli.options_from(args, "cmd")
    assert options.concurrency == (1, 8, 32) and options.systems == ("ensemble", "inprocess")
    assert options.perf.shared_memory == "system" and options.perf.extra_args == ("--async",)
    assert options.instances == 2 and options.output == tmp_path and options.command == "cmd"
    defaults = cli.options_from(cli.parse_args([]))
    assert defaults.concurrency == (1, 8, 32, 64, 128) and defaults.systems == ("ensemble", "baseline", "dali-served", "floor", "inprocess", "dali")
    for bad in (["--concurrency", "1,x"], ["--concurrency", "0"], ["--systems", "ensemble,triton"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_a_configuration_refused_by_a_stage_writes_nothing(tmp_path, tiny_onnx):
    config = tmp_path / "c.toml"
    config.write_text('backend = "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]"\nresize_h = 8\nresize_w = 8\n'
                      f'model = "{tiny_onnx}"\ndecoder = "torchvision"\ndecode_depth = 2\n')
    options = runner.BenchOptions(config=config, systems=("ensemble",), output=tmp_path / "out")
    with pytest.raises(ConfigError, match="decode_depth tunes"):
        runner.run_bench(options, say=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_the_report_gives_what_the_models_said_in_the_servers_log_each_line_once(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "I1205 07:00:00.000 1 server.cc:1] loading: cls_pre:1\n"
        + "tritonpipe INFO: decoder=nvjpeg on cuda:0: libnvjpeg 13.0.1 (libnvjpeg.so.13)\n" * 8
        + "tritonpipe INFO: ResizeTensor on cuda:0 does the model's mean and std, float16 output in its one launch\n" * 8
        + "tritonpipe WARNING: resnet18: warm-up stopped after 4 sample requests (x)\n"
        + "not tritonpipe INFO: a line of something else\n"
    )
    said = report.model_lines(log)
    assert said == [
        ("decoder=nvjpeg on cuda:0: libnvjpeg 13.0.1 (libnvjpeg.so.13)", 8),
        ("ResizeTensor on cuda:0 does the model's mean and std, float16 output in its one launch", 8),
        ("WARNING: resnet18: warm-up stopped after 4 sample requests (x)", 1),
    ]
    text = report.markdown([], [], {"date": "today"}, None, said)
    assert "## What the models said" in text
    assert "- decoder=nvjpeg on cuda:0: libnvjpeg 13.0.1 (libnvjpeg.so.13) (x8)" in text
    assert text.rstrip().endswith("- WARNING: resnet18: warm-up stopped after 4 sample requests (x)")
    assert report.model_lines(tmp_path / "missing.log") == []
    assert "What the models said" not in report.markdown([], [], {"date": "today"}, None, [])
