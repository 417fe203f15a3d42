"""Model engines, postprocessors, the plan cache, engine choice and native configs.

TensorRT and GPU tests run only where TensorRT / CUDA are present; everything else runs here.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.engines import cache
from tritonpipe.engines.base import TensorIO, describe_onnx
from tritonpipe.engines.postprocess import lookup_postprocessor, register_postprocessor
from tritonpipe.engines.profiles import resolve_profiles
from tritonpipe.engines.torch_engine import TorchEngine, describe_torch, parse_io
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.configs import from_text, to_text, validate_repository
from tritonpipe.repository.generate import build_repository, generate_repository
from tritonpipe.spec import TensorSpec
from tritonpipe.stages import build_stage
from tritonpipe.stages.model import pick_engine
from tritonpipe_tools import build_engine, generate
from tritonpipe_tools.build_engine import main as build_engine_main


def _tensorrt_ready() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - the PyPI stubs raise more than ImportError
        return False
    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_tensorrt = pytest.mark.skipif(not _tensorrt_ready(), reason="needs TensorRT and a CUDA GPU")

SCORES = TensorIO("scores", TensorSpec("FP32", (-1, 10), batched=True))
FEATURES = TensorIO("feat", TensorSpec("FP32", (-1, 8), batched=True))


def chain(model, **extra):
    return {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "model": str(model), **extra,
    }


def stage_for(**params):
    """A TensorrtTensor built on the CPU the way the Triton model builds it."""
    return build_stage(load_graph({"backend": "TensorrtTensor", **params}).entry.tree, "cpu")


# --- postprocessors -------------------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_builtin_postprocessors_match_numpy():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)) * 4
    extra = torch.arange(5.0).view(5, 1)
    cpu = lookup_postprocessor("cpu").run([logits, extra])
    assert all(t.device.type == "cpu" for t in cpu) and torch.equal(cpu[0], logits)

    probs, kept = lookup_postprocessor("softmaxcpu").run([logits.half(), extra])
    assert probs.dtype == torch.float32 and torch.equal(kept, extra)
    np.testing.assert_allclose(probs.numpy(), np_softmax(logits.half().float().numpy()), rtol=1e-5, atol=1e-7)

    (best,) = lookup_postprocessor("SoftmaxMax").run([logits])
    reference = np_softmax(logits.numpy())
    assert best.shape == (5, 2) and best.dtype == torch.float32
    np.testing.assert_allclose(best[:, 0].numpy(), reference.max(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(best[:, 1].numpy(), reference.argmax(axis=1).astype(np.float32))


def test_postprocessors_declare_their_output_specs():
    fp16 = TensorIO("scores", TensorSpec("FP16", (-1, 10), batched=True))
    assert lookup_postprocessor("cpu").specs([fp16, FEATURES]) == [fp16, FEATURES]
    assert lookup_postprocessor("SoftmaxCpu").specs([fp16])[0].spec == TensorSpec("FP32", (-1, 10), batched=True)
    assert lookup_postprocessor("SoftmaxMax").specs([SCORES, FEATURES]) == [
        TensorIO("scores", TensorSpec("FP32", (-1, 2), batched=True)), FEATURES,
    ]
    image = TensorIO("mask", TensorSpec("FP32", (-1, 3, 8, 8), batched=True))
    with pytest.raises(ConfigError, match=r"SoftmaxMax needs the first output to be \[N, classes\]"):
        lookup_postprocessor("SoftmaxMax").specs([image])
    assert lookup_postprocessor("") is None and lookup_postprocessor("none") is None


def test_registry_rejects_duplicates_and_suggests_names():
    @register_postprocessor("TestDouble")
    def double(outputs):
        return [t * 2 for t in outputs]

    with pytest.raises(ConfigError) as info:
        @register_postprocessor("testdouble")
        def other(outputs):
            return outputs

    message = str(info.value)
    assert "registered twice" in message and "test_engines.py" in message
    assert message.count("test_engines.py") == 2
    with pytest.raises(ConfigError, match="did you mean .*'SoftmaxMax'"):
        lookup_postprocessor("SoftmaxMx")


def test_a_user_postprocessor_reaches_the_generated_config(tmp_path, tiny_onnx):
    plugin = tmp_path / "top2.py"
    plugin.write_text(
        "import torch\n"
        "from tritonpipe.engines.base import TensorIO\n"
        "from tritonpipe.engines.postprocess import register_postprocessor\n"
        "from tritonpipe.spec import TensorSpec\n\n"
        "def specs(outputs):\n"
        "    return [TensorIO(outputs[0].name, TensorSpec('INT64', (-1, 2), True))]\n\n"
        "@register_postprocessor('Top2', specs=specs)\n"
        "def top2(outputs):\n"
        "    return [outputs[0].topk(2, dim=1).indices.cpu()]\n"
    )
    graph = load_graph(chain(tiny_onnx, postprocessor="Top2", max=4), plugins=[plugin])
    _, configs, _ = build_repository(graph)
    output = configs["pipeline_model"].output[0]
    assert output.data_type == mc.TYPE_INT64 and list(output.dims) == [2]
    assert configs["pipeline"].output[0].data_type == mc.TYPE_INT64
    with pytest.raises(ConfigError, match="unknown postprocessor 'Top3'"):
        build_repository(load_graph(chain(tiny_onnx, postprocessor="Top3")))


def test_onnxruntime_stage_with_postprocessor_matches_onnxruntime(tiny_onnx):
    stage = stage_for(model=str(tiny_onnx), engine="onnxruntime", postprocessor="SoftmaxMax", max=4)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = [{"data": x[:1]}, {"data": x[1:]}]
    stage.forward(batch)
    logits = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    got = torch.cat([item["result"] for item in batch])
    np.testing.assert_allclose(got[:, 0].numpy(), np_softmax(logits).max(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(got[:, 1].numpy(), np_softmax(logits).argmax(axis=1))
    assert stage.max() == 4


# --- plan cache -------------------------------------------------------------------------------


def wanted(model=b"onnx", gpu="NVIDIA H100", cc="9.0", trt="10.3.0", precision="fp16", profile="8"):
    io = [TensorIO("x", TensorSpec("FP32", (-1, 3, 4, 4), batched=True))]
    build = {"precision": precision, "profiles": [p.to_json() for p in resolve_profiles("1", profile, io)]}
    import hashlib

    return cache.fingerprint(hashlib.sha256(model).hexdigest(), gpu, cc, trt, build)


def test_rebuild_decisions(tmp_path):
    plan = tmp_path / "m.plan"
    base = wanted()
    assert "no plan" in cache.rebuild_reason(plan, base, None)
    plan.write_bytes(b"engine")
    assert "missing or unreadable" in cache.rebuild_reason(plan, base, None)
    assert "missing or unreadable" in cache.rebuild_reason(plan, base, {"version": 1})
    sidecar = cache.sidecar_content(base, [], [], [])
    assert cache.rebuild_reason(plan, base, sidecar) is None
    assert cache.rebuild_reason(plan, wanted(), json.loads(json.dumps(sidecar))) is None  # survives JSON
    assert cache.rebuild_reason(plan, wanted(model=b"other"), sidecar) == "the model file changed"
    assert "gpu changed" in cache.rebuild_reason(plan, wanted(gpu="NVIDIA A10"), sidecar)
    assert "compute_capability changed" in cache.rebuild_reason(plan, wanted(cc="8.6"), sidecar)
    assert "tensorrt changed" in cache.rebuild_reason(plan, wanted(trt="10.4.0"), sidecar)
    assert "build changed" in cache.rebuild_reason(plan, wanted(precision="fp32"), sidecar)
    assert "build changed" in cache.rebuild_reason(plan, wanted(profile="16"), sidecar)


def test_load_or_build_builds_once_and_rebuilds_on_change(tmp_path):
    plan, builds = tmp_path / "sub" / "m.plan", []
    io = [TensorIO("x", TensorSpec("FP32", (-1, 3, 4, 4), batched=True))]
    profiles = resolve_profiles("1", "8", io)

    def builder(fp):
        def build():
            builds.append(fp)
            return f"engine {len(builds)}".encode(), cache.sidecar_content(fp, io, io, profiles)
        return build

    assert cache.load_or_build(plan, wanted(), builder(wanted())) == b"engine 1"
    assert cache.load_or_build(plan, wanted(), builder(wanted())) == b"engine 1"
    assert len(builds) == 1
    assert cache.load_or_build(plan, wanted(precision="fp32"), builder(wanted(precision="fp32"))) == b"engine 2"
    assert cache.describe_from_sidecar(plan) == (io, io, profiles)
    cache.sidecar_path(plan).write_text("{not json")
    assert cache.load_or_build(plan, wanted(), builder(wanted())) == b"engine 3"


def test_file_digest_follows_content(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 3_000_000)
    assert cache.file_digest(a) == cache.file_digest(b)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert cache.file_digest(a) != cache.file_digest(b)


# --- engine choice ----------------------------------------------------------------------------


def test_auto_engine_choice():
    have = dict(tensorrt=True, cuda=True, onnxruntime=True)
    assert pick_engine("onnx", "auto", **have)[0] == "tensorrt"
    assert pick_engine("plan", "auto", **have)[0] == "tensorrt"
    assert pick_engine("torch", "auto", **have)[0] == "torch"
    engine, why = pick_engine("onnx", "auto", **{**have, "tensorrt": False})
    assert engine == "onnxruntime" and "not importable" in why
    engine, why = pick_engine("onnx", "auto", **{**have, "cuda": False})
    assert engine == "onnxruntime" and "no GPU" in why
    with pytest.raises(ConfigError, match="TensorRT is not installed here; use the NGC tritonserver container"):
        pick_engine("plan", "auto", tensorrt=False, cuda=True, onnxruntime=True)
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        pick_engine("onnx", "auto", tensorrt=False, cuda=False, onnxruntime=False)


def test_explicit_engine_that_cannot_run_the_file():
    have = dict(tensorrt=False, cuda=False, onnxruntime=True)
    with pytest.raises(ConfigError, match="engine=onnxruntime cannot run a torch file; choose engine=torch"):
        pick_engine("torch", "onnxruntime", **have)
    with pytest.raises(ConfigError, match="choose engine=tensorrt or engine=onnxruntime"):
        pick_engine("onnx", "torch", **have)
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        pick_engine("onnx", "tensorrt", **have)
    with pytest.raises(ConfigError, match="needs a GPU instance"):
        pick_engine("onnx", "tensorrt", **{**have, "tensorrt": True})
    assert pick_engine("onnx", "onnxruntime", **have) == ("onnxruntime", "it was asked for")


def test_unknown_model_file_type(tmp_path):
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"?")
    with pytest.raises(ConfigError, match="unknown file type; use .onnx"):
        build_repository(load_graph(chain(weird)))


# --- torch engine -----------------------------------------------------------------------------


class TwoHeads(torch.nn.Module):
    """Two inputs, two outputs: (scores [n,5], features [n,4])."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 + 6, 5)

    def forward(self, x, extra):
        feat = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(torch.cat([feat, extra], dim=1)), feat


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    root = tmp_path_factory.mktemp("torch")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, (torch.randn(2, 3, 16, 16), torch.randn(2, 6))).save(str(root / "two.ts"))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        model, (torch.randn(2, 3, 16, 16), torch.randn(2, 6)), dynamic_shapes={"x": {0: batch}, "extra": {0: batch}}
    )
    torch.export.save(program, str(root / "two.pt2"))
    return model, root / "two.ts", root / "two.pt2"


