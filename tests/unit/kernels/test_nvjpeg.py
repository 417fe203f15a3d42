"""nvjpeg's hardware decoder driven directly (kernels/nvjpeg.py).

On the CPU, a stand-in library with nvjpeg's calls checks how a batch is cut into parts, when a
state is initialised again, that a refused part is decoded again one image at a time, and which
images the JPEG decode routes there.  On a GPU with JPEG engines, the pixels must be torchvision's
(the same nvjpeg on the same engines) and a damaged file among good ones must fail alone.
"""

from __future__ import annotations

import ctypes
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from tritonpipe.errors import ConfigError
from tritonpipe.kernels import jpeg as J
from tritonpipe.kernels import nvjpeg
from tritonpipe.kernels.errors import DecodeError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages import build_stage


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 10, 64])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_parts_cover_the_batch_in_order_and_near_equal(count, lanes):
    cut = nvjpeg.parts(count, lanes)
    assert [i for part in cut for i in part] == list(range(count))
    assert len(cut) == min(count, lanes) and all(len(part) > 0 for part in cut)
    if cut:
        assert max(map(len, cut)) - min(map(len, cut)) <= 1


def test_a_library_named_in_the_environment_comes_first(monkeypatch):
    monkeypatch.setenv(nvjpeg.LIBRARY_ENV, "/opt/nvjpeg-13.2/lib/libnvjpeg.so.13")
    assert nvjpeg._library_paths()[0] == "/opt/nvjpeg-13.2/lib/libnvjpeg.so.13"
    monkeypatch.delenv(nvjpeg.LIBRARY_ENV)
    assert "/opt/nvjpeg-13.2/lib/libnvjpeg.so.13" not in nvjpeg._library_paths()


def test_a_named_library_that_does_not_load_is_said_and_the_next_one_tried(monkeypatch, tmp_path, caplog):
    wrong = str(tmp_path / "libnvjpeg.so.13")
    monkeypatch.setenv(nvjpeg.LIBRARY_ENV, wrong)
    monkeypatch.setattr(nvjpeg, "_library_paths", lambda: [wrong])
    nvjpeg.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tritonpipe"):
            reason = nvjpeg.library()
    finally:
        nvjpeg.library.cache_clear()
    assert isinstance(reason, str) and wrong in reason
    assert any(nvjpeg.LIBRARY_ENV in r.message and wrong in r.message for r in caplog.records)


def test_a_library_that_does_not_load_is_named_in_the_reason(monkeypatch, tmp_path):
    missing, not_a_library = tmp_path / "libnvjpeg.so.13", tmp_path / "libnvjpeg.so.99"
    not_a_library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(nvjpeg, "_library_paths", lambda: [str(missing), str(not_a_library)])
    nvjpeg.library.cache_clear()
    try:
        reason = nvjpeg.library()
    finally:
        nvjpeg.library.cache_clear()
    assert isinstance(reason, str) and "pip install nvidia-nvjpeg" in reason
    assert str(missing) in reason and str(not_a_library) in reason


class _Property:
    def __init__(self, values, status=0):
        self.values, self.status = list(values), status

    def __call__(self, prop, value):
        value._obj.value = self.values[prop]
        return self.status


@pytest.mark.parametrize("lib, expected", [
    (type("Lib", (), {"nvjpegGetProperty": _Property([13, 2, 3])})(), "13.2.3"),
    (type("Lib", (), {"nvjpegGetProperty": _Property([13, 0, 0], status=2)})(), "unknown"),
    (object(), "unknown"),  # an old library without the call
])
def test_the_librarys_release(lib, expected):
    assert nvjpeg.version(lib) == expected


# --- a stand-in for libnvjpeg --------------------------------------------------------------
# Its "JPEG" is FF D8, then flags, the pixel value, height and width: flags 1 = the engines refuse
# it, flags 2 = damaged (a part holding it is refused as a whole, as nvjpeg refuses a batch).


def _fake_jpeg(value: int, height: int, width: int, flags: int = 0) -> torch.Tensor:
    return torch.tensor([0xFF, 0xD8, flags, value, height, width, 0, 0], dtype=torch.uint8)


