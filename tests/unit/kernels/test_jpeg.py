"""JPEG kernels: header parsing, CPU/GPU decoding against Pillow, and refusal of bad input."""

from __future__ import annotations

import io
import re
import struct
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features

from tritonpipe.kernels import jpeg as J
from tritonpipe.kernels.errors import DecodeError

# torchvision 0.29 flags its image codecs as deprecated on every call.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning:torchvision")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- image makers


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """RGB test picture: smooth colour ramps, a hard-edged block and mild noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + 2 * yy) * 3 % 256], axis=-1
    ).astype(np.int16)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (230, 20, 40)
    rgb += np.random.default_rng(seed).integers(-12, 13, rgb.shape, dtype=np.int16)
    return rgb.clip(0, 255).astype(np.uint8)


def _pil_jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _cv_jpeg(rgb: np.ndarray, *params: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    return encoded.tobytes()


def _exif_block(orientation: int, big_endian: bool) -> bytes:
    """A minimal APP1 EXIF payload holding only the orientation tag."""
    e = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    tiff += struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    return b"Exif\x00\x00" + tiff


def _segments(data: bytes):
    """(marker, offset of its FF, payload) for each header segment up to SOS."""
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        length = struct.unpack_from(">H", data, pos + 2)[0]
        yield marker, pos, data[pos + 4 : pos + 2 + length]
        if marker == 0xDA:
            return
        pos += 2 + length


def _sof(data: bytes):
    return next((m, off, p) for m, off, p in _segments(data) if m in (0xC0, 0xC1, 0xC2))


def _luma_sampling(data: bytes) -> tuple[int, int]:
    payload = _sof(data)[2]
    factors = payload[7]  # first component: id, then H<<4|V
    return factors >> 4, factors & 0x0F


def _with_frame_size(data: bytes, height: int, width: int) -> bytes:
    _, offset, _ = _sof(data)
    patched = bytearray(data)
    struct.pack_into(">HH", patched, offset + 5, height, width)
    return bytes(patched)


def _t(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


# name -> (jpeg bytes, expected JpegInfo)
def _make_variants() -> dict[str, tuple[bytes, J.JpegInfo]]:
    v = {}

    def add(name, data, h, w, components=3, progressive=False, orientation=1):
        v[name] = (data, J.JpegInfo(h, w, components, progressive, orientation))

    add("444", _pil_jpeg(Image.fromarray(_picture(48, 64)), subsampling=0), 48, 64)
    add("422", _pil_jpeg(Image.fromarray(_picture(45, 70, 1)), subsampling=1), 45, 70)
    add("420", _pil_jpeg(Image.fromarray(_picture(64, 96, 2)), subsampling=2), 64, 96)
    sampling_411 = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411)
    add("411", _cv_jpeg(_picture(48, 80, 3), *sampling_411), 48, 80)
    sampling_440 = (cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440)
    add("440", _cv_jpeg(_picture(48, 80, 9), *sampling_440), 48, 80)
    add("gray", _pil_jpeg(Image.fromarray(_picture(50, 66, 4)).convert("L")), 50, 66, components=1)
    add("cmyk", _pil_jpeg(Image.fromarray(_picture(48, 64, 5)).convert("CMYK")), 48, 64, components=4)
    add("progressive", _pil_jpeg(Image.fromarray(_picture(240, 320, 6)), progressive=True), 240, 320, progressive=True)
    add("restart", _cv_jpeg(_picture(96, 128, 7), cv2.IMWRITE_JPEG_RST_INTERVAL, 2), 96, 128)
    picture = Image.fromarray(_picture(40, 72, 8))
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        add(f"exif{o}", _pil_jpeg(picture, exif=exif), 40, 72, orientation=o)
    add("exif6_motorola", _pil_jpeg(picture, exif=_exif_block(6, big_endian=True)), 40, 72, orientation=6)
    return v


VARIANTS = _make_variants()
NAMES = sorted(VARIANTS)
EXIF_NAMES = [n for n in NAMES if n.startswith("exif")]


def _pil_rgb(data: bytes, apply_exif: bool) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if apply_exif:
        image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


def _assert_matches_pil(rgb_hwc: np.ndarray, data: bytes, apply_exif: bool, tolerance: dict) -> None:
    expected = _pil_rgb(data, apply_exif)
    assert rgb_hwc.shape == expected.shape
    diff = np.abs(rgb_hwc.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= tolerance["max_abs"], f"max abs diff {diff.max()}"
    assert diff.mean() <= tolerance["mean_abs"], f"mean abs diff {diff.mean():.3f}"


# --------------------------------------------------------------------------- read_jpeg_info


def test_variants_are_what_they_claim():
    assert _luma_sampling(VARIANTS["444"][0]) == (1, 1)
    assert _luma_sampling(VARIANTS["422"][0]) == (2, 1)
    assert _luma_sampling(VARIANTS["420"][0]) == (2, 2)
    assert _luma_sampling(VARIANTS["411"][0]) == (4, 1)
    restart = VARIANTS["restart"][0]
    assert any(m == 0xDD for m, _, _ in _segments(restart))  # DRI: restart interval defined
    assert b"\xff\xd0" in restart and b"\xff\xd1" in restart


@pytest.mark.parametrize("name", NAMES)
def test_read_jpeg_info(name):
    data, expected = VARIANTS[name]
    assert J.read_jpeg_info(data) == expected


@pytest.mark.parametrize("convert", [bytes, memoryview, bytearray, lambda d: np.frombuffer(d, np.uint8), _t])
def test_read_jpeg_info_input_types(convert):
    data, expected = VARIANTS["exif6_motorola"]
    assert J.read_jpeg_info(convert(data)) == expected


def test_fill_bytes_and_lone_markers_between_segments_read_as_without_them():
    """Fill bytes and standalone markers before a segment leave the one-call segment read for the byte-by-byte one,
    which reads what PIL and libjpeg-turbo read."""
    data, expected = VARIANTS["420"]
    dqt = next(off for m, off, _ in _segments(data) if m == 0xDB)
    padded = data[:dqt] + b"\xff\xff\xff" + data[dqt:]  # fill bytes before a marker
    assert J.read_jpeg_info(padded) == expected
    assert Image.open(io.BytesIO(padded)).size == (expected.width, expected.height)
    assert tuple(J.decode_jpeg_cpu(_t(padded)).shape) == (expected.height, expected.width, 3)
    assert J.read_jpeg_info(data[:dqt] + b"\xff\x01" + data[dqt:]) == expected  # TEM: a marker with no length field


def test_a_segment_longer_than_the_file_is_named():
    data, _ = VARIANTS["420"]
    dht = next(off for m, off, _ in _segments(data) if m == 0xC4)
    cut = data[: dht + 10]  # the table's length field says more than is left
    with pytest.raises(DecodeError, match=f"segment FF C4 at byte {dht} needs .* but the {len(cut)}-byte input ends first"):
        J.read_jpeg_info(cut)


def test_trailing_padding_is_accepted():
    data, expected = VARIANTS["420"]
    assert J.read_jpeg_info(data + b"\x00" * 32) == expected


# --------------------------------------------------------------------------- decoding on CPU


def _cpu_tolerance(name: str) -> dict:
    return J.DECODER_TOLERANCE["cpu_cmyk" if name == "cmyk" else "cpu"]


@pytest.mark.parametrize("name", NAMES)
def test_decode_jpeg_cpu_matches_pil(name):
    data, info = VARIANTS[name]
    bgr = J.decode_jpeg_cpu(_t(data))
    assert bgr.dtype == torch.uint8 and bgr.is_contiguous()
    assert tuple(bgr.shape) == (info.height, info.width, 3)
    _assert_matches_pil(bgr.numpy()[..., ::-1], data, False, _cpu_tolerance(name))


@pytest.mark.parametrize("name", NAMES)
def test_decode_jpeg_tensor_cpu_matches_pil(name):
    data, info = VARIANTS[name]
    (chw,) = J.decode_jpeg_tensor([_t(data)], torch.device("cpu"))
    assert chw.dtype == torch.uint8 and chw.device.type == "cpu" and chw.is_contiguous()
    assert tuple(chw.shape) == (3, info.height, info.width)
    _assert_matches_pil(chw.permute(1, 2, 0).numpy(), data, False, J.DECODER_TOLERANCE["cpu"])


@pytest.mark.parametrize("name", EXIF_NAMES)
def test_apply_exif(name):
    data, _ = VARIANTS[name]
    bgr = J.decode_jpeg_cpu(_t(data), apply_exif=True)
    assert bgr.is_contiguous()
    _assert_matches_pil(bgr.numpy()[..., ::-1], data, True, J.DECODER_TOLERANCE["cpu"])
    (chw,) = J.decode_jpeg_tensor([_t(data)], torch.device("cpu"), apply_exif=True)
    assert chw.is_contiguous()
    assert torch.equal(chw, bgr.flip(-1).permute(2, 0, 1))


def test_exif_is_ignored_by_default():
    data, info = VARIANTS["exif6"]
    assert tuple(J.decode_jpeg_cpu(_t(data)).shape) == (info.height, info.width, 3)
    assert tuple(J.decode_jpeg_tensor([_t(data)], "cpu")[0].shape) == (3, info.height, info.width)


# --------------------------------------------------------------------------- refusals


def _other_format(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_picture(16, 16)).save(out, fmt)
    return out.getvalue()


def _headers_only() -> bytes:
    """Tables and frame header, then EOI without any scan (this crashes nvjpeg)."""
    data = VARIANTS["444"][0]
    sos = next(off for m, off, _ in _segments(data) if m == 0xDA)
    return data[:sos] + b"\xff\xd9"


def _bad_huffman() -> bytes:
    """Well-formed marker structure, but a Huffman table no decoder accepts."""
    data = bytearray(VARIANTS["420"][0])
    dht = next(off for m, off, _ in _segments(bytes(data)) if m == 0xC4)
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts per length: far too many codes
    return bytes(data)


BAD_INPUTS = {
    "empty": (b"", "empty"),
    "truncated": (VARIANTS["420"][0][: len(VARIANTS["420"][0]) // 2], "truncated"),
    "header cut off": (VARIANTS["420"][0][:30], "truncated"),
    "headers only": (_headers_only(), "image data"),
    "random bytes": (np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a JPEG"),
    "png": (_other_format("PNG"), "PNG"),
    "gif": (_other_format("GIF"), "GIF"),
    "bmp": (_other_format("BMP"), "BMP"),
    "huge": (_with_frame_size(VARIANTS["444"][0], 60000, 60000), "60000x60000 (3600000000 pixels)"),
    "zero height": (_with_frame_size(VARIANTS["444"][0], 0, 64), "zero"),
}
if features.check("webp"):
    BAD_INPUTS["webp"] = (_other_format("WEBP"), "WebP")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_everywhere(case):
    data, words = BAD_INPUTS[case]
    with pytest.raises(DecodeError, match=re.escape(words)):
        J.read_jpeg_info(data)
    with pytest.raises(DecodeError, match=re.escape(words)):
        J.decode_jpeg_cpu(_t(data))
    (result,) = J.decode_jpeg_tensor([_t(data)], "cpu")
    assert isinstance(result, DecodeError) and words in str(result)


def test_other_formats_are_named():
    with pytest.raises(DecodeError, match="got a PNG image; this stage decodes JPEG only"):
        J.read_jpeg_info(_other_format("PNG"))


def test_size_limit_is_checked_before_decoding(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoder was called")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    monkeypatch.setattr(J.tvio, "decode_jpeg", no_decode)
    huge = _t(BAD_INPUTS["huge"][0])
    with pytest.raises(DecodeError, match=r"the limit is 25000000 pixels"):
        J.decode_jpeg_cpu(huge)
    assert isinstance(J.decode_jpeg_tensor([huge], "cpu")[0], DecodeError)
    with pytest.raises(DecodeError, match="limit"):
        J.read_jpeg_info(VARIANTS["444"][0], max_pixels=48 * 64)
    J.read_jpeg_info(VARIANTS["444"][0], max_pixels=48 * 64 + 1)


def test_undecodable_image_raises_not_empty_tensor():
    data = _bad_huffman()
    J.read_jpeg_info(data)  # the damage is past what the header check looks at
    with pytest.raises(DecodeError, match="corrupt"):
        J.decode_jpeg_cpu(_t(data))
    (result,) = J.decode_jpeg_tensor([_t(data)], "cpu")
    assert isinstance(result, DecodeError) and "Huffman" in str(result)


def test_wrong_dtype_is_refused():
    with pytest.raises(DecodeError, match="uint8"):
        J.read_jpeg_info(torch.zeros(10, dtype=torch.float32))


@pytest.mark.parametrize("bad", ["truncated", "bad huffman table"])
def test_mixed_list_fails_only_the_bad_image(bad):
    good = [VARIANTS["420"], VARIANTS["gray"]]
    bad_data = BAD_INPUTS["truncated"][0] if bad == "truncated" else _bad_huffman()
    results = J.decode_jpeg_tensor([_t(good[0][0]), _t(bad_data), _t(good[1][0])], torch.device("cpu"))
    assert len(results) == 3
    assert isinstance(results[1], DecodeError)
    for (data, info), result in zip(good, (results[0], results[2])):
        assert isinstance(result, torch.Tensor)
        assert tuple(result.shape) == (3, info.height, info.width)


def test_the_host_share_is_decoded_on_its_threads_in_order_and_a_bad_image_fails_alone(monkeypatch):
    """cpu_decoder_share's side: libjpeg-turbo on the share's own threads, every image at its index and matching
    PIL, a corrupt one failing alone; the rest of the batch goes to the GPU decoder, the smallest images to the host."""
    names = [n for n in NAMES if n != "cmyk"]
    datas = [_t(VARIANTS[n][0]) for n in names] + [_t(_bad_huffman())]
    threads: set[str] = set()
    decode_hwc = J._decode_hwc

    def spied(data):
        threads.add(threading.current_thread().name)
        return decode_hwc(data)

    monkeypatch.setattr(J, "_decode_hwc", spied)
    to_gpu: list[int] = []

    def on_gpu(indices):
        to_gpu.extend(indices)
        return [("gpu", i) for i in indices]

    everything = list(range(len(datas)))
    side = J._host_side(datas, torch.device("cpu"), 2)
    decoded = dict(J._with_side_share(everything, datas, 1.0, side, on_gpu))
    assert sorted(decoded) == everything and to_gpu == []
    assert isinstance(decoded[len(names)], DecodeError)
    for index, name in enumerate(names):
        image = decoded[index]
        assert isinstance(image, torch.Tensor) and image.shape == (3, VARIANTS[name][1].height, VARIANTS[name][1].width)
        _assert_matches_pil(image.permute(1, 2, 0).numpy(), VARIANTS[name][0], False, J.DECODER_TOLERANCE["cpu"])
    assert threads and all(t.startswith("cpu-decoder-share") for t in threads)

    decoded = dict(J._with_side_share(everything, datas, 0.4, side, on_gpu, smallest_first=True))
    rest, host = J.split_by_bytes([len(d) for d in datas], 0.4, smallest_first=True)
    assert host and sorted(to_gpu) == rest and all(decoded[i] == ("gpu", i) for i in rest)
    assert max(len(datas[i]) for i in host) <= min(len(datas[i]) for i in rest)
    assert all(not isinstance(decoded[i], tuple) for i in host)
    with pytest.raises(ValueError, match="not both"):
        J.decode_jpeg_tensor(datas, torch.device("cpu"), cuda_decoder_share=0.2, cpu_decoder_share=0.2)


def test_the_balanced_share_settles_where_the_host_and_the_gpu_decoder_take_as_long():
    """A host that decodes a whole batch in H seconds and a GPU decoder that takes G: the share settles at
    G / (H + G), where each side's part takes as long, from above and from below, and never passes HIGH."""
    for host, gpu in ((0.040, 0.010), (0.010, 0.010), (0.100, 0.002)):
        want = gpu / (host + gpu)
        for start in (0.01, 0.3):
            balance = J.ShareBalance(start)
            for _ in range(30):
                share = balance.share
                balance.observe(share, share * host, (1 - share) * gpu)
            assert balance.share == pytest.approx(want, rel=1e-3)
    balance = J.ShareBalance(0.2)
    for _ in range(30):  # a host far faster than the GPU decoder: capped
        balance.observe(balance.share, balance.share * 0.001, (1 - balance.share) * 1.0)
    assert balance.share == J.ShareBalance.HIGH
    balance.observe(0.0, 0.0, 0.01)  # a batch the host took nothing of measures nothing
    assert balance.share == J.ShareBalance.HIGH
    low = J.ShareBalance(0.0)
    low.nothing_taken()
    assert low.share == pytest.approx(J.ShareBalance.CREEP)