TS_INPUTS = "x:FP32:3x16x16,extra:FP32:6"


def test_torch_files_describe_themselves_or_are_described(torch_models):
    _, ts, pt2 = torch_models
    inputs, outputs = describe_torch(pt2)
    assert [(io.name, io.spec.shape) for io in inputs] == [("x", (-1, 3, 16, 16)), ("extra", (-1, 6))]
    assert [(io.name, io.spec.dtype, io.spec.shape) for io in outputs] == [("output0", "FP32", (-1, 5)), ("output1", "FP32", (-1, 4))]
    ts_inputs, ts_outputs = describe_torch(ts, TS_INPUTS)
    assert ts_inputs == inputs and ts_outputs == outputs  # outputs from a dry run
    named = describe_torch(ts, TS_INPUTS, "scores:FP32:5,feat:FP32:4")[1]
    assert [io.name for io in named] == ["scores", "feat"]
    with pytest.raises(ConfigError, match="TorchScript, which does not describe its inputs; give inputs="):
        describe_torch(ts)
    with pytest.raises(ConfigError, match="inputs names 1 tensors but two.pt2 takes 2"):
        describe_torch(pt2, "x:FP32:3x16x16")


@pytest.mark.parametrize(
    "text, words",
    [("x:FP32", "should look like"), ("x:FP99:3", "unknown type"), ("x:FP32:3xa", "write them like"),
     ("x:FP32:0", "positive or -1"), ("x:FP32:3,x:FP32:3", "given twice")],
)
def test_torch_io_text_errors(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_io("inputs", text)


@pytest.mark.parametrize("which", ["ts", "pt2"])
def test_torch_engine_on_cpu_matches_eager(torch_models, which):
    model, ts, pt2 = torch_models
    path = ts if which == "ts" else pt2
    extra = {"inputs": TS_INPUTS} if which == "ts" else {}
    stage = stage_for(model=str(path), max=4, **extra)
    assert stage.engine.description.startswith("torch (") and "fp32" in stage.engine.description
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 6, generator=g)
    batch = [{"data": x[:2], "extra": e[:2]}, {"data": x[2:], "extra": e[2:]}]
    stage.forward(batch)
    with torch.no_grad():
        scores, feat = model(x, e)
    torch.testing.assert_close(torch.cat([b["result"] for b in batch]), scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([b["output1"] for b in batch]), feat, rtol=1e-5, atol=1e-6)
    assert batch[0]["result"].shape == (2, 5) and batch[1]["output1"].shape == (1, 4)


