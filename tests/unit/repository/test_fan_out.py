"""Graphs that fan out, generated: the two parts, the orchestrator's config, and the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from tritonpipe.contract import PARAM_FANOUT, FanOutParams
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.configs import from_text, to_text
from tritonpipe.repository.generate import build_repository


class Head(torch.nn.Module):
    """[n,3,32,32] -> a YOLO-shaped head [n, 4 + 2, 16]."""

    def forward(self, x):
        pooled = F.avg_pool2d(x, 8).flatten(2)
        return torch.cat([pooled, pooled], dim=1)


def export_head(path):
    torch.onnx.export(Head(), (torch.rand(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["head"],
                      dynamic_axes={"x": {0: "n"}, "head": {0: "n"}}, opset_version=17, dynamo=False)
    return path


def test_the_orchestrator_joins_the_two_parts(crop_and_classify, tiny_onnx):
    plan, configs, _ = build_repository(load_graph(crop_and_classify(max_items=5, too_many="truncate", deadline_ms=250)), "cpu")
    assert sorted(configs) == ["crops", "image", "spot", "spot_per_item", "spot_per_request"]
    spot = from_text(to_text(configs["spot"]))  # what is written survives the text form
    assert spot.backend == "python" and spot.max_batch_size == 64 and spot.dynamic_batching is not None
    assert [(i.name, list(i.dims), i.allow_ragged_batch) for i in spot.input] == [("INPUT", [-1], True), ("box", [-1, -1], True)]
    # the classifier's scores come back one row per crop, first; the crops' boxes pass through
    assert [(o.name, list(o.dims)) for o in spot.output] == [("scores", [-1, 10]), ("boxes", [-1, -1])]
    params = FanOutParams.decode({PARAM_FANOUT: spot.parameters[PARAM_FANOUT].string_value})
    assert (params.first, params.each, params.items, params.each_input) == ("spot_per_request", "spot_per_item", "OUTPUT", "x")
    assert params.passed == ("boxes",) and (params.max_items, params.truncate, params.deadline_ms) == (5, True, 250.0)
    assert [(o.name, o.dtype, o.dims) for o in params.gathered] == [("scores", "FP32", (10,))]
    # the per-item part is the classifier alone, batching crops of many requests
    assert configs["spot_per_item"].max_batch_size == 8 and list(configs["spot_per_item"].input[0].dims) == [3, 32, 32]
    assert plan.fan_out == params and not plan.needs_ensemble


def test_a_letterbox_gives_yolo11post_its_inverse_transform_inside_the_node(crop_and_classify, tiny_onnx, tmp_path):
    def post_inputs(first):
        config = {"backend": f"S[DecodeTensor,{first},SyncTensor[TensorrtTensor],Yolo11Post]", "model": str(yolo), **sizes[first]}
        _, configs, _ = build_repository(load_graph(config, name="det"), "cpu")
        post = configs["det_post"]
        return [i.name for i in post.input], json.loads(post.parameters["tritonpipe.inputs"].string_value)

    yolo = export_head(tmp_path / "yolo.onnx")
    sizes = {"ResizePadTensor": {"max_h": 32, "max_w": 32}, "ResizeTensor": {"resize_h": 32, "resize_w": 32}}
    assert post_inputs("ResizePadTensor") == (["INPUT", "inverse_transform"], {"INPUT": "data", "inverse_transform": "inverse_transform"})
    assert post_inputs("ResizeTensor") == (["INPUT"], {"INPUT": "data"})  # never asked of the request


@pytest.mark.parametrize("change, message", [
    (lambda g: g["image"].update(for_each=True), "nodes 'image', 'classify' all have for_each"),
    (lambda g: g["classify"].update(map="image[result:data]"),
     "node 'crops' runs once per request, but its next names 'classify'.* only the items' source 'image' may lead there"),
    (lambda g: g["classify"].update(backend="S[ResizeTensor]", resize_h=8, resize_w=8, model=None) or g["classify"].pop("model"),
     None),
])
def test_what_cannot_fan_out_is_refused_before_anything_is_written(crop_and_classify, tiny_onnx, change, message):
    config = crop_and_classify()
    change(config)
    if message is None:  # a per-item part of Python stages is fine
        build_repository(load_graph(config), "cpu")
        return
    with pytest.raises(ConfigError, match=message):
        build_repository(load_graph(config), "cpu")


def test_for_each_on_the_entry_node_is_refused(crop_and_classify, tiny_onnx):
    with pytest.raises(ConfigError, match="for_each needs items from a node before it"):
        build_repository(load_graph({"backend": "S[TensorrtTensor]", "model": str(tiny_onnx), "for_each": True}), "cpu")


def test_a_per_item_node_may_not_read_the_per_request_part(crop_and_classify, tiny_onnx):
    config = crop_and_classify()
    config["classify"]["next"] = "after"
    config["after"] = {"backend": "S[CpuTensor]", "map": "image[result:data]"}
    with pytest.raises(ConfigError, match="node 'after' runs once per item .* its map reads image\\[result\\]"):
        build_repository(load_graph(config), "cpu")


def test_an_item_the_per_item_model_cannot_take_is_refused(crop_and_classify, tiny_onnx):
    config = crop_and_classify()
    config["crops"].update(resize_h=16, resize_w=16)
    with pytest.raises(ConfigError, match=r"model input 'x' expects FP32\[\?x3x32x32\], but receives FP32\[1x3x16x16\]"):
        build_repository(load_graph(config), "cpu")
