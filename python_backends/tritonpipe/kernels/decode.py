"""Decoding JPEG, PNG, BMP and WebP on the CPU with OpenCV, as torchpipe's ``DecodeMat`` does.

Each format's header is read first, so that a truncated file, a wrong magic number or a
declared size over the pixel limit is refused with a clear DecodeError before OpenCV
allocates any pixel memory (a few hundred bytes can declare a gigapixel image).  JPEG goes
through :mod:`.jpeg`, which also reads EXIF orientation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from . import jpeg
from .errors import DecodeError

#: formats :func:`decode_image_cpu` reads
CPU_FORMATS = ("JPEG", "PNG", "BMP", "WebP")

# BMP info-header sizes: OS/2 core (12), Windows v1-v5 and their variants
_BMP_CORE = 12
_BMP_INFO_SIZES = frozenset({40, 52, 56, 64, 108, 124})
_BMP_DEPTHS = frozenset({1, 4, 8, 16, 24, 32})
# uncompressed layouts, whose pixel data size follows from the header: BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
_BMP_PLAIN = frozenset({0, 3, 6})
_BMP_RLE = frozenset({1, 2})
_WEBP_ANIMATED = 0x02  # VP8X flag bit


@dataclass(frozen=True)
class ImageInfo:
    format: str
    height: int
    width: int


def _check_size(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid {fmt}: the header declares a zero or negative dimension ({width}x{height})", reason="zero_size")
    pixels = width * height
    if pixels >= max_pixels:
        raise DecodeError(f"image is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels", reason="too_large")


def _png_info(view: memoryview, max_pixels: int) -> ImageInfo:
    size = len(view)
    if size < 33:
        raise DecodeError(f"truncated PNG: the {size}-byte input ends before the image header (IHDR)", reason="truncated")
    length, kind = struct.unpack_from(">I4s", view, 8)
    if kind != b"IHDR" or length != 13:
        raise DecodeError(f"corrupt PNG: the first chunk is {kind!r} of {length} bytes, not the 13-byte header IHDR", reason="corrupt")
    width, height = struct.unpack_from(">II", view, 16)
    _check_size("PNG", width, height, max_pixels)
    # Walk the chunk headers to IEND: OpenCV returns no error for some cut-off files.
    pos = 8
    while True:
        if pos + 12 > size:
            raise DecodeError(f"truncated PNG: the {size}-byte input ends before the end chunk (IEND)", reason="truncated")
        length, kind = struct.unpack_from(">I4s", view, pos)
        if pos + 12 + length > size:
            raise DecodeError(
                f"truncated PNG: chunk {kind.decode('latin-1')!r} at byte {pos} needs {length + 12} bytes "
                f"but the {size}-byte input ends first", reason="truncated"
            )
        if kind == b"IEND":
            return ImageInfo("PNG", height, width)
        pos += 12 + length


def _bmp_info(view: memoryview, max_pixels: int) -> ImageInfo:
    size = len(view)
    if size < 26:
        raise DecodeError(f"truncated BMP: the {size}-byte input ends inside the header", reason="truncated")
    offset, header = struct.unpack_from("<II", view, 10)
    if header == _BMP_CORE:
        width, height, _planes, depth = struct.unpack_from("<HHHH", view, 18)
        compression = 0
    elif header in _BMP_INFO_SIZES:
        if size < 14 + 40:
            raise DecodeError(f"truncated BMP: the {size}-byte input ends inside the {header}-byte info header", reason="truncated")
        width, height, _planes, depth, compression = struct.unpack_from("<iiHHI", view, 18)
        height = abs(height)  # negative: rows stored top-down
    else:
        raise DecodeError(f"corrupt BMP: unknown info-header size {header}; expected 12, 40, 52, 56, 64, 108 or 124", reason="corrupt")
    _check_size("BMP", width, height, max_pixels)
    if depth not in _BMP_DEPTHS:
        raise DecodeError(f"corrupt BMP: {depth} bits per pixel; expected one of {sorted(_BMP_DEPTHS)}", reason="corrupt")
    if compression in _BMP_PLAIN:
        needed = offset + (width * depth + 31) // 32 * 4 * height  # rows padded to 4 bytes
        if needed > size:
            raise DecodeError(f"truncated BMP: the {width}x{height} pixels need {needed} bytes, the input has {size}", reason="truncated")
    elif compression not in _BMP_RLE:
        raise DecodeError(f"unsupported BMP: compression type {compression} (embedded JPEG or PNG) is not read", reason="unsupported_format")
    return ImageInfo("BMP", height, width)


def _webp_frame_size(fourcc: bytes, payload: memoryview) -> tuple[int, int]:
    """(width, height) from a VP8 or VP8L bitstream header."""
    if fourcc == b"VP8 ":
        if len(payload) < 10 or bytes(payload[3:6]) != b"\x9d\x01\x2a":
            raise DecodeError("corrupt WebP: the VP8 frame header has no start code 9D 01 2A", reason="corrupt")
        width, height = struct.unpack_from("<HH", payload, 6)
        return width & 0x3FFF, height & 0x3FFF
    if len(payload) < 5 or payload[0] != 0x2F:
        raise DecodeError("corrupt WebP: the VP8L header has no signature byte 2F", reason="corrupt")
    (bits,) = struct.unpack_from("<I", payload, 1)
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _webp_info(view: memoryview, max_pixels: int) -> ImageInfo:
    size = len(view)
    if size < 20:
        raise DecodeError(f"truncated WebP: the {size}-byte input ends inside the header", reason="truncated")
    (riff,) = struct.unpack_from("<I", view, 4)
    end = 8 + riff
    if end > size:
        raise DecodeError(f"truncated WebP: the RIFF header declares {end} bytes, the input has {size}", reason="truncated")
    if bytes(view[12:16]) not in (b"VP8 ", b"VP8L", b"VP8X"):
        raise DecodeError(f"corrupt WebP: the first chunk is {bytes(view[12:16])!r}, expected VP8, VP8L or VP8X", reason="corrupt")
    frames: list[tuple[int, int]] = []
    pos = 12
    while pos + 8 <= end:
        fourcc = bytes(view[pos : pos + 4])
        (length,) = struct.unpack_from("<I", view, pos + 4)
        if pos + 8 + length > end:
            raise DecodeError(f"truncated WebP: chunk {fourcc!r} at byte {pos} needs {length + 8} bytes, the input ends first", reason="truncated")
        payload = view[pos + 8 : pos + 8 + length]
        if fourcc == b"VP8X":
            if length < 10:
                raise DecodeError(f"corrupt WebP: the VP8X chunk is {length} bytes, expected 10", reason="corrupt")
            if payload[0] & _WEBP_ANIMATED:
                raise DecodeError("animated WebP is not supported; send one frame as a still image", reason="unsupported_format")
            frames.append((1 + int.from_bytes(payload[4:7], "little"), 1 + int.from_bytes(payload[7:10], "little")))
        elif fourcc in (b"VP8 ", b"VP8L"):
            frames.append(_webp_frame_size(fourcc, payload))
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    if len(frames) < 2 and bytes(view[12:16]) == b"VP8X":
        raise DecodeError("corrupt WebP: an extended (VP8X) file without image data (VP8 or VP8L chunk)", reason="corrupt")
    for width, height in frames:
        _check_size("WebP", width, height, max_pixels)
    width, height = frames[-1]
    return ImageInfo("WebP", height, width)


_READERS = {"PNG": _png_info, "BMP": _bmp_info, "WebP": _webp_info}


def read_image_info(data, *, max_pixels: int = jpeg.MAX_PIXELS) -> ImageInfo:
    """Read and check the header of a JPEG, PNG, BMP or WebP file, decoding no pixels."""
    view = jpeg.bytes_view(data)
    if len(view) == 0:
        raise DecodeError("empty input: expected the bytes of an image file, got 0 bytes", reason="empty")
    fmt = jpeg.sniff_format(bytes(view[:16]))
    if fmt == "JPEG":
        info = jpeg.read_jpeg_info(view, max_pixels=max_pixels)
        return ImageInfo("JPEG", info.height, info.width)
    if fmt in _READERS:
        return _READERS[fmt](view, max_pixels)
    if fmt is not None:
        raise DecodeError(f"got a {fmt} image; this stage reads {', '.join(CPU_FORMATS)}", reason="unsupported_format")
    raise DecodeError(
        f"not a {', '.join(CPU_FORMATS[:-1])} or {CPU_FORMATS[-1]} image: unknown first bytes {bytes(view[:8]).hex(' ')}", reason="unsupported_format"
    )


def decode_image_cpu(data, *, apply_exif: bool = False, max_pixels: int = jpeg.MAX_PIXELS) -> torch.Tensor:
    """Decode one JPEG, PNG, BMP or WebP file with OpenCV into an HxWx3 uint8 BGR tensor.

    Alpha is dropped and 16-bit samples are scaled to 8 bits, as ``cv2.IMREAD_COLOR`` does.
    ``apply_exif`` applies a JPEG's EXIF orientation; other formats are left as stored.
    """
    view = jpeg.bytes_view(data)
    if jpeg.sniff_format(bytes(view[:2])) == "JPEG":
        return jpeg.decode_jpeg_cpu(view, apply_exif=apply_exif, max_pixels=max_pixels)
    info = read_image_info(view, max_pixels=max_pixels)
    array = np.frombuffer(view, dtype=np.uint8)
    bgr = cv2.imdecode(array, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape[:2] != (info.height, info.width):
        raise DecodeError(f"{info.format} data is corrupt: OpenCV could not decode the {info.width}x{info.height} image", reason="corrupt")
    return torch.from_numpy(bgr)
