"""Bit-exact parity of ``pillow_resize`` with the installed Pillow's bilinear resize."""

import math

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from tritonpipe.kernels import pillow_resize as kernel
from tritonpipe.kernels.pillow_resize import MAX_SIDE, pillow_resize, pillow_resize_hwc, release_line

BILINEAR = Image.Resampling.BILINEAR
CUDA = torch.cuda.is_available()


# Releases differ in the order of the two passes; compare with the Pillow installed here
# (tests/unit/kernels/test_pillow_releases.py covers the others)
INSTALLED = release_line(PIL.__version__)



# --------------------------------------------------------------------------- helpers


def pil_reference(hwc: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pillow's bilinear resize of an HxWxC uint8 array (C in 1, 3, 4)."""
    h, w, c = hwc.shape
    if c == 1:
        im = Image.fromarray(hwc[:, :, 0])
    elif c == 3:
        im = Image.fromarray(hwc)
    elif c == 4:
        # "RGBX", not "RGBA": Pillow premultiplies alpha before resizing RGBA.
        im = Image.frombytes("RGBX", (w, h), np.ascontiguousarray(hwc).tobytes())
    else:
        raise AssertionError(f"no Pillow mode for {c} channels")
    out = np.asarray(im.resize((out_w, out_h), BILINEAR))
    return out.reshape(out_h, out_w, c)


def torch_resize(hwc: np.ndarray, out_h: int, out_w: int, device="cpu", **kwargs) -> np.ndarray:
    chw = torch.from_numpy(hwc).permute(2, 0, 1).to(device)
    kwargs.setdefault("pillow_version", INSTALLED)
    if "method" in kwargs:
        out = kernel._resize(chw, out_h, out_w, **kwargs)
    else:
        out = pillow_resize(chw, out_h, out_w, **kwargs)
    assert out.dtype == torch.uint8
    assert out.device == chw.device
    assert tuple(out.shape) == (hwc.shape[2], out_h, out_w)
    return out.permute(1, 2, 0).cpu().numpy()


def assert_same(ours: np.ndarray, ref: np.ndarray, what) -> None:
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() == 0, (
        f"{what}: max |diff| = {diff.max()}, {np.count_nonzero(diff)} of {diff.size} values differ"
    )


def noise(seed: int, h: int, w: int, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _log_uniform_int(rng, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.499)))))


KINDS = (
    "free", "free", "free", "in_1xN", "in_Nx1", "in_1x1", "out_1xN", "out_Nx1",
    "out_1x1", "keep_w", "keep_h", "free",
)


