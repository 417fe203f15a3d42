"""Bilinear resize of a batch of images of any sizes in one GPU launch, with colour order,
per-channel normalisation and output dtype folded in.

Decoded photos come in as many sizes as there are images.  Resizing them one size at a time
costs a launch, a ``torch.cat`` copy and a full-size float conversion per size; here one
Triton kernel reads every image where it lies (uint8, any strides: CHW planes or HWC
interleaved) and writes the ``B x C x out_h x out_w`` result.

The arithmetic is that of ``F.interpolate(image.float(), size, mode="bilinear",
align_corners=False)`` (half-pixel centres, no antialias), in float32, followed by
``(x - mean) / std``.  :func:`resize_batch_reference` is the same thing in torch, used on the
CPU, where Triton is missing, and by the tests as the reference.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import check_side, fill_values

log = logging.getLogger("tritonpipe")

#: input dtypes the kernel reads; others take the torch path
KERNEL_INPUTS = (torch.uint8, torch.float16, torch.float32)
#: output dtypes the kernel writes
OUTPUTS = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 512
#: let the compiler fuse multiply-adds, as nvcc does in PyTorch's own kernel
FP_FUSION = True


def _as_chw(image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 1xCxHxW or CxHxW image (HxWxC when ``channels_last``) as a CxHxW view, nothing copied."""
    if channels_last:
        return image.permute(2, 0, 1)
    return image[0] if image.dim() == 4 else image


#: an image as the kernel reads it: address, channels, height, width, then the channel, row and column strides
Geometry = tuple[int, int, int, int, int, int, int]


def _geometry(image: torch.Tensor, channels_last: bool) -> Geometry:
    """Where a 1xCxHxW or CxHxW image (HxWxC when ``channels_last``) lies, read from its shape and strides: no
    view is made (on the host, a view of each image cost more than the rest of a batch's launch)."""
    shape, stride = image.shape, image.stride()
    if channels_last:
        if len(shape) != 3:
            raise ValueError(f"resize_batch: a channels-last image must be HxWxC, got shape {tuple(shape)}")
        (height, width, channels), (stride_h, stride_w, stride_c) = shape, stride
    elif len(shape) == 4 and shape[0] == 1:
        (_, channels, height, width), (_, stride_c, stride_h, stride_w) = shape, stride
    elif len(shape) == 3:
        (channels, height, width), (stride_c, stride_h, stride_w) = shape, stride
    else:
        raise ValueError(f"resize_batch needs 1xCxHxW or CxHxW images, got shape {tuple(shape)}")
    return image.data_ptr(), channels, height, width, stride_c, stride_h, stride_w


def _check_batch(images: Sequence[torch.Tensor], geometries: list[Geometry]) -> None:
    first, first_chw = images[0], geometries[0][1:4]
    for image, (_, c, h, w, *_strides) in zip(images, geometries):
        if c != first_chw[0] or image.dtype != first.dtype or image.device != first.device:
            raise ValueError(
                "resize_batch needs images of one channel count, dtype and device; got "
                f"{first_chw} {first.dtype} {first.device} and {(c, h, w)} {image.dtype} {image.device}"
            )
        if h == 0 or w == 0:
            raise ValueError(f"resize_batch got an empty image of shape {(c, h, w)}")


def resize_batch_reference(images: Sequence[torch.Tensor], out_h: int, out_w: int, **options) -> torch.Tensor:
    """:func:`resize_batch` in plain torch: one ``F.interpolate`` per image; the same options."""
    return resize_batch(images, out_h, out_w, use_kernel=False, **options)


