"""Resize and pad kernels on torch tensors (any device) and OpenCV mats."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import cv2
import torch
import torch.nn.functional as F

MAX_SIDE = 1024 * 1024


def check_side(name: str, value: object) -> int:
    """``value`` as an int in [1, MAX_SIDE] (Python or numpy integers; not bools, not floats)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer in [1, {MAX_SIDE}], got {value!r}")
    try:
        side = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"{name} must be an integer in [1, {MAX_SIDE}], got {value!r} of type {type(value).__name__}"
        ) from None
    if not 1 <= side <= MAX_SIDE:
        raise ValueError(f"{name} must be an integer in [1, {MAX_SIDE}], got {side}")
    return side


def check_nchw(image: torch.Tensor, what: str) -> None:
    shape = image.shape  # read once: each read makes a new torch.Size, and this runs for every image and stage
    if len(shape) != 4 or shape[0] != 1 or shape[1] not in (1, 3, 4):
        raise ValueError(f"{what} needs a 1xCxHxW tensor, got shape {tuple(shape)}")
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{what} got an empty image of shape {tuple(shape)}")


def check_hwc(image: torch.Tensor, what: str) -> None:
    shape = image.shape
    if len(shape) != 3 or shape[2] not in (1, 3, 4):
        raise ValueError(f"{what} needs an HxWxC mat, got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{what} got an empty image of shape {tuple(shape)}")


def resize_bilinear(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """1xCxHxW (any dtype) -> float32 1xCxout_hxout_w, bilinear with half-pixel centres."""
    check_nchw(image, "resize_bilinear")
    check_side("resize_h", out_h)
    check_side("resize_w", out_w)
    return F.interpolate(image.float(), size=(out_h, out_w), mode="bilinear", align_corners=False)


def resize_bilinear_many(images: list[torch.Tensor], out_h: int, out_w: int) -> list[torch.Tensor]:
    """``resize_bilinear`` of each image, with one kernel per distinct input shape, dtype and device.

    A batch of decoded photos holds a few sizes; stacking each size cuts the launches from one
    per image to one per size.  Each result equals ``resize_bilinear`` of its image.
    """
    check_side("resize_h", out_h)
    check_side("resize_w", out_w)
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        check_nchw(image, "resize_bilinear_many")
        groups.setdefault((tuple(image.shape), image.dtype, image.device), []).append(index)
    results: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        stacked = torch.cat([images[i] for i in indices]) if len(indices) > 1 else images[indices[0]]
        resized = F.interpolate(stacked.float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
        for row, index in enumerate(indices):
            results[index] = resized[row : row + 1]
    return results


def resize_bilinear_mat(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """HxWxC uint8 CPU tensor -> HxWxC uint8, OpenCV's INTER_LINEAR."""
    check_hwc(image, "resize_bilinear_mat")
    check_side("resize_h", out_h)
    check_side("resize_w", out_w)
    resized = cv2.resize(image.numpy(), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if resized.ndim == 2:  # OpenCV drops a single channel axis
        resized = resized[:, :, None]
    return torch.from_numpy(resized)


def fill_values(name: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    """One fill value per channel from one value (for all) or exactly one per channel."""
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise ValueError(f"{name} needs 1 or {channels} values for a {channels}-channel image, got {len(values)}")
    return tuple(values)


def parse_pad_value(text: str | float, channels: int = 3) -> tuple[float, ...]:
    """``"114"`` or ``"0,114,255"`` -> one value per channel."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"pad_value must be a number or {channels} comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"pad_value needs 1 or {channels} values, got {len(values)} in {text!r}")
    return values


def resize_pad(
    image: torch.Tensor, max_h: int, max_w: int, pad_value: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit 1xCxHxW into max_h x max_w keeping the aspect ratio, top-left aligned, padded.

    Returns the float32 1xCxmax_hxmax_w image and the inverse transform ``[sx, sy, tx, ty]``
    (float32, shape 1x4) that maps output coordinates to input ones:
    ``x_in = sx * x_out + tx``, ``y_in = sy * y_out + ty`` (continuous pixel-edge coordinates).
    """
    check_nchw(image, "resize_pad")
    check_side("max_h", max_h)
    check_side("max_w", max_w)
    height, width = image.shape[2], image.shape[3]
    scale = min(max_h / height, max_w / width)
    new_h = min(max_h, max(1, round(height * scale)))
    new_w = min(max_w, max(1, round(width * scale)))
    resized = resize_bilinear(image, new_h, new_w)
    fill = torch.tensor(pad_value, dtype=torch.float32, device=image.device).view(1, -1, 1, 1)
    out = fill.expand(1, image.shape[1], max_h, max_w).clone()
    out[:, :, :new_h, :new_w] = resized
    inverse = torch.tensor([[width / new_w, height / new_h, 0.0, 0.0]], dtype=torch.float32, device=image.device)
    return out, inverse
