"""The generic model's runtime: load-time warm-up (the `warmup` key) and host outputs for clients."""

import json
import warnings

import pytest
import torch
from google.protobuf import json_format

from tritonpipe.contract import parse_warmup
from tritonpipe.errors import ConfigError
from tritonpipe.model.runtime import ModelRuntime
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository, generate_repository


def chain(model, **extra):
    return {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "model": str(model), "fuse": True, **extra,
    }


def triton_json(config) -> dict:
    """The model config as Triton hands it to a Python model (int64 dims come as strings)."""
    return json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))


def test_warmup_values():
    assert parse_warmup("1080x1920") == (1080, 1920)
    assert parse_warmup(" 48 X 64 ") == (48, 64)
    for off in ("off", "OFF", "none", "false", "0"):
        assert parse_warmup(off) is None
    for bad in ("big", "1080", "0x10", "10x99999", "1080x1920x3"):
        with pytest.raises(ConfigError, match="warmup must be off or a sample image size HxW"):
            parse_warmup(bad)


def test_warmup_reaches_gpu_configs_only(tiny_onnx):
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "gpu")
    assert configs["cls"].parameters["tritonpipe.warmup"].string_value == "1080x1920"
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx, warmup="480x640"), name="cls"), "gpu")
    assert configs["cls"].parameters["tritonpipe.warmup"].string_value == "480x640"
    for device, extra in (("gpu", {"warmup": "off"}), ("cpu", {})):
        _, configs, _ = build_repository(load_graph(chain(tiny_onnx, **extra), name="cls"), device)
        assert "tritonpipe.warmup" not in configs["cls"].parameters


def test_bad_warmup_is_rejected_before_writing(tmp_path, tiny_onnx):
    with pytest.raises(ConfigError, match="warmup must be off"):
        generate_repository(load_graph(chain(tiny_onnx, warmup="huge")), tmp_path / "repo", device="gpu")
    assert not (tmp_path / "repo").exists()


def runtime_for(tmp_path, model, device="cpu", **extra) -> ModelRuntime:
    repo = generate_repository(load_graph(chain(model, **extra), name="cls"), tmp_path / "repo", device="gpu")
    config = triton_json(repo.configs["cls"])
    return ModelRuntime(config, repo.path / "cls" / "1", device)


def test_runtime_runs_every_batch_bucket_largest_first(tmp_path, tiny_onnx, monkeypatch):
    runtime = runtime_for(tmp_path, tiny_onnx, max=12, warmup="40x56")
    seen = []
    run = runtime.run

    def spy(items):
        run(items)
        seen.append(len(items))
        # every sample went through the whole chain: the classifier's scores came out
        assert all("error" not in item and tuple(runtime.output(item, "scores").shape) == (1, 10) for item in items)

    monkeypatch.setattr(runtime, "run", spy)
    assert runtime.warm_up() == (12 + 8 + 4 + 2 + 1, None)
    assert seen == [12, 8, 4, 2, 1]


def test_small_pool_sample_size():
    from tritonpipe.model.runtime import SMALL_BLOCK, _small_pool_size

    assert _small_pool_size((40, 56)) is None  # already small
    height, width = _small_pool_size((1080, 1920))
    assert 0.9 * SMALL_BLOCK < 3 * height * width < SMALL_BLOCK
    assert abs(width / height - 1920 / 1080) < 0.01


def test_runtime_sample_is_a_decodable_jpeg_of_the_asked_size(tmp_path, tiny_onnx):
    import cv2
    import numpy as np

    runtime = runtime_for(tmp_path, tiny_onnx, warmup="40x56")
    (name,) = runtime.inputs
    sample = runtime._sample(name, (40, 56))
    assert sample.dtype == torch.uint8 and sample.dim() == 2 and sample.shape[0] == 1
    decoded = cv2.imdecode(np.frombuffer(sample.numpy().tobytes(), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (40, 56, 3)


def test_runtime_reports_a_chain_that_refuses_the_samples(tmp_path, tiny_onnx, monkeypatch):
    runtime = runtime_for(tmp_path, tiny_onnx, max=4, warmup="40x56")
    png = torch.frombuffer(bytearray(b"\x89PNG\r\n\x1a\n" + bytes(64)), dtype=torch.uint8).reshape(1, -1)
    monkeypatch.setattr(runtime, "_sample", lambda name, size: png)
    count, problem = runtime.warm_up()
    assert count == 4  # stops at the first refused batch
    assert problem.startswith("RequestError") and "PNG" in problem


def test_runtime_without_warmup_runs_nothing(tmp_path, tiny_onnx):
    runtime = runtime_for(tmp_path, tiny_onnx, warmup="off")
    assert runtime.warm_up() == (0, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_up_captures_every_graph_and_keeps_memory_flat(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "net.ts"))
    device = torch.device("cuda", 0)
    runtime = runtime_for(tmp_path, tmp_path / "net.ts", device, max=16, warmup="720x1280", inputs="x:FP32:3x32x32")
    # each bucket runs the 720x1280 sample and one scaled to just under 1 MiB decoded
    assert runtime.warm_up() == (2 * (16 + 8 + 4 + 2 + 1), None)
    torch.cuda.synchronize()
    engine = runtime.root.children[-1].children[-1].engine
    assert sorted(key[0][0] for key in engine.graphs) == [1, 2, 4, 8, 16]
    reserved = torch.cuda.memory_reserved(device)
    from tritonpipe.examples import sample_jpeg

    jpeg = torch.frombuffer(bytearray(sample_jpeg(480, 640, seed=1)), dtype=torch.uint8).reshape(1, -1)
    (name,) = runtime.inputs
    for size in (3, 16, 1, 9, 5):
        items = [{runtime.inputs[name]: jpeg.clone()} for _ in range(size)]
        runtime.run(items)
        assert all("error" not in item for item in items)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved(device) == reserved


# --- outputs that only go back to clients --------------------------------------------------


def test_only_models_whose_outputs_nobody_reads_return_host_outputs(tiny_onnx):
    split = dict(chain(tiny_onnx), fuse=False)
    _, configs, _ = build_repository(load_graph(split, name="cls"), "gpu")
    assert "tritonpipe.host_outputs" not in configs["cls_pre"].parameters  # feeds cls_model on the GPU
    assert configs["cls_model"].parameters["tritonpipe.host_outputs"].string_value == "yes"
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "gpu")
    assert configs["cls"].parameters["tritonpipe.host_outputs"].string_value == "yes"
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "cpu")
    assert "tritonpipe.host_outputs" not in configs["cls"].parameters


