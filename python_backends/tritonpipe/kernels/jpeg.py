"""JPEG header inspection and decoding (OpenCV on CPU, torchvision/nvjpeg on GPU).

Every decode reads the marker structure first, so that malformed, truncated,
non-JPEG or oversized inputs are refused with a clear DecodeError before any
pixel memory is allocated.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torchvision.io as tvio

from . import dali_decode, nvimgcodec, nvjpeg
from .errors import DecodeError
from .threads import submit_in_callers_mode

log = logging.getLogger("tritonpipe")

MAX_PIXELS = 5000 * 5000

# Allowed absolute difference, per uint8 channel value, between these decoders and
# Pillow's (libjpeg-turbo). Measured with tests/unit/test_jpeg.py on baseline,
# progressive and restart-marker images, 4:4:4 to 4:1:1, grayscale and CMYK.
DECODER_TOLERANCE = {
    # OpenCV, torchvision and Pillow all wrap libjpeg-turbo with the same defaults
    # (islow IDCT, fancy upsampling), so YCbCr and grayscale images match bit for bit
    # (seen with two different sets of versions of the three libraries).
    "cpu": {"max_abs": 0, "mean_abs": 0.0},
    # OpenCV's CMYK->BGR conversion divides by 256 where Pillow and torchvision
    # divide by 255: nearly every value comes out one lower (measured mean 0.99).
    "cpu_cmyk": {"max_abs": 1, "mean_abs": 1.0},
    # nvjpeg where no chroma interpolation is involved: 4:4:4 and grayscale match
    # exactly (same IDCT results); 4:1:1, which libjpeg-turbo also upsamples by
    # plain replication, measured max 3, mean 0.04.
    "cuda": {"max_abs": 4, "mean_abs": 0.25},
    # nvjpeg on 4:2:2 and 4:2:0: libjpeg-turbo interpolates the chroma ("fancy
    # upsampling") and nvjpeg evidently does not, so sharp colour edges differ a
    # lot while flat areas agree (measured on an H200: max 96, mean 4.2).
    "cuda_upsampled": {"max_abs": 128, "mean_abs": 6.0},
    # nvImageCodec with fancy_upsampling: nvjpeg interpolates 4:2:0 and 4:2:2 chroma as
    # libjpeg-turbo does (measured on an H200: the hardware engines max 1, mean 0.0002;
    # the CUDA decoder max 3, mean 0.034, the same as on 4:4:4).
    "cuda_fancy": {"max_abs": 4, "mean_abs": 0.1},
}

# Writers may leave a few bytes (zeros, 0xFF fill, a newline) after EOI; files
# with more than this after their last EOI are treated as truncated.
_EOI_TAIL_SLACK = 1024

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# SOF0..SOF15 minus DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers that stand alone, without a length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# markers the segment walk's quick path leaves to its careful one: fill, standalone markers, end of image
_NOT_PLAIN = _STANDALONE | {0xFF, 0xD9}

_ORIENTATION_TAG = 0x0112
_SOF_FIELDS = struct.Struct(">BHHB")  # precision, height, width, components
_SEGMENT = struct.Struct(">BBH")  # FF, marker, length: a segment's first four bytes


class JpegInfo(NamedTuple):
    """What a JPEG's headers say (a tuple: it is made once per image on the serving path, where a frozen
    dataclass costs twice the time)."""

    height: int
    width: int
    components: int
    progressive: bool
    orientation: int  # EXIF orientation 1..8; 1 when absent or unreadable


def bytes_view(data) -> memoryview:
    if isinstance(data, torch.Tensor):
        if not data.is_cpu:
            raise DecodeError(f"encoded image must be in CPU memory, got a tensor on {data.device}", reason="not_bytes")
        data = (data.detach() if data.requires_grad else data).numpy()  # detach() alone costs a microsecond
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise DecodeError(
                f"encoded image must be a 1-D uint8 array, got dtype {data.dtype} with shape {tuple(data.shape)}", reason="not_bytes"
            )
        return memoryview(np.ascontiguousarray(data)).cast("B")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    raise DecodeError(f"encoded image must be bytes or a 1-D uint8 array, got {type(data).__name__}", reason="not_bytes")


def sniff_format(head: bytes) -> str | None:
    """The image format that a file's first bytes announce (JPEG, PNG, GIF, BMP, TIFF, WebP), or None."""
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)


