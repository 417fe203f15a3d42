"""Detection kernels against OpenCV (copyMakeBorder, resize, warpAffine) and torch/torchvision (crop, roi_align, index_select)."""

import math

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align

from tritonpipe.kernels.detection import (
    box_pixels,
    copy_make_border,
    crop,
    fit_pad_mat,
    index_select,
    parse_affine_matrix,
    parse_index,
    parse_numbers,
    warp_affine,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def as_nchw(hwc: np.ndarray, device="cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].to(device)


def as_hwc(nchw: torch.Tensor) -> np.ndarray:
    return nchw[0].permute(1, 2, 0).cpu().numpy()


# --- crop -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("box", [(0, 0, 40, 30), (5, 7, 19, 22), (39, 29, 40, 30), (3, 0, 4, 30)])
def test_crop_inside_the_image_equals_torchvision(device, box):
    image = as_nchw(picture(30, 40, seed=1), device)
    x1, y1, x2, y2 = box
    got = crop(image, torch.tensor(box))
    want = TF.crop(image, top=y1, left=x1, height=y2 - y1, width=x2 - x1)
    assert got.device.type == device and got.dtype == torch.uint8
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def random_boxes(count, height, width, seed):
    """Integer boxes (x1, y1, x2, y2), x2 and y2 exclusive, inside an HxW image, 1x1 up to the whole image."""
    rng = np.random.default_rng(seed)
    boxes = [(0, 0, width, height), (width - 1, height - 1, width, height), (0, 0, 1, 1)]
    while len(boxes) < count:
        x1, x2 = sorted(rng.choice(width + 1, 2, replace=False).tolist())
        y1, y2 = sorted(rng.choice(height + 1, 2, replace=False).tolist())
        boxes.append((x1, y1, x2, y2))
    return boxes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_crop_of_integer_boxes_equals_roi_align_sampling_pixel_centres(device, aligned):
    # roi_align reads a box in continuous coordinates where pixel i's centre is at i (aligned=False)
    # or at i + 0.5 (aligned=True).  With one sample per bin (sampling_ratio=1) and as many bins as
    # the box has pixels, every sample of the box x1, y1, x2, y2 (x2, y2 exclusive) lands on a
    # pixel centre of rows y1..y2-1 and columns x1..x2-1, where bilinear sampling is that pixel.
    generator = torch.Generator().manual_seed(11)
    image = torch.randn(1, 3, 37, 53, generator=generator).to(device)
    shift = 0.0 if aligned else -0.5
    for box in random_boxes(40, 37, 53, seed=12):
        x1, y1, x2, y2 = box
        rois = torch.tensor([[0, x1 + shift, y1 + shift, x2 + shift, y2 + shift]], dtype=torch.float32, device=device)
        want = roi_align(image, rois, output_size=(y2 - y1, x2 - x1), spatial_scale=1.0, sampling_ratio=1, aligned=aligned)
        got = crop(image, torch.tensor(box))
        assert got.shape == want.shape, box
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"box {box}")


@pytest.mark.parametrize("device", DEVICES)
def test_crop_of_a_uint8_image_equals_roi_align_of_its_float_copy(device):
    image = as_nchw(picture(30, 40, seed=13), device)
    for x1, y1, x2, y2 in random_boxes(20, 30, 40, seed=14):
        rois = torch.tensor([[0, x1 - 0.5, y1 - 0.5, x2 - 0.5, y2 - 0.5]], device=device)
        want = roi_align(image.float(), rois, output_size=(y2 - y1, x2 - x1), sampling_ratio=1, aligned=False)
        got = crop(image, [x1, y1, x2, y2])
        assert got.dtype == torch.uint8
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("box", "pixels"),
    [
        ((2.4, 3.6, 10.2, 11.0), (2, 3, 11, 11)),  # fractional corners widen to whole pixels
        ((-5, -2, 12, 9), (0, 0, 12, 9)),  # clamped at the top left
        ((30, 20, 99, 99), (30, 20, 40, 30)),  # clamped at the bottom right
        ((1, 2, 3, 4, 0.9, 7), (1, 2, 3, 4)),  # score and class after the box are ignored
    ],
)
def test_crop_widens_and_clamps_the_box_like_slicing_a_numpy_array(box, pixels):
    hwc = picture(30, 40, seed=2)
    assert box_pixels(list(box), 30, 40) == pixels
    x1, y1, x2, y2 = box[:4]
    want = hwc[max(0, math.floor(y1)) : min(30, math.ceil(y2)), max(0, math.floor(x1)) : min(40, math.ceil(x2))]
    np.testing.assert_array_equal(as_hwc(crop(as_nchw(hwc), box)), want)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((10, 10, 10, 20), r"box \[10, 10, 10, 20\].*empty or inverted"),
        ((20, 5, 10, 15), r"box \[20, 5, 10, 15\].*empty or inverted"),
        ((45, 0, 50, 10), r"box \[45, 0, 50, 10\].*empty or inverted inside the 40x30"),
        ((0, 0, float("nan"), 4), "not a finite number"),
        ((1, 2, 3), "needs 4 numbers"),
        ("1,2,3,4", "tensor or a list"),
    ],
)
def test_a_bad_box_is_a_value_error_naming_it(box, message):
    with pytest.raises(ValueError, match=message):
        crop(as_nchw(picture(30, 40)), box)


