"""Bilinear resize that reproduces ``PIL.Image.resize(..., Image.BILINEAR)`` exactly.

Pillow resamples 8-bit images with a separable, two-pass, fixed-point
convolution whose first pass is rounded to 8-bit storage before the second
pass reads it.  Each pass uses a triangle filter widened by the downscale factor, normalised per
output sample in double precision and then quantised to integers with
``PRECISION_BITS`` fractional bits.  This module rebuilds those integer
coefficients bit for bit and applies them with torch operations on whatever
device holds the image, so a CUDA tensor never leaves the GPU.

Channels are resampled independently, which is what Pillow does for "L",
"RGB", "RGBX" and "CMYK".  (Pillow premultiplies alpha for "RGBA" and "LA"
before resizing, so 4-channel parity holds against "RGBX"/"CMYK", not "RGBA".)

The 8-bit arithmetic (coefficients, precision, rounding, clipping) is the same
in every release from 9.0 to 13.0; what changed is which pass runs first, and
:data:`RELEASES` records that per release line.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple, Optional

import torch

from .geometry import MAX_SIDE, check_side

__all__ = ["pillow_resize", "pillow_resize_hwc", "release_line", "MAX_SIDE", "NEWEST", "RELEASES", "Release"]

"""Largest accepted output height or width."""

# Pillow keeps 32 - 8 - 2 fractional bits so that an 8-bit sample times a
# coefficient, plus headroom for negative filter lobes, fits in an int32.
_PRECISION_BITS = 22
_ONE = 1 << _PRECISION_BITS
_HALF = 1 << (_PRECISION_BITS - 1)
_BILINEAR_SUPPORT = 1.0

# A dense (in x out) float64 matrix turns a pass into one GEMM, which suits
# GPUs; above this many entries the banded form is used to bound memory.
_DENSE_MAX_ENTRIES = 1 << 21
# Below this many elements per tap the banded form batches several taps per
# step, trading a small temporary for fewer kernel launches.
_BAND_CHUNK_ELEMENTS = 1 << 16


class Release(NamedTuple):
    """How one Pillow release line orders the two passes of a resize.

    Every release skips a pass whose size is unchanged and otherwise runs the
    horizontal pass first, except where one of these rules sends the vertical
    pass first (both only when the height shrinks).
    """

    first: tuple[int, int]  # (major, minor) of the first release with this behaviour
    tall_ratio: Optional[int]  # vertical first when in_h > tall_ratio * in_w
    shrink_ratio: Optional[int]  # vertical first when in_h - out_h > shrink_ratio * (in_w - out_w)


_HORIZONTAL_FIRST = dict(tall_ratio=None, shrink_ratio=None)
RELEASES: dict[str, Release] = {
    # 9.0 - 12.1: ImagingResampleInner always runs the horizontal pass first
    # https://github.com/python-pillow/Pillow/blob/12.1.0/src/libImaging/Resample.c#L750
    "9": Release((9, 0), **_HORIZONTAL_FIRST),
    "10": Release((10, 0), **_HORIZONTAL_FIRST),
    "11": Release((11, 0), **_HORIZONTAL_FIRST),
    "12.0": Release((12, 0), **_HORIZONTAL_FIRST),
    "12.1": Release((12, 1), **_HORIZONTAL_FIRST),
    # 12.2 - 12.3: Image.resize splits images over 100 times taller than wide
    # into a height-only then a width-only resize ("Resize tall images
    # vertically first", 4ef0ac611)
    # https://github.com/python-pillow/Pillow/blob/12.2.0/src/PIL/Image.py#L2431
    "12.2": Release((12, 2), tall_ratio=100, shrink_ratio=None),
    "12.3": Release((12, 3), tall_ratio=100, shrink_ratio=None),
    # 13.0: the tall-image branch left Image.py; libImaging runs the vertical
    # pass first when the height loses over twice as many pixels as the width
    "13": Release((13, 0), tall_ratio=None, shrink_ratio=2),
}
NEWEST = "13"
"""The release line reproduced by default, and for Pillow versions newer than it."""


def release_line(version: str) -> str:
    """The :data:`RELEASES` key whose behaviour a Pillow version string has.

    ``"12.3.0"`` gives ``"12.3"``, ``"9.5.0"`` gives ``"9"``; versions newer
    than the newest line known here are taken to behave like it.

    Raises:
        ValueError: if ``version`` does not start with ``MAJOR.MINOR`` or is
            older than 9.0.
    """
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"Pillow version must look like MAJOR.MINOR[.PATCH], got {version!r}")
    wanted = (int(match.group(1)), int(match.group(2)))
    eligible = [key for key, release in RELEASES.items() if release.first <= wanted]
    if not eligible:
        raise ValueError(f"Pillow version must be 9.0 or newer, got {version!r}")
    return max(eligible, key=lambda key: RELEASES[key].first)


def _check_release(pillow_version: str) -> Release:
    release = RELEASES.get(pillow_version) if isinstance(pillow_version, str) else None
    if release is None:
        raise ValueError(f"pillow_version must be one of {', '.join(RELEASES)}, got {pillow_version!r}")
    return release


class _AxisCoeffs(NamedTuple):
    """Integer resampling weights for one axis, on one device."""

    index: torch.Tensor  # int64 [out, ksize]: source sample of each tap
    taps: torch.Tensor  # int32 [out, ksize]: fixed-point weight of each tap
    dense: Optional[torch.Tensor]  # float64 [in, out], or None


def _build_cpu(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis.

    Computed on the CPU in float64 so that every operation is the same IEEE
    double operation Pillow performs, in the same order.
    """
    f64 = torch.float64
    # Pillow's box is float32, but (in_size - 0) is exact there for every
    # size below 2**24, so the scale is just this double division.
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _BILINEAR_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale

    center = (torch.arange(out_size, dtype=f64) + 0.5) * scale
    # C casts with truncation toward zero, not floor.
    first = torch.trunc(center - support + 0.5).clamp_(min=0.0)
    count = torch.trunc(center + support + 0.5).clamp_(max=float(in_size)) - first

    offsets = torch.arange(ksize, dtype=f64)
    position = offsets.unsqueeze(0) + first.unsqueeze(1)  # exact small integers
    arg = ((position - center.unsqueeze(1)) + 0.5) * inv_filterscale
    weight = (1.0 - arg.abs()).clamp_(min=0.0)
    weight = torch.where(offsets.unsqueeze(0) < count.unsqueeze(1), weight, 0.0)

    # The normaliser must be summed tap by tap, left to right, as Pillow does:
    # a tree reduction can round differently.  CPU cumsum is sequential.
    total = torch.cumsum(weight, dim=1)[:, -1:]
    normalised = torch.where(total != 0.0, weight / total, weight)

    # Pillow rounds half away from zero, then truncates toward zero.
    scaled = normalised * float(_ONE)
    fixed = torch.where(scaled < 0, torch.trunc(scaled - 0.5), torch.trunc(scaled + 0.5))

    index = (position.to(torch.int64)).clamp_(max=in_size - 1)  # padding taps weigh 0
    return index, fixed.to(torch.int64)


