"""The benchmark's overrides go where the loader routes node keys: ``Stage::key`` reaches that stage only."""

import json

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.harness.bench import runner
from tritonpipe.pipeline.graph import load_graph

CHAIN = "S[DecodeMat,ResizeMat,Mat2Tensor,ResizeTensor]"


def _sizes(graph):
    """(node, stage) -> resize_h of every stage that has one."""
    return {(node.name, stage.name): stage.params["resize_h"]
            for node in graph.nodes.values() for stage in node.tree.walk() if "resize_h" in stage.params}


def test_a_scoped_key_reaches_only_its_stage_of_a_node():
    config = {"backend": CHAIN, "resize_h": 32, "resize_w": 32}
    updated = runner.apply_overrides(config, **{"ResizeTensor::resize_h": 48})
    assert "ResizeTensor::resize_h" not in config, "the caller's dict is not changed"
    assert _sizes(load_graph(updated)) == {("pipeline", "ResizeMat"): 32, ("pipeline", "ResizeTensor"): 48}


def test_a_scoped_key_reaches_only_the_nodes_with_its_stage():
    config = {
        "pre": {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 32, "resize_w": 32, "next": "net"},
        "net": {"backend": "S[Mat2Tensor,ResizeTensor]", "resize_h": 32, "resize_w": 32},
    }
    updated = runner.apply_overrides(config, **{"ResizeTensor::resize_h": 48, "ResizeMat::resize_w": 40})
    assert "ResizeTensor::resize_h" not in updated["pre"] and "ResizeMat::resize_w" not in updated["net"]
    graph = load_graph(updated)
    assert _sizes(graph) == {("pre", "ResizeMat"): 32, ("net", "ResizeTensor"): 48}
    assert graph.nodes["pre"].tree.children[1].params["resize_w"] == 40
    assert graph.nodes["net"].tree.children[1].params["resize_w"] == 32


def test_bench_settings_are_applied_when_the_pipeline_loads(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"backend": CHAIN, "resize_h": 32, "resize_w": 32, "instance_num": 1}))
    options = runner.BenchOptions(
        config=path, output=tmp_path, device="cpu", instances=2, settings={"ResizeTensor::resize_h": "48"},
    )
    graph, _ = runner.load_pipeline(options)
    assert _sizes(graph) == {("pipeline", "ResizeMat"): 32, ("pipeline", "ResizeTensor"): 48}
    assert graph.entry.settings.instance_num == 2


def test_a_scoped_key_for_a_stage_no_node_has_is_an_error():
    with pytest.raises(ConfigError, match=r"--set ResizeTensor::resize_h given, but no stage of the pipeline takes"):
        runner.apply_overrides({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 32, "resize_w": 32},
                               **{"ResizeTensor::resize_h": 48})


def test_the_bench_command_passes_set_through(tmp_path):
    from tritonpipe_tools import bench

    args = bench.parse_args(["--set", "ResizeTensor::resize_h=48", "--set", "instance_num=3", "-o", str(tmp_path)])
    assert bench.options_from(args).settings == {"ResizeTensor::resize_h": "48", "instance_num": "3"}
    with pytest.raises(ConfigError, match="--set takes KEY=VALUE"):
        bench.options_from(bench.parse_args(["--set", "resize_h"]))