# --- border -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sides", [(0, 0, 0, 0), (1, 2, 3, 4), (5, 0, 0, 7), (0, 9, 6, 0)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_constant_border_equals_opencv(device, sides, channels):
    hwc = picture(11, 13, channels, seed=channels)
    values = (10.0, 114.0, 250.0, 7.0)[:channels]
    got = copy_make_border(as_nchw(hwc, device), *sides, border_type="constant", value=values)
    want = cv2.copyMakeBorder(hwc, *sides, cv2.BORDER_CONSTANT, value=values)
    want = want[:, :, None] if want.ndim == 2 else want
    assert got.dtype == torch.uint8 and got.device.type == device
    np.testing.assert_array_equal(as_hwc(got), want)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("sides", [(1, 2, 3, 4), (12, 15, 20, 17)])
def test_replicate_border_equals_opencv(dtype, sides):
    hwc = picture(11, 13, seed=3).astype(dtype)
    got = copy_make_border(as_nchw(hwc), *sides, border_type="replicate")
    np.testing.assert_array_equal(as_hwc(got), cv2.copyMakeBorder(hwc, *sides, cv2.BORDER_REPLICATE))


def test_constant_border_saturates_into_uint8_as_opencv_does():
    hwc = picture(4, 5, seed=4)
    for value in (300.0, -20.0, 113.6):
        got = copy_make_border(as_nchw(hwc), 2, 2, 2, 2, value=(value,))
        want = cv2.copyMakeBorder(hwc, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(value,) * 3)
        np.testing.assert_array_equal(as_hwc(got), want)


def test_float_constant_border_keeps_the_value():
    hwc = picture(4, 5, seed=5).astype(np.float32)
    got = copy_make_border(as_nchw(hwc), 1, 0, 0, 2, value=(0.25,))
    np.testing.assert_array_equal(as_hwc(got), cv2.copyMakeBorder(hwc, 1, 0, 0, 2, cv2.BORDER_CONSTANT, value=(0.25,) * 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top=-1, bottom=0, left=0, right=0), "top must be an integer in"),
        (dict(top=0, bottom=0, left=0, right=1.5), "right must be an integer in"),
        (dict(top=0, bottom=0, left=0, right=0, border_type="reflect"), "border_type must be one of"),
        (dict(top=1, bottom=0, left=0, right=0, value=(1, 2)), "pad_val needs 1 or 3 values"),
    ],
)
def test_border_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        copy_make_border(as_nchw(picture(4, 4)), **kwargs)


# --- letterbox and top-left resize ------------------------------------------------------


def opencv_fit(hwc, out_h, out_w, pad, centre):
    """The reference: OpenCV's resize, then copyMakeBorder, with YOLO's letterbox arithmetic."""
    height, width = hwc.shape[:2]
    ratio = min(out_h / height, out_w / width)
    new_w, new_h = int(np.floor(width * ratio + 0.5)), int(np.floor(height * ratio + 0.5))
    resized = cv2.resize(hwc, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    if centre:
        top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
        left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    else:
        top, left, bottom, right = 0, 0, out_h - new_h, out_w - new_w
    out = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=pad)
    return out, (new_h, new_w, top, left)


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize(("source", "target"), [((480, 640), (320, 320)), ((300, 151), (128, 96)), ((50, 50), (64, 64)), ((37, 91), (41, 41))])
def test_fit_pad_mat_equals_opencv_resize_and_border(centre, source, target):
    hwc = picture(*source, seed=6)
    got, inverse = fit_pad_mat(torch.from_numpy(hwc), *target, (114, 115, 116), centre=centre)
    want, (new_h, new_w, top, left) = opencv_fit(hwc, *target, (114, 115, 116), centre)
    assert got.shape == (*target, 3) and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want)
    # the inverse maps the resized content's corners onto the source image's
    sx, sy, tx, ty = inverse[0].tolist()
    assert inverse.shape == (1, 4) and inverse.dtype == torch.float32
    for x_out, y_out, x_in, y_in in [(left, top, 0, 0), (left + new_w, top + new_h, source[1], source[0])]:
        assert sx * x_out + tx == pytest.approx(x_in, abs=1e-3) and sy * y_out + ty == pytest.approx(y_in, abs=1e-3)


def test_fit_pad_mat_takes_one_and_four_channels():
    for channels in (1, 4):
        hwc = picture(30, 20, channels, seed=channels)
        got, _ = fit_pad_mat(torch.from_numpy(hwc), 16, 16, (9,), centre=True)
        want, _ = opencv_fit(hwc, 16, 16, (9,) * channels, True)
        np.testing.assert_array_equal(got.numpy(), want.reshape(16, 16, channels))