def _reference(views, swaps, out_h, out_w, mean, std, dtype) -> torch.Tensor:
    rows = []
    for view, swap in zip(views, swaps):
        row = F.interpolate(view.unsqueeze(0).float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
        rows.append(row.flip(1) if swap else row)
    out = torch.cat(rows)
    if mean is not None:
        out = out - torch.tensor(mean, device=out.device).view(1, -1, 1, 1)
    if std is not None:
        out = out / torch.tensor(std, device=out.device).view(1, -1, 1, 1)
    return out.to(dtype)


def _prepare(images, out_h, out_w, channels_last, swap_rb, mean, std, dtype):
    check_side("resize_h", out_h)
    check_side("resize_w", out_w)
    if not images:
        raise ValueError("resize_batch needs at least one image")
    if dtype not in OUTPUTS:
        raise ValueError(f"resize_batch writes {', '.join(map(str, OUTPUTS))}, not {dtype}")
    geometries = [_geometry(image, channels_last) for image in images]
    _check_batch(images, geometries)
    channels = geometries[0][1]
    swaps = [bool(swap_rb)] * len(images) if isinstance(swap_rb, bool) else [bool(s) for s in swap_rb]
    if len(swaps) != len(images):
        raise ValueError(f"resize_batch: swap_rb has {len(swaps)} flags for {len(images)} images")
    if any(swaps) and channels != 3:
        raise ValueError(f"resize_batch: swapping red and blue needs 3 channels, got {channels}")
    mean = None if mean is None else fill_values("mean", [float(v) for v in mean], channels)
    std = None if std is None else fill_values("std", [float(v) for v in std], channels)
    return geometries, swaps, mean, std


@functools.cache
def _kernel():
    """The Triton kernels (batch, one image), their input types and ``cdiv``, compiled on first use; None where
    Triton cannot be imported."""
    try:
        from . import resize_triton
    except ImportError:
        return None
    return resize_triton.resize_kernel, resize_triton.resize_one_kernel, resize_triton.TYPES, resize_triton.cdiv


def kernel_available(device: torch.device) -> bool:
    """True where :func:`resize_batch` runs the one-launch kernel on ``device``."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted and device.type == "cpu") and _broken is None and _kernel() is not None


#: why the kernel could not be compiled or launched here (no C compiler for Triton's launcher, an
#: unsupported GPU, ...); from then on this process takes the torch path
_broken: str | None = None


def _scales(geometries: list[Geometry], out_h: int, out_w: int) -> np.ndarray:
    """Each image's H / out_h and W / out_w, divided in IEEE float32 as PyTorch's host code divides them (Triton's
    "/" is approximate)."""
    sides = np.array([side for g in geometries for side in (g[2], g[3])], dtype=np.float32)
    return sides / np.array([out_h, out_w] * len(geometries), dtype=np.float32)


def _norm_values(mean, std, channels: int) -> list[float]:
    """The kernel's per-channel mean, then std (0 and 1 where not given)."""
    return [*(mean or [0.0] * channels), *(std or [1.0] * channels)]


@functools.lru_cache(maxsize=64)
def _norm_on(device: torch.device, values: tuple[float, ...]) -> torch.Tensor:
    """:func:`_norm_values` on ``device``, made once: a stage resizes with one mean and std."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _launch_tables(geometries: list[Geometry], swaps, out_h, out_w, mean, std, channels, device):
    """The kernel's three tables (per image: address, sides, strides, swap; per image: scales; per channel:
    mean and std) as views of one buffer, so that a GPU gets them in one copy from pinned memory.  Each
    table starts 16 bytes into line, as separate tensors would, so that Triton compiles one variant.
    Filled in numpy: a batch of one costs a fifth of the host time of filling it with torch's small ops."""
    count, head = len(geometries), 7 * len(geometries)
    start = head + head % 2  # the float32 tables start 16-byte aligned
    norm_at = -(-2 * count // 4) * 4  # and so does mean/std after the scales
    floats = norm_at + 2 * channels
    host = np.zeros(start + (floats + 1) // 2, dtype=np.int64)
    host[:head] = [x for (address, _, h, w, *strides), s in zip(geometries, swaps) for x in (address, h, w, *strides, int(s))]
    values = host[start:].view(np.float32)
    values[: 2 * count] = _scales(geometries, out_h, out_w)
    values[norm_at:floats] = _norm_values(mean, std, channels)
    packed = torch.from_numpy(host)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    values = packed[start:].view(torch.float32)
    return packed[:head], values[: 2 * count], values[norm_at:floats]


def resize_batch(
    images: Sequence[torch.Tensor],
    out_h: int,
    out_w: int,
    *,
    channels_last: bool = False,
    swap_rb: Sequence[bool] | bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Resize every image to ``out_h x out_w`` into one ``B x C x out_h x out_w`` tensor of ``dtype``.

    ``images`` are 1xCxHxW or CxHxW tensors (HxWxC with ``channels_last``) of one channel count,
    dtype and device, each of any size and strides.  ``swap_rb`` reverses the channel order (one
    flag for all, or one per image); ``mean`` and ``std`` give ``(x - mean) / std`` per channel.
    On a GPU this is one kernel launch; elsewhere (or with ``use_kernel=False``) it is one
    ``F.interpolate`` per image, :func:`resize_batch_reference`.
    """
    geometries, swaps, mean, std = _prepare(images, out_h, out_w, channels_last, swap_rb, mean, std, dtype)
    first = images[0]
    device, channels = first.device, geometries[0][1]
    if not use_kernel or first.dtype not in KERNEL_INPUTS or not kernel_available(device):
        return _reference([_as_chw(image, channels_last) for image in images], swaps, out_h, out_w, mean, std, dtype)
    kernel, one_kernel, types, cdiv = _kernel()
    options = dict(C=channels, IN_TYPE=types[first.dtype], NORMALISE=mean is not None or std is not None,
                   BLOCK=_BLOCK, enable_fp_fusion=FP_FUSION)
    out = torch.empty((len(images), channels, out_h, out_w), dtype=dtype, device=device)
    blocks = cdiv(out_h * out_w, _BLOCK)
    try:
        if len(images) == 1:
            (address, _, height, width, *strides), (scale_y, scale_x) = geometries[0], _scales(geometries, out_h, out_w)
            norm = _norm_on(device, tuple(_norm_values(mean, std, channels)))
            one_kernel[(blocks,)](address, height, width, *strides, int(swaps[0]),
                                  float(scale_y), float(scale_x), norm, out, out_h, out_w, **options)
        else:
            table, scales, norm = _launch_tables(geometries, swaps, out_h, out_w, mean, std, channels, device)
            kernel[(blocks, len(images))](table, scales, norm, out, out_h, out_w, **options)
    except Exception as exc:  # noqa: BLE001 - the kernel, not the images: every later batch takes the torch path
        global _broken
        _broken = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("the one-launch batch resize cannot run here (%s); resizing one image at a time", _broken)
        return _reference([_as_chw(image, channels_last) for image in images], swaps, out_h, out_w, mean, std, dtype)
    return out