def random_pairs(n: int, seed: int, max_in: int = 300, max_out: int = 600):
    """(in_h, in_w, out_h, out_w, channels) with per-axis scales in [1/50, 50]."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        sides = []
        for _ in range(2):
            scale = math.exp(rng.uniform(math.log(1 / 50), math.log(50)))
            # Cap the input so that large upscales stay within max_out.
            in_side = _log_uniform_int(rng, 1, max(1, min(max_in, int(max_out / scale))))
            out_side = min(max_out, max(1, int(round(in_side * scale))))
            sides.append((in_side, out_side))
        (in_h, out_h), (in_w, out_w) = sides
        kind = KINDS[i % len(KINDS)]
        if kind == "in_1xN":
            in_h = 1
        elif kind == "in_Nx1":
            in_w = 1
        elif kind == "in_1x1":
            in_h = in_w = 1
        elif kind == "out_1xN":
            out_h = 1
        elif kind == "out_Nx1":
            out_w = 1
        elif kind == "out_1x1":
            out_h = out_w = 1
        elif kind == "keep_w":
            out_w = in_w
        elif kind == "keep_h":
            out_h = in_h
        channels = 1 if i % 13 == 5 else 4 if i % 17 == 3 else 3
        pairs.append((in_h, in_w, out_h, out_w, channels))
    return pairs


CPU_PAIRS = random_pairs(520, seed=20240521)
DENSE_PAIRS = random_pairs(160, seed=777)
GPU_PAIRS = random_pairs(300, seed=4242)

LARGE_CASES = [
    (1080, 1920, 224, 224),
    (1920, 1080, 224, 224),
    (720, 1280, 360, 640),
    (480, 640, 1080, 1920),
    (3000, 4000, 60, 80),
    (1, 4000, 1, 80),
    (4000, 1, 80, 1),
    (2, 3000, 100, 60),
]

# Pillow 13 runs the vertical pass first iff the height shrinks by more than
# twice as many pixels as the width; these straddle that rule.
ORDER_CASES = [
    (120, 100, 80, 80),  # 40 == 2 * 20: horizontal first
    (120, 100, 79, 80),  # 41 > 2 * 20: vertical first
    (100, 50, 99, 80),  # width grows: vertical first
    (100, 50, 100, 80),  # height kept: horizontal only
    (200, 200, 50, 120),  # 150 < 2 * 80: horizontal first
    (200, 200, 50, 130),  # 150 > 2 * 70: vertical first
    (301, 17, 33, 16),
    (64, 300, 8, 299),
]


def _vertical_first(in_h, in_w, out_h, out_w):
    return 0 < in_h - out_h and in_h - out_h > 2 * (in_w - out_w)


# --------------------------------------------------------------------------- parity


def test_random_pairs_cover_the_brief():
    ratios = [o / i for ih, iw, oh, ow, _ in CPU_PAIRS for i, o in ((ih, oh), (iw, ow))]
    assert len(CPU_PAIRS) >= 500
    assert min(ratios) <= 1 / 40 and max(ratios) >= 40
    assert any(ih == 1 and iw > 1 for ih, iw, *_ in CPU_PAIRS)
    assert any(iw == 1 and ih > 1 for ih, iw, *_ in CPU_PAIRS)
    assert any(ih == iw == 1 for ih, iw, *_ in CPU_PAIRS)
    assert any(oh == 1 and ow > 1 for _, _, oh, ow, _ in CPU_PAIRS)
    assert any(ow == 1 and oh > 1 for _, _, oh, ow, _ in CPU_PAIRS)
    assert any(oh == ow == 1 for _, _, oh, ow, _ in CPU_PAIRS)
    assert sum(ih != iw for ih, iw, *_ in CPU_PAIRS) > 400
    assert sum(_vertical_first(*p[:4]) for p in CPU_PAIRS) > 50


@pytest.mark.parametrize("index", range(len(CPU_PAIRS)))
def test_matches_pillow_cpu(index):
    in_h, in_w, out_h, out_w, c = CPU_PAIRS[index]
    hwc = noise(index, in_h, in_w, c)
    assert_same(torch_resize(hwc, out_h, out_w), pil_reference(hwc, out_h, out_w), CPU_PAIRS[index])


@pytest.mark.parametrize("index", range(len(DENSE_PAIRS)))
def test_dense_path_matches_pillow_cpu(index):
    # The GEMM form is what CUDA uses by default; check its arithmetic here too.
    in_h, in_w, out_h, out_w, c = DENSE_PAIRS[index]
    hwc = noise(10_000 + index, in_h, in_w, c)
    ours = torch_resize(hwc, out_h, out_w, method="dense")
    assert_same(ours, pil_reference(hwc, out_h, out_w), DENSE_PAIRS[index])


@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_large_images_match_pillow(case):
    in_h, in_w, out_h, out_w = case
    hwc = noise(sum(case), in_h, in_w)
    assert_same(torch_resize(hwc, out_h, out_w), pil_reference(hwc, out_h, out_w), case)


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_pass_order_rule_matches_pillow(case):
    in_h, in_w, out_h, out_w = case
    hwc = noise(99, in_h, in_w)
    assert_same(torch_resize(hwc, out_h, out_w), pil_reference(hwc, out_h, out_w), case)


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_legacy_order_matches_two_single_axis_pillow_resizes(case):
    # Pillow 9.0 - 12.1 always ran the horizontal pass first; chaining a width-only
    # and a height-only Pillow resize reproduces that exactly.
    in_h, in_w, out_h, out_w = case
    hwc = noise(98, in_h, in_w)
    ref = pil_reference(pil_reference(hwc, in_h, out_w), out_h, out_w)
    assert_same(torch_resize(hwc, out_h, out_w, pillow_version="12.1"), ref, case)


def test_pass_order_is_observable():
    # Guards the two order tests above against vacuity: the orders differ.
    differing = 0
    for case in ORDER_CASES:
        if _vertical_first(*case):
            hwc = noise(97, case[0], case[1])
            new = torch_resize(hwc, case[2], case[3], pillow_version="13")
            old = torch_resize(hwc, case[2], case[3], pillow_version="12.1")
            differing += int(not np.array_equal(new, old))
    assert differing >= 2


def test_smooth_and_saturated_content():
    ramp = np.linspace(0, 255, 97 * 131 * 3).reshape(97, 131, 3).astype(np.uint8)
    checker = ((np.indices((64, 80)).sum(0) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[:, :, None], 3, axis=2)
    for hwc in (ramp, checker, np.full((40, 30, 3), 255, np.uint8), np.zeros((5, 7, 3), np.uint8)):
        for out_h, out_w in ((1, 1), (13, 200), (300, 9), (hwc.shape[0] * 3, hwc.shape[1] // 2 + 1)):
            assert_same(
                torch_resize(hwc, out_h, out_w), pil_reference(hwc, out_h, out_w), (hwc.shape, out_h, out_w)
            )


# --------------------------------------------------------------------------- HWC helper, misc


@pytest.mark.parametrize("index", range(0, 520, 37))
def test_hwc_helper_matches_pillow(index):
    in_h, in_w, out_h, out_w, _ = CPU_PAIRS[index]
    hwc = noise(5_000 + index, in_h, in_w)
    out = pillow_resize_hwc(torch.from_numpy(hwc), out_h, out_w)
    assert out.shape == (out_h, out_w, 3) and out.is_contiguous()
    assert_same(out.numpy(), pil_reference(hwc, out_h, out_w), CPU_PAIRS[index])


def test_non_contiguous_input():
    big = noise(3, 120, 160)
    view = big[10:110:2, 5:155:3]  # strided in both axes
    chw = torch.from_numpy(np.ascontiguousarray(big)).permute(2, 0, 1)[:, 10:110:2, 5:155:3]
    assert not chw.is_contiguous()
    out = pillow_resize(chw, 37, 71)
    assert_same(out.permute(1, 2, 0).numpy(), pil_reference(np.ascontiguousarray(view), 37, 71), "strided")


def test_same_size_returns_an_equal_copy():
    x = torch.from_numpy(noise(4, 9, 11)).permute(2, 0, 1)
    out = pillow_resize(x, 9, 11)
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


def test_input_is_not_modified():
    x = torch.from_numpy(noise(5, 33, 47)).permute(2, 0, 1).contiguous()
    before = x.clone()
    pillow_resize(x, 20, 90)
    assert torch.equal(x, before)


def test_coefficients_are_cached():
    x = torch.from_numpy(noise(6, 50, 60)).permute(2, 0, 1)
    pillow_resize(x, 31, 43)
    hits = kernel._axis_coeffs.cache_info().hits
    pillow_resize(x, 31, 43)
    assert kernel._axis_coeffs.cache_info().hits == hits + 2


# --------------------------------------------------------------------------- argument errors


def test_rejects_wrong_dtype():
    with pytest.raises(ValueError, match=r"uint8.*float32"):
        pillow_resize(torch.zeros(3, 4, 4, dtype=torch.float32), 2, 2)
    with pytest.raises(ValueError, match=r"uint8.*int16"):
        pillow_resize(torch.zeros(3, 4, 4, dtype=torch.int16), 2, 2)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"rank 3.*rank 2"):
        pillow_resize(torch.zeros(4, 4, dtype=torch.uint8), 2, 2)
    with pytest.raises(ValueError, match=r"rank 3.*rank 4"):
        pillow_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2, 2)
    with pytest.raises(ValueError, match=r"rank 3.*rank 2"):
        pillow_resize_hwc(torch.zeros(4, 4, dtype=torch.uint8), 2, 2)


def test_rejects_out_of_range_sizes():
    x = torch.zeros(3, 4, 4, dtype=torch.uint8)
    limit = rf"\[1, {MAX_SIDE}\]"
    assert MAX_SIDE == 1024 * 1024
    with pytest.raises(ValueError, match=rf"out_h.*{limit}.*got 0"):
        pillow_resize(x, 0, 2)
    with pytest.raises(ValueError, match=rf"out_w.*{limit}.*got {MAX_SIDE + 1}"):
        pillow_resize(x, 2, MAX_SIDE + 1)
    with pytest.raises(ValueError, match=rf"out_w.*{limit}.*got -3"):
        pillow_resize(x, 2, -3)
    with pytest.raises(ValueError, match=r"out_h.*integer.*2\.5"):
        pillow_resize(x, 2.5, 2)
    with pytest.raises(ValueError, match=r"out_w.*integer.*True"):
        pillow_resize(x, 2, True)


def test_rejects_empty_input():
    with pytest.raises(ValueError, match=r"non-empty.*\(3, 0, 5\)"):
        pillow_resize(torch.zeros(3, 0, 5, dtype=torch.uint8), 2, 2)
    with pytest.raises(ValueError, match=r"non-empty.*\(0, 4, 5\)"):
        pillow_resize(torch.zeros(0, 4, 5, dtype=torch.uint8), 2, 2)


def test_accepts_numpy_integers_and_rejects_non_tensors():
    x = torch.from_numpy(noise(8, 6, 7)).permute(2, 0, 1)
    assert pillow_resize(x, np.int64(3), np.int32(5)).shape == (3, 3, 5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pillow_resize(np.zeros((3, 4, 4), np.uint8), 2, 2)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("index", range(len(GPU_PAIRS)))
def test_matches_pillow_cuda(index):
    in_h, in_w, out_h, out_w, c = GPU_PAIRS[index]
    hwc = noise(20_000 + index, in_h, in_w, c)
    ref = pil_reference(hwc, out_h, out_w)
    assert_same(torch_resize(hwc, out_h, out_w, device="cuda"), ref, GPU_PAIRS[index])
    if index % 3 == 0:
        ours = torch_resize(hwc, out_h, out_w, device="cuda", method="band")
        assert_same(ours, ref, ("band",) + GPU_PAIRS[index])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA is not available")
@pytest.mark.parametrize(
    "case", LARGE_CASES + [(3000, 4000, 1500, 2000)], ids=lambda c: "{}x{}->{}x{}".format(*c)
)
def test_large_images_match_pillow_cuda(case):
    # The last case is above the dense-matrix limit, so CUDA takes the band form.
    in_h, in_w, out_h, out_w = case
    hwc = noise(sum(case), in_h, in_w)
    ref = pil_reference(hwc, out_h, out_w)
    assert_same(torch_resize(hwc, out_h, out_w, device="cuda"), ref, case)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_pass_orders_match_pillow_cuda(case):
    in_h, in_w, out_h, out_w = case
    hwc = noise(96, in_h, in_w)
    assert_same(torch_resize(hwc, out_h, out_w, device="cuda"), pil_reference(hwc, out_h, out_w), case)
    legacy = pil_reference(pil_reference(hwc, in_h, out_w), out_h, out_w)
    ours = torch_resize(hwc, out_h, out_w, device="cuda", pillow_version="12.1")
    assert_same(ours, legacy, ("legacy",) + case)
