"""Detection stages run through pipelines, against OpenCV, torch and torchvision; their repositories and refusals."""

import re

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_convert

from tritonpipe.errors import ConfigError, RequestError
from tritonpipe.harness.chain import Chain
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository, generate_repository
from tritonpipe.spec import SpecError, TensorSpec
from tritonpipe.stages import build_stage
from tritonpipe.stages.base import lookup
from tritonpipe.stages.control import run_chain


def stage_for(backend: str, **params):
    return build_stage(load_graph({"backend": backend, **params}).entry.tree, "cpu")


def run(backend: str, data, extra=None, **params):
    """One item through a node's stages on the CPU; the item, or its error raised."""
    item = {"data": data, **(extra or {})}
    run_chain([stage_for(backend, **params)], [item])
    if "error" in item:
        raise item["error"]
    return item


def picture(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def as_nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None]


def as_hwc(nchw: torch.Tensor) -> np.ndarray:
    return nchw[0].permute(1, 2, 0).numpy()


# --- CropTensor -------------------------------------------------------------------------


def test_crop_takes_the_items_box_before_the_parameter():
    hwc = picture(30, 40, seed=1)
    from_item = run("CropTensor", as_nchw(hwc), {"box": torch.tensor([3.0, 4.0, 20.0, 25.0])}, box="0,0,5,5")["data"]
    np.testing.assert_array_equal(as_hwc(from_item), hwc[4:25, 3:20])
    from_param = run("CropTensor", as_nchw(hwc), box="0,0,5,6")["data"]
    np.testing.assert_array_equal(as_hwc(from_param), hwc[0:6, 0:5])


def test_a_bad_box_fails_its_request_alone_naming_the_box():
    hwc = picture(30, 40, seed=2)
    stage = stage_for("CropTensor")
    items = [
        {"data": as_nchw(hwc), "box": [1, 1, 10, 10]},
        {"data": as_nchw(hwc), "box": [50, 5, 60, 9]},
        {"data": as_nchw(hwc), "box": [8, 9, 8, 20]},
        {"data": as_nchw(hwc)},
        {"data": as_nchw(hwc), "box": [0, 0, 40, 30]},
    ]
    run_chain([stage], items)
    np.testing.assert_array_equal(as_hwc(items[0]["data"]), hwc[1:10, 1:10])
    np.testing.assert_array_equal(as_hwc(items[4]["data"]), hwc)
    for item, message in zip(items[1:4], [r"box \[50, 5, 60, 9\]", r"box \[8, 9, 8, 20\]", "needs a box"]):
        assert isinstance(item["error"], RequestError) and item["error"].args[0].startswith("CropTensor")
        assert re.search(message, str(item["error"]))


# --- CopyMakeBorderTensor ---------------------------------------------------------------


@pytest.mark.parametrize("border_type, cv_border", [("constant", cv2.BORDER_CONSTANT), ("replicate", cv2.BORDER_REPLICATE)])
def test_copy_make_border_equals_opencv(border_type, cv_border):
    hwc = picture(12, 9, seed=3)
    got = run("CopyMakeBorderTensor", as_nchw(hwc), top=1, bottom=2, left=3, right=4, border_type=border_type, pad_val="1,2,3")["data"]
    want = cv2.copyMakeBorder(hwc, 1, 2, 3, 4, cv_border, value=(1, 2, 3))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(as_hwc(got), want)


def test_copy_make_border_with_the_wrong_number_of_fill_values_fails_the_request():
    with pytest.raises(RequestError, match="pad_val needs 1 or 4 values for a 4-channel image"):
        run("CopyMakeBorderTensor", as_nchw(picture(4, 4, 4)), top=1, pad_val="1,2,3")


# --- LetterBoxMat / TopLeftResizeMat ----------------------------------------------------