class FakeNvjpeg:
    BAD_JPEG = 3

    def __init__(self):
        self.ids = iter(range(100, 10_000))
        self.initialised: list[tuple[int, int]] = []  # (state, batch size)
        self.destroyed: list[int] = []
        self.submitted: list[int] = []  # part sizes, in the order the lanes' threads submitted them
        self.headers: dict[int, bytes] = {}  # what each header stream last parsed

    @staticmethod
    def _set(ref, value):
        ref._obj.value = value

    def nvjpegCreateEx(self, backend, dev_allocator, pinned_allocator, flags, handle):
        assert backend == 3, "the hardware backend"
        self._set(handle, 1)
        return 0

    def nvjpegJpegStreamCreate(self, handle, stream):
        self._set(stream, next(self.ids))
        return 0

    def nvjpegJpegStateCreate(self, handle, state):
        self._set(state, next(self.ids))
        return 0

    def nvjpegJpegStateDestroy(self, state):
        self.destroyed.append(state.value)
        return 0

    def nvjpegJpegStreamParseHeader(self, handle, data, length, stream):
        header = self.headers[stream.value] = ctypes.string_at(data, length)
        return 0 if header[:2] == b"\xff\xd8" else self.BAD_JPEG

    def nvjpegDecodeBatchedSupported(self, handle, stream, supported):
        self._set(supported, 1 if self.headers[stream.value][2] == 1 else 0)
        return 0

    def nvjpegDecodeBatchedInitialize(self, handle, state, batch, threads, output):
        assert output == 5, "interleaved RGB"
        self.initialised.append((state.value, batch))
        return 0

    def nvjpegDecodeBatched(self, handle, state, pointers, lengths, images, stream):
        assert (state.value, len(pointers)) in self.initialised, "a state used for a batch size it was not initialised for"
        datas = [ctypes.string_at(pointers[i], lengths[i]) for i in range(len(pointers))]
        self.submitted.append(len(datas))
        if any(data[2] == 2 for data in datas):
            return self.BAD_JPEG
        for data, image in zip(datas, images):
            assert image.pitch[0] == data[5] * 3
            ctypes.memset(image.channel[0], data[3], data[4] * data[5] * 3)
        return 0


def _decode(decoder, images):
    return decoder.decode(images, [(int(i[4]), int(i[5])) for i in images])


class StatesNvjpeg(FakeNvjpeg):
    """Records the state of each decode call."""

    def __init__(self):
        super().__init__()
        self.used: list[int] = []

    def nvjpegDecodeBatched(self, handle, state, pointers, lengths, images, stream):
        self.used.append(state.value)
        return super().nvjpegDecodeBatched(handle, state, pointers, lengths, images, stream)


def test_the_calls_rotate_over_the_states_each_initialised_again_only_for_a_new_size():
    lib = StatesNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), lanes=1, states=2)
    images = [_fake_jpeg(10 + i, 2 + i, 3 + i) for i in range(7)]
    for _ in range(3):
        out = _decode(decoder, images)
        for image, result in zip(images, out):
            assert result.shape == (int(image[4]), int(image[5]), 3) and bool((result == image[3]).all())
    first, second = (state.state.value for state in decoder.states)
    assert lib.used == [first, second, first] and lib.submitted == [7, 7, 7]
    assert lib.initialised == [(first, 7), (second, 7)]  # once each, then reused
    _decode(decoder, images[:5])  # a new size: only the state whose turn it is is initialised again
    assert lib.used[-1] == second and lib.initialised[2:] == [(second, 5)]


def test_a_batch_in_parts_has_each_call_on_a_state_initialised_for_its_size():
    lib = StatesNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), lanes=2)
    images = [_fake_jpeg(10 + i, 2 + i, 3 + i) for i in range(7)]
    for _ in range(3):
        assert [int(r[0, 0, 0]) for r in _decode(decoder, images)] == [10 + i for i in range(7)]
    # two parts per batch (4 and 3 images); the stand-in refuses a call on a state not initialised for its size
    assert sorted(lib.submitted) == [3] * 3 + [4] * 3 and len(set(lib.used)) == nvjpeg.STATES