def test_responses_keep_each_items_outputs_and_errors(tmp_path, tiny_onnx):
    import cv2
    import numpy as np

    runtime = runtime_for(tmp_path, tiny_onnx, max=4, warmup="off")
    assert runtime.host_outputs
    (key,) = runtime.inputs.values()
    rng = np.random.default_rng(0)
    jpegs = [cv2.imencode(".jpg", rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))[1].tobytes() for i in range(3)]
    items = [{key: torch.frombuffer(bytearray(j), dtype=torch.uint8).reshape(1, -1)} for j in jpegs]
    items.insert(1, {key: torch.frombuffer(bytearray(b"not a jpeg"), dtype=torch.uint8).reshape(1, -1)})
    runtime.run(items)
    results = runtime.responses(items)
    assert isinstance(results[1], Exception) and "JPEG" in str(results[1])
    for item, result in zip(items, results):
        if "error" not in item:
            assert list(result) == ["scores"] and result["scores"].device.type == "cpu"
            torch.testing.assert_close(result["scores"], runtime.output(item, "scores"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_outputs_arrive_on_the_cpu_in_one_copy():
    from tritonpipe.model.runtime import _to_host

    device = torch.device("cuda", 0)
    tensors = [torch.randn(n, 7, device=device) for n in (1, 3, 2)]
    host = _to_host(tensors)
    assert [t.device.type for t in host] == ["cpu"] * 3
    for a, b in zip(host, tensors):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b.cpu())
    mixed = _to_host([tensors[0], tensors[1].half()])
    assert [t.dtype for t in mixed] == [torch.float32, torch.float16]


# --- two batches in flight (the overlap key) -------------------------------------------------


def test_overlap_reaches_models_that_answer_clients(tiny_onnx):
    split = dict(chain(tiny_onnx), fuse=False, overlap=True)
    _, configs, _ = build_repository(load_graph(split, name="cls"), "gpu")
    # its GPU outputs go to cls_model through execute's return: one batch at a time
    assert "tritonpipe.overlap" not in configs["cls_pre"].parameters
    assert configs["cls_model"].parameters["tritonpipe.overlap"].string_value == "yes"
    _, configs, _ = build_repository(load_graph(split, name="cls"), "cpu")
    assert all(configs[name].parameters["tritonpipe.overlap"].string_value == "yes" for name in ("cls_pre", "cls_model"))
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "gpu")
    assert "tritonpipe.overlap" not in configs["cls"].parameters  # off unless asked


def _jpeg_items(key, count, bad=()):
    import cv2
    import numpy as np

    rng = np.random.default_rng(1)
    items = []
    for i in range(count):
        data = b"not a jpeg" if i in bad else cv2.imencode(".jpg", rng.integers(0, 256, (24 + 3 * i, 40 - i, 3), dtype=np.uint8))[1].tobytes()
        items.append({key: torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(1, -1)})
    return items


