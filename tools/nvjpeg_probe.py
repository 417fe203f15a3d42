"""nvjpeg's hardware batched decoder driven directly, to find what costs the JPEG engines their time.

torchvision's GPU decode (tritonpipe's default decoder) synchronises the host after every batch, asks for
planar RGB and re-initialises its one decoder state per call; DALI keeps batches in flight and writes
interleaved RGB.  Here libnvjpeg (the copy torchvision loaded) is called through ctypes, one lever at a time:
planar or interleaved output, pageable or pinned input, one batch at a time or two states in flight (on one
CUDA stream or two), at batch 64 and at a served-size batch of 10, beside torchvision on the same images.

usage: python tools/nvjpeg_probe.py [--out DIR] [--seconds 2] [--photos 64] [--rows levers,lanes,host,sync,threads,inflight,handle,sizes,libraries,inputs,ex,feed,hostshare,hostcause,small,pre2,yuv]

``lanes`` rows run tritonpipe's own decoder at 1 to 4 lanes (a host thread each), with and without nvjpeg's
memory pool for its states (``nvjpegDecodeBatchedPreAllocate``), and nvjpeg's two other
backends (Huffman decoding on the host, or on the SMs) alone and beside the engines on a share of each batch;
``host`` rows time the header checks a batch costs the host.  ``sync`` rows time nvjpeg's batched call on
the host, and the decode on the GPU (CUDA events), at batches of 8 to 64 with the device idle or a kernel
queued before the call: whether, and for what, the call makes the host wait.  ``threads`` rows run 1 to 4
decoders at once, each on a host thread and stream of its own and none waiting for another: how far the
engines' work overlaps across calls; ``inflight`` rows do the same with the resize and normalisation after
each decode, batches of 64 in flight as DALI's prefetch keeps them, and with a share of each batch on an
nvImageCodec CUDA decoder of each batch's own (DALI's ``hw_decoder_load`` split).  ``sizes`` rows time
what batches of changing sizes (as Triton hands an instance them) cost the decoder's state; ``libraries``
rows run the decoder on each libnvjpeg found (torchvision's copy, the wheels').  ``handle`` rows try the
handle's flags and the order of a batch, with the GPU time of each decode call; ``inputs`` rows hand nvjpeg
its bitstreams from pageable or page-locked memory; ``ex``
rows decode through ``nvjpegDecodeBatchedEx`` with per-image parameters, nvImageCodec's call; ``feed`` rows have
one thread make nothing but nvjpeg's decode calls while caller threads check and allocate the next batches (how
DALI feeds the engines), beside tritonpipe's decoder shared by 2-3 callers and decoders calling side by side; ``hostshare``
rows put a share of each batch in flight on libjpeg-turbo host threads (``cpu_decoder_share``) beside the engines;
``hostcause`` rows take that share apart beside one decoder for two batches in flight (where it collapsed): the host
threads' decoding alone, with the page-locked staging, the whole path (its copies on the threads' own streams, and on
the batch's stream as they were), a decoder each, and torch on one thread;
``small`` rows decode served-size batches (8 callers with 16 images each, 4 with 32) through one decoder shared by
the callers, its calls in turn, and through a decoder each calling side by side (as 8 served instances' processes
do): whether calls in turn keep the engines busy at the batch sizes a server sees, or only at 64.
``pre2`` rows run the kernels of the bench's ``inprocess-pre-2`` row without its stages (one decoder, two batches of
64 in flight, the one-launch resize and FP16 normalisation), with each batch waited for before the next, as that
row and DALI's prefetch of 2 wait, and without, and waited for with each image's headers parsed first as the stage
parses them: what the stages cost apart from what the waiting does, and what their parse costs of it.
``yuv`` rows decode two batches of 64 in flight (a state and stream each, decode only) into interleaved RGB, what
tritonpipe's decoder asks for, into the YUV planes as coded (no colour conversion, chroma left subsampled: the
conversion would then move into the resize kernel) and into luma alone: what the conversion costs the engines' side.

Each row prints img/s, host CPU ms per image, and the JPEG engines' and SMs' busy share (nvidia-smi dmon);
the table goes to DIR/nvjpeg_probe.md.  Only images the hardware decoder accepts are decoded (the count of
the others is a row of its own).  Needs a CUDA GPU with JPEG engines (A100, H100, H200).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from preprocess_probe import MEAN, SIDE, STD, Busy, timed
from tritonpipe.harness.corpus import photo_corpus, synthetic_corpus
from tritonpipe.kernels import batch_resize, jpeg, nvjpeg
from tritonpipe.optional import importable

BACKEND_HYBRID, BACKEND_GPU_HYBRID, BACKEND_HARDWARE = 1, 2, 3  # nvjpegBackend_t
BACKENDS = {BACKEND_HYBRID: "hybrid: Huffman on the host", BACKEND_GPU_HYBRID: "GPU hybrid: Huffman on the SMs",
            BACKEND_HARDWARE: "hardware"}
OUTPUT_YUV, OUTPUT_Y, OUTPUT_RGB, OUTPUT_RGBI = 1, 2, 3, 5  # nvjpegOutputFormat_t
MAX_COMPONENT = 4
#: thread_rows' settings for tritonpipe in one process as the bench's ``inprocess-pre-2`` row runs it: one decoder for
#: two batches of 64 in flight, each with the one-launch resize and normalisation after its decode
TWO_IN_FLIGHT = dict(plan=((64, 2),), post=True, shared=True)


def loaded_nvjpeg() -> ctypes.CDLL:
    """libnvjpeg as tritonpipe's decoder loads it, after torchvision's GPU decode has put its copy in this process."""
    decode_jpeg([torch.frombuffer(bytearray(synthetic_corpus(1, 0).images[0]), dtype=torch.uint8)], device="cuda")
    lib = nvjpeg.library()
    if isinstance(lib, str):
        raise SystemExit(lib)
    return lib


class Nvjpeg:
    def __init__(self, backend: int = BACKEND_HARDWARE) -> None:
        self.lib = lib = loaded_nvjpeg()
        handle = ctypes.c_void_p()
        self.check(lib.nvjpegCreateEx(backend, None, None, 0, ctypes.byref(handle)), f"nvjpegCreateEx({BACKENDS[backend]})")
        self.handle = handle
        self.stream_header = ctypes.c_void_p()
        self.check(lib.nvjpegJpegStreamCreate(handle, ctypes.byref(self.stream_header)), "nvjpegJpegStreamCreate")

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with nvjpeg status {status}")

    def info(self, data: bytes) -> tuple[int, int, bool]:
        """(height, width, whether the hardware decoder takes it)."""
        height, width = self.planes(data)[0]
        self.check(self.lib.nvjpegJpegStreamParseHeader(self.handle, data, ctypes.c_size_t(len(data)), self.stream_header),
                   "nvjpegJpegStreamParseHeader")
        supported = ctypes.c_int(-1)
        self.check(self.lib.nvjpegDecodeBatchedSupported(self.handle, self.stream_header, ctypes.byref(supported)),
                   "nvjpegDecodeBatchedSupported")
        return height, width, supported.value == 0

    def planes(self, data: bytes) -> list[tuple[int, int]]:
        """(height, width) of each component's plane as coded (chroma subsampled)."""
        components, subsampling = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * MAX_COMPONENT)(), (ctypes.c_int * MAX_COMPONENT)()
        self.check(self.lib.nvjpegGetImageInfo(self.handle, data, ctypes.c_size_t(len(data)), ctypes.byref(components),
                                               ctypes.byref(subsampling), widths, heights), "nvjpegGetImageInfo")
        return [(heights[c], widths[c]) for c in range(components.value)]