@pytest.mark.parametrize("lanes, parts", [(1, [7]), (3, [2, 2, 3])])
def test_the_lane_count_sets_the_parts_of_a_batch(lanes, parts):
    lib = FakeNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), lanes)
    images = [_fake_jpeg(10 + i, 2 + i, 3 + i) for i in range(7)]
    out = _decode(decoder, images)
    assert sorted(lib.submitted) == parts and len(decoder.states) == nvjpeg.STATES
    assert [int(r[0, 0, 0]) for r in out] == [10 + i for i in range(7)]


def test_a_parts_images_lie_in_one_allocation_each_on_its_own_aligned_bytes():
    decoder = nvjpeg.Decoder(FakeNvjpeg(), torch.device("cpu"), lanes=1)
    images = [_fake_jpeg(10 + i, 5 + 7 * i, 3 + 11 * i) for i in range(6)]
    out = _decode(decoder, images)
    base = out[0]._base
    assert base is not None and all(r._base is base for r in out)
    spans = sorted((r.data_ptr() - base.data_ptr(), r.numel()) for r in out)
    assert all(start % nvjpeg.ALIGN == 0 for start, _ in spans)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no image overlaps the next
    assert [int(r[0, 0, 0]) for r in out] == [10 + i for i in range(6)] and all(bool((r == r[0, 0, 0]).all()) for r in out)


@pytest.mark.parametrize("sort_from, largest_first", [(1, True), (6, True), (7, False), (None, False)])
def test_a_part_from_sort_from_images_goes_to_nvjpeg_largest_image_first_and_every_image_keeps_its_place(sort_from, largest_first):
    class Recording(FakeNvjpeg):
        def __init__(self):
            super().__init__()
            self.areas: list[list[int]] = []

        def nvjpegDecodeBatched(self, handle, state, pointers, lengths, images, stream):
            headers = [ctypes.string_at(pointers[i], lengths[i]) for i in range(len(pointers))]
            self.areas.append([header[4] * header[5] for header in headers])
            return super().nvjpegDecodeBatched(handle, state, pointers, lengths, images, stream)

    lib = Recording()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), lanes=1, sort_from=sort_from)
    sides = [(3, 4), (9, 9), (2, 2), (7, 5), (9, 9), (1, 6)]
    images = [_fake_jpeg(20 + i, h, w) for i, (h, w) in enumerate(sides)]
    out = _decode(decoder, images)
    for image, result in zip(images, out):
        assert result.shape == (int(image[4]), int(image[5]), 3) and bool((result == image[3]).all())
    (areas,) = lib.areas
    as_given = [h * w for h, w in sides]
    assert areas == (sorted(as_given, reverse=True) if largest_first else as_given)


class OneCallAtATime(FakeNvjpeg):
    """Counts the decode calls in progress at once (each takes a while), and lets a header check through
    only once ``checkers`` threads are checking at the same time."""

    def __init__(self, checkers: int = 1):
        super().__init__()
        self.barrier = threading.Barrier(checkers, timeout=10) if checkers > 1 else None
        self.checked_on: set[str] = set()
        self.active = self.most = 0
        self.guard = threading.Lock()

    def nvjpegJpegStreamParseHeader(self, handle, data, length, stream):
        self.checked_on.add(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait()  # broken (and the test failed) if the checks came one after the other
        return super().nvjpegJpegStreamParseHeader(handle, data, length, stream)

    def nvjpegDecodeBatched(self, *args):
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.02)
        try:
            return super().nvjpegDecodeBatched(*args)
        finally:
            with self.guard:
                self.active -= 1


def test_the_parts_are_checked_side_by_side_on_a_thread_each_and_their_calls_made_one_at_a_time():
    lib = OneCallAtATime(checkers=2)
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), 2)
    images = [_fake_jpeg(10 + i, 3, 4) for i in range(2)]  # a part of one image each: one check per thread
    for _ in range(3):
        assert [int(r[0, 0, 0]) for r in _decode(decoder, images)] == [10, 11]
    assert len(lib.checked_on) == 2 and threading.current_thread().name not in lib.checked_on
    assert lib.most == 1 and lib.submitted == [1] * 6


def test_callers_on_several_threads_check_at_once_and_take_turns_for_the_engines():
    lib = OneCallAtATime(checkers=3)
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), 1)

    def batch(k: int) -> list[int]:
        return [int(r[0, 0, 0]) for r in _decode(decoder, [_fake_jpeg(10 * k + i, 3, 4) for i in range(1)])]

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(batch, range(1, 4))) == [[10], [20], [30]]
    assert len(lib.checked_on) == 3 and lib.most == 1