def _not_jpeg(view: memoryview) -> DecodeError:
    head = bytes(view[:16])
    kind = sniff_format(head)
    if kind is not None:
        return DecodeError(f"got a {kind} image; this stage decodes JPEG only", reason="not_jpeg")
    return DecodeError(
        f"not a JPEG image: it does not start with the JPEG SOI marker FF D8 (first bytes: {head[:8].hex(' ')})", reason="not_jpeg"
    )


def _exif_orientation(payload: memoryview) -> int:
    """Orientation from an APP1 payload; 1 when it is not EXIF or is malformed.

    A broken EXIF block does not make the pixels unreadable, so it never fails the image.
    """
    if bytes(payload[:6]) != b"Exif\x00\x00":
        return 1
    tiff = payload[6:]
    order = bytes(tiff[:2])
    if order == b"II":
        endian = "<"
    elif order == b"MM":
        endian = ">"
    else:
        return 1
    try:
        magic, ifd = struct.unpack_from(endian + "HI", tiff, 2)
        if magic != 42:
            return 1
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, n = struct.unpack_from(endian + "HHI", tiff, entry)
            if tag == _ORIENTATION_TAG:
                # SHORT (type 3), value stored inline in the first two bytes.
                (value,) = struct.unpack_from(endian + "H", tiff, entry + 8)
                return value if kind == 3 and n >= 1 and 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def read_jpeg_info(data, *, max_pixels: int = MAX_PIXELS) -> JpegInfo:
    """Parse the JPEG headers (no pixel decoding) and validate size and integrity."""
    view = bytes_view(data)
    size = len(view)
    if size == 0:
        raise DecodeError("empty input: expected JPEG bytes, got 0 bytes", reason="empty")
    if size < 2 or view[0] != 0xFF or view[1] != 0xD8:
        raise _not_jpeg(view)

    orientation = 1
    frame = None  # (SOF marker, height, width, components)
    pos = 2
    # Walk every header segment up to the first scan (SOS): a file whose headers
    # end without one has no pixels, and nvjpeg crashes the process on it.
    while True:
        # the usual segment is read in one call, 2.5x faster than byte by byte: FF, a marker with a length field,
        # a length that fits.  Anything else (fill bytes, standalone markers, end of image, damage) is read byte by
        # byte, which gives the errors
        ff, marker, length = _SEGMENT.unpack_from(view, pos) if pos + 4 <= size else (0, 0, 0)
        if ff == 0xFF and marker not in _NOT_PLAIN and length >= 2 and pos + 2 + length <= size \
                and (marker != 0xDA or frame is not None):
            start, pos = pos + 4, pos + 2 + length
        else:
            if pos >= size:
                what = "frame header (SOF)" if frame is None else "image data (SOS)"
                raise DecodeError(f"truncated JPEG: the {size}-byte input ends before the {what}", reason="truncated")
            if view[pos] != 0xFF:
                raise DecodeError(f"corrupt JPEG header: expected a marker at byte {pos}, found 0x{view[pos]:02X}", reason="corrupt")
            while pos < size and view[pos] == 0xFF:  # fill bytes may pad before a marker
                pos += 1
            if pos >= size:
                continue  # reported as truncated at the top of the loop
            marker = view[pos]
            pos += 1
            if marker in _STANDALONE:
                continue
            if marker == 0xD9:
                what = "frame header (SOF)" if frame is None else "image data (SOS)"
                raise DecodeError(f"corrupt JPEG: end-of-image marker before any {what}", reason="corrupt")
            if marker == 0xDA and frame is None:
                raise DecodeError("corrupt JPEG header: image data (SOS) before the frame header (SOF)", reason="corrupt")
            if pos + 2 > size:
                raise DecodeError(f"truncated JPEG: the header is cut off at byte {size}", reason="truncated")
            length = view[pos] << 8 | view[pos + 1]
            if length < 2:
                raise DecodeError(f"corrupt JPEG header: segment FF {marker:02X} at byte {pos - 2} has length {length}", reason="corrupt")
            if pos + length > size:
                raise DecodeError(
                    f"truncated JPEG: segment FF {marker:02X} at byte {pos - 2} needs {length} bytes "
                    f"but the {size}-byte input ends first", reason="truncated"
                )
            start, pos = pos + 2, pos + length
        # the segment's payload is view[start:pos]
        if marker == 0xDA:
            break
        if marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(view[start:pos])
        elif frame is None and marker in _SOF_MARKERS:
            if length < 8:
                raise DecodeError(f"corrupt JPEG header: frame header FF {marker:02X} is only {length - 2} bytes", reason="corrupt")
            _precision, height, width, components = _SOF_FIELDS.unpack_from(view, start)
            frame = (marker, height, width, components)

    sof, height, width, components = frame
    if height == 0 or width == 0:
        raise DecodeError(f"invalid JPEG: frame header declares a zero dimension ({width}x{height})", reason="zero_size")
    pixels = height * width
    if pixels >= max_pixels:
        raise DecodeError(f"image is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels", reason="too_large")
    ends_with_eoi = size - 2 >= pos and view[size - 2] == 0xFF and view[size - 1] == 0xD9  # most files: no search
    if not ends_with_eoi and b"\xff\xd9" not in bytes(view[max(pos, size - _EOI_TAIL_SLACK) :]):
        raise DecodeError(f"truncated JPEG: no end-of-image marker (FF D9) at the end of the {size}-byte input", reason="truncated")
    return JpegInfo(height, width, components, sof in _PROGRESSIVE_SOF, orientation)