def test_a_balanced_batch_is_split_smallest_first_and_measured_and_a_small_one_goes_whole(monkeypatch):
    """decode_jpeg_tensor's wiring of cpu_decoder_balance, with the CUDA calls stood in for on this host: the
    host decodes the smallest images of the balance's share, the balance gets the batch's measurement (its
    events, the host's share of the bytes), every image comes back at its index, and a batch under MIN_BATCH
    images goes to the GPU decoder whole without moving the share."""

    class Event:
        def __init__(self, **_):
            self.at = None

        def record(self, stream=None):
            self.at = time.perf_counter()

        def query(self):
            return True

        def elapsed_time(self, end):
            return (end.at - self.at) * 1000.0

    on_gpu_calls: list[int] = []

    def gpu(batch, device):
        on_gpu_calls.append(len(batch))
        return [J._decode_on_cpu(data) for data in batch]

    monkeypatch.setattr(J, "_decode_on_gpu", gpu)
    monkeypatch.setattr(J, "_host_copy", lambda data, device, stream, into, ready: (J._decode_on_cpu(data), ("copied", id(data))))
    slots_for: list[int] = []
    monkeypatch.setattr(J, "_device_slots", lambda shapes, device: slots_for.append(len(shapes)) or [None] * len(shapes))
    monkeypatch.setattr(J.nvjpeg, "drain", lambda stream: None)
    stream = _FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    names = [n for n in NAMES if n != "cmyk"]
    datas = [_t(VARIANTS[n][0]) for n in names] * 2
    assert len(datas) >= J.ShareBalance.MIN_BATCH
    balance = J.ShareBalance(0.3)
    recorded = []
    monkeypatch.setattr(balance, "record", lambda start, end, share, seconds: recorded.append((share, seconds)))
    results = J.decode_jpeg_tensor(datas, torch.device("cuda"), balance=balance, cpu_decoder_threads=2)
    sizes = [len(d) for d in datas]
    rest, host = J.split_by_bytes(sizes, 0.3, smallest_first=True)
    assert on_gpu_calls == [len(rest)] and host and slots_for == [len(host)]
    assert stream.recorded == 1  # where the slots' memory is free on the caller's stream, for the copies to wait on
    # the caller's stream waits for each of the host's copies before the stages after the decode read the images
    assert stream.waited == [("copied", id(datas[i])) for i in host]
    ((share, seconds),) = recorded
    assert share == pytest.approx(sum(sizes[i] for i in host) / sum(sizes)) and seconds > 0
    for data, image in zip(datas, results):
        assert torch.equal(image, J._decode_on_cpu(data))

    on_gpu_calls.clear()
    small = datas[: J.ShareBalance.MIN_BATCH - 1]
    results = J.decode_jpeg_tensor(small, torch.device("cuda"), balance=balance, cpu_decoder_threads=2)
    assert on_gpu_calls == [len(small)] and len(recorded) == 1 and balance.share == 0.3
    assert all(torch.equal(image, J._decode_on_cpu(data)) for data, image in zip(small, results))