class Lane:
    """One decoder state, initialised once for a fixed batch size and output format, and its last batch's event."""

    def __init__(self, nv: Nvjpeg, batch: int, output: int, stream: torch.cuda.Stream) -> None:
        self.nv, self.output, self.stream = nv, output, stream
        self.state = ctypes.c_void_p()
        nv.check(nv.lib.nvjpegJpegStateCreate(nv.handle, ctypes.byref(self.state)), "nvjpegJpegStateCreate")
        nv.check(nv.lib.nvjpegDecodeBatchedInitialize(nv.handle, self.state, batch, 1, output), "nvjpegDecodeBatchedInitialize")
        self.done: torch.cuda.Event | None = None

    def _call(self, images, inputs: list[tuple[int, int]]) -> None:
        """nvjpeg's batched decode of (pointer, length) bitstreams into ``images``, on this lane's stream, once the
        lane's last batch is off the engines (the state's buffers are free again)."""
        if self.done is not None:
            self.done.synchronize()
        count = len(inputs)
        pointers = (ctypes.c_void_p * count)(*[pointer for pointer, _ in inputs])
        lengths = (ctypes.c_size_t * count)(*[length for _, length in inputs])
        self.nv.check(self.nv.lib.nvjpegDecodeBatched(self.nv.handle, self.state, pointers, lengths, images,
                                                      ctypes.c_void_p(self.stream.cuda_stream)), "nvjpegDecodeBatched")
        self.done = torch.cuda.Event()
        self.done.record(self.stream)

    def decode(self, inputs: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        """Submit one batch of (pointer, length, height, width); returns its outputs, ordered on this lane's stream."""
        count = len(inputs)
        images, outputs = (nvjpeg.Image * count)(), []
        with torch.cuda.stream(self.stream):
            for image, (_, _, height, width) in zip(images, inputs):
                if self.output == OUTPUT_RGBI:
                    out = torch.empty((height, width, 3), dtype=torch.uint8, device="cuda")
                    image.channel[0], image.pitch[0] = out.data_ptr(), width * 3
                else:
                    out = torch.empty((3, height, width), dtype=torch.uint8, device="cuda")
                    for c in range(3):
                        image.channel[c], image.pitch[c] = out[c].data_ptr(), width
                outputs.append(out)
            self._call(images, [(pointer, length) for pointer, length, _, _ in inputs])
        return outputs


class PlaneLane(Lane):
    """A lane that decodes into each image's planes as nvjpeg writes them for its output format."""

    def decode_planes(self, datas: list[torch.Tensor], planes: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
        """Submit one batch; ``planes``: each image's (height, width) per component, as coded."""
        count = len(datas)
        images, outputs = (nvjpeg.Image * count)(), []
        with torch.cuda.stream(self.stream):
            for image, sizes in zip(images, planes):
                if self.output == OUTPUT_RGBI:
                    height, width = sizes[0]
                    out = torch.empty(height * width * 3, dtype=torch.uint8, device="cuda")
                    image.channel[0], image.pitch[0] = out.data_ptr(), width * 3
                else:
                    used = sizes[:1] if self.output == OUTPUT_Y else sizes[:3]
                    out = torch.empty(sum(h * w for h, w in used), dtype=torch.uint8, device="cuda")
                    offset = 0
                    for c, (height, width) in enumerate(used):
                        image.channel[c], image.pitch[c] = out.data_ptr() + offset, width
                        offset += height * width
                outputs.append(out)
            self._call(images, [(data.data_ptr(), data.numel()) for data in datas])
        return outputs


def yuv_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """Two batches of 64 in flight, decode only, into interleaved RGB, the YUV planes as coded, or luma alone."""
    kept = [data for data in corpus if nv.info(data)[2]]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in kept]
    planes = [nv.planes(data) for data in kept]
    order, batch = itertools.cycle(range(len(kept))), 64
    for output, label in ((OUTPUT_RGBI, "interleaved RGB"), (OUTPUT_YUV, "YUV planes as coded, no conversion"),
                          (OUTPUT_Y, "luma alone")):
        what = f"batch {batch}: nvjpeg, two states in flight, a stream each, decode only, {label}"
        try:
            turn = itertools.cycle([PlaneLane(nv, batch, output, torch.cuda.Stream()) for _ in range(2)])

            def step(turn=turn):
                chosen = [next(order) for _ in range(batch)]
                next(turn).decode_planes([tensors[i] for i in chosen], [planes[i] for i in chosen])

            rate, cpu = timed(step, batch, seconds)
            now = time.perf_counter()
            report.append((name, what, f"{rate:,.0f}", f"{cpu:.2f}", busy.between(now - seconds, now)))
        except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
            report.append((name, what, f"FAILED {type(exc).__name__}: {str(exc)[:120]}", "", ""))
        print(" | ".join(report[-1]), flush=True)


def rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    infos = [nv.info(data) for data in corpus]
    chosen = [(data, h, w) for data, (h, w, ok) in zip(corpus, infos) if ok]
    report.append((name, "images the hardware decoder refuses (left out below)", f"{len(corpus) - len(chosen)} of {len(corpus)}", "", ""))
    print(" | ".join(report[-1]), flush=True)
    pageable = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _, _ in chosen]
    pinned = [tensor.pin_memory() for tensor in pageable]

    def inputs(source: list[torch.Tensor], indices: list[int]) -> list[tuple[int, int, int, int]]:
        return [(source[i].data_ptr(), source[i].numel(), chosen[i][1], chosen[i][2]) for i in indices]

    for batch in (64, 10):
        def add(what: str, step) -> None:
            try:
                rate, cpu = timed(step, batch, seconds)
                now = time.perf_counter()  # the timed part is the last ``seconds``
                report.append((name, f"batch {batch}: {what}", f"{rate:,.0f}", f"{cpu:.2f}", busy.between(now - seconds, now)))
            except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
                report.append((name, f"batch {batch}: {what}", f"FAILED {type(exc).__name__}: {str(exc)[:120]}", "", ""))
            print(" | ".join(report[-1]), flush=True)

        order = itertools.cycle(range(len(chosen)))
        picks = lambda: [next(order) for _ in range(batch)]  # noqa: E731
        add("torchvision decode_jpeg (planar RGB, host waits per batch)",
            lambda: decode_jpeg([pageable[i] for i in picks()], mode=ImageReadMode.RGB, device="cuda"))
        stream = torch.cuda.current_stream()
        for output, label in ((OUTPUT_RGB, "planar RGB"), (OUTPUT_RGBI, "interleaved RGB")):
            lane = Lane(nv, batch, output, stream)

            def one(lane=lane):
                lane.decode(inputs(pageable, picks()))
                lane.done.synchronize()

            add(f"nvjpeg, {label}, one state, host waits per batch", one)
        lane = Lane(nv, batch, OUTPUT_RGBI, stream)

        def one_pinned(lane=lane):
            lane.decode(inputs(pinned, picks()))
            lane.done.synchronize()

        add("nvjpeg, interleaved RGB, pinned input, host waits per batch", one_pinned)
        for streams, label in ((1, "one stream"), (2, "a stream each")):
            side = [stream] + [torch.cuda.Stream() for _ in range(streams - 1)]
            lanes = [Lane(nv, batch, OUTPUT_RGBI, side[i % streams]) for i in range(2)]
            turn = itertools.cycle(lanes)
            add(f"nvjpeg, interleaved RGB, two states in flight, {label}", lambda turn=turn: next(turn).decode(inputs(pageable, picks())))
            torch.cuda.synchronize()

    # the same pixels as torchvision's (both are nvjpeg on the engines)
    data, h, w = chosen[0]
    lane = Lane(nv, 1, OUTPUT_RGB, torch.cuda.current_stream())
    (mine,) = lane.decode(inputs(pageable, [0]))
    torch.cuda.synchronize()
    theirs = decode_jpeg(pageable[0], mode=ImageReadMode.RGB, device="cuda")
    report.append((name, "check: largest pixel difference against torchvision", f"{(mine.int() - theirs.int()).abs().max().item()}", "", ""))
    print(" | ".join(report[-1]), flush=True)