def _orient(image: torch.Tensor, orientation: int, h_dim: int, w_dim: int) -> torch.Tensor:
    """Apply EXIF orientation to a tensor whose rows/columns are dims h_dim/w_dim."""
    if orientation <= 1 or orientation > 8:
        return image
    if orientation >= 5:  # 5..8 swap the axes first, then flip like 1..4
        image = image.transpose(h_dim, w_dim)
    flips = {
        2: (w_dim,), 3: (h_dim, w_dim), 4: (h_dim,),
        5: (), 6: (w_dim,), 7: (h_dim, w_dim), 8: (h_dim,),
    }[orientation]
    if flips:
        image = image.flip(flips)
    return image.contiguous()


def decode_jpeg_cpu(data, *, apply_exif: bool = False, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode one JPEG with OpenCV into an HxWx3 uint8 BGR tensor."""
    info = read_jpeg_info(data, max_pixels=max_pixels)
    array = np.frombuffer(bytes_view(data), dtype=np.uint8)
    # Orientation is applied below from our own parse, so that it is the same for
    # every decoder (and off unless asked for).
    bgr = cv2.imdecode(array, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.size == 0:
        raise DecodeError(f"JPEG data is corrupt: OpenCV could not decode the {info.width}x{info.height} image", reason="corrupt")
    image = torch.from_numpy(bgr)
    if apply_exif:
        image = _orient(image, info.orientation, 0, 1)
    return image


def _reason(exc: Exception) -> str:
    """First line of a torchvision error, without its C++ source location."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    return re.sub(r"^.*\.cpp:\d+, ", "", lines[0])


def _decode_hwc(data: torch.Tensor) -> torch.Tensor:
    """HWC RGB through torchvision's libjpeg-turbo decoder (handles grayscale, CMYK and YCCK), nothing copied."""
    try:
        # torchvision hands back a CHW view of an HWC buffer
        image = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB).permute(1, 2, 0)
    except RuntimeError as exc:
        raise DecodeError(f"JPEG data is corrupt: {_reason(exc)}", reason="corrupt") from None
    return image if image.is_contiguous() else image.contiguous()


def _decode_on_cpu(data: torch.Tensor) -> torch.Tensor:
    """Dense CHW RGB through torchvision's libjpeg-turbo decoder (see :func:`_decode_hwc`)."""
    return _decode_hwc(data).permute(2, 0, 1).contiguous()


