"""DecodeMat's formats beyond JPEG (PNG, BMP, WebP): decoded as OpenCV decodes them, hostile files refused."""

from __future__ import annotations

import io
import re
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tritonpipe.kernels import decode as D
from tritonpipe.kernels.errors import DecodeError
from tritonpipe.pipeline.grammar import parse_backend
from tritonpipe.stages import build_stage


def picture(height=37, width=53, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(fmt: str, rgb: np.ndarray, **options) -> bytes:
    """Encoded by Pillow, so the decoder under test never reads its own encoder's output."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **options)
    return out.getvalue()


def t(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def cases() -> dict[str, bytes]:
    rgb = picture()
    out = {
        "PNG": encoded("PNG", rgb),
        "PNG with alpha": encoded("PNG", np.dstack([rgb, rgb[..., :1]])),
        "PNG palette": (lambda b: (Image.fromarray(rgb).convert("P").save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "BMP": encoded("BMP", rgb),
        "BMP 8-bit gray": encoded("BMP", rgb[..., 0]),
        "WebP lossless": encoded("WEBP", rgb, lossless=True),
        "WebP lossy": encoded("WEBP", rgb, quality=80),
    }
    ok, top_down = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    out["PNG by OpenCV"] = top_down.tobytes()
    return out


CASES = cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_opencv(name):
    data = CASES[name]
    got = D.decode_image_cpu(t(data))
    want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
    np.testing.assert_array_equal(got.numpy(), want)
    info = D.read_image_info(t(data))
    assert (info.height, info.width) == (37, 53) and info.format.lower() == name.split()[0].lower()


@pytest.mark.parametrize("name", ["PNG", "BMP", "WebP lossless"])
def test_lossless_formats_give_back_the_pixels(name):
    np.testing.assert_array_equal(D.decode_image_cpu(t(CASES[name])).numpy()[..., ::-1], picture())


def test_jpeg_still_goes_through_the_jpeg_decoder(jpeg_factory):
    data = jpeg_factory(30, 40)
    np.testing.assert_array_equal(
        D.decode_image_cpu(t(data)).numpy(), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    )


# --- hostile variants ---------------------------------------------------------------------


def png_sized(width: int, height: int) -> bytes:
    data = bytearray(CASES["PNG"])
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def bmp_sized(width: int, height: int) -> bytes:
    data = bytearray(CASES["BMP"])
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def webp_vp8x(width: int, height: int, flags: int = 0) -> bytes:
    """A VP8X file declaring a canvas of width x height around the small lossless image."""
    inner = CASES["WebP lossless"][12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0])
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l_sized(width: int, height: int) -> bytes:
    data = bytearray(CASES["WebP lossless"])
    assert data[12:16] == b"VP8L"
    bits = struct.unpack_from("<I", data, 21)[0] & ~((1 << 28) - 1)
    struct.pack_into("<I", data, 21, bits | (width - 1) | (height - 1) << 14)
    return bytes(data)


def wrong_magic(data: bytes) -> bytes:
    return b"\x00" + data[1:]


HOSTILE = {
    "PNG truncated": (CASES["PNG"][: len(CASES["PNG"]) // 2], "truncated PNG: chunk 'IDAT'"),
    "PNG header only": (CASES["PNG"][:20], "truncated PNG"),
    "PNG no IEND": (CASES["PNG"][:-12], "ends before the end chunk (IEND)"),
    "PNG huge": (png_sized(60000, 60000), "image is 60000x60000 (3600000000 pixels); the limit is 25000000"),
    "PNG zero": (png_sized(0, 10), "invalid PNG"),
    "PNG wrong magic": (wrong_magic(CASES["PNG"]), "not a JPEG, PNG, BMP or WebP image"),
    "PNG chunk not IHDR": (CASES["PNG"][:12] + b"IDAT" + CASES["PNG"][16:], "not the 13-byte header IHDR"),
    "BMP truncated": (CASES["BMP"][: len(CASES["BMP"]) // 2], "truncated BMP: the 53x37 pixels need"),
    "BMP header only": (CASES["BMP"][:20], "truncated BMP"),
    "BMP huge": (bmp_sized(60000, -60000), "image is 60000x60000"),
    "BMP zero": (bmp_sized(0, 37), "invalid BMP"),
    "BMP wrong magic": (b"BN" + CASES["BMP"][2:], "not a JPEG, PNG, BMP or WebP image"),
    "BMP odd header": (CASES["BMP"][:14] + struct.pack("<I", 99) + CASES["BMP"][18:], "unknown info-header size 99"),
    "WebP truncated": (CASES["WebP lossy"][: len(CASES["WebP lossy"]) // 2], "truncated WebP: the RIFF header declares"),
    "WebP huge canvas": (webp_vp8x(60000, 60000), "image is 60000x60000"),
    "WebP huge frame": (webp_vp8l_sized(16384, 16384), "image is 16384x16384"),
    "WebP animated": (webp_vp8x(53, 37, flags=0x02), "animated WebP is not supported"),
    "WebP wrong magic": (b"RIFX" + CASES["WebP lossy"][4:], "not a JPEG, PNG, BMP or WebP image"),
    "WebP wrong chunk": (CASES["WebP lossy"][:12] + b"ABCD" + CASES["WebP lossy"][16:], "corrupt WebP: the first chunk"),
    "GIF": (encoded("GIF", picture()), "got a GIF image; this stage reads JPEG, PNG, BMP, WebP"),
    "TIFF": (encoded("TIFF", picture()), "got a TIFF image"),
    "empty": (b"", "empty input"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_before_decoding(name, monkeypatch):
    data, words = HOSTILE[name]

    def no_decode(*args, **kwargs):
        raise AssertionError("OpenCV was asked to decode a refused file")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    with pytest.raises(DecodeError, match=re.escape(words)):
        D.decode_image_cpu(t(data))


def test_hostile_variants_are_what_they_claim(monkeypatch):
    # the huge PNG and BMP really declare what their names say (Pillow agrees once its own limit is lifted)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert Image.open(io.BytesIO(png_sized(60000, 60000))).size == (60000, 60000)
    assert Image.open(io.BytesIO(bmp_sized(60000, -60000))).size == (60000, 60000)


def test_pixel_limit_is_configurable():
    data = CASES["PNG"]
    with pytest.raises(DecodeError, match="the limit is 1961 pixels"):
        D.decode_image_cpu(t(data), max_pixels=37 * 53)
    assert D.decode_image_cpu(t(data), max_pixels=37 * 53 + 1).shape == (37, 53, 3)


@pytest.mark.parametrize("backend", ["DecodeMat(max_pixels=1961)", "DecodeTensor(max_pixels=1961)"])
def test_decode_stages_take_max_pixels(backend, jpeg_factory):
    stage = build_stage(parse_backend(backend), "cpu")
    items = [{"data": t(jpeg_factory(37, 53))}, {"data": t(jpeg_factory(36, 53))}]
    stage.forward(items)
    assert "the limit is 1961 pixels" in str(items[0]["error"]) and "result" in items[1]


def test_decode_tensor_names_what_it_refuses():
    stage = build_stage(parse_backend("DecodeTensor"), "cpu")
    items = [{"data": t(CASES[name])} for name in ("PNG", "BMP", "WebP lossy")]
    stage.forward(items)
    assert [str(item["error"]) for item in items] == [
        f"got a {fmt} image; this stage decodes JPEG only" for fmt in ("PNG", "BMP", "WebP")
    ]


@pytest.mark.parametrize("name", ["PNG", "BMP", "WebP lossless", "WebP lossy"])
def test_damaged_files_only_raise_stage_errors(name):
    rng = np.random.default_rng(1)
    original = np.frombuffer(CASES[name], np.uint8)
    for _ in range(300):
        data = original.copy()
        spots = rng.integers(0, min(len(data), 64), rng.integers(1, 4))  # the headers live up front
        data[spots] = rng.integers(0, 256, len(spots))
        data = data[: rng.integers(1, len(data) + 1)] if rng.random() < 0.3 else data
        try:
            image = D.decode_image_cpu(torch.from_numpy(data))
        except DecodeError:
            continue
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[2] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_tensor_on_the_gpu_keeps_the_limit_and_names_other_formats(jpeg_factory):
    stage = build_stage(parse_backend("DecodeTensor(max_pixels=1961)"), "cuda")
    small = jpeg_factory(36, 53)
    items = [{"data": t(jpeg_factory(37, 53))}, {"data": t(small)}, {"data": t(CASES["PNG"])}]
    stage.forward(items)
    assert "the limit is 1961 pixels" in str(items[0]["error"])
    assert str(items[2]["error"]) == "got a PNG image; this stage decodes JPEG only"
    decoded = items[1]["result"]
    assert decoded.device.type == "cuda" and tuple(decoded.shape) == (1, 3, 36, 53)
    want = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].transpose(2, 0, 1)
    # nvjpeg's chroma upsampling differs from libjpeg-turbo's (README: decoder tolerance)
    assert np.abs(decoded[0].cpu().numpy().astype(int) - want).mean() <= 6.0
