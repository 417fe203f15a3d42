"""nvImageCodec decode with the batch split between the hardware engines and the CUDA decoder.

Every split must give the same pixels as Pillow within the nvjpeg tolerances of the README, keep
the batch's order, and fail a bad image alone.  Runs where a GPU and nvImageCodec are present.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tritonpipe.kernels import jpeg as J
from tritonpipe.kernels import nvimgcodec
from tritonpipe.kernels.errors import DecodeError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not nvimgcodec.available(), reason="needs nvImageCodec (nvidia-nvimgcodec-cu12/-cu13)"),
    pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning:torchvision"),
]


def _jpeg(height: int, width: int, seed: int, **options) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.int16)
    rgb += rng.integers(-10, 11, rgb.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


CASES = {
    "444": (_jpeg(96, 128, 0, subsampling=0), "cuda"),
    "420": (_jpeg(120, 160, 1, subsampling=2), "cuda_upsampled"),
    "422": (_jpeg(64, 80, 2, subsampling=1), "cuda_upsampled"),
    "progressive": (_jpeg(72, 100, 3, progressive=True, subsampling=0), "cuda"),
    "odd size": (_jpeg(37, 53, 4, subsampling=0), "cuda"),
}


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check(image: torch.Tensor, data: bytes, tolerance: str) -> None:
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    got = image.permute(1, 2, 0).cpu().numpy().astype(np.int16)
    assert got.shape == reference.shape
    diff = np.abs(got - reference)
    limits = J.DECODER_TOLERANCE[tolerance]
    assert diff.max() <= limits["max_abs"] and diff.mean() <= limits["mean_abs"], (diff.max(), diff.mean())


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("hw_load", [0.0, 0.65, 1.0])
def test_every_split_matches_pillow_in_order(hw_load, threads):
    names = list(CASES) * 4  # a batch large enough for both decoders to take a share
    datas = [_tensor(CASES[n][0]) for n in names]
    settings = nvimgcodec.Settings(hw_load=hw_load, threads=threads)
    results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvimgcodec", settings=settings)
    for name, image in zip(names, results):
        assert isinstance(image, torch.Tensor) and image.device.type == "cuda", name
        _check(image, *CASES[name])


def test_a_bad_image_fails_alone():
    good = CASES["420"][0]
    truncated = good[: len(good) // 3]
    results = J.decode_jpeg_tensor(
        [_tensor(good), _tensor(truncated), _tensor(good)], torch.device("cuda"), gpu_decoder="nvimgcodec"
    )
    assert isinstance(results[1], DecodeError)
    for image in (results[0], results[2]):
        _check(image, good, "cuda_upsampled")


@pytest.mark.parametrize("hw_load", [0.0, 1.0])
@pytest.mark.parametrize("name", ["420", "422"])
def test_fancy_upsampling_matches_pillow_chroma(name, hw_load):
    data, _ = CASES[name]
    settings = nvimgcodec.Settings(hw_load=hw_load, fancy_upsampling=True)
    (image,) = J.decode_jpeg_tensor([_tensor(data)] * 1, torch.device("cuda"), gpu_decoder="nvimgcodec", settings=settings)
    _check(image, data, "cuda_fancy")


def _damaged(data: bytes, how: str) -> bytes:
    """Headers and end marker intact, the entropy-coded data spoiled in the middle."""
    middle = len(data) // 2
    if how == "zeros":
        return data[:middle] + bytes(2000) + data[middle + 2000 :]
    if how == "noise":
        noise = np.random.default_rng(7).integers(0, 256, 2000, dtype=np.uint8).tobytes()
        return data[:middle] + noise + data[middle + 2000 :]
    return data[:middle] + b"\xff\xd9" + data[middle:]  # an early end marker, the rest after it


@pytest.mark.parametrize("threads", [1, 2])
def test_damaged_scans_among_good_images_keep_every_image_in_its_place(threads):
    """Images of different sizes around damaged ones: a shifted result would show in size or pixels."""
    goods = [_jpeg(96, 128, 10, subsampling=0), _jpeg(72, 100, 11, subsampling=0), _jpeg(40, 60, 12, subsampling=0)]
    source = _jpeg(120, 160, 13, subsampling=0)
    batch = [goods[0], _damaged(source, "zeros"), goods[1], _damaged(source, "noise"), goods[2], _damaged(source, "eoi")]
    settings = nvimgcodec.Settings(hw_load=0.65, threads=threads)
    results = J.decode_jpeg_tensor([_tensor(d) for d in batch], torch.device("cuda"), gpu_decoder="nvimgcodec", settings=settings)
    for index in (0, 2, 4):
        _check(results[index], batch[index], "cuda")
    for index in (1, 3, 5):
        result = results[index]
        # nvjpeg and libjpeg-turbo may refuse a damaged scan or decode it with errors; either way at its own size
        assert isinstance(result, DecodeError) or tuple(result.shape) == (3, 120, 160), (index, result)


@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_a_share_for_the_cuda_decoder_keeps_pixels_and_order(decoder):
    names = list(CASES) * 4
    datas = [_tensor(CASES[n][0]) for n in names]
    results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder=decoder, cuda_decoder_share=0.4)
    for name, image in zip(names, results):
        assert isinstance(image, torch.Tensor) and image.device.type == "cuda", name
        _check(image, *CASES[name])


def test_huffman_decoding_on_the_gpu_keeps_pixels_and_order():
    # hw_load 0: the CUDA decoder takes every image, and with a threshold of 0 decodes every Huffman stream on the GPU
    names = list(CASES) * 3
    datas = [_tensor(CASES[n][0]) for n in names]
    settings = nvimgcodec.Settings(hw_load=0.0, huffman_threshold=0)
    results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvimgcodec", settings=settings)
    for name, image in zip(names, results):
        assert isinstance(image, torch.Tensor) and image.device.type == "cuda", name
        _check(image, *CASES[name])