def _decode_on_gpu(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """nvjpeg decode; None where nvjpeg could not decode an image."""
    rgb = tvio.ImageReadMode.RGB
    try:
        # One batched call lets nvjpeg use the hardware decoder across the batch.
        return list(tvio.decode_jpeg(datas, mode=rgb, device=device))
    except RuntimeError:
        pass
    # A single undecodable image fails the whole batch: retry alone to isolate it.
    results: list[torch.Tensor | None] = []
    for data in datas:
        try:
            results.append(tvio.decode_jpeg(data, mode=rgb, device=device))
        except RuntimeError:
            results.append(None)
    return results


GPU_DECODERS = ("torchvision", "nvjpeg", "nvimgcodec", "dali")


def _nvimgcodec_images(datas: list[torch.Tensor], device: torch.device, stream: int, settings: nvimgcodec.Settings) -> list:
    """nvImageCodec's images for ``datas`` (see :mod:`.nvimgcodec`); safe to call from any thread."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nvimgcodec.decode([data.numpy() for data in datas], index, stream, settings)


def _as_tensors(images: list, infos: list[JpegInfo]) -> list[torch.Tensor | None]:
    """3xHxW tensors of nvImageCodec images; None where one failed or has the wrong shape."""
    results: list[torch.Tensor | None] = []
    for image, info in zip(images, infos):
        # DLPack orders the tensor on this thread's current stream, after the decode
        planar = torch.from_dlpack(image) if image is not None else None
        if planar is None or tuple(planar.shape) != (3, info.height, info.width):
            results.append(None)
            continue
        results.append(planar)
    return results


def _decode_on_gpu_nvimgcodec(
    datas: list[torch.Tensor], infos: list[JpegInfo], device: torch.device, settings: nvimgcodec.Settings
) -> list[torch.Tensor | None]:
    """nvImageCodec decode; None where it failed or gave the wrong shape."""
    stream = torch.cuda.current_stream(device).cuda_stream
    return _as_tensors(_nvimgcodec_images(datas, device, stream, settings), infos)


def _decode_on_gpu_nvjpeg(
    datas: list[torch.Tensor], infos: list[JpegInfo], device: torch.device, lanes: int = nvjpeg.LANES
) -> list[torch.Tensor | None]:
    """nvjpeg's hardware decoder driven directly (see :mod:`.nvjpeg`), a batch in ``lanes`` parts in flight:
    3xHxW views of its interleaved images, nothing copied; torchvision decodes what the engines do not
    take; None where either failed."""
    found = nvjpeg.decoder(device, lanes)
    if isinstance(found, str):
        _warn_once(f"decoder=nvjpeg cannot run here ({found}); torchvision decodes instead")
        return _decode_on_gpu(datas, device)
    datas = [data.contiguous() for data in datas]
    candidates = [i for i, info in enumerate(infos) if info.components == 3 and not info.progressive]
    results: list[torch.Tensor | None] = [None] * len(datas)
    decoded = found.decode([datas[i] for i in candidates], [(infos[i].height, infos[i].width) for i in candidates]) if candidates else []
    for i, image in zip(candidates, decoded):
        if isinstance(image, torch.Tensor):
            results[i] = image.permute(2, 0, 1)
    not_taken = set(range(len(datas))) - set(candidates)
    rest = sorted(not_taken | {i for i, image in zip(candidates, decoded) if image is False})
    for i, image in zip(rest, _decode_on_gpu([datas[i] for i in rest], device) if rest else []):
        results[i] = image
    return results


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _decode_on_gpu_dali(
    datas: list[torch.Tensor], infos: list[JpegInfo], device: torch.device, settings: dali_decode.Settings
) -> list[torch.Tensor | None]:
    """DALI decode (see :mod:`.dali_decode`); None where it failed or gave the wrong shape."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    images = dali_decode.decode([data.numpy() for data in datas], index, torch.cuda.current_stream(device), settings)
    return [
        image if image is not None and tuple(image.shape) == (3, info.height, info.width) else None
        for image, info in zip(images, infos)
    ]


def split_by_bytes(sizes: list[int], share: float, smallest_first: bool = False) -> tuple[list[int], list[int]]:
    """Indices into (rest, side): ``side`` holds about ``share`` of the bytes, largest images first (or
    smallest first).

    Each image goes to the side while the side stays within its share, so the side never holds
    more than ``share`` of the bytes, and holds nothing when ``share`` is 0.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    budget = share * sum(sizes)
    side: list[int] = []
    taken = 0
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i] if smallest_first else -sizes[i]):
        if taken + sizes[index] <= budget:
            side.append(index)
            taken += sizes[index]
    chosen = set(side)
    return [i for i in range(len(sizes)) if i not in chosen], sorted(side)


#: where :class:`ShareBalance` starts when no share is given
BALANCE_START = 0.05


class ShareBalance:
    """A host share of each batch that follows the host: after each batch the share moves toward the one at
    which the host threads' part would have taken as long as the GPU decoder's part (timed with CUDA
    events), so that neither waits for the other however busy the cores and the engines are.

    ``share`` is the share to use next.  :meth:`observe` takes one batch's measurement: the share of the
    bytes the host took, the host's seconds from the split to its last image, and the GPU decoder's seconds.
    A batch whose share held no image measures nothing; the share then creeps up by :attr:`CREEP` until
    the host gets an image again, so a share that fell to nothing comes back when the engines get busier.
    A batch of fewer than :attr:`MIN_BATCH` images goes to the GPU decoder whole: batches that small mean
    the engines have time to spare, and one image on one core would take longer than they take.
    """

    GAIN = 0.5  # how far each batch moves the share toward the balanced one
    CREEP = 0.002
    HIGH = 0.5  # at most half of each batch's bytes goes to the host
    MIN_BATCH = 8

    def __init__(self, start: float) -> None:
        self.share = min(max(start, 0.0), self.HIGH)
        # (start event, end event, host share, host seconds) of the batches not read yet, oldest first
        self._pending: collections.deque = collections.deque(maxlen=8)

    def observe(self, host_share: float, host_seconds: float, gpu_seconds: float) -> None:
        if not 0.0 < host_share < 1.0 or host_seconds <= 0.0 or gpu_seconds <= 0.0:
            return
        host_per_share = host_seconds / host_share
        gpu_per_share = gpu_seconds / (1.0 - host_share)
        balanced = gpu_per_share / (host_per_share + gpu_per_share)
        self.share = min(max(self.share + self.GAIN * (balanced - self.share), 0.0), self.HIGH)

    def nothing_taken(self) -> None:
        self.share = min(self.share + self.CREEP, self.HIGH)

    def record(self, start: torch.cuda.Event, end: torch.cuda.Event, host_share: float, host_seconds: float) -> None:
        """Keep a batch's events, to be read by :meth:`settle` once the GPU has passed them (the last few
        batches' are kept, for a caller that does not wait for the GPU between batches)."""
        self._pending.append((start, end, host_share, host_seconds))

    def settle(self) -> None:
        """Observe, oldest first, the batches whose decode the GPU has finished (never waits for one)."""
        while self._pending and self._pending[0][1].query():
            start, end, host_share, host_seconds = self._pending.popleft()
            self.observe(host_share, host_seconds, start.elapsed_time(end) / 1000.0)


_side_thread: ThreadPoolExecutor | None = None
_side_lock = threading.Lock()
_host_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


def _side_executor() -> ThreadPoolExecutor:
    """The process's one thread for the CUDA decoder's share: two batches in flight queue their shares on it."""
    global _side_thread
    with _side_lock:
        if _side_thread is None:
            _side_thread = ThreadPoolExecutor(1, thread_name_prefix="cuda-decoder-share")
        return _side_thread


def _host_executor(threads: int) -> ThreadPoolExecutor:
    """The process's threads for the host's share of a batch (one pool, made again if the count changes)."""
    global _host_pool
    if _host_pool is None or _host_pool[0] != threads:
        if _host_pool is not None:
            _host_pool[1].shutdown(wait=False)
        _host_pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="cpu-decoder-share"))
    return _host_pool[1]