@pytest.mark.parametrize("stage, centre", [("LetterBoxMat", True), ("TopLeftResizeMat", False)])
def test_fit_stages_equal_opencv_and_map_boxes_back(stage, centre):
    hwc = picture(120, 200, seed=4)
    item = run(stage, torch.from_numpy(hwc), resize_h=96, resize_w=96, pad_val="114")
    out, inverse = item["data"], item["inverse_transform"]
    # 200x120 scaled by 0.48 is 96x58 (57.6 rounded); 38 rows of padding
    resized = cv2.resize(hwc, (96, 58), interpolation=cv2.INTER_LINEAR)
    top = 19 if centre else 0
    want = cv2.copyMakeBorder(resized, top, 38 - top, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    np.testing.assert_array_equal(out.numpy(), want)
    sx, sy, tx, ty = inverse[0].tolist()
    # a box drawn on the output around the image content maps to the whole source image
    x1, y1, x2, y2 = 0, top, 96, top + 58
    assert [sx * x1 + tx, sy * y1 + ty, sx * x2 + tx, sy * y2 + ty] == pytest.approx([0, 0, 200, 120], abs=1e-3)


def test_letterbox_pads_with_114_unless_told():
    item = run("LetterBoxMat", torch.full((10, 20, 3), 7, dtype=torch.uint8), resize_h=20, resize_w=20)
    assert item["data"][0, 0].tolist() == [114, 114, 114] and item["data"][10, 10].tolist() == [7, 7, 7]
    item = run("TopLeftResizeMat", torch.full((10, 20, 3), 7, dtype=torch.uint8), resize_h=20, resize_w=20)
    assert item["data"][19, 0].tolist() == [0, 0, 0] and item["data"][0, 0].tolist() == [7, 7, 7]


def test_fit_stages_refuse_tensors_per_request():
    with pytest.raises(RequestError, match="HxWxC"):
        run("LetterBoxMat", torch.zeros(1, 3, 8, 8, dtype=torch.uint8), resize_h=4, resize_w=4)
    with pytest.raises(RequestError, match="uint8"):
        run("TopLeftResizeMat", torch.zeros(8, 8, 3), resize_h=4, resize_w=4)


# --- IndexSelectTensor ------------------------------------------------------------------


def test_index_select_reverses_channels_and_the_colour_follows():
    data = torch.arange(3 * 4 * 5, dtype=torch.uint8).view(1, 3, 4, 5)
    item = run("IndexSelectTensor", data, {"color": "rgb"}, index="2,1,0")
    torch.testing.assert_close(item["data"], torch.index_select(data, 1, torch.tensor([2, 1, 0])), rtol=0, atol=0)
    assert item["color"] == "bgr"
    item = run("IndexSelectTensor", data, {"color": "rgb"}, index="0,0,0")
    assert "color" not in item
    rows = run("IndexSelectTensor", data, {"color": "rgb"}, dim=2, index="3,0")
    torch.testing.assert_close(rows["data"], data[:, :, [3, 0]], rtol=0, atol=0)
    assert rows["color"] == "rgb"


def test_index_select_past_the_size_fails_the_request():
    with pytest.raises(RequestError, match=r"IndexSelectTensor: index \[0, 5\] must lie in \[0, 2\]"):
        run("IndexSelectTensor", torch.zeros(1, 3, 4, 4), index="0,5")


# --- CpuTensor / GpuTensor --------------------------------------------------------------


def test_device_moves():
    data = torch.rand(1, 3, 4, 4)
    gpu = stage_for("GpuTensor")
    assert gpu.device == torch.device("cpu")  # a CPU instance keeps tensors on the host
    for backend in ("GpuTensor", "CpuTensor"):
        torch.testing.assert_close(run(backend, data)["data"], data)
        parts = run(backend, [data, data])["data"]
        assert isinstance(parts, list) and len(parts) == 2
        with pytest.raises(RequestError, match="needs a tensor or a list of tensors"):
            run(backend, "text")
    if torch.cuda.is_available():
        moved = build_stage(load_graph({"backend": "GpuTensor"}).entry.tree, "cuda")
        item = {"data": data}
        run_chain([moved], [item])
        assert item["data"].is_cuda and run("CpuTensor", item["data"])["data"].device.type == "cpu"


# --- WarpAffineTensor -------------------------------------------------------------------


def test_warp_affine_stage_equals_opencv_on_a_smooth_image():
    y, x = np.mgrid[0:40, 0:50].astype(np.float32)
    hwc = np.stack([3 * x + 2 * y, 200 - x - y, 100 + 0 * x], -1).astype(np.float32)
    matrix = np.array([[0.8, 0.1, 2.0], [-0.1, 0.9, 1.5]])
    got = run("WarpAffineTensor", as_nchw(hwc), affine_matrix=",".join(map(str, matrix.flatten())), target_h=30, target_w=36)["data"]
    want = cv2.warpAffine(hwc, matrix, (36, 30), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # inside the image: within 1/32 of the largest neighbour step (3); at its edge the step is the border's
    inside = cv2.warpAffine(np.ones((40, 50), np.float32), matrix, (36, 30), flags=cv2.INTER_LINEAR) >= 1 - 1e-6
    assert np.abs(as_hwc(got) - want)[inside].max() <= 3 / 32 + 1e-3
    assert np.abs(as_hwc(got) - want).max() <= 255 / 32


# --- Yolo11Post -------------------------------------------------------------------------


def yolo_head(boxes, classes=3, anchors=12, seed=0):
    """A 1x(4+classes)xanchors head: ``boxes`` as (x1, y1, x2, y2, class, score) first, background after."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.rand(1, 4 + classes, anchors, generator=generator) * 0.05
    head[0, :4] = torch.tensor([100.0, 100.0, 10.0, 10.0])[:, None]
    for anchor, (x1, y1, x2, y2, cls, score) in enumerate(boxes):
        head[0, :4, anchor] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        head[0, 4 + cls, anchor] = score
    return head


def nms_reference(head, conf_thres=0.25, iou_thres=0.45, max_det=300):
    """One image's rows [x1, y1, x2, y2, score, class] from torchvision's box_convert and batched_nms."""
    scores, classes = head[0, 4:].max(dim=0)
    keep = scores >= conf_thres
    boxes = box_convert(head[0, :4, keep].T, in_fmt="cxcywh", out_fmt="xyxy")
    order = batched_nms(boxes, scores[keep], classes[keep], iou_thres)[:max_det]
    return torch.column_stack([boxes[order], scores[keep][order], classes[keep][order].float()])


THREE_BOXES = [(0, 0, 40, 40, 0, 0.9), (2, 2, 40, 40, 0, 0.8), (2, 2, 40, 40, 1, 0.7), (50, 50, 60, 70, 2, 0.4)]


def test_yolo11_post_gives_each_request_its_own_boxes():
    heads = [yolo_head(THREE_BOXES, seed=1), yolo_head([], seed=2), yolo_head(THREE_BOXES[:1], seed=3)]
    items = [{"data": head} for head in heads]
    run_chain([stage_for("Yolo11Post")], items)
    assert [tuple(item["data"].shape) for item in items] == [(1, 3, 6), (1, 0, 6), (1, 1, 6)]
    for item, head in zip(items, heads):
        assert item["data"].dtype == torch.float32
        torch.testing.assert_close(item["data"][0], nms_reference(head))
    assert items[0]["data"][0, :, 5].tolist() == [0, 1, 2]  # the class-1 twin of a class-0 box stays


def test_yolo11_post_parameters_reach_the_decoding():
    head = yolo_head(THREE_BOXES)
    got = run("Yolo11Post", head, conf_thres=0.5, iou_thres=0.95, max_det=2)["data"]
    torch.testing.assert_close(got[0], nms_reference(head, 0.5, 0.95, 2))
    assert got[0, :, 4].tolist() == pytest.approx([0.9, 0.8])  # 0.8 survives an IoU threshold of 0.95


def test_yolo11_post_maps_boxes_back_through_the_items_inverse_transform():
    letterboxed = run("LetterBoxMat", torch.zeros(120, 200, 3, dtype=torch.uint8), resize_h=96, resize_w=96)
    inverse = letterboxed["inverse_transform"]
    # the content sits in rows 19..77 of the 96x96 letterbox; a box around it is the whole source image
    head = yolo_head([(0, 19, 96, 77, 1, 0.9)])
    got = run("Yolo11Post", head, {"inverse_transform": inverse})["data"]
    torch.testing.assert_close(got[0, 0, :4], torch.tensor([0.0, 0.0, 200.0, 120.0]), atol=1e-3, rtol=0)
    assert got[0, 0, 4:].tolist() == [pytest.approx(0.9), 1.0]


def test_yolo11_post_pads_a_request_of_several_rows():
    heads = [yolo_head(THREE_BOXES, seed=4), yolo_head([], seed=5)]
    got = run("Yolo11Post", torch.cat(heads))["data"]
    assert got.shape == (2, 3, 6)
    torch.testing.assert_close(got[0], nms_reference(heads[0]))
    assert got[1].tolist() == [[0, 0, 0, 0, 0, -1]] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_yolo11_post_decodes_a_gpu_head_on_the_gpu():
    head = yolo_head(THREE_BOXES, seed=6)
    stage = build_stage(load_graph({"backend": "Yolo11Post"}).entry.tree, "cuda")
    item = {"data": head.cuda()}
    run_chain([stage], [item])
    assert item["data"].is_cuda
    torch.testing.assert_close(item["data"][0].cpu(), nms_reference(head))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.zeros(7, 12), r"rank 2, shape \(7, 12\)"),
        (torch.zeros(1, 4, 12), r"at least 5 rows.*shape \(1, 4, 12\)"),
        (torch.zeros(1, 7, 12, dtype=torch.uint8), r"got uint8 of shape \(1, 7, 12\)"),
        ("text", "got str"),
    ],
)
def test_a_bad_head_fails_its_request_alone_naming_the_shape(data, message):
    items = [{"data": yolo_head(THREE_BOXES)}, {"data": data}]
    run_chain([stage_for("Yolo11Post")], items)
    assert items[0]["data"].shape == (1, 3, 6) and "error" not in items[0]
    error = items[1]["error"]
    assert isinstance(error, RequestError) and str(error).startswith("Yolo11Post: ")
    assert re.search(message, str(error))


def test_yolo11_post_describes_its_output_and_refuses_what_is_no_head():
    cls = lookup("Yolo11Post")
    params = {"conf_thres": 0.25, "iou_thres": 0.45, "max_det": 300}
    assert cls.infer(params, TensorSpec("FP16", (-1, 84, 8400), batched=True)) == TensorSpec("FP32", (1, -1, 6), batched=True)
    for spec, message in [
        (TensorSpec("FP32", (-1, 84), batched=True), "needs a float"),
        (TensorSpec("INT32", (-1, 84, 8400), batched=True), "needs a float"),
        (TensorSpec("FP32", (-1, 4, 8400), batched=True), "at least 5 rows"),
    ]:
        with pytest.raises(SpecError, match=message):
            cls.infer(params, spec)
    with pytest.raises(ConfigError, match="'conf_thres' must be in"):
        stage_for("Yolo11Post", conf_thres=1.5)


class ConstantHead(torch.nn.Module):
    """A stand-in detector: every image gets the same head, whatever its pixels."""

    def __init__(self, head):
        super().__init__()
        self.register_buffer("head", head)

    def forward(self, x):
        return self.head.expand(x.shape[0], -1, -1) + 0.0 * x.mean(dim=(1, 2, 3))[:, None, None]


def test_a_generated_detector_answers_boxes_per_request(tmp_path, jpeg_factory):
    head = yolo_head(THREE_BOXES, seed=7)
    model = tmp_path / "head.onnx"
    torch.onnx.export(
        ConstantHead(head).eval(), (torch.zeros(1, 3, 32, 32),), str(model), input_names=["images"],
        output_names=["output0"], dynamic_axes={"images": {0: "n"}, "output0": {0: "n"}}, opset_version=17, dynamo=False,
    )
    config = {"backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor],Yolo11Post]",
              "resize_h": 32, "resize_w": 32, "model": str(model), "max": 4}
    repo = generate_repository(load_graph(config, name="det"), tmp_path / "repo", device="cpu")
    post = repo.configs["det_post"]
    assert [(o.name, list(o.dims)) for o in post.output] == [("OUTPUT", [-1, 6])]
    chain = Chain.of_repository(repo, torch.device("cpu"))
    jpeg = torch.frombuffer(bytearray(jpeg_factory(40, 60, seed=8)), dtype=torch.uint8)[None]
    answers = chain.run([{chain.inputs[0]: jpeg}, {chain.inputs[0]: jpeg[:, :20]}])
    assert isinstance(answers[1], BaseException), "a truncated image fails alone"
    got = answers[0][chain.outputs[0]]
    assert got.shape == (1, 3, 6)
    torch.testing.assert_close(got[0], nms_reference(head), atol=1e-5, rtol=0)


# --- pipelines and repositories ---------------------------------------------------------

DETECT_CHAIN = {
    "backend": "S[DecodeMat,LetterBoxMat,cvtColorMat,Mat2Tensor,CopyMakeBorderTensor,IndexSelectTensor,GpuTensor,CpuTensor]",
    "resize_h": 64,
    "resize_w": 64,
    "color": "rgb",
    "top": 2,
    "left": 2,
    "index": "2,1,0",
}


def test_a_detection_chain_generates_a_repository_with_its_shapes():
    _, configs, _ = build_repository(load_graph(DETECT_CHAIN, name="det"), "cpu")
    outputs = {o.name: list(o.dims) for config in configs.values() for o in config.output}
    assert outputs == {"OUTPUT": [3, 66, 66], "inverse_transform": [4]}


def test_crop_and_warp_chains_generate():
    config = {"backend": "S[DecodeTensor,CropTensor,WarpAffineTensor]", "box": "0,0,8,8",
              "affine_matrix": "1,0,0,0,1,0", "target_h": 16, "target_w": 24}
    _, configs, _ = build_repository(load_graph(config, name="warp"), "cpu")
    assert [list(o.dims) for c in configs.values() for o in c.output] == [[3, 16, 24]]
    top_left = {"backend": "S[DecodeMat,TopLeftResizeMat,Mat2Tensor]", "resize_h": 32, "resize_w": 32}
    _, configs, _ = build_repository(load_graph(top_left, name="tl"), "cpu")
    assert {o.name: list(o.dims) for c in configs.values() for o in c.output} == {"OUTPUT": [3, 32, 32], "inverse_transform": [4]}


def test_the_chain_runs_end_to_end(jpeg_factory):
    jpeg = jpeg_factory(40, 80, seed=5)
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    item = run(DETECT_CHAIN["backend"], data, **{k: v for k, v in DETECT_CHAIN.items() if k != "backend"})
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    letterboxed = cv2.copyMakeBorder(cv2.resize(bgr, (64, 32), interpolation=cv2.INTER_LINEAR), 16, 16, 0, 0,
                                     cv2.BORDER_CONSTANT, value=(114, 114, 114))
    want = cv2.copyMakeBorder(letterboxed, 2, 0, 2, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))  # rgb, then reversed: bgr
    np.testing.assert_array_equal(as_hwc(item["data"]), want)
    assert item["color"] == "bgr"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"index": "2,1,x"}, "IndexSelectTensor: index must be comma-separated"),
        ({"index": "0,3"}, "index '0,3' passes the size 3"),
        ({"dim": 0}, "selects along the batch dimension"),
        ({"pad_val": "1,2"}, "LetterBoxMat: pad_val needs 1 or 3 values"),
        ({"border_type": "wrap"}, "border_type"),
        ({"top": -1}, "'top' must be in"),
        ({"resize_w": 0}, "'resize_w' must be in"),
    ],
)
def test_a_bad_parameter_is_refused_before_anything_is_written(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        generate_repository(load_graph({**DETECT_CHAIN, **bad}, name="det"), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"backend": "S[DecodeTensor,CropTensor]", "box": "9,9,3,3"}, "CropTensor: box '9,9,3,3' is empty or inverted"),
        ({"backend": "S[DecodeTensor,WarpAffineTensor]", "affine_matrix": "1,2,0,2,4,0", "target_h": 8, "target_w": 8},
         "WarpAffineTensor: affine_matrix '1,2,0,2,4,0' is singular"),
        ({"backend": "S[DecodeTensor,WarpAffineTensor]", "target_h": 8, "target_w": 8}, "needs parameter 'affine_matrix'"),
        ({"backend": "S[DecodeTensor,LetterBoxMat]", "resize_h": 8, "resize_w": 8}, "LetterBoxMat needs UINT8 an HxWxC mat"),
    ],
)
def test_crop_and_warp_parameters_are_checked_at_generation(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        generate_repository(load_graph(config, name="m"), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
