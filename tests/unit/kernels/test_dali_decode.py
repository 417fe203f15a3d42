"""DALI's mixed decoder, fed a batch in overlapping chunks, against Pillow.

Every chunking must give Pillow's pixels within the nvjpeg tolerances of the README, keep the
batch's order, and fail a bad image alone.  Runs where a GPU and DALI are present; the settings'
checks run everywhere.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tritonpipe.kernels import dali_decode
from tritonpipe.kernels import jpeg as J
from tritonpipe.kernels.errors import DecodeError

from .test_nvimgcodec import CASES, _check, _jpeg, _tensor

needs_dali = pytest.mark.skipif(
    not (torch.cuda.is_available() and dali_decode.available()), reason="needs a CUDA GPU and DALI (nvidia-dali-cuda120/-cuda130)"
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hw_load": 1.5}, "hw_load"), ({"chunk": 0}, "chunk"), ({"depth": 0}, "depth"), ({"threads": -1}, "threads")],
)
def test_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dali_decode.Settings(**kwargs)


@pytest.mark.parametrize(("chunk", "depth"), [(1, 1), (4, 2), (7, 3), (64, 2), (16, 4)])
@pytest.mark.parametrize("hw_load", [0.0, 0.65, 1.0])
@pytest.mark.gpu
@needs_dali
def test_every_chunking_matches_pillow_in_order(chunk, depth, hw_load, caplog):
    names = list(CASES) * 5  # not a multiple of most chunk sizes: the last chunk is short
    datas = [_tensor(CASES[n][0]) for n in names]
    settings = dali_decode.Settings(hw_load=hw_load, chunk=chunk, depth=depth)
    with caplog.at_level(logging.WARNING, logger="tritonpipe"):
        results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="dali", dali_settings=settings)
    # DALI decoded them: nothing went to the CPU decoder, whose pixels would pass the checks below too
    assert "DALI could not decode" not in caplog.text
    for name, image in zip(names, results):
        assert isinstance(image, torch.Tensor) and image.device.type == "cuda", name
        assert image.is_contiguous()
        _check(image, *CASES[name])


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
@pytest.mark.gpu
@needs_dali
def test_a_bad_image_fails_alone(damage):
    good = _jpeg(120, 160, 1, subsampling=2)
    if damage == "truncated":
        bad = good[: len(good) // 3]
    else:  # a valid header and end marker around scrambled entropy-coded data
        middle = bytearray(good[len(good) // 2 : -2])
        bad = good[: len(good) // 2] + bytes(b ^ 0x5A for b in middle) + good[-2:]
    settings = dali_decode.Settings(chunk=2, depth=2)
    results = J.decode_jpeg_tensor(
        [_tensor(good), _tensor(bad), _tensor(good), _tensor(good)], torch.device("cuda"), gpu_decoder="dali",
        dali_settings=settings,
    )
    for index in (0, 2, 3):
        assert isinstance(results[index], torch.Tensor), (index, results[index])
        _check(results[index], good, "cuda_upsampled")
    # a garbled file may decode to garbage (as libjpeg-turbo's may); it never takes the others down
    assert isinstance(results[1], (DecodeError, torch.Tensor))
    if damage == "truncated":
        assert isinstance(results[1], DecodeError)


@pytest.mark.gpu
@needs_dali
def test_photo_sizes_decode_on_the_gpu_as_libjpeg_turbo_does_within_tolerance(caplog):
    from tritonpipe.harness.corpus import photo_corpus

    photos = photo_corpus(6, seed=2).images
    with caplog.at_level(logging.WARNING, logger="tritonpipe"):
        results = J.decode_jpeg_tensor([_tensor(p) for p in photos], torch.device("cuda"), gpu_decoder="dali")
    assert "DALI could not decode" not in caplog.text
    for data, image in zip(photos, results):
        _check(image, data, "cuda_upsampled")