def host_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, report: list) -> None:
    """What a batch of 64 costs the host before any pixel is decoded: tritonpipe's own header check, and
    nvjpeg's (the acceptance check the decoder makes per image)."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in corpus]
    decoder = nvjpeg.Decoder(nv.lib, torch.device("cuda"), 1)
    for what, step in (("read_jpeg_info (tritonpipe's header check)", jpeg.read_jpeg_info),
                       ("nvjpeg header parse + hardware support check", decoder.takes)):
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 2:
            for tensor in tensors:
                step(tensor)
            done += len(tensors)
        report.append((name, f"host cost per batch of 64: {what}", "", f"{(time.perf_counter() - start) / done * 64 * 1000:.3f} ms", ""))
        print(" | ".join(report[-1]), flush=True)


def lane_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """tritonpipe's decoder (kernels/nvjpeg.py) at batch 64 with 1 to 4 lanes, each lane a host thread;
    then nvjpeg's other backends alone, and beside the engines on a share of each batch."""
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in corpus]
    shapes = [(h, w) for h, w, _ in (nv.info(data) for data in corpus)]
    order = itertools.cycle(range(len(corpus)))
    picks = lambda: [next(order) for _ in range(64)]  # noqa: E731

    def add(what: str, step) -> None:
        try:
            rate, cpu = timed(step, 64, seconds)
            now = time.perf_counter()
            report.append((name, f"batch 64: {what}", f"{rate:,.0f}", f"{cpu:.2f}", busy.between(now - seconds, now)))
        except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
            report.append((name, f"batch 64: {what}", f"FAILED {type(exc).__name__}: {str(exc)[:120]}", "", ""))
        print(" | ".join(report[-1]), flush=True)

    decoders = {lanes: nvjpeg.Decoder(nv.lib, torch.device("cuda"), lanes) for lanes in (1, 2, 3, 4)}
    unpooled = {lanes: nvjpeg.Decoder(nv.lib, torch.device("cuda"), lanes, pool=False) for lanes in (1, 2)}
    engines = decoders[1].engines
    report.append((name, "hardware JPEG engines x cores per engine (nvjpegGetHardwareDecoderInfo)",
                   "not reported" if engines is None else f"{engines[0]} x {engines[1]}", "", ""))
    print(" | ".join(report[-1]), flush=True)
    rows_to_run = [(f"{lanes} lane{'s' * (lanes > 1)} (a host thread each), "
                    f"{'memory pool' if decoder.states[0].pooled else 'no memory pool'}", decoder) for lanes, decoder in decoders.items()]
    rows_to_run += [(f"{lanes} lane{'s' * (lanes > 1)}, memory pool not asked for", decoder) for lanes, decoder in unpooled.items()]
    for label, decoder in rows_to_run:
        def step(decoder=decoder):
            chosen = picks()
            decoder.decode([tensors[i] for i in chosen], [shapes[i] for i in chosen])

        add(f"tritonpipe's nvjpeg decoder, {label}", step)
    for backend in (BACKEND_GPU_HYBRID, BACKEND_HYBRID):
        try:
            other = Nvjpeg(backend)
            lane = Lane(other, 64, OUTPUT_RGBI, torch.cuda.current_stream())
        except RuntimeError as exc:
            report.append((name, f"nvjpeg {BACKENDS[backend]}", f"FAILED {exc}", "", ""))
            print(" | ".join(report[-1]), flush=True)
            continue
        pointers = [(t.data_ptr(), t.numel(), h, w) for t, (h, w) in zip(tensors, shapes)]

        def alone(lane=lane):
            lane.decode([pointers[i] for i in picks()])
            lane.done.synchronize()

        add(f"nvjpeg {BACKENDS[backend]} alone, host waits per batch", alone)
        pool = ThreadPoolExecutor(1)
        for share in (0.2, 0.35):
            cut = round(64 * share)
            try:
                side = Lane(other, cut, OUTPUT_RGBI, torch.cuda.Stream())
            except RuntimeError as exc:
                report.append((name, f"nvjpeg {BACKENDS[backend]}, batch {cut}", f"FAILED {exc}", "", ""))
                continue

            def both(side=side, cut=cut):
                chosen = sorted(picks(), key=lambda i: -tensors[i].numel())  # the largest go to the side
                pending = pool.submit(lambda: (side.decode([pointers[i] for i in chosen[:cut]]), side.done.synchronize()))
                rest = chosen[cut:]
                decoders[2].decode([tensors[i] for i in rest], [shapes[i] for i in rest])
                pending.result()

            add(f"engines (2 lanes) + nvjpeg {BACKENDS[backend]} on the largest {cut} of 64, a thread of its own", both)
        pool.shutdown()
        torch.cuda.synchronize()


class TimedLib:
    """libnvjpeg with each call's host time summed by name, and the GPU time of each batched decode (CUDA
    events around it on its stream)."""

    def __init__(self, lib) -> None:
        self.lib, self.host, self.gpu = lib, {}, []

    def __getattr__(self, name):
        function = getattr(self.lib, name)

        def timed_call(*args):
            stream = args[-1] if name == "nvjpegDecodeBatched" else None
            if stream is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(torch.cuda.ExternalStream(stream) if stream else torch.cuda.default_stream())
            begin = time.perf_counter()
            status = function(*args)
            self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - begin
            if stream is not None:
                end.record(torch.cuda.ExternalStream(stream) if stream else torch.cuda.default_stream())
                self.gpu.append((start, end))
            return status

        return timed_call


