import json

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph

SEED = {"backend": "S[DecodeMat,ResizeMat]", "instance_num": 2, "batching_timeout": 5, "max": 4, "resize_h": 224, "resize_w": 224}


def test_single_node_seed():
    graph = load_graph(SEED)
    node = graph.entry
    assert graph.name == "pipeline" and list(graph.nodes) == ["pipeline"]
    assert (node.settings.instance_num, node.settings.batching_timeout, node.settings.max) == (2, 5.0, 4)
    resize = node.tree.children[1]
    assert resize.params == {"resize_h": 224, "resize_w": 224}


def test_inline_params_win_over_node_keys():
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat(resize_h=10)]", "resize_h": 224, "resize_w": 20})
    assert graph.entry.tree.children[1].params == {"resize_h": 10, "resize_w": 20}


def test_scoped_keys_reach_only_their_stage():
    graph = load_graph(
        {"backend": "S[DecodeMat,cvtColorMat,Mat2Tensor,cvtColorTensor]", "cvtColorMat::color": "bgr", "color": "rgb"}
    )
    stages = graph.entry.tree.children
    assert stages[1].params["color"] == "bgr" and stages[3].params["color"] == "rgb"


def test_backend_scope_builds_wrapper():
    graph = load_graph({"backend": "SyncTensor", "SyncTensor::backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8})
    assert [n.name for n in graph.entry.tree.walk()] == ["SyncTensor", "Sequential", "DecodeTensor", "ResizeTensor"]


def test_bare_sync_tensor_is_allowed():
    graph = load_graph({"backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor]", "resize_h": 8, "resize_w": 8})
    assert graph.entry.tree.children[-1].name == "SyncTensor"


def test_graph_from_toml_with_globals(tmp_path):
    path = tmp_path / "graph.toml"
    path.write_text(
        'name = "det"\ninstance_num = 3\n'
        '[decode]\nbackend = "DecodeMat"\nnext = "resize"\n'
        '[resize]\nbackend = "S[ResizeMat,cvtColorMat]"\nresize_h = 32\nresize_w = 48\ninstance_num = 1\n'
    )
    graph = load_graph(path)
    assert graph.name == "det" and list(graph.nodes) == ["decode", "resize"]
    assert graph.nodes["decode"].settings.instance_num == 3
    assert graph.nodes["resize"].settings.instance_num == 1
    assert graph.nodes["decode"].next == ["resize"]


@pytest.mark.parametrize(
    "config, message",
    [
        ({**SEED, "resize_h": 0}, "resize_h"),
        ({**SEED, "max": 0}, "'max' must be in"),
        ({**SEED, "instance_num": "two"}, "instance_num"),
        ({**SEED, "resize_hx": 1}, "did you mean 'resize_h'"),
        ({"backend": "S[DecodeMat,ResizeMat]"}, "needs parameter 'resize_h'"),
        ({"a": {"backend": "DecodeMat", "next": "b"}, "b": {"backend": "Identity", "next": "a"}}, "cycle"),
        ({"a": {"backend": "DecodeMat", "next": "a"}}, "cycles are not allowed"),
        ({"a": {"backend": "DecodeMat", "next": "bb"}, "b": {"backend": "Identity"}}, "names no node"),
        ({"a": {"backend": "DecodeMat"}, "b": {"backend": "Identity"}}, "several entry nodes"),
        ({"../evil": {"backend": "DecodeMat"}}, "not allowed"),
        ({"/abs": {"backend": "DecodeMat"}}, "not allowed"),
        ({"a\0b": {"backend": "DecodeMat"}}, "not allowed"),
        ({**SEED, "name": "../x"}, "not allowed"),
        ({"backend": "S[DecodeTensor,TensorrtTensor]", "model": "missing.onnx"}, "does not exist"),
        ({"backend": "S[]"}, "expected a stage name"),
        ({"backend": "Sequential"}, "chains other stages"),
        ({"backend": "DecodeMat[Identity]"}, "not a wrapper"),
    ],
)
def test_bad_configurations_are_rejected(config, message):
    with pytest.raises(ConfigError) as info:
        from tritonpipe.repository.generate import build_repository

        build_repository(load_graph(config))
    assert message in str(info.value)


def test_duplicate_node_names_in_json(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"a": {"backend": "DecodeMat"}, "a": {"backend": "Identity"}}')
    with pytest.raises(ConfigError, match="appears twice"):
        load_graph(path)


def test_relative_model_path_resolves_against_the_config(tmp_path, tiny_onnx):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx.read_bytes())
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"backend": "TensorrtTensor", "model": "m.onnx"}))
    graph = load_graph(path)
    assert graph.entry.tree.params["model"] == str(tmp_path / "m.onnx")


@pytest.mark.parametrize("where", ["argument", "config"])
def test_an_empty_pipeline_name_is_refused(where):
    config = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}
    with pytest.raises(ConfigError, match="^pipeline name is empty; give a name of letters, digits"):
        if where == "argument":
            load_graph(config, name="")
        else:
            load_graph({**config, "name": ""})


def test_the_name_argument_wins_over_the_configs_name():
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8, "name": "x"}, name="y")
    assert graph.name == "y" and list(graph.nodes) == ["y"]
    assert load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8, "name": "x"}).name == "x"


def test_an_unknown_parameter_of_a_long_backend_shows_its_start():
    backend = "S[" + ",".join(["Identity"] * 20_000) + "]"
    with pytest.raises(ConfigError) as info:
        load_graph({"backend": backend, "no_such_key": 1}, name="wide")
    message = str(info.value)
    assert message.startswith("node 'wide': no stage of 'S[Identity,Identity,") and "...' takes parameter 'no_such_key'" in message
    assert len(message) < 300
