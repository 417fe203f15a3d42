"""torchpipe's configuration habits: ``[global]``, ``map`` and the keys it accepts on a stage."""

import re

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import MapLink, load_graph, parse_map

PRE = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 32, "resize_w": 32}


def test_global_table_applies_to_every_node_and_top_level_keys_win(tmp_path):
    path = tmp_path / "graph.toml"
    path.write_text(
        'batching_timeout = 7\n'
        '[global]\ninstance_num = 3\nbatching_timeout = 2\nmax = 4\n'
        '[decode]\nbackend = "DecodeMat"\nnext = "resize"\n'
        '[resize]\nbackend = "ResizeMat"\nresize_h = 8\nresize_w = 8\ninstance_num = 1\n'
    )
    graph = load_graph(path)
    assert list(graph.nodes) == ["decode", "resize"]
    decode, resize = graph.nodes["decode"].settings, graph.nodes["resize"].settings
    assert (decode.instance_num, decode.max, decode.batching_timeout) == (3, 4, 7.0)
    assert (resize.instance_num, resize.max) == (1, 4)


def test_global_table_with_a_single_node():
    graph = load_graph({"global": {"instance_num": 2}, **PRE})
    assert list(graph.nodes) == ["pipeline"] and graph.entry.settings.instance_num == 2


def test_global_table_may_not_hold_nodes():
    with pytest.raises(ConfigError, match=r"\[global\] holds keys for every node"):
        load_graph({"global": {"decode": {"backend": "DecodeMat"}}, **PRE})


def test_map_entries_parse_with_several_pairs_and_nodes():
    assert parse_map("a[result:data,color:color], b[result:extra]", "node 'x'") == [
        MapLink("a", "result", "data"), MapLink("a", "color", "color"), MapLink("b", "result", "extra"),
    ]


@pytest.mark.parametrize("text", ["a[result]", "a(result:data)", "a[result:data] b[x:y]", "", "a[:data]", "a[result:data,result:data]"])
def test_malformed_map_is_refused(text):
    with pytest.raises(ConfigError, match="map"):
        parse_map(text, "node 'x'")


def two_nodes(map_text: str) -> dict:
    return {"decode": {**PRE, "next": "copy"}, "copy": {"backend": "Identity", "map": map_text}}


def test_map_without_a_node_name_reads_the_one_predecessor():
    graph = load_graph(two_nodes("[result:data]"))
    assert graph.nodes["copy"].map == [MapLink("decode", "result", "data")]


@pytest.mark.parametrize(
    "config, words",
    [
        (two_nodes("decdoe[result:data]"), "map names node 'decdoe', which does not exist; did you mean 'decode'?"),
        (two_nodes("decode[result:other]"), "map must feed 'data'"),
        (
            {"decode": {**PRE, "map": "copy[result:data]", "next": "copy"}, "copy": {"backend": "Identity"}},
            "map reads node 'copy', which does not run before it",
        ),
        ({"decode": {**PRE, "map": "[result:data]"}}, "only allowed with exactly one predecessor (it has: none)"),
    ],
)
def test_map_nodes_are_checked_like_next(config, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_graph(config)


def test_map_may_read_an_ancestor_beyond_the_predecessor():
    graph = load_graph(
        {
            "decode": {**PRE, "next": "middle"},
            "middle": {"backend": "Identity", "next": "last"},
            "last": {"backend": "Identity", "map": "decode[result:data]"},
        }
    )
    assert graph.nodes["last"].map == [MapLink("decode", "result", "data")]


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"filter": "Run"}, "'filter' is torchpipe's and has no counterpart here: Triton runs every step"),
        ({"Interpreter::backend": "PipelineV3"}, "Triton schedules the nodes itself"),
        ({"precision::output::fp32": "conv1"}, "precision::fp32 keeps named layers in FP32"),
        ({"max": "1&4"}, "combines settings with '&'"),
    ],
)
def test_torchpipe_keys_without_a_counterpart_say_what_to_use(tiny_onnx, extra, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_graph({"backend": "SyncTensor[TensorrtTensor]", "model": str(tiny_onnx), **extra})


def test_torchpipe_model_keys_are_honoured(tiny_onnx, tmp_path):
    graph = load_graph(
        {
            "backend": "SyncTensor[TensorrtTensor]", "model": str(tiny_onnx), "instance_num": 2, "batching_timeout": 5,
            "max": 8, "min": 2, "device_id": "1", "precision": "fp32", "model::cache": str(tmp_path / "m.plan"),
            "mean": "1,2,3", "std": "4,5,6",
        }
    )
    model = graph.entry.tree.find("model").params
    assert (model["max"], model["min"], model["precision"], model["mean"], model["std"]) == ("8", "2", "fp32", "1,2,3", "4,5,6")
    assert model["model::cache"] == str(tmp_path / "m.plan")
    settings = graph.entry.settings
    assert (settings.instance_num, settings.batching_timeout, settings.max, settings.gpus) == (2, 5.0, 8, (1,))