def _with_side_share(
    indices: list[int], datas: list[torch.Tensor], share: float, start_side, decode_on_gpu, smallest_first: bool = False,
) -> list[tuple[int, torch.Tensor | DecodeError | None]]:
    """``decode_on_gpu`` of ``indices``, but for ``share`` of their bytes (the largest images, or with
    ``smallest_first`` the smallest), which another decoder decodes meanwhile: ``start_side(side_indices)`` starts
    it and returns a call that waits for its images.  (index, image, a DecodeError or None) pairs."""
    if share <= 0:
        return list(zip(indices, decode_on_gpu(indices)))
    rest_positions, side_positions = split_by_bytes([len(datas[i]) for i in indices], share, smallest_first)
    rest, side = [indices[p] for p in rest_positions], [indices[p] for p in side_positions]
    wait = start_side(side) if side else list
    try:
        decoded = list(zip(rest, decode_on_gpu(rest))) if rest else []
    finally:
        side_images = wait()
    return decoded + list(zip(side, side_images))


def _cuda_decoder_side(datas, infos, device: torch.device, settings: nvimgcodec.Settings):
    """``start_side`` for nvImageCodec's CUDA decoder (Huffman decoding on host threads), on a thread of its own."""
    def start(side: list[int]):
        side_settings = dataclasses.replace(settings, hw_load=0.0, threads=1)
        stream = torch.cuda.current_stream(device).cuda_stream
        pending = _side_executor().submit(_nvimgcodec_images, [datas[i] for i in side], device, stream, side_settings)
        return lambda: _as_tensors(pending.result(), [infos[i] for i in side])
    return start


