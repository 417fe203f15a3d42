"""Resize and pad kernels against OpenCV's resize, and torch where OpenCV is the kernel itself."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritonpipe.kernels.geometry import (
    MAX_SIDE,
    parse_pad_value,
    resize_bilinear,
    resize_bilinear_many,
    resize_bilinear_mat,
    resize_pad,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def as_nchw(hwc: np.ndarray, device="cpu") -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None].to(device)


def opencv_bilinear(hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR on float32, where it computes in floating point."""
    out = cv2.resize(hwc.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("source", "target"), [((48, 64), (96, 128)), ((50, 70), (37, 23)), ((31, 17), (31, 60)), ((7, 9), (1, 1))])
def test_resize_bilinear_matches_opencv(device, source, target):
    image = picture(*source)
    got = resize_bilinear(as_nchw(image, device), *target)
    assert got.dtype == torch.float32 and got.shape == (1, 3, *target) and got.device.type == device
    want = opencv_bilinear(image, *target)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).cpu().numpy(), want, atol=1e-3)


def test_resize_bilinear_keeps_one_and_four_channels():
    for channels in (1, 4):
        image = picture(20, 30, channels, seed=channels)
        got = resize_bilinear(as_nchw(image), 10, 45)
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), opencv_bilinear(image, 10, 45), atol=1e-3)


@pytest.mark.parametrize(("source", "target"), [((48, 64), (96, 128)), ((50, 70), (37, 23)), ((9, 11), (9, 11))])
def test_resize_bilinear_mat_agrees_with_torch_within_rounding(source, target):
    image = picture(*source, seed=2)
    got = resize_bilinear_mat(torch.from_numpy(image), *target)
    assert got.dtype == torch.uint8 and got.shape == (*target, 3)
    # OpenCV rounds uint8 through 11-bit fixed point; torch interpolates in float
    want = F.interpolate(as_nchw(image).float(), size=target, mode="bilinear", align_corners=False)
    want = want[0].permute(1, 2, 0).round().clamp(0, 255)
    assert (got.float() - want).abs().max() <= 1


def test_resize_bilinear_mat_keeps_a_single_channel_axis():
    got = resize_bilinear_mat(torch.from_numpy(picture(10, 12, 1)), 5, 6)
    assert got.shape == (5, 6, 1)


@pytest.mark.parametrize("bad", [0, -1, MAX_SIDE + 1, 2.5, True, "8"])
def test_sides_outside_the_range_are_named(bad):
    image = as_nchw(picture(4, 4))
    with pytest.raises(ValueError, match=rf"resize_h must be an integer in \[1, {MAX_SIDE}\], got {bad!r}"):
        resize_bilinear(image, bad, 4)
    with pytest.raises(ValueError, match="max_w must be an integer"):
        resize_pad(image, 4, bad, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 4, 4), (1, 2, 4, 4), (1, 3, 0, 4)])
def test_tensor_kernels_refuse_other_shapes(shape):
    with pytest.raises(ValueError, match=r"resize_bilinear .*\(" + ", ".join(map(str, shape))):
        resize_bilinear(torch.zeros(shape), 2, 2)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 2), (0, 4, 3)])
def test_mat_kernel_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match="resize_bilinear_mat"):
        resize_bilinear_mat(torch.zeros(shape, dtype=torch.uint8), 2, 2)


def test_pad_values():
    assert parse_pad_value("114") == (114.0, 114.0, 114.0)
    assert parse_pad_value(" 0, 114 ,255") == (0.0, 114.0, 255.0)
    assert parse_pad_value(7, channels=1) == (7.0,)
    with pytest.raises(ValueError, match="'a,b'"):
        parse_pad_value("a,b")
    with pytest.raises(ValueError, match="needs 1 or 3 values, got 2"):
        parse_pad_value("1,2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("source", "box", "fitted"), [((60, 80), (64, 64), (48, 64)), ((80, 40), (50, 100), (50, 25)), ((30, 30), (30, 30), (30, 30))])
def test_resize_pad_fits_top_left_and_pads(device, source, box, fitted):
    image = picture(*source, seed=5)
    out, inverse = resize_pad(as_nchw(image, device), *box, (1.0, 2.0, 3.0))
    assert out.shape == (1, 3, *box) and out.dtype == torch.float32
    hwc = out[0].permute(1, 2, 0).cpu().numpy()
    np.testing.assert_allclose(hwc[: fitted[0], : fitted[1]], opencv_bilinear(image, *fitted), atol=1e-3)
    padding = np.concatenate([hwc[fitted[0] :].reshape(-1, 3), hwc[:, fitted[1] :].reshape(-1, 3)])
    assert (padding == np.array([1.0, 2.0, 3.0], np.float32)).all()
    # the inverse maps the fitted image's far corner back onto the source's
    sx, sy, tx, ty = inverse[0].tolist()
    assert inverse.shape == (1, 4) and inverse.device.type == device
    assert (sx * fitted[1] + tx, sy * fitted[0] + ty) == pytest.approx((source[1], source[0]))


def test_resize_many_equals_one_by_one_across_sizes_and_dtypes():
    rng = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 37, 53), (1, 3, 64, 48), (1, 3, 37, 53), (1, 1, 20, 20), (1, 3, 64, 48), (1, 3, 37, 53)]
    images = [torch.randint(0, 256, s, generator=rng, dtype=torch.uint8) for s in shapes]
    images[3] = images[3].float()
    many = resize_bilinear_many(images, 24, 32)
    for image, got in zip(images, many):
        assert torch.equal(got, resize_bilinear(image, 24, 32))


def test_resize_many_checks_its_arguments():
    with pytest.raises(ValueError, match="resize_h"):
        resize_bilinear_many([torch.zeros(1, 3, 4, 4)], 0, 4)
    with pytest.raises(ValueError, match="1xCxHxW"):
        resize_bilinear_many([torch.zeros(3, 4, 4)], 4, 4)