def test_a_part_that_fails_outright_fails_the_call_only_once_every_lane_is_done():
    class Broken(FakeNvjpeg):
        """The first part's header check fails with an error nvjpeg never returns; the second part is slow."""

        def __init__(self):
            super().__init__()
            self.finished: list[int] = []

        def nvjpegJpegStreamParseHeader(self, handle, data, length, stream):
            value = ctypes.string_at(data, length)[3]
            if value == 10:
                raise MemoryError("out of host memory")
            return super().nvjpegJpegStreamParseHeader(handle, data, length, stream)

        def nvjpegDecodeBatched(self, *args):
            time.sleep(0.2)
            status = super().nvjpegDecodeBatched(*args)
            self.finished.append(len(self.submitted))
            return status

    lib = Broken()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), 2)
    with pytest.raises(MemoryError):
        _decode(decoder, [_fake_jpeg(10 + i, 3, 4) for i in range(4)])
    assert lib.finished == [1]  # the other lane's part had finished when the call failed
    out = _decode(decoder, [_fake_jpeg(20 + i, 3, 4) for i in range(4)])
    assert [int(image[0, 0, 0]) for image in out] == [20, 21, 22, 23]


def test_a_batch_of_one_part_is_decoded_on_the_callers_thread():
    class Where(FakeNvjpeg):
        threads: list[str] = []

        def nvjpegDecodeBatched(self, *args):
            self.threads.append(threading.current_thread().name)
            return super().nvjpegDecodeBatched(*args)

    lib = Where()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), 2)
    for _ in range(3):
        (image,) = _decode(decoder, [_fake_jpeg(42, 3, 4)])
        assert int(image[0, 0, 0]) == 42
    assert lib.threads == [threading.current_thread().name] * 3


class PoolingNvjpeg(FakeNvjpeg):
    """A newer library: it has the memory-pool and hardware-info calls."""

    def __init__(self, pool_status: int = 0):
        super().__init__()
        self.pooled: list[tuple] = []
        self.pool_status = pool_status

    def nvjpegDecodeBatchedPreAllocate(self, handle, state, batch, width, height, subsampling, output):
        self.pooled.append((state.value, batch, width, height, subsampling, output))
        return self.pool_status

    def nvjpegGetHardwareDecoderInfo(self, handle, engines, cores):
        self._set(engines, 7)
        self._set(cores, 5)
        return 0


def test_each_state_asks_for_nvjpegs_memory_pool_where_the_library_has_the_call():
    lib = PoolingNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"))
    states = [lane.state.value for lane in decoder.states]
    assert [entry[0] for entry in lib.pooled] == states and all(entry[1:] == (1, 1, 1, 0, 5) for entry in lib.pooled)
    assert all(lane.pooled for lane in decoder.states) and decoder.engines == (7, 5)
    images = [_fake_jpeg(10 + i, 4, 5) for i in range(4)]
    images[1] = _fake_jpeg(99, 4, 5, flags=2)  # its part's state is replaced, and the new one pooled too
    _decode(decoder, images)
    assert len(lib.pooled) == len(states) + len(lib.destroyed) and lib.pooled[-1][0] not in states
    # without the call (an older library), or asked not to, the decoder runs as before
    assert not any(lane.pooled for lane in nvjpeg.Decoder(FakeNvjpeg(), torch.device("cpu")).states)
    assert nvjpeg.Decoder(FakeNvjpeg(), torch.device("cpu")).engines is None
    quiet = PoolingNvjpeg()
    assert not any(lane.pooled for lane in nvjpeg.Decoder(quiet, torch.device("cpu"), pool=False).states) and not quiet.pooled


def test_a_library_that_refuses_the_pool_still_decodes():
    lib = PoolingNvjpeg(pool_status=FakeNvjpeg.BAD_JPEG)
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"))
    assert lib.pooled and not any(lane.pooled for lane in decoder.states)
    out = _decode(decoder, [_fake_jpeg(10 + i, 3, 4) for i in range(3)])
    assert [int(image[0, 0, 0]) for image in out] == [10, 11, 12]