def test_torch_model_in_a_generated_repository(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(net, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "net.ts"))
    graph = load_graph(chain(tmp_path / "net.ts", inputs="image:FP32:3x32x32", max=4))
    _, configs, files = build_repository(graph, native=("tensorrt", "onnxruntime"))
    model = configs["pipeline_model"]
    assert model.backend == "python"  # torch files always use the Python runner
    assert [i.name for i in model.input] == ["image"] and list(model.output[0].dims) == [4]
    assert "net.ts" in files["pipeline_model"]


@needs_gpu
@pytest.mark.gpu
def test_torch_engine_fp16_cuda_graphs_match_eager_fp16(torch_models):
    model, _, pt2 = torch_models
    device = torch.device("cuda", 0)
    engine = TorchEngine(pt2, device, precision="fp16", cuda_graph=True)
    assert engine.use_graphs and engine.compute == torch.float16
    reference = TwoHeads().eval()
    reference.load_state_dict(model.state_dict())
    reference = reference.to(device).half()
    g = torch.Generator().manual_seed(3)
    for size in (1, 4, 1, 4):
        x, e = torch.randn(size, 3, 16, 16, generator=g), torch.randn(size, 6, generator=g)
        got = engine.run([x.to(device), e.to(device)])
        with torch.no_grad():
            want = reference(x.to(device).half(), e.to(device).half())
        assert got[0].dtype == torch.float32  # declared type kept
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.float(), rtol=2e-3, atol=2e-3)
    assert len(engine.graphs) == 2  # one capture per batch size, replayed after