def _staged(image: torch.Tensor) -> torch.Tensor:
    """``image`` copied into page-locked memory by the calling thread alone.  torch's own copy of an image
    (``pin_memory``, ``contiguous``) runs as a parallel region over all of torch's threads (every core in a GPU
    instance), so the host share's threads started one such region per image each, side by side."""
    staged = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
    np.copyto(staged.numpy(), image.numpy())
    return staged


#: the host share's copies leave on a stream of each host thread's own (False: on the caller's stream, behind
#: the GPU decoder's part of the batch, as they did; kept for the probes' side-by-side rows)
HOST_COPY_OWN_STREAM = True
_copy_streams = threading.local()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's own stream for the host share's copies to ``device``."""
    streams = getattr(_copy_streams, "by_device", None)
    if streams is None:
        streams = _copy_streams.by_device = {}
    key = torch.cuda.current_device() if device.index is None else device.index
    if key not in streams:
        streams[key] = torch.cuda.Stream(torch.device("cuda", key))
    return streams[key]


def _host_copy(data: torch.Tensor, device: torch.device, stream, into: torch.Tensor | None = None,
               ready: torch.cuda.Event | None = None) -> tuple[torch.Tensor | DecodeError, torch.cuda.Event | None]:
    """One image by libjpeg-turbo, on its way to ``device``, or why it failed; and the event ``stream`` (the
    caller's) must wait for before it reads the image (None: nothing to wait for).  The image is a 3xHxW view of an
    HxWx3 image there (as nvjpeg's images are), in ``into`` where given and of the image's shape: an HxWx3 slot on
    the device that ``stream`` allocated before ``ready``, an event on ``stream`` (given with ``into``).  Off CUDA
    (``stream`` None), a dense 3xHxW image.

    The copy leaves from page-locked memory at once, on a stream of the calling thread's own: on ``stream`` it
    would wait behind the GPU decoder's part of the batch queued there, each staged image's page-locked block
    held until then (so that torch's pool took new ones from the driver meanwhile), and the copies would sit
    between the decoder's calls in that stream's queue."""
    try:
        image = _decode_hwc(data)
    except DecodeError as exc:
        return exc, None
    if stream is None:
        return image.permute(2, 0, 1).contiguous().to(device), None
    try:
        staged = _staged(image)
    except RuntimeError:  # no page-locked memory to be had: the plain copy, which waits, still delivers
        with torch.cuda.stream(stream):
            return image.to(device).permute(2, 0, 1), None
    fits = into is not None and into.shape == staged.shape
    side = _copy_stream(device) if HOST_COPY_OWN_STREAM else stream
    with torch.cuda.stream(side):
        if fits:
            side.wait_event(ready)
            target = into
        else:
            target = torch.empty(staged.shape, dtype=staged.dtype, device=device)
            target.record_stream(stream)  # read there next: not handed to this stream's allocations before
        target.copy_(staged, non_blocking=True)
        done = side.record_event()
    return target.permute(2, 0, 1), done


def _decode_on_host_to(data: torch.Tensor, device: torch.device, stream) -> torch.Tensor | DecodeError:
    """:func:`_host_copy`, with ``stream`` made to wait for the copy: the image, or why it failed."""
    image, done = _host_copy(data, device, stream)
    if done is not None:
        stream.wait_event(done)
    return image


#: the host share's images of a batch land in one device allocation, made on the caller's thread before
#: the threads start, rather than one allocation per image from whichever thread decoded it
HOST_ONE_BUFFER = True


def _device_slots(shapes: list[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
    """An HxWx3 uint8 view for each (height, width), all in one allocation on ``device`` (the current stream's)."""
    sizes = [3 * height * width for height, width in shapes]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    slots, offset = [], 0
    for (height, width), size in zip(shapes, sizes):
        slots.append(buffer[offset : offset + size].view(height, width, 3))
        offset += size
    return slots


def _host_copy_timed(data: torch.Tensor, device: torch.device, stream, into: torch.Tensor | None,
                     ready: torch.cuda.Event | None):
    return *_host_copy(data, device, stream, into, ready), time.perf_counter()


def _host_side(datas, device: torch.device, threads: int, took: list[tuple[float, int]] | None = None,
               shapes: list[tuple[int, int]] | None = None):
    """``start_side`` for libjpeg-turbo on ``threads`` host threads, each image copied to the GPU as soon as it is
    decoded (see :func:`_host_copy`); the caller's stream waits for the copies, so that the stages after the decode
    find the images there in order.
    Its share is best filled with the smallest images (``smallest_first``): one core decodes a large image
    in longer than the engines take for a batch, and the engines pay most per byte for the small ones.
    ``took``, where given, gets (the host's seconds, the bytes it took) for each batch.  With ``shapes``, the
    (height, width) of every image of ``datas``, the share's images land in one allocation (see
    :data:`HOST_ONE_BUFFER`): the caching allocator then sees one block per batch instead of one per image,
    cut from whichever thread got there first."""
    def start(side: list[int]):
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        one_buffer = stream is not None and shapes is not None and HOST_ONE_BUFFER
        slots = _device_slots([shapes[i] for i in side], device) if one_buffer else [None] * len(side)
        ready = stream.record_event() if one_buffer else None  # the slots' memory is free from here on the stream
        pool, began = _host_executor(threads), time.perf_counter()
        # in the caller's inference mode: the slots were made in it (see submit_in_callers_mode)
        pending = [submit_in_callers_mode(pool, _host_copy_timed, datas[i], device, stream, slot, ready)
                   for i, slot in zip(side, slots)]

        def wait() -> list[torch.Tensor | DecodeError]:
            done = [future.result() for future in pending]
            for _, copied, _ in done:  # the caller's stream reads the images after their copies, nothing before
                if copied is not None:
                    stream.wait_event(copied)
            if took is not None:  # seconds from the split to the last image, and the share's bytes
                took.append((max(at for _, _, at in done) - began, sum(len(datas[i]) for i in side)))
            return [image for image, _, _ in done]
        return wait
    return start


def _timed_on_gpu(decode_on_gpu, device: torch.device, events: list):
    """``decode_on_gpu`` between two timing events on the caller's stream, which go into ``events``."""
    def decode(indices: list[int]) -> list[torch.Tensor | None]:
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        images = decode_on_gpu(indices)
        end.record(stream)
        events[:] = [start, end]
        return images
    return decode


def decode_jpeg_tensor(
    datas: list[torch.Tensor],
    device: torch.device,
    *,
    apply_exif: bool = False,
    max_pixels: int = MAX_PIXELS,
    gpu_decoder: str = "torchvision",
    settings: nvimgcodec.Settings | None = None,
    cuda_decoder_share: float = 0.0,
    dali_settings: dali_decode.Settings | None = None,
    nvjpeg_lanes: int = nvjpeg.LANES,
    cpu_decoder_share: float = 0.0,
    cpu_decoder_threads: int = 1,
    balance: ShareBalance | None = None,
) -> list[torch.Tensor | DecodeError]:
    """Decode JPEGs into CHW uint8 RGB tensors on `device`; one tensor or DecodeError per input.

    ``gpu_decoder`` picks nvjpeg through torchvision, nvjpeg's hardware decoder driven directly
    (:mod:`.nvjpeg`, a batch in ``nvjpeg_lanes`` parts in flight), nvImageCodec (with ``settings``) or
    DALI (with ``dali_settings``) on CUDA devices.  ``cuda_decoder_share`` of the batch's bytes goes to nvImageCodec's CUDA decoder
    (Huffman decoding on host threads, ``settings.cpu_threads`` of them), on a thread of its own,
    while ``gpu_decoder`` decodes the rest: the hardware engines and the CUDA decoder then work at
    the same time.  ``cpu_decoder_share`` of the bytes goes instead to libjpeg-turbo on ``cpu_decoder_threads``
    host threads, smallest images first, each image copied to the device when decoded (cores the GPU's
    decoders leave idle).  With ``balance``, the host's share is the balance's, which each batch moves
    (see :class:`ShareBalance`), and ``cpu_decoder_share`` is not read.
    """
    if cuda_decoder_share > 0 and (cpu_decoder_share > 0 or balance is not None):
        raise ValueError("give cuda_decoder_share or cpu_decoder_share, not both")
    if gpu_decoder not in GPU_DECODERS:
        raise ValueError(f"gpu_decoder must be one of {GPU_DECODERS}, got {gpu_decoder!r}")
    device = torch.device(device)
    settings = settings or nvimgcodec.Settings()
    results: list[torch.Tensor | DecodeError | None] = [None] * len(datas)
    infos: list[JpegInfo | None] = [None] * len(datas)
    for i, data in enumerate(datas):
        try:
            infos[i] = read_jpeg_info(data, max_pixels=max_pixels)
        except DecodeError as exc:
            results[i] = exc
    valid = [i for i, info in enumerate(infos) if info is not None]

    def decode_on_gpu(indices: list[int]) -> list[torch.Tensor | None]:
        if gpu_decoder == "dali":
            chosen = [infos[i] for i in indices]
            return _decode_on_gpu_dali([datas[i] for i in indices], chosen, device, dali_settings or dali_decode.Settings())
        if gpu_decoder == "nvjpeg":
            return _decode_on_gpu_nvjpeg([datas[i] for i in indices], [infos[i] for i in indices], device, nvjpeg_lanes)
        if gpu_decoder == "nvimgcodec":
            return _decode_on_gpu_nvimgcodec([datas[i] for i in indices], [infos[i] for i in indices], device, settings)
        return _decode_on_gpu([datas[i] for i in indices], device)

    on_cpu = valid
    if device.type == "cuda":
        # torchvision does not enable nvjpeg's CMYK conversion, so 4-component
        # images (CMYK/YCCK) always fail there; libjpeg-turbo reads them.
        on_gpu = [i for i in valid if infos[i].components != 4]
        on_cpu = [i for i in valid if infos[i].components == 4]
        if on_gpu:
            # every GPU decoder here drives the hardware engines, which write when called (see nvjpeg.drain)
            nvjpeg.drain(torch.cuda.current_stream(device))
            on_host = balance is not None or cpu_decoder_share > 0
            shapes = [(info.height, info.width) if info is not None else (0, 0) for info in infos] if on_host else None
            took: list[tuple[float, int]] = []
            if balance is not None:
                balance.settle()
                share = balance.share if len(on_gpu) >= balance.MIN_BATCH else 0.0
                start_side = _host_side(datas, device, cpu_decoder_threads, took, shapes)
            elif on_host:
                share, start_side = cpu_decoder_share, _host_side(datas, device, cpu_decoder_threads, shapes=shapes)
            else:
                share, start_side = cuda_decoder_share, _cuda_decoder_side(datas, infos, device, settings)
            events: list[torch.cuda.Event] = []
            decode_rest = _timed_on_gpu(decode_on_gpu, device, events) if balance is not None else decode_on_gpu
            for i, image in _with_side_share(on_gpu, datas, share, start_side, decode_rest, on_host):
                if image is None:
                    on_cpu.append(i)  # nvjpeg refused it; libjpeg-turbo may be more lenient
                else:
                    results[i] = image
            if balance is not None and share > 0 and not took:
                balance.nothing_taken()
            elif balance is not None and took and events:
                seconds, host_bytes = took[0]
                balance.record(events[0], events[1], host_bytes / sum(len(datas[i]) for i in on_gpu), seconds)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" and on_cpu else None
    for i in on_cpu:
        results[i] = _decode_on_host_to(datas[i], device, stream)

    if apply_exif:
        for i in valid:
            if isinstance(results[i], torch.Tensor):
                results[i] = _orient(results[i], infos[i].orientation, 1, 2)
    return results