class _FakeStream:
    """A CUDA stream's calls the host share makes, recorded, for the CPU: events are named by the stream's count."""

    cuda_stream = 0

    def __init__(self):
        self.recorded, self.waited = 0, []

    def record_event(self):
        self.recorded += 1
        return (id(self), self.recorded)

    def wait_event(self, event):
        self.waited.append(event)


def test_a_host_image_still_reaches_the_device_when_no_page_locked_memory_is_left(monkeypatch):
    """The host share's copy stages each image in page-locked memory; where none can be had, the image goes by
    the plain copy instead of failing its batch."""
    import contextlib

    def no_pinned_memory(image):
        raise RuntimeError("CUDA error: out of memory (pinned host memory)")

    monkeypatch.setattr(J, "_staged", no_pinned_memory)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    data, info = VARIANTS["420"]
    image = J._decode_on_host_to(_t(data), torch.device("cpu"), _FakeStream())
    assert isinstance(image, torch.Tensor) and torch.equal(image, J._decode_on_cpu(_t(data)))


def test_the_host_share_lands_in_one_allocation_per_batch(monkeypatch):
    """The host share's images go into views of one buffer, made before the threads start: each image in its own
    slot, none overlapping, with PIL's pixels; an image whose slot does not fit it gets a tensor of its own."""
    import contextlib

    monkeypatch.setattr(J, "_staged", lambda image: image.clone())  # page-locked memory needs a GPU
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    copies = _FakeStream()
    monkeypatch.setattr(J, "_copy_stream", lambda device: copies)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
    names = [n for n in NAMES if n != "cmyk"]
    shapes = [(VARIANTS[n][1].height, VARIANTS[n][1].width) for n in names]
    slots = J._device_slots(shapes, torch.device("cpu"))
    storage = slots[0].untyped_storage()
    assert all(slot.untyped_storage().data_ptr() == storage.data_ptr() for slot in slots)
    assert storage.nbytes() == sum(3 * h * w for h, w in shapes)
    spans = sorted((slot.data_ptr(), slot.data_ptr() + slot.numel()) for slot in slots)
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))
    caller = _FakeStream()
    ready = caller.record_event()  # where the slots' memory is free on the caller's stream
    for name, slot, (height, width) in zip(names, slots, shapes):
        assert slot.shape == (height, width, 3) and slot.is_contiguous()
        image, done = J._host_copy(_t(VARIANTS[name][0]), torch.device("cpu"), caller, into=slot, ready=ready)
        assert image.data_ptr() == slot.data_ptr() and image.shape == (3, height, width)
        # the copy, on the thread's own stream, waits for the caller's stream to have made the slot; the caller's
        # stream is to wait for the copy
        assert copies.waited[-1] == ready and done == (id(copies), copies.recorded)
        _assert_matches_pil(image.permute(1, 2, 0).numpy(), VARIANTS[name][0], False, J.DECODER_TOLERANCE["cpu"])
    wrong = J._device_slots([(shapes[0][0] + 1, shapes[0][1])], torch.device("cpu"))[0]
    waits = len(copies.waited)
    image, done = J._host_copy(_t(VARIANTS[names[0]][0]), torch.device("cpu"), caller, into=wrong, ready=ready)
    assert image.data_ptr() != wrong.data_ptr() and image.shape == (3, *shapes[0])
    assert len(copies.waited) == waits and done == (id(copies), copies.recorded)
    # without a slot, the caller's stream waits for the copy there and then
    image = J._decode_on_host_to(_t(VARIANTS[names[0]][0]), torch.device("cpu"), caller)
    assert image.shape == (3, *shapes[0]) and caller.waited == [(id(copies), copies.recorded)]


