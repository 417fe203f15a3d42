"""The torch engine's speed options: ``freeze`` and ``channels_last``.

Outputs are checked against the eager module; GPU tests run only where CUDA is present.  channels_last's
choices (which modules take it, and the trial at load that sends a module back to the default layout) are
checked on the CPU too, with the engine told that the layout applies there.
"""

import logging
import warnings

import pytest
import torch

from tritonpipe.engines import torch_engine
from tritonpipe.engines.torch_engine import TorchEngine, load_module, prepare_module
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages import build_stage

CPU = torch.device("cpu")
INPUTS = "x:FP32:3x16x16"
LOGGER = "tritonpipe.engines.torch_engine"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still works

    @torch.jit.interface
    class Head(torch.nn.Module):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            pass


class PickedHead(torch.nn.Module):
    """Picks a head by a runtime index: torch.jit.freeze refuses prim::ModuleContainerIndex."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)])

    def forward(self, x):
        head: Head = self.heads[int(x.mean() > 0)]
        return head.forward(x)


class SwappedHead(torch.nn.Module):
    """Sets an interface-typed attribute in forward: torch.jit.freeze refuses SetAttr on an interface."""

    head: Head

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)
        self.other = torch.nn.Linear(3, 2)

    def forward(self, x):
        self.head = self.other
        return self.head.forward(x)


def script(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))
    return path


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory):
    """A conv net whose BatchNorm has random running stats and affine weights, eager and as a .ts file."""
    torch.manual_seed(0)
    model = BatchNormNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    return model, script(model, tmp_path_factory.mktemp("bn") / "bn.ts")


def batch(size=3, seed=1):
    return torch.randn(size, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def eager(model, x):
    with torch.no_grad():
        return model(x)


def tensor_constants(module):
    return [n.output().toIValue() for n in module.graph.findAllNodes("prim::Constant") if n.output().type().kind() == "TensorType"]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_folds_batchnorm_and_keeps_the_outputs(bn_model, freeze):
    model, ts = bn_model
    engine = TorchEngine(ts, CPU, INPUTS, freeze=freeze)
    x = batch()
    torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)
    # the unfrozen graph calls submodules, so look at the inlined one
    assert ("aten::batch_norm" in str(engine.module.inlined_graph)) is not freeze
    assert ("frozen" in engine.description) is freeze and "optimized" not in engine.description  # CPU: no MKLDNN pass


def test_the_stage_passes_both_keys_to_the_engine(bn_model):
    model, ts = bn_model
    stage = build_stage(load_graph({"backend": "TensorrtTensor", "model": str(ts), "inputs": INPUTS,
                                    "freeze": "on", "channels_last": "true", "max": 4}).entry.tree, "cpu")
    assert stage.engine.description == "torch (TorchScript, cpu, fp32, frozen)"
    assert not stage.engine.channels_last
    x = batch(2)
    items = [{"data": x[:1]}, {"data": x[1:]}]
    stage.forward(items)
    torch.testing.assert_close(torch.cat([i["result"] for i in items]), eager(model, x), rtol=1e-4, atol=1e-4)


def test_freeze_comes_after_the_dtype_and_layout_change(bn_model):
    model, ts = bn_model
    # why: .half() does not reach the constants of a frozen module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        late = torch.jit.freeze(load_module(ts, CPU)).half()
    assert {t.dtype for t in tensor_constants(late)} == {torch.float32}

    module, done = prepare_module(load_module(ts, CPU), ts, CPU, half=True, channels_last=True, freeze=True)
    assert done == ["channels_last", "frozen"]
    constants = tensor_constants(module)
    assert constants and {t.dtype for t in constants} == {torch.float16}
    weights = [t for t in constants if t.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
    x = batch()
    with torch.no_grad():
        got = module(x.half().contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float16
    # FP16 rounding through one conv, BN and a 8->5 linear on outputs of magnitude ~1
    torch.testing.assert_close(got.float(), eager(model, x), rtol=1e-2, atol=1e-2)


def test_an_optimized_module_that_fails_its_first_call_runs_frozen_only(bn_model, caplog):
    """cuDNN's fused operations are picked at the first call, after optimize_for_inference returned: a module whose
    check fails keeps the freeze and drops the optimization.  (The CPU module is optimized as a GPU one would be.)"""
    model, path = bn_model
    calls = []

    def failing(module):
        calls.append(module)
        raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED\nmore")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        module, done = prepare_module(load_module(path, CPU), path, torch.device("cuda"), False, False, True, failing)
    assert done == ["frozen"] and len(calls) == 1 and module is not calls[0]
    assert "runs frozen but not optimized for inference (CUDNN_STATUS_NOT_SUPPORTED)" in caplog.text
    assert not module.inlined_graph.findAllNodes("aten::batch_norm")
    torch.testing.assert_close(eager(module, batch()), eager(model, batch()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls, words", [(PickedHead, "ModuleContainerIndex"), (SwappedHead, "SetAttr on an interface type")])
def test_a_module_that_cannot_be_frozen_runs_unfrozen(tmp_path, caplog, cls, words):
    torch.manual_seed(0)
    model = cls().eval()
    ts = script(model, tmp_path / "heads.ts")
    with pytest.raises(RuntimeError, match=words), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.freeze(load_module(ts, CPU))  # a real refusal, not a made-up one
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        engine = TorchEngine(ts, CPU, "x:FP32:3", freeze=True)
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]
    assert "heads.ts runs unfrozen" in caplog.text and words in caplog.text
    assert "frozen" not in engine.description
    for sign in (1.0, -1.0):  # both heads
        x = sign * torch.rand(4, 3) + sign
        torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-5, atol=1e-6)


def test_freeze_leaves_an_export_file_as_it_is(bn_model, tmp_path, caplog):
    model, _ = bn_model
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (batch(2),), dynamic_shapes={"x": {0: batch_dim}})
    torch.export.save(program, str(tmp_path / "bn.pt2"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        frozen = TorchEngine(tmp_path / "bn.pt2", CPU, freeze=True)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == ["freeze applies to TorchScript only; bn.pt2 (torch.export) runs as it is"]
    plain = TorchEngine(tmp_path / "bn.pt2", CPU)
    assert frozen.description == plain.description == "torch (torch.export, cpu, fp32)"
    x = batch()
    got = frozen.run([x])[0]
    assert torch.equal(got, plain.run([x])[0])
    torch.testing.assert_close(got, eager(model, x), rtol=1e-4, atol=1e-4)


def test_channels_last_changes_nothing_on_the_cpu(bn_model, caplog):
    model, ts = bn_model
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = TorchEngine(ts, CPU, INPUTS, channels_last=True)
    assert "channels_last applies on a GPU only" in caplog.text
    assert not engine.channels_last and "channels_last" not in engine.description
    x = batch()
    fed = engine._feed(x, engine.inputs[0])
    assert fed.is_contiguous()
    weight = engine.module.conv.weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    got = engine.run([x])[0]
    assert torch.equal(got, TorchEngine(ts, CPU, INPUTS).run([x])[0])
    torch.testing.assert_close(got, eager(model, x), rtol=1e-4, atol=1e-4)


class FlatByView(torch.nn.Module):
    """A conv net that flattens its feature map with view, as older classifiers do: channels_last refuses that."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


class NoConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5, 2.0, 3.0]))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


@pytest.fixture
def layout_on_cpu(monkeypatch):
    """The engine takes the GPU's channels_last path on the CPU."""
    monkeypatch.setattr(torch_engine, "_layout_applies", lambda device: True)


@pytest.mark.parametrize("given, used", [({}, True), ({"channels_last": "false"}, False)])
def test_the_stage_runs_channels_last_unless_told_not_to(bn_model, layout_on_cpu, given, used):
    model, ts = bn_model
    stage = build_stage(load_graph({"backend": "TensorrtTensor", "model": str(ts), "inputs": INPUTS, "max": 4,
                                    **given}).entry.tree, "cpu")
    assert stage.engine.channels_last is used
    assert stage.engine.module.conv.weight.is_contiguous(memory_format=torch.channels_last) is used


def test_a_conv_net_runs_channels_last_with_the_same_outputs(bn_model, layout_on_cpu):
    model, ts = bn_model
    engine = TorchEngine(ts, CPU, INPUTS, channels_last=True)
    assert engine.channels_last and "channels_last" in engine.description
    assert engine.module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = batch()
    fed = engine._feed(x, engine.inputs[0])
    assert fed.is_contiguous(memory_format=torch.channels_last) and not fed.is_contiguous()
    torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)