def test_what_the_engines_do_not_take_comes_back_marked_and_the_rest_is_decoded():
    lib = FakeNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"), lanes=2)
    images = [_fake_jpeg(10 + i, 3, 4, flags=1 if i in (1, 4) else 0) for i in range(6)]
    out = _decode(decoder, images)
    assert out[1] is False and out[4] is False
    assert [int(out[i][0, 0, 0]) for i in (0, 2, 3, 5)] == [10, 12, 13, 15]
    assert sorted(lib.submitted) == [2, 2]  # only the images the engines take are submitted


@pytest.mark.parametrize("decoder", ["nvjpeg", "auto"])
def test_decode_depth_gives_the_stage_its_lanes(monkeypatch, decoder):
    asked = []
    monkeypatch.setattr(nvjpeg, "problem", lambda device, lanes=nvjpeg.LANES: asked.append(lanes))
    stage = build_stage(load_graph({"backend": "DecodeTensor", "decoder": decoder, "decode_depth": 3}).entry.tree, "cuda")
    assert asked == [3] and stage.nvjpeg_lanes == 3 and stage.decoder == "nvjpeg"


def test_a_refused_part_is_decoded_again_one_image_at_a_time():
    lib = FakeNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"))
    images = [_fake_jpeg(10 + i, 4, 5) for i in range(6)]
    images[1] = _fake_jpeg(99, 4, 5, flags=2)
    out = _decode(decoder, images)
    assert out[1] is None
    assert all(bool((out[i] == 10 + i).all()) for i in range(6) if i != 1)
    # the refused part's state is replaced, and so is the single-image state that met the damaged file
    assert len(lib.destroyed) == 2
    again = _decode(decoder, [images[0], images[2], images[3]])  # the states still work afterwards
    assert [int(r[0, 0, 0]) for r in again] == [10, 12, 13]


def test_the_engines_take_only_what_nvjpeg_says_they_take():
    lib = FakeNvjpeg()
    decoder = nvjpeg.Decoder(lib, torch.device("cpu"))
    assert decoder.takes(_fake_jpeg(1, 2, 2))
    assert not decoder.takes(_fake_jpeg(1, 2, 2, flags=1))
    assert not decoder.takes(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))  # the header parser refuses it


def _jpeg(height: int, width: int, seed: int, mode: str = "RGB", **options) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class StubDecoder:
    """Decodes on the CPU with Pillow, as HxWx3, and says which images it was given: ``refuse`` comes
    back None (nvjpeg refused it), ``skip`` False (the engines do not take it)."""

    def __init__(self, refuse: bytes = b"", skip: bytes = b""):
        self.seen: list[bytes] = []
        self.refuse, self.skip = refuse, skip

    def decode(self, datas, sizes):
        out = []
        for data in datas:
            raw = data.numpy().tobytes()
            self.seen.append(raw)
            if raw in (self.refuse, self.skip):
                out.append(None if raw == self.refuse else False)
            else:
                out.append(torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()))
        return out


def test_the_jpeg_decode_sends_3_component_baseline_jpegs_there_and_the_rest_to_torchvision(monkeypatch):
    color, gray, progressive, refused = _jpeg(8, 12, 0), _jpeg(8, 12, 1, "L"), _jpeg(8, 12, 2, progressive=True), _jpeg(6, 10, 3)
    skipped = _jpeg(8, 12, 4)
    stub = StubDecoder(refuse=refused, skip=skipped)
    monkeypatch.setattr(nvjpeg, "decoder", lambda device, lanes=nvjpeg.LANES: stub)
    elsewhere: list[int] = []

    def torchvision(datas, device):
        elsewhere.extend(d.numel() for d in datas)
        return [J._decode_on_cpu(d) for d in datas]

    monkeypatch.setattr(J, "_decode_on_gpu", torchvision)
    datas = [_tensor(d) for d in (color, gray, progressive, refused, skipped)]
    infos = [J.read_jpeg_info(d) for d in datas]
    out = J._decode_on_gpu_nvjpeg(datas, infos, torch.device("cpu"))
    assert stub.seen == [color, refused, skipped]
    assert sorted(elsewhere) == sorted([len(gray), len(progressive), len(skipped)])
    # the engines' images come back as 3xHxW views of their interleaved pixels; a refusal as None
    assert out[0].shape == (3, 8, 12) and torch.equal(out[0], J._decode_on_cpu(datas[0]))
    assert out[3] is None
    assert out[1].shape == (3, 8, 12) and out[2].shape == (3, 8, 12)
    assert torch.equal(out[4], J._decode_on_cpu(datas[4]))


