"""The pipeline's inputs follow its first stage; a model's other inputs are fed by name."""

import json
import re

import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository

PRE = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 32, "resize_w": 32}


def configs_of(config, **kwargs) -> dict[str, mc.ModelConfig]:
    return build_repository(load_graph(config, **kwargs), device="cpu")[1]


def io_table(messages) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in messages}


def item_keys(config: mc.ModelConfig) -> dict[str, str]:
    return json.loads(config.parameters["tritonpipe.inputs"].string_value)


def test_a_model_first_takes_its_model_input_with_dynamic_batching(tiny_onnx):
    configs = configs_of(
        {"instance_num": 2, "batching_timeout": 5, "backend": "SyncTensor[TensorrtTensor]", "model": str(tiny_onnx), "max": 4}
    )
    config = configs["pipeline"]
    assert list(configs) == ["pipeline"] and config.max_batch_size == 4
    assert io_table(config.input) == {"x": ("TYPE_FP32", [3, 32, 32])}
    assert not config.input[0].allow_ragged_batch
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.instance_group[0].count == 2
    assert item_keys(config) == {"x": "data"}


def test_encoded_images_keep_a_ragged_uint8_input():
    config = configs_of(PRE)["pipeline"]
    assert io_table(config.input) == {"INPUT": ("TYPE_UINT8", [-1])}
    assert config.input[0].allow_ragged_batch


def test_a_two_input_model_alone_exposes_both_inputs_and_both_outputs(pair_onnx):
    config = configs_of({"backend": "SyncTensor[TensorrtTensor]", "model": str(pair_onnx), "max": 8})["pipeline"]
    assert io_table(config.input) == {"x": ("TYPE_FP32", [3, 32, 32]), "y": ("TYPE_FP32", [4])}
    assert io_table(config.output) == {"scores": ("TYPE_FP32", [10]), "shifted": ("TYPE_FP32", [4])}
    assert item_keys(config) == {"x": "data", "y": "y"}


def test_a_named_model_input_after_preprocessing_becomes_an_ensemble_input(pair_onnx):
    configs = configs_of({**PRE, "backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "model": str(pair_onnx)})
    ensemble = configs["pipeline"]
    assert io_table(ensemble.input) == {"INPUT": ("TYPE_UINT8", [-1]), "y": ("TYPE_FP32", [4])}
    steps = {step.model_name: dict(step.input_map) for step in ensemble.ensemble_scheduling.step}
    assert steps == {"pipeline_pre": {"INPUT": "INPUT"}, "pipeline_model": {"x": "pipeline_pre.OUTPUT", "y": "y"}}
    assert io_table(configs["pipeline_model"].input) == {"x": ("TYPE_FP32", [3, 32, 32]), "y": ("TYPE_FP32", [4])}


def test_a_fused_two_input_model_reads_its_named_input_in_python(pair_onnx):
    config = configs_of(
        {**PRE, "backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "model": str(pair_onnx), "fuse": True}
    )["pipeline"]
    assert io_table(config.input) == {"INPUT": ("TYPE_UINT8", [-1]), "y": ("TYPE_FP32", [4])}
    assert item_keys(config) == {"INPUT": "data", "y": "y"}


def letterbox_then(model, map_text: str) -> dict:
    return {
        "letterbox": {"backend": "S[DecodeTensor,ResizePadTensor]", "max_h": 32, "max_w": 32, "next": "model"},
        "model": {"backend": "SyncTensor[TensorrtTensor]", "model": str(model), "map": map_text},
    }


def test_map_feeds_a_named_input_from_an_extra_output(pair_onnx):
    ensemble = configs_of(letterbox_then(pair_onnx, "letterbox[result:data,inverse_transform:y]"))["pipeline"]
    assert io_table(ensemble.input) == {"INPUT": ("TYPE_UINT8", [-1])}
    steps = {step.model_name: dict(step.input_map) for step in ensemble.ensemble_scheduling.step}
    assert steps["model"] == {"x": "letterbox.OUTPUT", "y": "inverse_transform"}


@pytest.mark.parametrize(
    "map_text, words",
    [
        ("letterbox[result:data,inverse_transfrom:y]", "did you mean 'inverse_transform'"),
        ("letterbox[result:data,inverse_transform:z]", "no stage of the node reads"),
        ("letterbox[inverse_transform:data]", "expects FP32[?x3x32x32], but receives FP32[1x4]"),
    ],
)
def test_map_keys_are_checked(pair_onnx, map_text, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        configs_of(letterbox_then(pair_onnx, map_text))


def test_a_map_type_mismatch_on_a_named_input_is_refused(pair_onnx):
    with pytest.raises(ConfigError, match=re.escape("input 'y' expects FP32[?x4], but map gives it FP32[1x3x32x32]")):
        configs_of(letterbox_then(pair_onnx, "letterbox[result:data,result:y]"))


def test_several_predecessors_need_map_to_say_which_gives_data(tiny_onnx):
    graph = {
        "a": {**PRE, "next": "c"},
        "b": {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 16, "resize_w": 16, "next": "c"},
        "c": {"backend": "SyncTensor[TensorrtTensor]", "model": str(tiny_onnx)},
        "root": {"backend": "Identity", "next": "a,b"},
    }
    with pytest.raises(ConfigError, match=r"several predecessors \('a', 'b'\); say which gives its data with map"):
        configs_of(graph)
    ensemble = configs_of({**graph, "c": {**graph["c"], "map": "a[result:data]"}})["pipeline"]
    steps = {step.model_name: dict(step.input_map) for step in ensemble.ensemble_scheduling.step}
    assert steps["c"] == {"x": "a.OUTPUT"}


@pytest.mark.parametrize(
    "backend, words",
    [
        ("S[DecodeTensor,SyncTensor[TensorrtTensor]]", "add a stage that gives FP32 before the model"),
        ("S[Identity,SyncTensor[TensorrtTensor]]", "for tensor requests put the model first"),
    ],
)
def test_a_model_fed_the_wrong_tensor_gets_a_hint_that_fits(tiny_onnx, backend, words):
    with pytest.raises(ConfigError, match=words) as caught:
        configs_of({"backend": backend, "model": str(tiny_onnx)})
    assert "ResizeTensor gives FP32)" not in str(caught.value)


def test_a_torchscript_model_first_takes_the_inputs_the_config_declares(tmp_path):
    path = tmp_path / "double.ts"
    torch.jit.script(Double()).save(str(path))
    config = configs_of(
        {"backend": "SyncTensor[TensorrtTensor]", "model": str(path), "inputs": "input:FP32:3x224x224", "max": 2}
    )["pipeline"]
    assert io_table(config.input) == {"input": ("TYPE_FP32", [3, 224, 224])}
    assert io_table(config.output) == {"output0": ("TYPE_FP32", [3, 224, 224])}


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2