def test_a_model_without_4d_weights_keeps_the_default_layout(tmp_path, layout_on_cpu, caplog):
    ts = script(NoConv().eval(), tmp_path / "noconv.ts")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine = TorchEngine(ts, CPU, INPUTS, channels_last=True)
    assert "has no 4-D weights" in caplog.text
    assert not engine.channels_last and "channels_last" not in engine.description
    assert engine._feed(batch(), engine.inputs[0]).is_contiguous()


def test_a_fixed_shape_model_that_fails_in_channels_last_is_found_at_load(tmp_path, layout_on_cpu, caplog):
    torch.manual_seed(0)
    model = FlatByView().eval()
    ts = script(model, tmp_path / "flat.ts")
    with pytest.raises(RuntimeError, match="view"):  # why the fallback exists: the layout itself breaks this model
        load_module(ts, CPU).to(memory_format=torch.channels_last)(batch().contiguous(memory_format=torch.channels_last))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        engine = TorchEngine(ts, CPU, INPUTS, channels_last=True)
    assert "runs in the default layout: a trial batch failed in channels_last" in caplog.text
    assert not engine.channels_last and "channels_last" not in engine.description
    assert engine.module.conv.weight.is_contiguous()
    x = batch()
    torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)


def test_a_free_dims_model_that_fails_in_channels_last_is_found_at_load_too(tmp_path, layout_on_cpu, caplog):
    class FlatByViewAnySize(torch.nn.Module):
        """Flattens the feature map with view and sums it: runs at any size, but not in channels_last."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.shape[0], -1).sum(dim=1, keepdim=True)

    torch.manual_seed(0)
    model = FlatByViewAnySize().eval()
    ts = script(model, tmp_path / "flat_any.ts")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        engine = TorchEngine(ts, CPU, "x:FP32:3x-1x-1", outputs_text="y:FP32:1", channels_last=True)
    assert "a trial batch failed in channels_last" in caplog.text
    assert not engine.channels_last and not engine.use_graphs
    for x in (batch(), torch.randn(2, 3, 40, 24)):
        torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)


def test_a_free_dims_conv_net_keeps_channels_last(bn_model, tmp_path, layout_on_cpu, caplog):
    model, _ = bn_model
    ts = script(model, tmp_path / "bn_free.ts")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        engine = TorchEngine(ts, CPU, "x:FP32:3x-1x-1", outputs_text="y:FP32:5", channels_last=True)
    assert engine.channels_last and not caplog.records
    for x in (batch(), torch.randn(2, 3, 40, 24)):
        torch.testing.assert_close(engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A torchvision ResNet-18 with random weights (seed 0) whose BatchNorm stats come from random batches,
    so that its logits are of magnitude ~1 as a trained net's; eager FP32 on the GPU and as a scripted file."""
    torchvision = pytest.importorskip("torchvision")
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(device).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224, device=device))
    model.eval()
    return model, script(model, tmp_path_factory.mktemp("resnet") / "resnet18.ts")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("freeze, channels_last", [(True, False), (False, True), (True, True)])