class ExLib:
    """libnvjpeg whose batched decode goes through ``nvjpegDecodeBatchedEx`` with a set of whole-image decode
    parameters per image (EXIF orientation ignored, no region), as nvImageCodec's hardware decoder calls it;
    each refused call's status is counted."""

    ORIENTATION_NORMAL = 1  # nvjpegExifOrientation_t

    def __init__(self, lib) -> None:
        void, integer = ctypes.c_void_p, ctypes.c_int
        for name, argtypes in {"nvjpegDecodeParamsCreate": [void, ctypes.POINTER(void)],
                               "nvjpegDecodeParamsSetROI": [void, integer, integer, integer, integer],
                               "nvjpegDecodeParamsSetExifOrientation": [void, integer],
                               "nvjpegDecodeBatchedEx": [void, void, void, void, void, void, void]}.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, integer
        self.lib, self.params, self.refused = lib, {}, {}

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def nvjpegDecodeBatched(self, handle, state, pointers, lengths, images, stream):
        params = self.params.setdefault(handle.value, [])
        while len(params) < len(pointers):
            made = ctypes.c_void_p()
            Nvjpeg.check(self.lib.nvjpegDecodeParamsCreate(handle, ctypes.byref(made)), "nvjpegDecodeParamsCreate")
            Nvjpeg.check(self.lib.nvjpegDecodeParamsSetExifOrientation(made, self.ORIENTATION_NORMAL), "SetExifOrientation")
            Nvjpeg.check(self.lib.nvjpegDecodeParamsSetROI(made, 0, 0, -1, -1), "nvjpegDecodeParamsSetROI")
            params.append(made)
        table = (ctypes.c_void_p * len(pointers))(*[made.value for made in params[: len(pointers)]])
        status = self.lib.nvjpegDecodeBatchedEx(handle, state, pointers, lengths, images, table, stream)
        if status != 0:
            self.refused[status] = self.refused.get(status, 0) + 1
        return status


def ex_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """``nvjpegDecodeBatchedEx`` (nvImageCodec's call) against ``nvjpegDecodeBatched`` with 2 batches of 64 in
    flight: the pixels of a batch of 64 and one of 16 compared first, then the rate, then how many calls nvjpeg
    refused and with which status (a refused part is decoded again one image at a time)."""
    tensors, shapes = accepted(nv, corpus)
    ex = ExLib(nv.lib)
    for batch in (64, 16):
        chosen = [i % len(tensors) for i in range(3, 3 + batch)]
        outputs = [nvjpeg.Decoder(lib, torch.device("cuda"), 1, sort_from=nvjpeg.SORT_FROM).decode(
            [tensors[i] for i in chosen], [shapes[i] for i in chosen]) for lib in (nv.lib, ex)]
        torch.cuda.synchronize()
        worst = max((int((a.int() - b.int()).abs().max()) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                     else -1) for a, b in zip(*outputs))
        report.append((name, f"batch {batch}: nvjpegDecodeBatchedEx against nvjpegDecodeBatched, largest pixel "
                             f"difference (-1: an image one of them refused); refused calls so far {ex.refused or 'none'}",
                       str(worst), "", ""))
        print(" | ".join(report[-1]), flush=True)
    thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 2),), post=True, lib=ex,
                label=" [nvjpegDecodeBatchedEx, whole-image parameters per image]")
    report.append((name, f"nvjpegDecodeBatchedEx: refused calls by nvjpeg status, all rows: {ex.refused or 'none'}", "", "", ""))