# --- native configs ---------------------------------------------------------------------------


def fake_plan(folder, onnx, max_batch=8):
    """A plan file with the sidecar tritonpipe build-engine writes (the engine bytes are never read here)."""
    inputs, outputs = describe_onnx(onnx)
    profiles = resolve_profiles("1", str(max_batch), inputs, need_static=True)
    plan = folder / "tiny.plan"
    fp = cache.fingerprint("0" * 64, "NVIDIA H100", "9.0", "10.3.0", {})
    cache.write_plan(plan, b"serialized engine", cache.sidecar_content(fp, inputs, outputs, profiles))
    return plan


def round_trip(configs):
    parsed = {name: from_text(to_text(config)) for name, config in configs.items()}
    assert parsed == configs
    validate_repository(parsed)
    return parsed


def test_native_tensorrt_plan_config(tmp_path, tiny_onnx):
    plan = fake_plan(tmp_path, tiny_onnx, max_batch=8)
    graph = load_graph(chain(plan, max=4, instance_num=2, batching_timeout=3), name="cls")
    configs = round_trip(build_repository(graph, "gpu", native=("tensorrt",))[1])
    model = configs["cls_model"]
    assert model.platform == "tensorrt_plan" and not model.backend
    assert model.default_model_filename == "model.plan" and model.max_batch_size == 8
    assert model.optimization.cuda.graphs
    # two GPU instances, the first preferred (instance_affinity's default on a GPU)
    assert [(g.kind, g.count, g.rate_limiter.priority) for g in model.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 1, 1), (mc.ModelInstanceGroup.KIND_GPU, 1, 1000)]
    assert model.dynamic_batching.max_queue_delay_microseconds == 3000
    assert [i.name for i in model.input] == ["x"] and list(model.input[0].dims) == [3, 32, 32]
    assert configs["cls"].max_batch_size == 4  # the ensemble takes its smallest step
    repo = generate_repository(graph, tmp_path / "repo", device="gpu", native=("tensorrt",))
    assert (repo.path / "cls_model" / "1" / "model.plan").read_bytes() == b"serialized engine"
    assert not (repo.path / "cls_model" / "1" / "model.py").exists()
    # without --native the same plan runs on the Python runner, described by its sidecar
    python = build_repository(graph, "gpu")[1]["cls_model"]
    assert python.backend == "python" and "model=tiny.plan" in python.parameters["tritonpipe.pipeline"].string_value