def test_freeze_and_channels_last_match_the_plain_fp16_engine(resnet18, freeze, channels_last):
    model, ts = resnet18
    device = torch.device("cuda", 0)
    plain = TorchEngine(ts, device, "x:FP32:3x224x224", precision="fp16", cuda_graph=True)
    engine = TorchEngine(ts, device, "x:FP32:3x224x224", precision="fp16", cuda_graph=True,
                         freeze=freeze, channels_last=channels_last)
    assert engine.use_graphs and ("frozen" in engine.description) is freeze
    assert ("channels_last" in engine.description) is channels_last
    g = torch.Generator().manual_seed(3)
    for size in (1, 3, 1, 3):
        x = torch.randn(size, 3, 224, 224, generator=g).to(device)
        got, want = engine.run([x])[0], plain.run([x])[0]
        with torch.no_grad():
            reference = model(x)
        assert got.dtype == torch.float32 and got.shape == (size, 1000) and got.is_contiguous()
        # FP16 rounding through 18 layers: on CPU FP16 the two orders differ from FP32 by ~1.3e-3 on
        # logits up to ~1.5; 2e-2 leaves room for cuDNN's algorithms and the fused conv+add+relu
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
        torch.testing.assert_close(got, reference, rtol=0, atol=2e-2)
    assert sorted(key[0][0] for key in engine.graphs) == [1, 4]  # one capture per bucket, replayed after
    for _, (static_in,), _ in engine.graphs.values():
        assert static_in.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert static_in.is_contiguous() is not channels_last


@needs_gpu
@pytest.mark.gpu
def test_on_the_gpu_the_stage_runs_a_conv_net_channels_last_and_a_view_net_as_it_is(bn_model, tmp_path, caplog):
    model, ts = bn_model
    stage = build_stage(load_graph({"backend": "TensorrtTensor", "model": str(ts), "inputs": INPUTS,
                                    "max": 4}).entry.tree, "cuda:0")
    assert stage.engine.channels_last and "channels_last" in stage.engine.description
    x = batch(2)
    items = [{"data": x[:1].cuda()}, {"data": x[1:].cuda()}]
    stage.forward(items)
    # FP16 on the GPU against FP32 eager on the CPU
    torch.testing.assert_close(torch.cat([i["result"] for i in items]).cpu(), eager(model, x), rtol=0, atol=2e-2)
    torch.manual_seed(0)
    flat = script(FlatByView().eval(), tmp_path / "flat.ts")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stage = build_stage(load_graph({"backend": "TensorrtTensor", "model": str(flat), "inputs": INPUTS,
                                        "max": 4}).entry.tree, "cuda:0")
    assert "a trial batch failed in channels_last" in caplog.text and not stage.engine.channels_last


def stage_with(ts, device, **given):
    return build_stage(load_graph({"backend": "TensorrtTensor", "model": str(ts), "inputs": INPUTS, "max": 4,
                                   **given}).entry.tree, device)


@pytest.mark.parametrize("given, frozen", [({}, False), ({"freeze": "auto"}, False), ({"freeze": True}, True),
                                           ({"freeze": "yes"}, True), ({"freeze": "off"}, False)])
def test_freeze_is_off_on_the_cpu_unless_asked_for(bn_model, given, frozen):
    model, ts = bn_model
    stage = stage_with(ts, "cpu", **given)
    assert ("frozen" in stage.engine.description) is frozen
    assert bool(stage.engine.module.inlined_graph.findAllNodes("aten::batch_norm")) is not frozen
    x = batch()
    torch.testing.assert_close(stage.engine.run([x])[0], eager(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", ["maybe", "2", ""])
def test_freeze_refuses_a_value_that_is_not_auto_or_a_yes_or_no(bn_model, value):
    _, ts = bn_model
    with pytest.raises(ConfigError, match="'freeze' must be one of auto, true, false"):
        stage_with(ts, "cpu", freeze=value)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("given, frozen", [({}, True), ({"freeze": "false"}, False)])
def test_on_the_gpu_the_stage_freezes_unless_told_not_to(bn_model, given, frozen):
    model, ts = bn_model
    stage = stage_with(ts, "cuda:0", **given)
    assert ("frozen" in stage.engine.description) is frozen
    x = batch(2)
    items = [{"data": x[:1].cuda()}, {"data": x[1:].cuda()}]
    stage.forward(items)
    torch.testing.assert_close(torch.cat([i["result"] for i in items]).cpu(), eager(model, x), rtol=0, atol=2e-2)
