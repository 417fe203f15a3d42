"""set_node_keys: keys written into the nodes that take them, as the loader routes them, winning over the config's."""

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph, set_node_keys
from tritonpipe.pipeline.routing import takes_key

CHAIN = "S[DecodeMat,ResizeMat,Mat2Tensor,ResizeTensor]"


def _resize_h(graph):
    return {(node.name, stage.name): stage.params["resize_h"]
            for node in graph.nodes.values() for stage in node.tree.walk() if "resize_h" in stage.params}


def test_takes_key_routes_as_the_loader():
    raw = {"backend": CHAIN, "SyncTensor::backend": "x"}
    assert takes_key("node 'x'", {"backend": CHAIN}, "ResizeTensor::resize_h")
    assert takes_key("node 'x'", {"backend": CHAIN}, "max") and takes_key("node 'x'", {"backend": CHAIN}, "next")
    assert not takes_key("node 'x'", {"backend": CHAIN}, "cvtColorTensor::color")
    assert not takes_key("node 'x'", {"backend": CHAIN}, "model") and not takes_key("node 'x'", {"backend": CHAIN}, "filter")
    with pytest.raises(ConfigError, match="names no stage of the backend"):
        takes_key("node 'x'", raw, "max")


def test_a_scoped_key_wins_over_the_configs_unscoped_one():
    config = {"backend": CHAIN, "global": {"resize_h": 16}, "resize_h": 32, "resize_w": 32}
    updated, untaken = set_node_keys(config, {"resize_h": 64, "ResizeTensor::resize_h": 48})
    assert untaken == [] and config["resize_h"] == 32
    assert _resize_h(load_graph(updated)) == {("pipeline", "ResizeMat"): 64, ("pipeline", "ResizeTensor"): 48}


def test_shared_keys_of_a_graph_yield_to_a_nodes_scoped_key():
    config = {
        "name": "two", "resize_h": 32, "resize_w": 32, "global": {"instance_num": 2},
        "pre": {"backend": "S[DecodeMat,ResizeMat]", "next": "net"},
        "net": {"backend": "S[Mat2Tensor,ResizeTensor]"},
    }
    updated, untaken = set_node_keys(config, {"ResizeTensor::resize_h": 48, "cvtColorMat::color": "bgr"})
    assert untaken == ["cvtColorMat::color"]
    graph = load_graph(updated)
    assert graph.name == "two" and _resize_h(graph) == {("pre", "ResizeMat"): 32, ("net", "ResizeTensor"): 48}
    assert [node.settings.instance_num for node in graph.nodes.values()] == [2, 2]


@pytest.mark.parametrize("order", ["plain first", "scoped first"])
def test_a_scoped_key_wins_over_a_plain_one_whatever_the_order(order):
    pairs = [("resize_h", 224), ("ResizeTensor::resize_h", 256)]
    raw = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_w": 224}
    for key, value in pairs if order == "plain first" else pairs[::-1]:
        raw[key] = value
    tree = load_graph(raw).entry.tree
    assert dict(tree.children[1].params)["resize_h"] == 256
