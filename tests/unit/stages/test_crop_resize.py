"""crop_resize and CropResizeTensor: every box's crop resized, against CropTensor's pixels and torch's resize."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritonpipe.errors import RequestError
from tritonpipe.kernels import detection as kernels
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages import build_stage


def image(height=48, width=64, dtype=torch.uint8):
    rng = np.random.default_rng(3)
    return torch.from_numpy(rng.integers(0, 256, (1, 3, height, width), dtype=np.uint8)).to(dtype)


def reference(img, box, out_h, out_w):
    """The box's pixels (floor/ceil corners, clamped), resized with half-pixel centres by torch."""
    x1, y1, x2, y2 = box[:4]
    left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    right, bottom = min(img.shape[3], int(np.ceil(x2))), min(img.shape[2], int(np.ceil(y2)))
    crop = img[:, :, top:bottom, left:right].float()
    return F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)[0]


BOXES = [[0, 0, 64, 48, 0.9, 1], [10.5, 4.2, 30.1, 40.0, 0.8, 3], [50, 30, 80, 60, 0.5, 0], [3, 3, 4, 4, 0.1, 2]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_each_box_is_its_crop_resized(dtype):
    img = image(dtype=dtype)
    out = kernels.crop_resize(img, torch.tensor(BOXES), 24, 20)
    assert out.shape == (4, 3, 24, 20) and out.dtype == torch.float32
    for row, box in zip(out, BOXES):
        torch.testing.assert_close(row, reference(img, box, 24, 20), atol=1e-4, rtol=0)


def test_boxes_come_as_yolo11post_gives_them_or_as_rows():
    img = image()
    as_head = kernels.crop_resize(img, torch.tensor([BOXES]), 8, 8)  # 1 x N x 6
    as_rows = kernels.crop_resize(img, BOXES, 8, 8)
    torch.testing.assert_close(as_head, as_rows)


def test_no_boxes_is_an_empty_batch():
    out = kernels.crop_resize(image(), torch.zeros(1, 0, 6), 8, 8)
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32


def test_a_box_thinner_than_a_pixel_or_past_the_edge_takes_the_nearest_pixels():
    img = image()
    out = kernels.crop_resize(img, [[10, 20, 15, 20], [70, 0, 90, 10], [5, 47.5, 9, 60]], 4, 4)
    torch.testing.assert_close(out[0], reference(img, [10, 20, 15, 21], 4, 4), atol=1e-4, rtol=0)  # one row
    torch.testing.assert_close(out[1], reference(img, [63, 0, 64, 10], 4, 4), atol=1e-4, rtol=0)  # the last column
    torch.testing.assert_close(out[2], reference(img, [5, 47, 9, 48], 4, 4), atol=1e-4, rtol=0)  # the last row


def test_an_inverted_or_not_finite_box_is_named_with_its_index():
    with pytest.raises(ValueError, match=r"box 1: \[30, 0, 20, 10\] \(x1, y1, x2, y2\) is inverted"):
        kernels.crop_resize(image(), [[0, 0, 5, 5], [30, 0, 20, 10]], 8, 8)
    with pytest.raises(ValueError, match=r"box 0: \[0, nan, 5, 5\] holds a value that is not a finite number"):
        kernels.crop_resize(image(), [[0, float("nan"), 5, 5]], 8, 8)
    with pytest.raises(ValueError, match="N rows of x1, y1, x2, y2"):
        kernels.crop_resize(image(), torch.zeros(3, 3), 8, 8)


def test_the_stage_reads_the_items_box_key_and_fails_its_request_alone():
    stage = build_stage(load_graph({"backend": "CropResizeTensor", "resize_h": 16, "resize_w": 12}).entry.tree, "cpu")
    img = image()
    good = {"data": img, "box": torch.tensor([BOXES[:2]])}
    missing = {"data": img}
    outside = {"data": img, "box": torch.tensor([[100.0, 100, 90, 120]])}
    stage.forward([good, missing, outside])
    assert good["result"].shape == (1, 2, 3, 16, 12)
    torch.testing.assert_close(good["result"][0, 1], reference(img, BOXES[1], 16, 12), atol=1e-4, rtol=0)
    assert isinstance(missing["error"], RequestError) and "`box` key" in str(missing["error"])
    assert isinstance(outside["error"], RequestError) and "box 0" in str(outside["error"])


def test_the_boxes_are_passed_on_row_for_row_with_the_crops():
    stage = build_stage(load_graph({"backend": "CropResizeTensor", "resize_h": 8, "resize_w": 8}).entry.tree, "cpu")
    given = torch.tensor([BOXES[:3]])
    as_list = {"data": image(), "box": [row[:4] for row in BOXES[:2]]}
    none = {"data": image(), "box": []}
    stage.forward([{"data": image(), "box": given}, as_list, none])
    assert as_list["boxes"].shape == (1, 2, 4) and as_list["result"].shape == (1, 2, 3, 8, 8)
    assert none["boxes"].shape == (1, 0, 4) and none["result"].shape == (1, 0, 3, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_on_the_gpu_every_crop_equals_the_cpu_reference(dtype):
    img = image(480, 640, dtype).cuda()
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, [600, 440], (24, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 200, (24, 2))], axis=1).tolist()
    out = kernels.crop_resize(img, boxes, 224, 224)
    assert out.is_cuda and out.shape == (24, 3, 224, 224)
    for row, box in zip(out.cpu(), boxes):
        # the one-launch kernel against torch's resize of the same pixels (see kernels/batch_resize.py)
        torch.testing.assert_close(row, reference(img.cpu(), box, 224, 224), atol=1e-3, rtol=0)