def test_where_nvjpeg_cannot_run_torchvision_decodes_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(nvjpeg, "decoder", lambda device, lanes=nvjpeg.LANES: "this GPU has no hardware JPEG decoder")
    monkeypatch.setattr(J, "_decode_on_gpu", lambda datas, device: [J._decode_on_cpu(d) for d in datas])
    monkeypatch.setattr(J, "_warned", set())
    datas = [_tensor(_jpeg(8, 12, 0))]
    infos = [J.read_jpeg_info(d) for d in datas]
    with caplog.at_level(logging.WARNING, logger="tritonpipe"):
        for _ in range(3):
            (image,) = J._decode_on_gpu_nvjpeg(datas, infos, torch.device("cpu"))
            assert image.shape == (3, 8, 12)
    assert [r.getMessage() for r in caplog.records].count(
        "decoder=nvjpeg cannot run here (this GPU has no hardware JPEG decoder); torchvision decodes instead") == 1


def test_a_gpu_stage_that_cannot_have_it_is_refused_at_load(monkeypatch):
    monkeypatch.setattr(nvjpeg, "problem", lambda device, lanes=nvjpeg.LANES: "this GPU has no hardware JPEG decoder (A100, H100, H200 and later have one)")
    with pytest.raises(ConfigError, match=r"DecodeTensor\(decoder=nvjpeg\): this GPU has no hardware JPEG decoder.*choose decoder=torchvision"):
        build_stage(load_graph({"backend": "DecodeTensor", "decoder": "nvjpeg"}).entry.tree, "cuda")
    # on a CPU instance the key does not matter: libjpeg-turbo decodes
    build_stage(load_graph({"backend": "DecodeTensor", "decoder": "nvjpeg"}).entry.tree, "cpu")


def test_the_default_decoder_is_nvjpeg_where_the_gpu_has_jpeg_engines_and_torchvision_elsewhere(monkeypatch, caplog):
    asked = []

    def problem(device, lanes=nvjpeg.LANES):
        asked.append(device.type)
        return why

    monkeypatch.setattr(nvjpeg, "problem", problem)
    tree = load_graph({"backend": "DecodeTensor"}).entry.tree
    why = None
    assert build_stage(tree, "cuda").decoder == "nvjpeg"
    why = "this GPU has no hardware JPEG decoder (A100, H100, H200 and later have one)"
    with caplog.at_level(logging.INFO, logger="tritonpipe"):
        assert build_stage(tree, "cuda").decoder == "torchvision"  # not refused: the default falls back
    assert any("decoder=auto" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert asked == ["cuda", "cuda"]
    assert build_stage(tree, "cpu").decoder == "torchvision" and asked == ["cuda", "cuda"]  # libjpeg-turbo decodes


# --- on a GPU with JPEG engines -------------------------------------------------------------

on_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning:torchvision"),
]


def _engines() -> None:
    why = nvjpeg.problem(torch.device("cuda"))
    if why is not None:
        pytest.skip(why)


def _on_gpu(test):
    for mark in reversed(on_gpu):
        test = mark(test)
    return test


@_on_gpu
@pytest.mark.parametrize("batch", [1, 3, 10, 64])
def test_pixels_are_torchvisions_whatever_the_batch(batch):
    _engines()
    sizes = [(48, 64), (37, 53), (120, 90), (16, 16)]
    datas = [_tensor(_jpeg(*sizes[i % 4], i, subsampling=i % 3)) for i in range(batch)]
    for _ in range(3):  # the states are reused from one batch to the next
        ours = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvjpeg")
        theirs = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="torchvision")
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and torch.equal(a, b)