def test_fit_pad_mat_refuses_float_mats_and_bad_sizes():
    with pytest.raises(ValueError, match="uint8"):
        fit_pad_mat(torch.zeros(4, 4, 3), 8, 8, (0,), centre=True)
    with pytest.raises(ValueError, match="resize_w must be an integer"):
        fit_pad_mat(torch.zeros(4, 4, 3, dtype=torch.uint8), 8, 0, (0,), centre=False)


# --- index select -----------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "index"), [(1, (2, 1, 0)), (2, (0, 3, 3)), (-1, (4,)), (0, (0, 0))])
def test_index_select_equals_torch_and_numpy(dim, index):
    data = torch.arange(1 * 3 * 4 * 5).view(1, 3, 4, 5)
    got = index_select(data, dim, index)
    torch.testing.assert_close(got, torch.index_select(data, dim, torch.tensor(index)), rtol=0, atol=0)
    np.testing.assert_array_equal(got.numpy(), np.take(data.numpy(), index, axis=dim))


def test_index_select_names_the_index_and_the_size():
    data = torch.zeros(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"index \[0, 3\] must lie in \[0, 2\] along dim 1"):
        index_select(data, 1, (0, 3))
    with pytest.raises(ValueError, match="dim 4 is out of range"):
        index_select(data, 4, (0,))


@pytest.mark.parametrize("text", ["", "a", "1,-1", "1.5"])
def test_parse_index_refuses_what_is_not_non_negative_integers(text):
    with pytest.raises(ValueError, match="non-negative integers"):
        parse_index(text)
    assert parse_index(" 2, 1,0 ") == (2, 1, 0)


def test_parse_numbers():
    assert parse_numbers("pad_val", "114") == (114.0,)
    with pytest.raises(ValueError, match="pad_val must be comma-separated numbers"):
        parse_numbers("pad_val", "x")
    with pytest.raises(ValueError, match="finite"):
        parse_numbers("pad_val", "inf")
    with pytest.raises(ValueError, match="box needs 4 numbers, got 2"):
        parse_numbers("box", "1,2", 4)


# --- affine warp ------------------------------------------------------------------------


def smooth_picture(height, width):
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([100 + 80 * np.sin(x / 7) * np.cos(y / 5), 50 + 3 * x + 2 * y, 200 - x - y], -1).astype(np.float32)


def max_step(hwc: np.ndarray, border: tuple[float, ...]) -> float:
    """The largest difference between neighbouring pixels, the border around the image included."""
    padded = cv2.copyMakeBorder(hwc, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=border)
    return float(max(np.abs(np.diff(padded, axis=0)).max(), np.abs(np.diff(padded, axis=1)).max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("matrix", "size"),
    [
        ([[0.9, 0.2, 3.5], [-0.15, 1.1, -2.25]], (37, 45)),
        ([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]], (20, 25)),
        ([[1.7, -0.4, -10.0], [0.4, 1.7, -30.0]], (64, 64)),
    ],
)
@pytest.mark.parametrize("border", [(0.0, 0.0, 0.0), (7.0, 8.0, 9.0)])
def test_warp_affine_equals_opencv_within_its_sampling_step(device, matrix, size, border):
    hwc = smooth_picture(40, 50)
    m = np.array(matrix, dtype=np.float64)
    want = cv2.warpAffine(hwc, m, (size[1], size[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    got = warp_affine(as_nchw(hwc, device), m.flatten().tolist(), *size, border)
    assert got.dtype == torch.float32 and got.shape == (1, 3, *size)
    # OpenCV samples at positions rounded to 1/32 pixel: at most 1/64 off on each axis
    tolerance = max_step(hwc, border) / 32 + 1e-3
    assert np.abs(as_hwc(got) - want).max() <= tolerance


def test_warp_affine_integer_shift_is_exact_on_noise():
    hwc = picture(20, 30, seed=7)
    m = np.array([[1, 0, 3], [0, 1, -2]], dtype=np.float64)
    got = warp_affine(as_nchw(hwc), m.flatten().tolist(), 20, 30)
    want = cv2.warpAffine(hwc.astype(np.float32), m, (30, 20), flags=cv2.INTER_LINEAR)
    np.testing.assert_allclose(as_hwc(got), want, atol=1e-3)


def test_affine_matrix_must_be_six_numbers_and_invertible():
    assert parse_affine_matrix("1,0,2,0,1,3") == (1.0, 0.0, 2.0, 0.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="needs 6 numbers"):
        parse_affine_matrix("1,0,0,1")
    with pytest.raises(ValueError, match="singular"):
        parse_affine_matrix("1,2,0,2,4,0")
    with pytest.raises(ValueError, match="invertible"):
        warp_affine(as_nchw(picture(4, 4)), (0, 0, 0, 0, 0, 0), 4, 4)