def test_the_host_share_fills_slots_made_under_inference_mode(monkeypatch):
    """A caller under ``torch.inference_mode`` (the in-process chain, any user's loop) makes the batch's slots as
    inference tensors; the share's threads write into them in the caller's mode, not refused by torch (which used to
    fail the whole batch, then every image retried alone).  The CUDA calls are the CPU's stand-ins."""
    import contextlib

    monkeypatch.setattr(J, "_staged", lambda image: image.clone())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    caller, copies = _FakeStream(), _FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(J, "_copy_stream", lambda device: copies)
    make_slots = J._device_slots
    monkeypatch.setattr(J, "_device_slots", lambda shapes, device: make_slots(shapes, torch.device("cpu")))
    names = [n for n in NAMES if n != "cmyk"]
    datas = [_t(VARIANTS[n][0]) for n in names]
    shapes = [(VARIANTS[n][1].height, VARIANTS[n][1].width) for n in names]
    with torch.inference_mode():
        wait = J._host_side(datas, torch.device("cuda"), 2, shapes=shapes)(list(range(len(names))))
        images = wait()
    assert len(caller.waited) == len(names)  # the caller's stream waits for every copy
    buffers = {image.untyped_storage().data_ptr() for image in images}
    assert len(buffers) == 1, "the images are not in the batch's slots"
    for name, image in zip(names, images):
        assert isinstance(image, torch.Tensor), f"{name}: {image!r}"
        _assert_matches_pil(image.permute(1, 2, 0).numpy(), VARIANTS[name][0], False, J.DECODER_TOLERANCE["cpu"])