def test_native_onnxruntime_config(tmp_path, tiny_onnx):
    graph = load_graph(chain(tiny_onnx, max=8), name="cls")
    for device, kind in (("cpu", mc.ModelInstanceGroup.KIND_CPU), ("auto", mc.ModelInstanceGroup.KIND_AUTO)):
        configs = round_trip(build_repository(graph, device, native=("tensorrt", "onnxruntime"))[1])
        model = configs["cls_model"]
        assert model.platform == "onnxruntime_onnx" and model.default_model_filename == "model.onnx"
        assert model.max_batch_size == 8 and model.instance_group[0].kind == kind
        assert not model.optimization.cuda.graphs
        assert [o.name for o in model.output] == ["scores"]
    repo = generate_repository(graph, tmp_path / "repo", native=("onnxruntime",))
    assert (repo.path / "cls_model" / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    # only tensorrt native: an ONNX model under engine=auto stays on the Python runner
    assert build_repository(graph, native=("tensorrt",))[1]["cls_model"].backend == "python"


@pytest.mark.parametrize(
    "extra, native, device, words",
    [
        ({"engine": "tensorrt"}, ("tensorrt",), "gpu", "needs a TensorRT plan but tiny.onnx is ONNX; build one first"),
        ({"mean": "1,2,3"}, ("onnxruntime",), "auto", "mean run in Python and cannot be part of a native onnxruntime"),
        ({"postprocessor": "SoftmaxCpu"}, ("onnxruntime",), "auto", "postprocessor run in Python"),
        ({}, ("tensorrt", "triton"), "auto", "native takes tensorrt, onnxruntime; got triton"),
    ],
)
def test_native_errors(tiny_onnx, extra, native, device, words):
    with pytest.raises(ConfigError, match=words):
        build_repository(load_graph(chain(tiny_onnx, **extra)), device, native=native)


def test_native_plan_errors(tmp_path, tiny_onnx):
    plan = fake_plan(tmp_path, tiny_onnx, max_batch=4)
    with pytest.raises(ConfigError, match="a TensorRT plan needs a GPU"):
        build_repository(load_graph(chain(plan)), "cpu", native=("tensorrt",))
    with pytest.raises(ConfigError, match="max=8 exceeds the plan's largest profile batch 4"):
        build_repository(load_graph(chain(plan, max=8)), "gpu", native=("tensorrt",))
    if not _tensorrt_ready():
        cache.sidecar_path(plan).unlink()
        with pytest.raises(ConfigError, match="tiny.plan.json beside it and TensorRT is not installed"):
            build_repository(load_graph(chain(plan)), "gpu")


def test_model_cache_plan_serves_natively(tmp_path, tiny_onnx):
    """engine=tensorrt with model::cache naming a plan built ahead: the plan is what gets served."""
    plan = fake_plan(tmp_path, tiny_onnx, max_batch=8)
    graph = load_graph(chain(tiny_onnx, engine="tensorrt", max=8, **{"model::cache": str(plan)}))
    model = round_trip(build_repository(graph, "gpu", native=("tensorrt",))[1])["pipeline_model"]
    assert model.platform == "tensorrt_plan" and model.max_batch_size == 8


def test_generate_cli_native_flag(tiny_onnx, capsys):
    argv = ["--backend", chain(tiny_onnx)["backend"], "--set", "resize_h=32", "--set", "resize_w=32",
            "--set", f"model={tiny_onnx}", "--native", "onnxruntime", "--dry-run"]
    assert generate.main(argv) == 0
    assert 'platform: "onnxruntime_onnx"' in capsys.readouterr().out


# --- the build tool and TensorRT --------------------------------------------------------------


@pytest.mark.skipif(_tensorrt_ready(), reason="TensorRT is installed here")
def test_build_engine_says_what_to_install(tiny_onnx, tmp_path, capsys):
    code = build_engine_main([str(tiny_onnx), "-o", str(tmp_path / "t.plan"), "--max", "8x3x32x32", "--min", "1x3x32x32"])
    err = capsys.readouterr().err
    assert code == 2
    assert "TensorRT is not installed here; use the NGC tritonserver container or pip install tensorrt" in err
    assert not (tmp_path / "t.plan").exists()


def test_build_engine_checks_shapes_first(tiny_onnx, tmp_path, capsys):
    assert build_engine_main([str(tiny_onnx), "-o", str(tmp_path / "t.plan"), "--max", "8x3x64x64"]) == 2
    assert "dim 2 fixed at 32" in capsys.readouterr().err
    assert build_engine.parse_args([str(tiny_onnx)]).precision == "fp16"


@pytest.fixture(scope="module")
def built_plan(tmp_path_factory, tiny_onnx):
    if not _tensorrt_ready():
        pytest.skip("needs TensorRT and a CUDA GPU")
    plan = tmp_path_factory.mktemp("trt") / "tiny.plan"
    assert build_engine_main([str(tiny_onnx), "-o", str(plan), "--max", "8", "--min", "1", "--precision", "fp32", "--no-progress"]) == 0
    return plan


def _onnxruntime(tiny_onnx, x):
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


@needs_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_plan_matches_onnxruntime(built_plan, tiny_onnx):
    from tritonpipe.engines.tensorrt_engine import TensorRTEngine, describe_plan

    inputs, outputs, profiles = describe_plan(built_plan)
    assert (inputs, outputs) == describe_onnx(tiny_onnx) and profiles[0].max_batch == 8
    engine = TensorRTEngine(built_plan.read_bytes(), torch.device("cuda", 0))
    for size in (1, 5, 8):
        x = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(size))
        (got,) = engine.run([x.cuda()])
        torch.cuda.synchronize()
        np.testing.assert_allclose(got.cpu().numpy(), _onnxruntime(tiny_onnx, x), rtol=1e-3, atol=1e-4)


@needs_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_stage_builds_into_its_cache_once(tmp_path, tiny_onnx):
    plan = tmp_path / "cache" / "tiny.plan"
    params = {"model": str(tiny_onnx), "engine": "tensorrt", "max": "4", "precision": "fp16", "model::cache": str(plan)}
    node = load_graph({"backend": "TensorrtTensor", **params}).entry.tree
    stage = build_stage(node, "cuda:0")
    built = plan.stat().st_mtime_ns
    assert cache.read_sidecar(plan)["fingerprint"]["build"]["precision"] == "fp16"
    build_stage(node, "cuda:0")
    assert plan.stat().st_mtime_ns == built  # reused, not rebuilt
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    batch = [{"data": x[:1].cuda()}, {"data": x[1:].cuda()}]
    stage.forward(batch)
    torch.cuda.synchronize()
    got = torch.cat([b["result"] for b in batch]).float().cpu().numpy()
    np.testing.assert_allclose(got, _onnxruntime(tiny_onnx, x), rtol=2e-2, atol=2e-2)  # fp16 engine