class Feeder:
    """The engines fed the way DALI's decoder feeds them: caller threads check, order and allocate each
    batch ahead, and one thread of the feeder's own does nothing but call nvjpeg, batch after batch, on
    ``states`` decoder states in turn (a state is reused once its previous batch is off the engines).  So
    the engines wait only for nvjpeg's own host work, never for the callers' Python."""

    def __init__(self, nv: Nvjpeg, states: int, lib=None) -> None:
        self.nv, self.lib = nv, lib or nv.lib
        self.stream = torch.cuda.Stream()
        self.slots: list[list] = []  # [state, the batch size it was initialised for, its last batch's event]
        for _ in range(states):
            state = ctypes.c_void_p()
            nv.check(nv.lib.nvjpegJpegStateCreate(nv.handle, ctypes.byref(state)), "nvjpegJpegStateCreate")
            if hasattr(nv.lib, "nvjpegDecodeBatchedPreAllocate"):
                nv.lib.nvjpegDecodeBatchedPreAllocate(nv.handle, state, 1, 1, 1, 0, OUTPUT_RGBI)
            self.slots.append([state, None, None])
        self.jobs: queue.Queue = queue.Queue()
        self.calls, self.call_seconds, self.idle_seconds = 0, 0.0, 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        turn = 0
        while True:
            waited = time.perf_counter()
            job = self.jobs.get()
            self.idle_seconds += time.perf_counter() - waited
            if job is None:
                return
            slot = self.slots[turn % len(self.slots)]
            turn += 1
            if slot[2] is not None:
                slot[2].synchronize()
            count = len(job["lengths"])
            began = time.perf_counter()
            status = 0
            if slot[1] != count:
                status = self.nv.lib.nvjpegDecodeBatchedInitialize(self.nv.handle, slot[0], count, 1, OUTPUT_RGBI)
                slot[1] = count if status == 0 else None
            if status == 0:
                status = self.lib.nvjpegDecodeBatched(self.nv.handle, slot[0], job["pointers"], job["lengths"], job["images"],
                                                      ctypes.c_void_p(self.stream.cuda_stream))
            self.call_seconds += time.perf_counter() - began
            self.calls += 1
            event = torch.cuda.Event()
            event.record(self.stream)
            slot[2] = event
            job["result"] = (status, event)
            job["ready"].set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        torch.cuda.synchronize()

    def decode(self, header: ctypes.c_void_p, datas: list[torch.Tensor], shapes: list[tuple[int, int]]):
        """On the caller's thread: check each image as tritonpipe's decoder does, order a large batch largest
        first, allocate the outputs on the caller's stream; then hand the call to the feeder and wait for it.
        Returns (status, the decode's event, outputs in the caller's order)."""
        lib, handle = self.nv.lib, self.nv.handle
        supported = ctypes.c_int(-1)
        for data in datas:
            self.nv.check(lib.nvjpegJpegStreamParseHeader(handle, data.data_ptr(), data.numel(), header), "ParseHeader")
            self.nv.check(lib.nvjpegDecodeBatchedSupported(handle, header, ctypes.byref(supported)), "Supported")
        order = list(range(len(datas)))
        if len(order) >= nvjpeg.SORT_FROM:
            order.sort(key=lambda i: -shapes[i][0] * shapes[i][1])
        count, starts, end = len(order), [], 0
        for i in order:
            starts.append(end)
            end += -(-shapes[i][0] * shapes[i][1] * 3 // nvjpeg.ALIGN) * nvjpeg.ALIGN
        buffer = torch.empty(end, dtype=torch.uint8, device="cuda")
        images, outputs = (nvjpeg.Image * count)(), [None] * count
        for image, i, start in zip(images, order, starts):
            height, width = shapes[i]
            outputs[i] = buffer[start : start + height * width * 3].view(height, width, 3)
            image.channel[0], image.pitch[0] = outputs[i].data_ptr(), width * 3
        job = {"pointers": (ctypes.c_void_p * count)(*[datas[i].data_ptr() for i in order]),
               "lengths": (ctypes.c_size_t * count)(*[datas[i].numel() for i in order]),
               "images": images, "ready": threading.Event()}
        self.jobs.put(job)
        job["ready"].wait()
        status, event = job["result"]
        return status, event, outputs


def feed_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """Batches of 64 through a :class:`Feeder`: 2 or 3 caller threads (batches in flight), 1 to 3 states,
    nvjpeg's batched call or its Ex call, with and without the resize and FP16 normalisation after each
    decode; beside them, the ``inflight`` row tritonpipe's decoder gives now (2 batches in flight, a
    decoder each).  Each row also gives the feeder's nvjpeg call time per batch and the share of the
    run its thread sat waiting for work (near 0: nvjpeg's own calls set the pace)."""
    tensors, shapes = accepted(nv, corpus)
    probe = nvjpeg.Decoder(nv.lib, torch.device("cuda"), 1)
    engines = probe.engines
    report.append((name, "hardware JPEG engines x cores per engine (nvjpegGetHardwareDecoderInfo)",
                   "not reported" if engines is None else f"{engines[0]} x {engines[1]}", "", ""))
    print(" | ".join(report[-1]), flush=True)
    # the resize kernel compiles on its first call: not inside a timed row
    batch_resize.resize_batch(probe.decode(tensors[:4], shapes[:4]), SIDE, SIDE, channels_last=True, mean=MEAN, std=STD,
                              dtype=torch.float16)
    torch.cuda.synchronize()
    thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 2), (64, 3)), post=True, shared=True)
    thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 2),), post=True)
    plans = [(2, 2, False, True), (2, 1, False, True), (3, 2, False, True), (3, 3, False, True), (2, 2, True, True),
             (2, 2, False, False)]
    for callers, states, use_ex, post in plans:
        feeder = Feeder(nv, states, ExLib(nv.lib) if use_ex else None)
        done, refused, finished = [0] * callers, [0] * callers, [0.0] * callers
        begin = time.perf_counter() + 0.5
        stop = begin + seconds

        def work(k: int, feeder=feeder, post=post) -> None:
            header = ctypes.c_void_p()
            nv.check(nv.lib.nvjpegJpegStreamCreate(nv.handle, ctypes.byref(header)), "nvjpegJpegStreamCreate")
            order = itertools.cycle(range(k * 7, k * 7 + len(tensors)))
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                while (started := time.perf_counter()) < stop:
                    chosen = [next(order) % len(tensors) for _ in range(64)]
                    status, event, outputs = feeder.decode(header, [tensors[i] for i in chosen], [shapes[i] for i in chosen])
                    counted = started >= begin
                    if status != 0:
                        refused[k] += 64 if counted else 0
                        continue
                    stream.wait_event(event)
                    if post:
                        batch_resize.resize_batch(outputs, SIDE, SIDE, channels_last=True, mean=MEAN, std=STD, dtype=torch.float16)
                    stream.synchronize()  # this thread's outputs are let go only once read: its next batch may reuse them
                    done[k] += 64 if counted else 0
            finished[k] = time.perf_counter()

        calls0, call0, idle0 = feeder.calls, feeder.call_seconds, feeder.idle_seconds
        cpu0 = os.times()
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(work, range(callers)))
        cpu1 = os.times()
        wall, total = max(finished) - begin, sum(done)
        calls = max(feeder.calls - calls0, 1)
        detail = (f"nvjpeg call {(feeder.call_seconds - call0) * 1000 / calls:.2f} ms per batch, feeder idle "
                  f"{(feeder.idle_seconds - idle0) / max(wall + 0.5, 1e-9):.0%}")
        feeder.close()
        what = (f"batch 64: the engines fed by one thread, {callers} callers checking and allocating ahead, {states} "
                f"state(s), {'nvjpegDecodeBatchedEx' if use_ex else 'nvjpegDecodeBatched'}, "
                f"{'decode + one-launch post' if post else 'decode only'} [{detail}]")
        if sum(refused):
            what += f" ({sum(refused):,} images in refused calls, not counted)"
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000 / max(total, 1)
        report.append((name, what, f"{total / wall:,.0f}", f"{cpu:.2f}", busy.between(begin, max(finished))))
        print(" | ".join(report[-1]), flush=True)