def test_the_balance_reads_a_batch_only_once_the_gpu_has_passed_it():
    class Event:
        def __init__(self, done, ms=0.0):
            self.done, self.ms = done, ms

        def query(self):
            return self.done

        def elapsed_time(self, end):
            return end.ms

    balance = J.ShareBalance(0.1)
    end = Event(False, ms=10.0)
    balance.record(Event(True), end, 0.1, 0.010)
    balance.settle()
    assert balance.share == 0.1  # the decode is still on the GPU: nothing read, nothing waited for
    end.done = True
    balance.settle()
    assert balance.share == pytest.approx(0.1 + J.ShareBalance.GAIN * ((1 / 90) / (1 / 10 + 1 / 90) - 0.1))
    moved = balance.share
    balance.settle()
    assert balance.share == moved  # read once
    # batches queued faster than the GPU decodes them: each is read, in order, once the GPU has passed it
    first, second = Event(False, ms=10.0), Event(False, ms=10.0)
    balance.record(Event(True), first, 0.1, 0.010)
    balance.record(Event(True), second, 0.1, 0.010)
    second.done = True
    balance.settle()
    assert balance.share == moved  # the older one holds the newer one back
    first.done = True
    balance.settle()
    twice = J.ShareBalance(moved)
    twice.observe(0.1, 0.010, 0.010)
    twice.observe(0.1, 0.010, 0.010)
    assert balance.share == pytest.approx(twice.share)


