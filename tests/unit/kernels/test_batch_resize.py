"""The one-launch batch resize against torch's ``F.interpolate`` and OpenCV, image by image.

On a machine without a GPU the Triton kernel runs under Triton's interpreter (in a child
process, since ``TRITON_INTERPRET`` is read when Triton is imported), so CI checks the kernel's
own arithmetic, not only the torch fallback.
"""

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritonpipe.kernels import batch_resize
from tritonpipe.kernels.batch_resize import resize_batch, resize_batch_reference

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIZES = [(37, 53), (20, 17), (64, 48), (5, 300), (224, 224), (1, 1)]


def images(sizes=SIZES, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, channels, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def interpolate(image, out_h, out_w):
    return F.interpolate(image.float(), size=(out_h, out_w), mode="bilinear", align_corners=False)


def test_reference_is_interpolate_then_normalise_image_by_image():
    batch = images()
    got = resize_batch_reference(batch, 24, 32, swap_rb=[True, False] * 3, mean=MEAN, std=STD, dtype=torch.float16)
    assert got.shape == (len(batch), 3, 24, 32) and got.dtype == torch.float16
    for row, (image, swap) in enumerate(zip(batch, [True, False] * 3)):
        want = interpolate(image, 24, 32)
        want = want.flip(1) if swap else want
        want = (want - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert torch.equal(got[row : row + 1], want.half())


def test_reference_agrees_with_opencv_bilinear():
    batch = images(seed=1)
    got = resize_batch_reference(batch, 40, 30)
    for row, image in enumerate(batch):
        hwc = image[0].permute(1, 2, 0).numpy().astype(np.float32)
        want = cv2.resize(hwc, (30, 40), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(got[row].permute(1, 2, 0).numpy(), want, atol=1e-2)  # float rounding, 10x downscale


def test_channels_last_views_are_read_in_place():
    batch = images(seed=2)
    hwc = [image[0].permute(1, 2, 0).contiguous() for image in batch]
    got = resize_batch_reference(hwc, 24, 32, channels_last=True)
    assert torch.equal(got, resize_batch_reference(batch, 24, 32))


@pytest.mark.parametrize(
    ("batch", "kwargs", "message"),
    [
        ([], {}, "at least one image"),
        (images([(4, 4)]) + images([(4, 4)], channels=1), {}, "one channel count"),
        (images([(4, 4)]), {"mean": (1.0, 2.0)}, "mean needs 1 or 3 values"),
        (images([(4, 4)]), {"swap_rb": [True, False]}, "2 flags for 1 images"),
        (images([(4, 4)], channels=1), {"swap_rb": True}, "needs 3 channels"),
        (images([(4, 4)]), {"dtype": torch.int32}, "writes"),
        ([torch.zeros(1, 3, 0, 4, dtype=torch.uint8)], {}, "empty image"),
        ([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], {}, "1xCxHxW or CxHxW"),
    ],
)
def test_bad_batches_are_refused_with_a_reason(batch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resize_batch(batch, 8, 8, **kwargs)


def test_bad_output_sides_are_refused():
    with pytest.raises(ValueError, match="resize_h must be an integer"):
        resize_batch(images([(4, 4)]), 0, 8)


def test_without_the_kernel_the_cpu_gets_the_reference():
    if batch_resize.kernel_available(torch.device("cpu")):
        pytest.skip("Triton's interpreter is on in this process")
    batch = images()
    assert torch.equal(resize_batch(batch, 24, 32, mean=MEAN, std=STD), resize_batch_reference(batch, 24, 32, mean=MEAN, std=STD))


# The kernel itself, under Triton's interpreter in a child process, against the reference.
_INTERPRETED = textwrap.dedent(
    """
    import json, sys, torch
    from tritonpipe.kernels import batch_resize
    assert batch_resize.kernel_available(torch.device("cpu")), "the interpreter did not take the kernel"
    generator = torch.Generator().manual_seed(3)
    sizes = [(37, 53), (20, 17), (64, 48), (5, 300), (1, 1), (300, 7)]
    planar = [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    hwc = [image[0].permute(1, 2, 0).contiguous() for image in planar]
    strided = [image[:, :, ::2, 1::3] for image in planar]  # views with strides of their own
    as_float = [image.float() for image in planar]
    swaps = [i % 2 == 0 for i in range(len(sizes))]
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    cases = {
        "plain": (planar, dict()),
        "upscale": (planar, dict(out=(96, 130))),
        "normalised_fp16_swapped": (planar, dict(mean=mean, std=std, dtype=torch.float16, swap_rb=swaps)),
        "channels_last": (hwc, dict(channels_last=True, mean=mean, std=std)),
        "strided": ([s for s in strided if min(s.shape[2:]) > 0], dict()),
        "float_input": (as_float, dict(dtype=torch.bfloat16)),
        "one_channel": ([image[:, :1] for image in planar], dict(mean=(10.0,), std=(2.0,))),
    }
    report = {}
    for name, (batch, kwargs) in cases.items():
        out_h, out_w = kwargs.pop("out", (24, 32))
        got = batch_resize.resize_batch(batch, out_h, out_w, **kwargs).float()
        want = batch_resize.resize_batch_reference(batch, out_h, out_w, **kwargs).float()
        report[name] = [list(got.shape), list(want.shape), float((got - want).abs().max())]
        # each image alone: a batch of one takes the kernel with the image's sides and strides as arguments
        alone = []
        for row, image in enumerate(batch):
            one = dict(kwargs, swap_rb=[swaps[row]]) if "swap_rb" in kwargs else kwargs
            got = batch_resize.resize_batch([image], out_h, out_w, **one).float()
            want = batch_resize.resize_batch_reference([image], out_h, out_w, **one).float()
            alone.append((list(got.shape), list(want.shape), float((got - want).abs().max())))
        report[name + "_alone"] = [[a[0] for a in alone], [a[1] for a in alone], max(a[2] for a in alone)]
    assert batch_resize._broken is None, "a kernel failed and the torch path answered: " + batch_resize._broken
    json.dump(report, sys.stdout)
    """
)

#: largest difference from the reference, by case: float32 rounding (FMA contraction) on values up
#: to 255, or one unit in the last place of the output dtype
_TOLERANCE = {"normalised_fp16_swapped": 2e-3, "float_input": 1.0, "one_channel": 1e-3}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


_CASES = ["plain", "upscale", "normalised_fp16_swapped", "channels_last", "strided", "float_input", "one_channel"]


@pytest.mark.parametrize("case", _CASES)
def test_the_triton_kernel_matches_the_reference(interpreted, case):
    got_shape, want_shape, difference = interpreted[case]
    assert got_shape == want_shape
    assert difference <= _TOLERANCE.get(case, 1e-3), f"{case}: largest difference {difference}"


@pytest.mark.parametrize("case", _CASES)
def test_the_one_image_kernel_matches_the_reference_image_by_image(interpreted, case):
    got_shapes, want_shapes, difference = interpreted[case + "_alone"]
    assert got_shapes == want_shapes and all(shape[0] == 1 for shape in got_shapes)
    assert difference <= _TOLERANCE.get(case, 1e-3), f"{case}, one image at a time: largest difference {difference}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_one_launch_matches_interpolate_on_the_gpu_in_a_batch_and_alone():
    batch = [image.cuda() for image in images(SIZES + [(1080, 1920), (3000, 1000)], seed=4)]
    got = resize_batch(batch, 224, 224, mean=MEAN, std=STD)
    for row, image in enumerate(batch):
        want = (interpolate(image, 224, 224) - torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)) / torch.tensor(
            STD, device="cuda"
        ).view(1, 3, 1, 1)
        assert (got[row : row + 1] - want).abs().max().item() <= 1e-4
        alone = resize_batch([image], 224, 224, mean=MEAN, std=STD)  # the one-image kernel
        assert (alone - want).abs().max().item() <= 1e-4
    assert batch_resize._broken is None


def test_a_kernel_that_cannot_launch_falls_back_once_and_for_all(monkeypatch, caplog):
    """No C compiler for Triton's launcher, say: the batch is still resized, by torch, and said once."""

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    class Launcher:
        def __getitem__(self, grid):
            return broken

    monkeypatch.setattr(batch_resize, "_broken", None)
    monkeypatch.setattr(batch_resize, "kernel_available", lambda device: batch_resize._broken is None)
    monkeypatch.setattr(batch_resize, "_kernel",
                        lambda: (Launcher(), Launcher(), {torch.uint8: "u8"}, lambda a, b: -(-a // b)))
    batch = images()
    with caplog.at_level("WARNING", logger="tritonpipe"):
        got = resize_batch(batch, 24, 32, mean=MEAN, std=STD)
    assert torch.equal(got, resize_batch_reference(batch, 24, 32, mean=MEAN, std=STD))
    assert "cannot run here (RuntimeError: Failed to find C compiler)" in caplog.text
    assert not batch_resize.kernel_available(torch.device("cuda"))


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_the_launch_tables_share_one_buffer_each_16_byte_aligned_with_the_right_values(count):
    views = [torch.zeros(3, 10 + i, 20 + i, dtype=torch.uint8)[:, 1:, :] for i in range(count)]
    swaps = [i % 2 == 1 for i in range(count)]
    geometries = [batch_resize._geometry(v, channels_last=False) for v in views]
    table, scales, norm = batch_resize._launch_tables(geometries, swaps, 7, 9, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 3,
                                                      torch.device("cpu"))
    assert table.untyped_storage().data_ptr() == scales.untyped_storage().data_ptr() == norm.untyped_storage().data_ptr()
    assert all(t.data_ptr() % 16 == 0 for t in (table, scales, norm))  # one compiled variant whatever the count
    rows = table.view(count, 7).tolist()
    assert rows == [[v.data_ptr(), v.shape[1], v.shape[2], *v.stride(), int(s)] for v, s in zip(views, swaps)]
    sides = torch.tensor([[9 + i, 20 + i] for i in range(count)], dtype=torch.float32)
    assert torch.equal(scales.view(count, 2), sides / torch.tensor([7.0, 9.0]))
    assert norm.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


# Triton's compiler is stricter than its interpreter: both kernels are compiled here for a Hopper GPU (sm_90), as
# a GPU compiles them at their first launch, with no GPU needed (Triton ships the assembler).
_ARGUMENTS = {"address": "i64", "height": "i32", "width": "i32", "stride_c": "i32", "stride_h": "i32", "stride_w": "i32",
              "swap": "i32", "scale_y": "fp32", "scale_x": "fp32", "norm_ptr": "*fp32", "out_h": "i32", "out_w": "i32",
              "table_ptr": "*i64", "scale_ptr": "*fp32"}


@pytest.mark.parametrize("name", ["resize_kernel", "resize_one_kernel"])
@pytest.mark.parametrize("in_type, out_type, normalise", [("uint8", "fp16", True), ("float32", "bf16", False)])
def test_the_kernels_compile_for_a_hopper_gpu(name, in_type, out_type, normalise):
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compiler interface")
    from tritonpipe.kernels import resize_triton

    kernel = getattr(resize_triton, name)
    constants = {"C": 3, "IN_TYPE": getattr(triton.language, in_type), "NORMALISE": normalise, "BLOCK": 512}
    signature = {arg: "constexpr" if arg in constants else ("*" + out_type if arg == "out_ptr" else _ARGUMENTS[arg])
                 for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".entry " + name in compiled.asm["ptx"]