@functools.lru_cache(maxsize=32)
def _axis_coeffs(in_size: int, out_size: int, device: torch.device, dense: bool) -> _AxisCoeffs:
    index, taps = _build_cpu(in_size, out_size)
    matrix = None
    if dense:
        # scatter_add, not scatter: clamped padding indices may repeat (weight 0).
        rows = torch.zeros(out_size, in_size, dtype=torch.float64)
        rows.scatter_add_(1, index, taps.to(torch.float64))
        matrix = rows.t().contiguous().to(device)
    # Blocking copies: the cached tensors are then valid on every stream.
    return _AxisCoeffs(index.to(device), taps.to(device=device, dtype=torch.int32), matrix)


def _use_dense(in_size: int, out_size: int, device: torch.device) -> bool:
    # On CPU the banded form does far less arithmetic and wins; on GPU one
    # float64 GEMM beats a chain of gathers until the matrix gets large.
    return device.type == "cuda" and in_size * out_size <= _DENSE_MAX_ENTRIES


def _to_uint8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 on an accumulator that already holds the rounding half."""
    if acc.is_floating_point():
        # acc holds exact integers; scaling by a power of two and flooring
        # is the same as an arithmetic right shift.
        shifted = torch.floor(acc * (1.0 / _ONE))
    else:
        shifted = acc >> _PRECISION_BITS
    return shifted.clamp_(0, 255).to(torch.uint8)


def _resample_dense(image: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    # Every product and partial sum is an integer below 2**31, so float64
    # GEMM is exact whatever order the library accumulates in.
    x = image.to(torch.float64)
    if dim == 2:
        c, h, w = x.shape
        acc = (x.reshape(c * h, w) @ matrix).reshape(c, h, -1)
    else:
        acc = torch.matmul(matrix.t(), x)
    # Pillow rounds before shifting: its accumulator starts at one half.
    return _to_uint8(acc.add_(float(_HALF)))


def _accumulate_band(x: torch.Tensor, coeffs: _AxisCoeffs) -> torch.Tensor:
    """int32 ``[A, out, B]`` sums over taps of ``x[A, L, B]`` resampled along dim 1."""
    # int32 suffices: Pillow itself accumulates in an int, and every partial
    # sum of non-negative bilinear terms is bounded by the full sum.
    out_size, ksize = coeffs.taps.shape
    a, _, b = x.shape
    # Pillow rounds before shifting: its accumulator starts at one half.
    acc = torch.full((a, out_size, b), _HALF, dtype=torch.int32, device=x.device)
    # Taps are applied one (or, for tiny planes, a few) at a time: gathering
    # whole rows along dim 1 keeps every memory access contiguous.
    step = max(1, min(ksize, _BAND_CHUNK_ELEMENTS // (a * out_size * b)))
    for start in range(0, ksize, step):
        stop = min(ksize, start + step)
        gathered = x.index_select(1, coeffs.index[:, start:stop].reshape(-1))
        if stop - start == 1:
            acc.addcmul_(gathered, coeffs.taps[:, start:stop].view(1, out_size, 1))
        else:
            terms = gathered.view(a, out_size, stop - start, b).to(torch.int32)
            terms = terms * coeffs.taps[:, start:stop].view(1, out_size, stop - start, 1)
            acc.add_(terms.sum(2, dtype=torch.int32))
    return acc


def _resample_band(image: torch.Tensor, dim: int, coeffs: _AxisCoeffs) -> torch.Tensor:
    c, h, w = image.shape
    if dim == 1:
        return _to_uint8(_accumulate_band(image, coeffs))
    # Put the columns first so that each tap gathers contiguous rows.
    columns = image.permute(2, 0, 1).reshape(1, w, c * h)
    acc = _accumulate_band(columns, coeffs)
    return _to_uint8(acc).view(-1, c, h).permute(1, 2, 0)


def _resample_axis(
    image: torch.Tensor, dim: int, out_size: int, method: Optional[str]
) -> torch.Tensor:
    in_size = image.shape[dim]
    dense = _use_dense(in_size, out_size, image.device) if method is None else method == "dense"
    coeffs = _axis_coeffs(in_size, out_size, image.device, dense)
    if coeffs.dense is not None:
        return _resample_dense(image, dim, coeffs.dense)
    return _resample_band(image, dim, coeffs)


def _vertical_first(release: Release, in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    # The 8-bit rounding between the passes makes the order visible in the output.
    if out_h >= in_h:
        return False
    if release.tall_ratio is not None:
        return in_h > release.tall_ratio * in_w
    if release.shrink_ratio is not None:
        return in_h - out_h > release.shrink_ratio * (in_w - out_w)
    return False


def _resize(
    image: torch.Tensor,
    out_h: int,
    out_w: int,
    *,
    pillow_version: str = NEWEST,
    method: Optional[str] = None,
) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image dtype must be torch.uint8, got {image.dtype}")
    if image.dim() != 3:
        raise ValueError(
            f"image must have rank 3 [C, H, W], got rank {image.dim()} "
            f"with shape {tuple(image.shape)}"
        )
    if image.numel() == 0:
        raise ValueError(
            f"image must be non-empty (C, H and W in [1, inf)), got shape {tuple(image.shape)}"
        )
    out_h = check_side("out_h", out_h)
    out_w = check_side("out_w", out_w)
    if method not in (None, "dense", "band"):
        raise ValueError(f"method must be None, 'dense' or 'band', got {method!r}")
    release = _check_release(pillow_version)

    _, in_h, in_w = image.shape
    passes = [(2, out_w), (1, out_h)]
    if _vertical_first(release, in_h, in_w, out_h, out_w):
        passes.reverse()
    result = image
    for dim, size in passes:
        # Pillow skips a pass whose size is unchanged; each pass that runs
        # stores its rounded, clipped 8-bit result before the next one reads it.
        if size != result.shape[dim]:
            result = _resample_axis(result, dim, size, method)
    if result is image:
        return image.clone()
    return result.contiguous()


def pillow_resize(
    image: torch.Tensor, out_h: int, out_w: int, *, pillow_version: str = NEWEST
) -> torch.Tensor:
    """Resize a uint8 ``[C, H, W]`` tensor to ``[C, out_h, out_w]`` on its own device.

    The result is bit-identical to
    ``PIL.Image.fromarray(hwc).resize((out_w, out_h), Image.BILINEAR)`` under
    the Pillow release line ``pillow_version`` (a key of :data:`RELEASES`;
    :func:`release_line` maps a full version string to one) for the same
    pixels (every channel is filtered independently, as Pillow does for "L",
    "RGB", "RGBX" and "CMYK" images).

    Raises:
        ValueError: if the dtype is not uint8, the rank is not 3, the tensor is
            empty, ``out_h``/``out_w`` are not integers in ``[1, 1024*1024]``,
            or ``pillow_version`` is not a key of :data:`RELEASES`.
    """
    return _resize(image, out_h, out_w, pillow_version=pillow_version)


def pillow_resize_hwc(
    image_hwc: torch.Tensor, out_h: int, out_w: int, *, pillow_version: str = NEWEST
) -> torch.Tensor:
    """Same as :func:`pillow_resize` for an ``[H, W, C]`` tensor; returns ``[out_h, out_w, C]``."""
    if not isinstance(image_hwc, torch.Tensor):
        raise TypeError(f"image_hwc must be a torch.Tensor, got {type(image_hwc).__name__}")
    if image_hwc.dim() != 3:
        raise ValueError(
            f"image_hwc must have rank 3 [H, W, C], got rank {image_hwc.dim()} "
            f"with shape {tuple(image_hwc.shape)}"
        )
    resized = pillow_resize(image_hwc.permute(2, 0, 1), out_h, out_w, pillow_version=pillow_version)
    return resized.permute(1, 2, 0).contiguous()