@_on_gpu
def test_grayscale_and_progressive_jpegs_among_them_come_back_as_torchvision_decodes_them():
    _engines()
    batch = [_jpeg(40, 60, 0), _jpeg(40, 60, 1, "L"), _jpeg(40, 60, 2, progressive=True), _jpeg(30, 20, 3)]
    datas = [_tensor(d) for d in batch]
    ours = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvjpeg")
    theirs = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="torchvision")
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(a, b)


@_on_gpu
def test_a_decode_never_writes_into_memory_that_queued_work_still_reads():
    """The hardware decoder writes when called; the caching allocator may hand it a block freed a moment ago
    whose last reader is still queued behind long work on the stream."""
    _engines()
    datas = [_tensor(_jpeg(96, 128, i)) for i in range(4)]
    size = 4 * -(-96 * 128 * 3 // nvjpeg.ALIGN) * nvjpeg.ALIGN  # what the decoder allocates for the batch
    slow = torch.randn(4096, 4096, device="cuda")
    for _ in range(5):
        held = torch.full((size,), 7, dtype=torch.uint8, device="cuda")
        for _ in range(20):  # tens of milliseconds queued before the read
            slow = torch.tanh(slow @ slow)
        total = held.sum(dtype=torch.int64)
        del held  # back to the allocator while the sum is still queued
        J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="nvjpeg")
        assert total.item() == 7 * size


def test_the_decoder_waits_only_for_a_stream_with_work_queued():
    class Stream:
        def __init__(self, idle):
            self.idle, self.waited = idle, 0

        def query(self):
            return self.idle

        def synchronize(self):
            self.waited += 1

    busy, idle = Stream(False), Stream(True)
    nvjpeg.drain(busy)
    nvjpeg.drain(idle)
    nvjpeg.drain(None)  # no CUDA stream: nothing to wait for
    assert (busy.waited, idle.waited) == (1, 0)


def _damaged(data: bytes, how: str) -> bytes:
    """Headers intact, the entropy-coded data spoiled or cut in the middle."""
    middle = len(data) // 2
    if how == "cut":
        return data[:middle]
    noise = np.random.default_rng(7).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return data[:middle] + noise + data[middle + 200 :]


@_on_gpu
def test_a_damaged_file_among_good_ones_fails_alone_and_every_image_keeps_its_place():
    _engines()
    goods = [_jpeg(96, 128, 10), _jpeg(72, 100, 11), _jpeg(40, 60, 12)]
    source = _jpeg(120, 160, 13)
    batch = [goods[0], _damaged(source, "cut"), goods[1], _damaged(source, "noise"), goods[2]]
    results = J.decode_jpeg_tensor([_tensor(d) for d in batch], torch.device("cuda"), gpu_decoder="nvjpeg")
    reference = J.decode_jpeg_tensor([_tensor(d) for d in goods], torch.device("cuda"), gpu_decoder="torchvision")
    for index, want in zip((0, 2, 4), reference):
        assert torch.equal(results[index], want)
    for index in (1, 3):
        # nvjpeg and libjpeg-turbo may refuse a damaged scan or decode it with errors; either way at its own size
        assert isinstance(results[index], DecodeError) or tuple(results[index].shape) == (3, 120, 160)
    again = J.decode_jpeg_tensor([_tensor(d) for d in goods], torch.device("cuda"), gpu_decoder="nvjpeg")
    assert all(torch.equal(a, b) for a, b in zip(again, reference))  # the decoder still works afterwards


@_on_gpu
@pytest.mark.parametrize("lanes, sort_from", [(1, 1), (2, 1), (3, None)])
def test_lanes_and_the_largest_first_order_give_torchvisions_pixels_in_the_callers_order(lanes, sort_from):
    _engines()
    decoder = nvjpeg.Decoder(nvjpeg.library(), torch.device("cuda"), lanes, sort_from=sort_from)
    shapes = [(64 + 8 * i, 48 + 4 * i) for i in range(10)]
    datas = [_tensor(_jpeg(h, w, 30 + i, subsampling=i % 3)) for i, (h, w) in enumerate(shapes)]
    theirs = J.decode_jpeg_tensor(datas, torch.device("cuda"), gpu_decoder="torchvision")
    for _ in range(3):
        ours = decoder.decode(datas, shapes)
        assert all(torch.equal(a.permute(2, 0, 1), b) for a, b in zip(ours, theirs, strict=True))
