import json
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.errors import ConfigError
from tritonpipe.examples import EXAMPLE_DIR
from tritonpipe.pipeline.files import read_config_file
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.configs import from_text, validate_repository
from tritonpipe.repository.generate import build_repository, generate_repository

REPO_ROOT = Path(__file__).resolve().parents[3]


def model_chain(tiny_onnx, **extra):
    return {
        "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
        "resize_h": 32, "resize_w": 32, "model": str(tiny_onnx), **extra,
    }


def test_seed_mapping_and_protobuf_round_trip(tmp_path):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "instance_num": 2, "batching_timeout": 5, "max": 4, "resize_h": 224, "resize_w": 224})
    repo = generate_repository(graph, tmp_path / "repo")
    text = (repo.path / "pipeline" / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.max_batch_size == 4
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.input[0].allow_ragged_batch and list(config.input[0].dims) == [-1]
    assert config.input[0].data_type == mc.TYPE_UINT8
    assert list(config.output[0].dims) == [224, 224, 3]
    assert (repo.path / "pipeline" / "1" / "model.py").is_file()


def test_chain_is_split_at_the_model_and_joined_by_an_ensemble(tmp_path, tiny_onnx):
    repo = generate_repository(load_graph(model_chain(tiny_onnx, max=8), name="cls"), tmp_path / "r", device="gpu")
    configs = {p.parent.name: from_text(p.read_text()) for p in repo.path.glob("*/config.pbtxt")}
    assert set(configs) == {"cls", "cls_pre", "cls_model"}
    pre, model, ensemble = configs["cls_pre"], configs["cls_model"], configs["cls"]
    assert pre.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert model.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert list(pre.output[0].dims) == [3, 32, 32] and pre.output[0].data_type == mc.TYPE_FP32
    assert [i.name for i in model.input] == ["x"] and [o.name for o in model.output] == ["scores"]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 8
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["cls_pre", "cls_model"]
    assert steps[1].input_map["x"] == steps[0].output_map["OUTPUT"]
    assert [o.name for o in ensemble.output] == ["scores"]
    assert (repo.path / "cls_model" / "1" / "tiny.onnx").is_file()
    assert "model=tiny.onnx" in model.parameters["tritonpipe.pipeline"].string_value


def test_device_choice_sets_instance_kind(tiny_onnx):
    for device, kind in (("auto", mc.ModelInstanceGroup.KIND_AUTO), ("cpu", mc.ModelInstanceGroup.KIND_CPU)):
        _, configs, _ = build_repository(load_graph(model_chain(tiny_onnx)), device)
        assert configs["pipeline_pre"].instance_group[0].kind == kind


def test_type_mismatch_between_steps_is_rejected(tiny_onnx):
    # DecodeTensor gives UINT8 1x3xHxW, the model wants FP32
    with pytest.raises(ConfigError, match="expects FP32"):
        build_repository(load_graph({"backend": "S[DecodeTensor,TensorrtTensor]", "model": str(tiny_onnx)}))
    with pytest.raises(ConfigError, match="needs a 1xCxHxW tensor"):
        build_repository(load_graph({"backend": "S[DecodeMat,ResizeTensor]", "resize_h": 2, "resize_w": 2}))
    with pytest.raises(ConfigError, match=r"expects FP32\[\?x3x32x32\]"):
        build_repository(load_graph(model_chain(tiny_onnx, resize_h=64)))


def test_validation_catches_what_triton_would_refuse(tiny_onnx):
    _, configs, _ = build_repository(load_graph(model_chain(tiny_onnx, max=4)))
    validate_repository(configs)
    configs["pipeline"].max_batch_size = 16
    with pytest.raises(ConfigError, match="exceeds"):
        validate_repository(configs)
    configs["pipeline"].max_batch_size = 4
    configs["pipeline_model"].input[0].data_type = mc.TYPE_FP16
    with pytest.raises(ConfigError, match="needs TYPE_FP16"):
        validate_repository(configs)
    configs["pipeline_model"].input[0].data_type = mc.TYPE_FP32
    configs["pipeline"].ensemble_scheduling.step[1].input_map["x"] = "nothing"
    with pytest.raises(ConfigError, match="before anything produces it"):
        validate_repository(configs)


def test_failed_generation_writes_nothing(tmp_path, tiny_onnx):
    out = tmp_path / "repo"
    generate_repository(load_graph({"backend": "DecodeMat"}), out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ConfigError):
        generate_repository(load_graph(model_chain(tiny_onnx, resize_h=64)), out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging left behind


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        generate_repository(load_graph({"backend": "DecodeMat"}), out)
    assert (out / "keep").read_text() == "x"


def _committed_files(folder: str) -> dict[str, str]:
    """The files under ``folder`` as the checkout's last commit holds them (not as a quick start left them)."""
    if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout of the project to read the committed model_repository/")
    git = ["git", "-C", str(REPO_ROOT)]
    names = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", folder], check=True,
                           capture_output=True, text=True).stdout.split()
    return {
        name[len(folder) + 1:]: subprocess.run([*git, "show", f"HEAD:{name}"], check=True, capture_output=True,
                                               text=True).stdout
        for name in names
    }


def _example_stand_in(path: Path) -> Path:
    """An ONNX classifier with the example's inputs and outputs (input [n,3,224,224] -> logits [n,1000])."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1000)).eval()
    torch.onnx.export(
        model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    return path


def test_committed_example_is_current(tmp_path):
    """Regenerating the example gives exactly the files committed in model_repository/.

    The classifier's weights don't matter to the configs, so a stand-in with the same inputs and
    outputs is exported here: the check runs on a fresh clone, before any ``export-example``.
    """
    example = tmp_path / "example"
    example.mkdir()
    shutil.copy(EXAMPLE_DIR / "pipeline.toml", example / "pipeline.toml")
    _example_stand_in(example / "resnet18.onnx")
    fresh_root = generate_repository(load_graph(read_config_file(example / "pipeline.toml"), base_dir=example),
                                     tmp_path / "model_repository").path
    fresh = {
        str(p.relative_to(fresh_root)): p.read_text()
        for p in fresh_root.rglob("*")
        if p.is_file() and p.suffix != ".onnx" and "__pycache__" not in p.parts
    }
    committed = _committed_files("model_repository")

    def marker(texts):
        # the exported classifier's bytes depend on the exporting torch; its name in the marker does not
        data = json.loads(texts.pop("tritonpipe.json"))
        data["files"] = {name: None if name.endswith(".onnx") else digest for name, digest in data["files"].items()}
        return data

    assert marker(fresh) == marker(committed)
    assert fresh == committed, "model_repository/ is stale: regenerate it (see README, Quick start) and commit it"


def test_fuse_keeps_the_model_in_the_preprocessing_model(tiny_onnx):
    _, configs, _ = build_repository(load_graph(model_chain(tiny_onnx, fuse=True, max=4), name="cls"))
    assert list(configs) == ["cls"]
    config = configs["cls"]
    assert config.backend == "python" and [o.name for o in config.output] == ["scores"]
    assert list(config.output[0].dims) == [10]
    assert "TensorrtTensor(" in config.parameters["tritonpipe.pipeline"].string_value