def accepted(nv: Nvjpeg, corpus: list[bytes]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """The corpus's JPEGs the engines take, as tensors, and their (height, width)."""
    infos = [nv.info(data) for data in corpus]
    return ([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, (_, _, ok) in zip(corpus, infos) if ok],
            [(h, w) for h, w, ok in infos if ok])


def sync_rows(nv: Nvjpeg, name: str, corpus: list[bytes], report: list) -> None:
    """Does nvjpeg's batched call wait on the host, and for what?  Its host time (and the decode's GPU time)
    at several batch sizes with the device idle, with a 20 ms kernel queued on the call's own stream just
    before it, and with that kernel on another stream."""
    base = nv.lib
    tensors, shapes = accepted(nv, corpus)
    order = itertools.cycle(range(len(tensors)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    lib = TimedLib(base)
    decoder = nvjpeg.Decoder(lib, torch.device("cuda"), 1)
    caller, other = torch.cuda.Stream(), torch.cuda.Stream()
    cases = {"idle": None, "a 20 ms kernel queued on its own stream before it": caller, "a 20 ms kernel on another stream": other}
    for batch in (8, 16, 35, 64):
        for label, busy_stream in cases.items():
            took, gpu = [], []
            for _ in range(6):
                torch.cuda.synchronize()
                if busy_stream is not None:
                    with torch.cuda.stream(busy_stream):
                        torch.cuda._sleep(int(20 * cycles_per_ms))
                lib.host, lib.gpu = {}, []
                chosen = [next(order) for _ in range(batch)]
                with torch.cuda.stream(caller):
                    decoder.decode([tensors[i] for i in chosen], [shapes[i] for i in chosen])
                torch.cuda.synchronize()
                took.append(lib.host.get("nvjpegDecodeBatched", 0.0) * 1000)
                gpu.append(sum(a.elapsed_time(b) for a, b in lib.gpu))
            # the first call of a batch size initialises the state for it: left out
            report.append((name, f"batch {batch}: the nvjpegDecodeBatched call, {label}: host ms (median of 5)",
                           f"{sorted(took[1:])[2]:.2f} ms", "", f"GPU ms {sorted(gpu[1:])[2]:.2f}"))
            print(" | ".join(report[-1]), flush=True)


def thread_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list,
                plan=((64, 1), (64, 2), (64, 3), (64, 4), (16, 1), (16, 4), (16, 8)), post: bool = False,
                share: float = 0.0, lib=None, label: str = "", pin: bool = False,
                host_threads: int = 0, balanced: bool = False, shared: bool = False, host_mode: str = "copy",
                wait_each: bool = False, parse: bool = False) -> None:
    """How much engine work overlaps when nobody waits for a whole batch: 1 to 4 host threads, each with a
    decoder of its own (its own handle and one state), each decoding batches back to back on a stream of
    its own for ``seconds``; the rate is all threads' images together.  Batches of 64, and of 16 on up to
    8 threads (what 8 served instances' batches look like).  With ``post``, each thread also resizes its
    batch to 224x224 and normalises it to FP16 (the one-launch batch resize), and its decoder hands batches
    of ``nvjpeg.SORT_FROM`` or more largest first, as ``DecodeTensor`` does: a thread is a batch in flight.
    With ``share``, that share of each batch's bytes (largest images first, as ``cuda_decoder_share`` splits
    a batch) goes to an nvImageCodec CUDA decoder of the thread's own, on a side thread, while its nvjpeg
    decoder takes the rest.  ``lib``: the libnvjpeg the decoders use (by default the one tritonpipe loads),
    named in each row by ``label``; ``pin``:
    the bitstreams already in page-locked memory, as if Triton's shared memory were.  With ``host_threads``, the
    share goes instead to libjpeg-turbo on that many host threads (one pool for all batches in flight, as
    ``cpu_decoder_share`` and ``cpu_decoder_threads`` decode it in an instance), each image copied to the GPU;
    ``balanced``: that share moves batch by batch (``cpu_decoder_balance``), and the row gives where it went;
    ``host_mode`` ``decode`` or ``stage``: the host threads only decode (and stage) the share beside a whole batch on
    the GPU decoder, so that what the host's work costs the engines' side reads apart from the copies; ``wait_each``:
    each thread waits for its batch's GPU work before it starts the next, as the bench's ``inprocess-pre-2`` row and
    DALI's prefetch of 2 do, so that at most ``count`` batches are in flight; ``parse``: each image's headers are
    also walked by the stage's own parse (``read_jpeg_info``) before its batch is decoded, as ``DecodeTensor`` does."""
    tensors, shapes = accepted(nv, corpus)
    if pin:
        tensors = [tensor.pin_memory() for tensor in tensors]
    if post:  # the resize kernel compiles on its first call: not inside a timed row
        images = nvjpeg.Decoder(nv.lib, torch.device("cuda"), 1).decode(tensors[:4], shapes[:4])
        batch_resize.resize_batch(images, SIDE, SIDE, channels_last=True, mean=MEAN, std=STD, dtype=torch.float16)
        torch.cuda.synchronize()
    for batch, count in plan:
        sort_from = nvjpeg.SORT_FROM if post else None
        decoders = [nvjpeg.Decoder(lib or nv.lib, torch.device("cuda"), 1, sort_from=sort_from)
                    for _ in range(1 if shared else count)] * (count if shared else 1)
        streams = [torch.cuda.Stream() for _ in range(count)]
        side = (lambda: HostDecoderSide(share, host_threads, balanced, host_mode)) if host_threads else (lambda: CudaDecoderSide(share))
        sides = [side() for _ in range(count)] if share > 0 else []
        done, finished, refused = [0] * count, [0.0] * count, [0] * count
        begin = time.perf_counter() + 0.5  # half a second of warm-up: batches started before it are not counted
        stop = begin + seconds

        def work(k: int) -> None:
            order = itertools.cycle(range(k * 7, k * 7 + len(tensors)))
            with torch.cuda.stream(streams[k]):
                while (started := time.perf_counter()) < stop:
                    chosen = [next(order) % len(tensors) for _ in range(batch)]
                    if parse:
                        for i in chosen:
                            jpeg.read_jpeg_info(tensors[i])
                    if sides:
                        images = sides[k].decode(decoders[k], [tensors[i] for i in chosen], [shapes[i] for i in chosen],
                                                 streams[k].cuda_stream)
                    else:
                        images = decoders[k].decode([tensors[i] for i in chosen], [shapes[i] for i in chosen])
                    decoded = [image for image in images if isinstance(image, torch.Tensor)]  # None: refused
                    refused[k] += len(images) - len(decoded) if started >= begin else 0
                    if post and decoded:
                        batch_resize.resize_batch(decoded, SIDE, SIDE, channels_last=True, mean=MEAN, std=STD, dtype=torch.float16)
                    if wait_each:
                        streams[k].synchronize()
                    done[k] += len(decoded) if started >= begin else 0
                torch.cuda.current_stream().synchronize()
            finished[k] = time.perf_counter()

        with ThreadPoolExecutor(count) as pool:
            cpu0 = os.times()
            list(pool.map(work, range(count)))
            cpu1 = os.times()
        wall, total = max(finished) - begin, sum(done)
        where = f"libjpeg-turbo on {host_threads} host threads" if host_threads else "a CUDA decoder each"
        if host_threads and host_mode != "copy":
            where += f" ({'decoded' if host_mode == 'decode' else 'decoded and staged'} only, thrown away: the GPU decodes all)"
        if torch.get_num_threads() == 1:
            where += ", torch on 1 thread"
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000 / max(total, 1)  # warm-up included
        what = (f"batch {batch}: {count} batch(es) in flight, a host thread and stream each, "
                f"{'one decoder for all (tritonpipe as it runs in one process)' if shared else 'a decoder each'}, "
                f"{f'{share:.0%} of the bytes on {where}, ' if share else ''}decode + one-launch post"
                if post else f"batch {batch}: {count} host thread(s), a decoder and stream each, no waiting for each other")
        if wait_each:
            what += ", each batch waited for before the next"
        if parse:
            what += ", each image's headers parsed first as the stage parses them"
        if sum(refused):
            what += f" ({sum(refused):,} images refused, not counted)"
        if balanced:
            moved = [side.shares for side in sides if side.shares]
            what += (f", balanced from {share:.2f}: share {min(min(m) for m in moved):.2f}-{max(max(m) for m in moved):.2f}, "
                     f"last {moved[0][-1]:.2f}") if moved else ", balanced (no batch)"
        report.append((name, what + label,
                       f"{total / wall:,.0f}", f"{cpu:.2f}", busy.between(begin, max(finished))))
        print(" | ".join(report[-1]), flush=True)


class CudaDecoderSide:
    """One batch in flight's share for nvImageCodec's CUDA decoder (Huffman decoding on host threads), on a
    thread of its own, while the batch's nvjpeg decoder takes the rest; images come back HWC, in batch order."""

    def __init__(self, share: float) -> None:
        from tritonpipe.kernels import nvimgcodec

        self.share = share
        self.pool = nvimgcodec.make_pool(0, nvimgcodec.Settings(hw_load=0.0))
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cuda-decoder-side")

    def decode(self, decoder: nvjpeg.Decoder, datas: list[torch.Tensor], shapes: list[tuple[int, int]], stream: int):
        from tritonpipe.kernels.jpeg import split_by_bytes

        rest, side = split_by_bytes([len(data) for data in datas], self.share)
        pending = self.thread.submit(self.pool.decode, [datas[i].numpy() for i in side], stream)
        images: list = [None] * len(datas)
        for i, image in zip(rest, decoder.decode([datas[i] for i in rest], [shapes[i] for i in rest])):
            images[i] = image
        for i, image in zip(side, pending.result()):
            images[i] = torch.from_dlpack(image).permute(1, 2, 0)  # 3xHxW planes, read in place as HxWx3
        return images


class HostDecoderSide:
    """One batch in flight's share for libjpeg-turbo on host threads, through the kernel ``cpu_decoder_share``
    uses (each image copied to the GPU when decoded, on the thread's own stream unless the row says otherwise), while
    the batch's nvjpeg decoder takes the rest; images come back HWC, in batch order.  With ``balanced``, the share starts at ``share``
    and moves batch by batch as ``cpu_decoder_balance`` moves it (the kernel's ``ShareBalance``)."""

    def __init__(self, share: float, threads: int, balanced: bool = False, mode: str = "copy") -> None:
        self.share, self.threads, self.mode = share, threads, mode
        self.balance = jpeg.ShareBalance(share) if balanced else None
        self.shares: list[float] = []

    def _beside(self, datas: list[torch.Tensor]):
        """The share's host work alone, its images thrown away (the GPU decoder decodes the whole batch):
        libjpeg-turbo only (``decode``), or with each image staged in page-locked memory (``stage``)."""
        def one(data: torch.Tensor) -> None:
            image = jpeg._decode_hwc(data)
            if self.mode == "stage":
                jpeg._staged(image)
        pending = [jpeg._host_executor(self.threads).submit(one, data) for data in datas]
        return lambda: [future.result() for future in pending]

    def decode(self, decoder: nvjpeg.Decoder, datas: list[torch.Tensor], shapes: list[tuple[int, int]], stream: int):
        if self.balance is not None:
            self.balance.settle()
            self.share = self.balance.share
            self.shares.append(self.share)
        sizes = [len(data) for data in datas]
        rest, side = jpeg.split_by_bytes(sizes, self.share, smallest_first=True)
        if self.mode != "copy":  # the host's work beside a whole batch on the GPU decoder
            finish = self._beside([datas[i] for i in side])
            images = decoder.decode(datas, shapes)
            finish()
            return images
        took: list[tuple[float, int]] = []
        wait = jpeg._host_side([datas[i] for i in side], torch.device("cuda"), self.threads, took,
                               [shapes[i] for i in side])(list(range(len(side))))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        images: list = [None] * len(datas)
        for i, image in zip(rest, decoder.decode([datas[i] for i in rest], [shapes[i] for i in rest])):
            images[i] = image
        end.record()
        for i, image in zip(side, wait()):
            images[i] = image.permute(1, 2, 0) if isinstance(image, torch.Tensor) else None
        if self.balance is not None and took:
            seconds, side_bytes = took[0]
            self.balance.record(start, end, side_bytes / sum(sizes), seconds)
        elif self.balance is not None:
            self.balance.nothing_taken()
        return images


def library_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """The same decoder on each libnvjpeg found here (torchvision's copy, the wheels', the system's, and
    ``TRITONPIPE_NVJPEG_LIBRARY``): decode alone on 1 and 2 threads and decode + post with 2 batches in
    flight, each row naming the library's release."""
    seen: set[str] = set()
    for path in nvjpeg._library_paths():
        real = os.path.realpath(path)
        if real in seen or not os.path.exists(real):
            continue
        seen.add(real)
        try:
            lib = nvjpeg.load(path)
        except (OSError, AttributeError) as exc:
            report.append((name, f"libnvjpeg at {path}", f"does not load: {exc}"[:160], ""))
            continue
        label = f" [libnvjpeg {nvjpeg.version(lib)}, {os.path.basename(real)}]"
        thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 1), (64, 2)), lib=lib, label=label)
        thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 2),), post=True, lib=lib, label=label)


