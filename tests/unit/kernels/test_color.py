"""Colour-order kernel against OpenCV's cvtColor and torch indexing."""

import cv2
import numpy as np
import pytest
import torch

from tritonpipe.kernels.color import COLORS, convert_color

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(seed=0, shape=(6, 9, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize(("source", "target", "code"), [("rgb", "bgr", cv2.COLOR_RGB2BGR), ("bgr", "rgb", cv2.COLOR_BGR2RGB)])
def test_mat_conversion_matches_opencv(source, target, code):
    image = picture()
    got = convert_color(torch.from_numpy(image), source, target, channel_dim=2)
    np.testing.assert_array_equal(got.numpy(), cv2.cvtColor(image, code))
    assert got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_nchw_conversion_reverses_the_channel_axis(device):
    image = torch.from_numpy(picture(1, (2, 3, 5, 4))).float().to(device)
    got = convert_color(image, "bgr", "rgb", channel_dim=1)
    torch.testing.assert_close(got, image[:, [2, 1, 0]])
    assert got.is_contiguous() and got.device == image.device
    # twice is the identity
    torch.testing.assert_close(convert_color(got, "rgb", "bgr", channel_dim=1), image)


@pytest.mark.parametrize("color", COLORS)
def test_same_order_is_returned_unchanged(color):
    image = torch.from_numpy(picture(2))
    assert convert_color(image, color, color, channel_dim=2) is image


def test_unknown_colours_name_the_choices():
    image = torch.zeros(4, 4, 3)
    with pytest.raises(ValueError, match=r"source colour must be one of \('rgb', 'bgr'\), got 'gray'"):
        convert_color(image, "gray", "rgb", channel_dim=2)
    with pytest.raises(ValueError, match="target colour .* got 'RGB'"):
        convert_color(image, "bgr", "RGB", channel_dim=2)


@pytest.mark.parametrize("shape", [(4, 4, 1), (4, 4, 4)])
def test_other_channel_counts_are_refused(shape):
    with pytest.raises(ValueError, match=rf"3 channels on dim 2, got shape \({shape[0]}, {shape[1]}, {shape[2]}\)"):
        convert_color(torch.zeros(shape), "rgb", "bgr", channel_dim=2)