def test_the_halves_compute_what_the_whole_chain_does(tmp_path, tiny_onnx):
    runtime = runtime_for(tmp_path, tiny_onnx, max=8, warmup="off", overlap=True)
    assert runtime.overlap
    head, tail = runtime.halves()
    assert [s.name for s in head] == ["DecodeTensor", "ResizeTensor", "cvtColorTensor"]
    assert [s.name for s in tail] == ["SyncTensor"]
    (key,) = runtime.inputs.values()
    whole, halves = _jpeg_items(key, 5, bad={2}), _jpeg_items(key, 5, bad={2})
    runtime.run(whole)
    runtime.run_head(halves)
    runtime.run_tail(halves)
    for a, b in zip(runtime.responses(whole), runtime.responses(halves)):
        if isinstance(a, Exception):
            assert type(a) is type(b) and str(a) == str(b)
        else:
            torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapping_streams_give_the_chains_own_results(tmp_path):
    import threading

    from tritonpipe.model.overlap import Flight, Overlap

    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 32, 32)), tmp_path / "net.ts")
    device = torch.device("cuda", 0)
    runtime = runtime_for(tmp_path, tmp_path / "net.ts", device, max=8, warmup="off", inputs="x:FP32:3x32x32", overlap=True)
    (key,) = runtime.inputs.values()
    want = []
    for start in range(0, 40, 8):
        items = _jpeg_items(key, 8, bad={start % 7})
        runtime.run(items)
        want += runtime.responses(items)
    torch.cuda.synchronize()
    got: dict[int, object] = {}
    done = threading.Event()

    def answer(flight, results):
        got.update(zip(flight.senders, results))
        if len(got) == len(want):
            done.set()

    overlap = Overlap(runtime, torch.cuda.Stream(device), answer)
    for start in range(0, 40, 8):
        flight = Flight(_jpeg_items(key, 8, bad={start % 7}), list(range(start, start + 8)))
        overlap.run_head(flight)
        overlap.submit(flight)
    assert done.wait(60)
    overlap.close()
    for index, expected in enumerate(want):
        if isinstance(expected, Exception):
            assert isinstance(got[index], Exception)
        else:
            assert list(got[index]) == list(expected)
            for name, tensor in expected.items():
                torch.testing.assert_close(got[index][name], tensor)


# --- how an instance waits for the GPU (the gpu_wait key) ----------------------------------


def test_gpu_wait_reaches_gpu_models_only_and_a_bad_value_is_refused_before_writing(tmp_path, tiny_onnx):
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx, gpu_wait="yield"), name="cls"), "gpu")
    assert configs["cls"].parameters["tritonpipe.gpu_wait"].string_value == "yield"
    assert runtime_for(tmp_path / "yield", tiny_onnx, warmup="off", gpu_wait="yield").gpu_wait == "yield"
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx, gpu_wait="block"), name="cls"), "cpu")
    assert "tritonpipe.gpu_wait" not in configs["cls"].parameters  # a CPU instance never waits for a GPU
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "gpu")
    assert "tritonpipe.gpu_wait" not in configs["cls"].parameters  # spin, CUDA's own wait, unless asked
    with pytest.raises(ConfigError, match="gpu_wait"):
        generate_repository(load_graph(chain(tiny_onnx, gpu_wait="sleep")), tmp_path / "repo", device="gpu")
    assert not (tmp_path / "repo").exists()


def test_a_config_with_an_unknown_gpu_wait_is_refused_at_load():
    from tritonpipe.contract import ModelParams

    params = ModelParams("DecodeTensor", {}, {}, gpu_wait="block").encode()
    assert ModelParams.decode(params).gpu_wait == "block"
    with pytest.raises(ConfigError, match="tritonpipe.gpu_wait.*spin, yield, block.*'nap'"):
        ModelParams.decode({**params, "tritonpipe.gpu_wait": "nap"})


def test_yield_polls_and_gives_the_core_up_until_the_gpu_is_done(monkeypatch):
    from tritonpipe.model import runtime as R

    made, yields = [], []

    class Event:
        def __init__(self, blocking=False):
            self.blocking, self.polls, self.recorded, self.waited = blocking, 0, None, False
            made.append(self)

        def record(self, stream):
            self.recorded = stream

        def query(self):
            self.polls += 1
            return self.polls > 3

        def synchronize(self):
            self.waited = True

    class Stream:
        synchronized = False

        def synchronize(self):
            self.synchronized = True

    monkeypatch.setattr(R.torch.cuda, "Event", Event)
    monkeypatch.setattr(R.os, "sched_yield", lambda: yields.append(1))
    stream = Stream()
    R.wait_for_gpu(stream, "yield")
    assert len(made) == 1 and made[0].recorded is stream and not made[0].blocking
    assert made[0].polls == 4 and len(yields) == 3 and not stream.synchronized
    R.wait_for_gpu(stream, "block")
    assert made[1].blocking and made[1].waited and made[1].recorded is stream and len(yields) == 3
    R.wait_for_gpu(stream, "spin")
    assert stream.synchronized and len(made) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["spin", "yield", "block"])
def test_every_gpu_wait_returns_once_the_streams_work_is_done(how):
    from tritonpipe.model.runtime import wait_for_gpu

    stream = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(stream):
        for _ in range(20):
            a = a @ a / 4096  # tens of milliseconds of queued work
        after = torch.cuda.Event()
        after.record(stream)
    wait_for_gpu(stream, how)
    assert after.query()