def input_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """How nvjpeg is handed a batch: 2 batches of 64 in flight with the resize and normalisation after
    each (the ``inflight`` rows' fastest shape), with the bitstreams where the caller keeps them (pageable) or
    in page-locked memory from the start (what ``pin_inputs`` makes of Triton's shared memory)."""
    for label, pin in ((" [pageable input]", False), (" [input page-locked from the start]", True)):
        thread_rows(nv, name, corpus, seconds, busy, report, plan=((64, 2),), post=True, label=label, pin=pin)


def size_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """What a served instance's changing batch sizes cost one lane: batches of 10 back to back, against
    batches of 5 to 15 images drawn at random (mean 10), each a size the state was not initialised for,
    and the same sizes with a decoder of its own per size (so no state is ever initialised again).  The host
    waits for the GPU after every batch, as an instance does.  Each row gives, per batch, the host ms of
    ``nvjpegDecodeBatchedInitialize`` and of the decode call, and the GPU's memory in use after the row."""
    import random

    tensors, shapes = accepted(nv, corpus)
    draw = random.Random(0)
    sizes = [draw.randint(5, 15) for _ in range(4096)]
    lib = TimedLib(nv.lib)
    one = nvjpeg.Decoder(lib, torch.device("cuda"), 1)
    per_size: dict[int, nvjpeg.Decoder] = {}

    def decoder_for(size: int) -> nvjpeg.Decoder:
        if size not in per_size:
            per_size[size] = nvjpeg.Decoder(lib, torch.device("cuda"), 1)
        return per_size[size]

    for label, size_of, decoder_of in (
        ("batches of 10, one state", lambda k: 10, lambda size: one),
        ("batches of 5-15 at random, one state initialised for each new size", lambda k: sizes[k % len(sizes)], lambda size: one),
        ("batches of 5-15 at random, a decoder per size", lambda k: sizes[k % len(sizes)], decoder_for),
    ):
        turn, order = itertools.count(), itertools.cycle(range(len(tensors)))

        def step(size_of=size_of, decoder_of=decoder_of, turn=turn, order=order):
            size = size_of(next(turn))
            chosen = [next(order) for _ in range(size)]
            decoder_of(size).decode([tensors[i] for i in chosen], [shapes[i] for i in chosen])
            torch.cuda.current_stream().synchronize()
            return size

        for _ in range(40):  # every size seen once before the clock starts
            step()
        lib.host, lib.gpu = {}, []
        images = batches = 0
        cpu0, start = os.times(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            images += step()
            batches += 1
        now, cpu1 = time.perf_counter(), os.times()
        rate = images / (now - start)
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000 / max(images, 1)
        batches = max(batches, 1)
        free, total = torch.cuda.mem_get_info()
        detail = (f"[per batch: Initialize host ms {lib.host.get('nvjpegDecodeBatchedInitialize', 0.0) * 1000 / batches:.3f}, "
                  f"decode call host ms {lib.host.get('nvjpegDecodeBatched', 0.0) * 1000 / batches:.2f}; "
                  f"GPU memory in use {(total - free) / 2**20:,.0f} MiB]")
        report.append((name, f"{label} {detail}", f"{rate:,.0f}", f"{cpu:.2f}", busy.between(now - seconds, now)))
        print(" | ".join(report[-1]), flush=True)


def handle_rows(nv: Nvjpeg, name: str, corpus: list[bytes], seconds: float, busy: Busy, report: list) -> None:
    """What the engines' time per batch depends on: the handle's flags (no buffering across batches,
    interpolated chroma upsampling) and the order of a batch (as drawn, or largest first, the order
    nvImageCodec's first hardware decoder sorted a batch into), one lane at batches of 64 and 16.  Each
    row gives the rate, and per batch the host ms of nvjpeg's decode call and the GPU ms of the decode."""
    tensors, shapes = accepted(nv, corpus)
    variants = [(0, "default flags"), (nvjpeg.NO_PIPELINE, "NO_PIPELINE"), (nvjpeg.INTERPOLATED_UPSAMPLING, "interpolated upsampling")]
    for batch in (64, 16):
        for flags, flag_name in variants:
            lib = TimedLib(nv.lib)
            for largest_first in (False, True):
                decoder = nvjpeg.Decoder(lib, torch.device("cuda"), 1, flags=flags, sort_from=1 if largest_first else None)
                order = itertools.cycle(range(len(tensors)))

                def step(decoder=decoder, order=order):
                    chosen = [next(order) for _ in range(batch)]
                    decoder.decode([tensors[i] for i in chosen], [shapes[i] for i in chosen])

                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                lib.host, lib.gpu = {}, []
                rate, cpu = timed(step, batch, seconds, warmup=0)
                now = time.perf_counter()
                calls = max(len(lib.gpu), 1)
                gpu = sorted(a.elapsed_time(b) for a, b in lib.gpu)
                detail = (f"[per batch: decode call host ms {lib.host.get('nvjpegDecodeBatched', 0.0) * 1000 / calls:.2f}, "
                          f"GPU ms median {gpu[len(gpu) // 2] if gpu else 0.0:.2f}]")
                what = f"batch {batch}: 1 lane, {flag_name}, {'largest first' if largest_first else 'as drawn'} {detail}"
                report.append((name, what, f"{rate:,.0f}", f"{cpu:.2f}", busy.between(now - seconds, now)))
                print(" | ".join(report[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="probe_out")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--photos", type=int, default=64, help="images (and distinct sizes) of the second corpus")
    parser.add_argument("--corpora", default="3-size,distinct-size", help="which corpora to decode")
    parser.add_argument("--rows", default="levers,lanes,host", help="groups of rows: levers (nvjpeg called here), "
                        "lanes (tritonpipe's decoder and nvjpeg's other backends), host (host cost of the header checks), "
                        "sync (what nvjpeg's batched call waits for on the host), threads (decoders on host threads of their "
                        "own, none waiting for another), inflight (the same with the resize and normalisation: 1 to 3 batches of 64 in "
                        "flight, to set beside DALI's prefetch depth), handle (the handle's flags and a batch's order), sizes (batches of "
                        "changing sizes, as an instance gets them, against one size), libraries (each libnvjpeg found), inputs (pinned "
                        "or pageable bitstreams, with 2 batches in flight), ex (nvjpegDecodeBatchedEx, "
                        "nvImageCodec's call, against nvjpegDecodeBatched), feed (one thread only calls nvjpeg while caller "
                        "threads check and allocate ahead, as DALI feeds the engines), hostshare (a share of each batch on libjpeg-turbo "
                        "host threads beside the engines, as cpu_decoder_share splits it), hostcause (that share taken apart beside one "
                        "decoder: decoding only, staging, the whole path, torch on one thread), small (served-size batches "
                        "from 4-8 callers, one decoder for all or a decoder each), pre2 (the bench's inprocess-pre-2 kernels "
                        "without its stages, each batch waited for or not), yuv (two batches in flight decoded into "
                        "interleaved RGB, the YUV planes as coded, or luma alone)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    nv, busy, report = Nvjpeg(), Busy(), []
    corpora = {"3-size": lambda: synthetic_corpus(48, 0), "distinct-size": lambda: photo_corpus(args.photos, 0)}
    for name in args.corpora.split(","):
        corpus = corpora[name]()
        groups = args.rows.split(",")
        if "host" in groups:
            host_rows(nv, name, corpus.images, args.seconds, report)
        if "lanes" in groups:
            lane_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "sync" in groups:
            sync_rows(nv, name, corpus.images, report)
        if "handle" in groups:
            handle_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "sizes" in groups:
            size_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "inputs" in groups:
            input_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "feed" in groups:
            feed_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "ex" in groups:
            ex_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "libraries" in groups:
            library_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "threads" in groups:
            thread_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "inflight" in groups:
            thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((64, 1), (64, 2), (64, 3)), post=True)
            if importable("nvidia.nvimgcodec"):
                for share in (0.15, 0.3):
                    thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((64, 2),), post=True, share=share)
            else:
                report.append((name, "batches in flight with a CUDA decoder's share", "nvImageCodec not installed", ""))
        if "small" in groups:  # served-size batches: calls in turn through one decoder, or side by side
            for shared in (True, False):
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((16, 8), (32, 4)), post=True,
                            shared=shared)
        if "hostshare" in groups:  # libjpeg-turbo on host threads beside the engines: cpu_decoder_share in one process
            thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((64, 1), (64, 2)), post=True)
            for share, threads in ((0.05, 4), (0.05, 8), (0.1, 8), (0.1, 12), (0.15, 14)):
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((64, 2),), post=True, share=share,
                            host_threads=threads)
            for threads in (4, 8, 14):  # the share found batch by batch (cpu_decoder_balance)
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, plan=((64, 2),), post=True, share=0.05,
                            host_threads=threads, balanced=True)
        if "hostcause" in groups:  # where the host share's collapse beside one decoder comes from, a part at a time
            thread_rows(nv, name, corpus.images, args.seconds, busy, report, **TWO_IN_FLIGHT)
            for mode in ("decode", "stage", "copy"):
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, **TWO_IN_FLIGHT, share=0.05, host_threads=8,
                            host_mode=mode)
            jpeg.HOST_COPY_OWN_STREAM = False  # the copies on the batch's stream, as they were, beside the row above
            try:
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, **TWO_IN_FLIGHT, share=0.05, host_threads=8,
                            label=" [copies on the batch's stream]")
            finally:
                jpeg.HOST_COPY_OWN_STREAM = True
            thread_rows(nv, name, corpus.images, args.seconds, busy, report, **dict(TWO_IN_FLIGHT, shared=False), share=0.05,
                        host_threads=8)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # torch's own parallel regions off: the share's threads alone on the host
            try:
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, **TWO_IN_FLIGHT, share=0.05, host_threads=8)
            finally:
                torch.set_num_threads(threads)
        if "pre2" in groups:  # the bench's inprocess-pre-2 shape without the stages: one decoder, two batches in flight
            for wait_each, parse in ((False, False), (True, False), (True, True)):
                thread_rows(nv, name, corpus.images, args.seconds, busy, report, **TWO_IN_FLIGHT, wait_each=wait_each,
                            parse=parse)
        if "yuv" in groups:
            yuv_rows(nv, name, corpus.images, args.seconds, busy, report)
        if "levers" in groups:
            rows(nv, name, corpus.images, args.seconds, busy, report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| corpus | what | img/s | host ms/img | JPEG engines / SMs busy % |", "|---|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in report]
    (out / "nvjpeg_probe.md").write_text(f"# nvjpeg probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