# --------------------------------------------------------------------------- decoding on GPU


def _cuda_tolerance(data: bytes) -> dict:
    interpolated_chroma = _luma_sampling(data) in ((2, 1), (2, 2), (1, 2))
    return J.DECODER_TOLERANCE["cuda_upsampled" if interpolated_chroma else "cuda"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", NAMES)
def test_decode_jpeg_tensor_cuda_matches_pil(name):
    data, info = VARIANTS[name]
    (chw,) = J.decode_jpeg_tensor([_t(data)], torch.device("cuda"))
    # CMYK comes from libjpeg-turbo as a 3xHxW view of an HxWx3 image, as nvjpeg's own images do
    assert chw.device.type == "cuda" and (chw.is_contiguous() or chw.permute(1, 2, 0).is_contiguous())
    assert tuple(chw.shape) == (3, info.height, info.width)
    _assert_matches_pil(chw.permute(1, 2, 0).cpu().numpy(), data, False, _cuda_tolerance(data))


@pytest.mark.gpu
@needs_gpu
def test_cuda_batch_matches_single_and_applies_exif():
    datas = [_t(VARIANTS[n][0]) for n in NAMES]
    batch = J.decode_jpeg_tensor(datas, torch.device("cuda"), apply_exif=True)
    for name, data, image in zip(NAMES, datas, batch):
        (single,) = J.decode_jpeg_tensor([data], torch.device("cuda"), apply_exif=True)
        assert torch.equal(image, single), name
        encoded = VARIANTS[name][0]
        _assert_matches_pil(image.permute(1, 2, 0).cpu().numpy(), encoded, True, _cuda_tolerance(encoded))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bad", ["truncated", "headers only", "png", "bad huffman table"])
def test_cuda_mixed_list_fails_only_the_bad_image(bad):
    bad_data = {
        "truncated": BAD_INPUTS["truncated"][0],
        "headers only": BAD_INPUTS["headers only"][0],
        "png": BAD_INPUTS["png"][0],
        "bad huffman table": _bad_huffman(),  # passes the header check: nvjpeg itself fails the batch
    }[bad]
    good = [VARIANTS["420"], VARIANTS["cmyk"], VARIANTS["progressive"]]
    datas = [_t(good[0][0]), _t(bad_data), _t(good[1][0]), _t(good[2][0])]
    results = J.decode_jpeg_tensor(datas, torch.device("cuda"))
    assert isinstance(results[1], DecodeError)
    for (data, info), result in zip(good, (results[0], results[2], results[3])):
        assert isinstance(result, torch.Tensor) and result.device.type == "cuda"
        _assert_matches_pil(result.permute(1, 2, 0).cpu().numpy(), data, False, _cuda_tolerance(data))


@pytest.mark.gpu
@needs_gpu
def test_a_balanced_host_share_keeps_pixels_and_order_while_it_moves():
    names = NAMES * 4
    datas = [_t(VARIANTS[n][0]) for n in names]
    balance = J.ShareBalance(0.3)
    shares = []
    for _ in range(6):
        results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvjpeg", cpu_decoder_threads=2, balance=balance)
        torch.cuda.synchronize()
        shares.append(balance.share)
        for name, image in zip(names, results):
            data, info = VARIANTS[name]
            assert isinstance(image, torch.Tensor) and tuple(image.shape) == (3, info.height, info.width), name
            _assert_matches_pil(image.permute(1, 2, 0).cpu().numpy(), data, False, _cuda_tolerance(data))
    assert len(set(shares)) > 1 and all(0.0 <= share <= J.ShareBalance.HIGH for share in shares)


@pytest.mark.gpu
@needs_gpu
def test_the_host_share_copies_to_the_gpu_without_waiting_for_the_stream():
    """A host thread's image goes to the GPU behind the work already queued on the caller's stream (the GPU
    decoder's part of the batch) without waiting for it: a pageable copy would block until the stream drained."""
    stream = torch.cuda.current_stream()
    data, info = VARIANTS["420"]
    J._decode_on_host_to(_t(data), torch.device("cuda"), stream)  # warm: torch's pinned pool and the decoder
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the copy
    image = J._decode_on_host_to(_t(data), torch.device("cuda"), stream)
    assert not stream.query(), "the host waited for the queued GPU work"
    torch.cuda.synchronize()
    assert tuple(image.shape) == (3, info.height, info.width)
    _assert_matches_pil(image.permute(1, 2, 0).cpu().numpy(), data, False, J.DECODER_TOLERANCE["cpu"])


@pytest.mark.gpu
@needs_gpu
def test_the_host_share_copy_does_not_queue_behind_the_callers_stream():
    """The copy leaves on the thread's own stream: it is done while the caller's stream still has about a second
    of work queued ahead (the GPU decoder's part of the batch, in an instance), and that stream reads it after."""
    stream = torch.cuda.current_stream()
    data, info = VARIANTS["420"]
    J._host_copy(_t(data), torch.device("cuda"), stream)  # warm: torch's pinned pool, the thread's stream
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    image, done = J._host_copy(_t(data), torch.device("cuda"), stream)
    done.synchronize()
    assert not stream.query(), "the copy waited for the work queued on the caller's stream"
    stream.wait_event(done)
    torch.cuda.synchronize()
    assert tuple(image.shape) == (3, info.height, info.width)
    _assert_matches_pil(image.permute(1, 2, 0).cpu().numpy(), data, False, J.DECODER_TOLERANCE["cpu"])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "torchvision"])
@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_a_host_share_beside_the_gpu_decoder_keeps_pixels_and_order(decoder, inference):
    names = NAMES * 3
    datas = [_t(VARIANTS[n][0]) for n in names]
    with torch.inference_mode(inference):
        results = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder=decoder, cpu_decoder_share=0.4,
                                       cpu_decoder_threads=2)
    on_gpu = [i for i, n in enumerate(names) if n != "cmyk"]
    _, host = J.split_by_bytes([len(datas[i]) for i in on_gpu], 0.4, smallest_first=True)
    buffers = {results[on_gpu[p]].untyped_storage().data_ptr() for p in host}
    assert len(host) >= 2 and len(buffers) == 1, "the host's images are not in one allocation"
    for name, image in zip(names, results):
        assert isinstance(image, torch.Tensor) and image.device.type == "cuda", name
        data, info = VARIANTS[name]
        assert tuple(image.shape) == (3, info.height, info.width), name
        _assert_matches_pil(image.permute(1, 2, 0).cpu().numpy(), data, False, _cuda_tolerance(data))
