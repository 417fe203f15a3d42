"""Detection stages run through pipelines, against OpenCV and torch; their repositories and refusals."""

import re

import cv2
import numpy as np
import pytest
import torch

from tritonpipe.errors import ConfigError, StageError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository, generate_repository
from tritonpipe.stages import build_stage
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
        assert isinstance(item["error"], StageError) and item["error"].args[0].startswith("CropTensor")
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
    with pytest.raises(StageError, match="pad_val needs 1 or 4 values for a 4-channel image"):
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
    with pytest.raises(StageError, match="HxWxC"):
        run("LetterBoxMat", torch.zeros(1, 3, 8, 8, dtype=torch.uint8), resize_h=4, resize_w=4)
    with pytest.raises(StageError, match="uint8"):
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
    with pytest.raises(StageError, match=r"IndexSelectTensor: index \[0, 5\] must lie in \[0, 2\]"):
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
        with pytest.raises(StageError, match="needs a tensor or a list of tensors"):
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
