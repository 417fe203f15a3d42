"""JPEG decoding on the hardware JPEG engines through libnvjpeg itself, with the batch in flight.

torchvision's GPU decode drives the same engines through the same library, but asks for planar RGB,
initialises its decoder state again on every call and makes the host wait for each batch.  Here:

- the output is interleaved RGB (HxWx3), what the engines write;
- a decoder state is initialised again only when the part size changes (on an H100 that costs about 3 us, and
  a state kept for each size decoded no faster);
- a part's images are decoded into one allocation (:data:`ALIGN`), not one each;
- nothing waits on the host for the engines: a batch is submitted on the caller's CUDA stream;
- the decode calls of a process are made one at a time, on decoder states in turn, while the checks and
  allocations around them run on the callers' threads at once.  That is how DALI feeds the engines: on an
  H100, two callers with a batch of 64 each decoded and resized 10,208-10,533 img/s through one decoder
  (the engines 96-100% busy), where two decoders calling side by side made 7,631-8,465 (79-90%).  Across
  processes, turns taken on a lock file were slower served (0.82-0.83x, and 0.47-0.62x under MPS): each process
  keeps its own calls;
- a large batch goes to nvjpeg largest image first (:data:`SORT_FROM`).  DALI's order (grouped by chroma
  subsampling first) and a copy of the bitstreams into a pinned buffer before each call (DALI's decoders read
  page-locked memory) were slower on an H200, two batches of 64 in flight: 0.96x and 0.64x.

On an H200 that decoded 1.26x torchvision's rate at batch 64 and 1.54x at batch 10, with identical
pixels (docs/BENCHMARKS.md, "nvjpeg driven directly").

Only 3-component images should come here; those the hardware decoder does not accept (:meth:`Decoder.takes`)
come back marked so, for the caller to decode another way.  A part that nvjpeg refuses is decoded again one image at a time, so
that a damaged file fails alone (as None, for the caller's fallback).  The library is the one
torchvision loads where it is already in the process, else the ``nvidia-nvjpeg`` wheel's or the
system's (``TRITONPIPE_NVJPEG_LIBRARY``, a path, comes before all of them); no Triton import, no compiler.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import torch

from .threads import submit_in_callers_mode

#: parts a batch is cut into, each checked on a host thread of its own.  One: on an H200 one part was faster
#: than two served (8 instances, both corpora) and in one process at batch 64
LANES = 1
#: decoder states the calls rotate over: a state is reused only once its last batch is off the engines.
#: On an H100, two callers with batches of 64: 10,705 img/s on 2 states, 10,452 on one
STATES = 2
#: a part of this many images or more goes to nvjpeg largest image first.  On an H200, one decoder alone at
#: batch 64 then took 5.9 instead of 7.4 ms of GPU time per batch on the 3-size corpus and 8.6 instead of
#: 15.8 ms on photos of distinct sizes; but 8 served instances, each sorting its batches of about 10,
#: decoded distinct sizes 22% slower than unsorted, so small parts keep the caller's order
SORT_FROM = 32
#: where each decoded image of a part starts in the part's one output allocation: a multiple of this many bytes,
#: as every image had its own allocation before (the caching allocator aligns its blocks to 512 bytes)
ALIGN = 512
_BACKEND_HARDWARE = 3  # nvjpegBackend_t
_OUTPUT_RGBI = 5  # nvjpegOutputFormat_t: interleaved RGB
_CSS_444 = 0  # nvjpegChromaSubsampling_t
_MAX_COMPONENT = 4
_ARCH_MISMATCH = 7  # nvjpegStatus_t: no hardware decoder on this GPU
#: nvjpegCreateEx flags: no buffering of images across the engines' batches; chroma upsampling interpolated
NO_PIPELINE, INTERPOLATED_UPSAMPLING = 1, 32


log = logging.getLogger("tritonpipe")

#: a libnvjpeg to use before any other (a path), e.g. a newer release than the one torchvision ships
LIBRARY_ENV = "TRITONPIPE_NVJPEG_LIBRARY"


class NvjpegError(RuntimeError):
    """An nvjpeg call returned a status other than success."""

    def __init__(self, call: str, status: int):
        super().__init__(f"{call} failed with nvjpeg status {status}")
        self.status = status


class Image(ctypes.Structure):
    """nvjpegImage_t: one pointer and one pitch per plane (interleaved output uses the first)."""

    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENT), ("pitch", ctypes.c_size_t * _MAX_COMPONENT)]


def parts(count: int, lanes: int = LANES) -> list[range]:
    """``range(count)`` cut into at most ``lanes`` consecutive parts of near-equal length, none empty."""
    if count < 0 or lanes < 1:
        raise ValueError(f"parts needs count >= 0 and lanes >= 1, got {count} and {lanes}")
    cuts = min(lanes, count)
    bounds = [round(i * count / cuts) for i in range(cuts + 1)] if cuts else [0]
    return [range(bounds[i], bounds[i + 1]) for i in range(cuts)]


def _library_paths() -> list[str]:
    """Where libnvjpeg may be: ``TRITONPIPE_NVJPEG_LIBRARY``, a copy already in this process
    (torchvision's), the pip wheels', the system's."""
    paths: list[str] = [os.environ[LIBRARY_ENV]] if os.environ.get(LIBRARY_ENV) else []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            paths += sorted({line.split()[-1] for line in maps if "libnvjpeg" in line and "/" in line})
    for root in sys.path:
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvjpeg.so*")))
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libnvjpeg.so*")))
    found = ctypes.util.find_library("nvjpeg")
    return paths + ([found] if found else [])


@functools.cache
def library() -> ctypes.CDLL | str:
    """libnvjpeg with the calls used here declared, or why it cannot be loaded."""
    tried = []
    for path in _library_paths():
        try:
            return load(path)
        except (OSError, AttributeError) as exc:
            tried.append(f"{path}: {exc}")
            if path == os.environ.get(LIBRARY_ENV):
                log.warning("%s=%s does not load (%s); the next libnvjpeg found is used instead", LIBRARY_ENV, path, exc)
    return "libnvjpeg was not found (pip install nvidia-nvjpeg, or the CUDA toolkit's)" + (f"; tried {'; '.join(tried)}" if tried else "")


def load(path: str) -> ctypes.CDLL:
    """The libnvjpeg at ``path`` with the calls used here declared; OSError where it does not load,
    AttributeError where it lacks one of them."""
    lib = ctypes.CDLL(path)
    void, size, integer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    declared = {
        "nvjpegCreateEx": [integer, void, void, ctypes.c_uint, ctypes.POINTER(void)],
        "nvjpegJpegStateCreate": [void, ctypes.POINTER(void)],
        "nvjpegJpegStateDestroy": [void],
        "nvjpegJpegStreamCreate": [void, ctypes.POINTER(void)],
        "nvjpegJpegStreamParseHeader": [void, void, size, void],
        "nvjpegDecodeBatchedSupported": [void, void, ctypes.POINTER(integer)],
        "nvjpegDecodeBatchedInitialize": [void, void, integer, integer, integer],
        "nvjpegDecodeBatched": [void, void, void, void, void, void],
    }
    optional = {  # newer libraries' calls, used where present
        "nvjpegDecodeBatchedPreAllocate": [void, void, integer, integer, integer, integer, integer],
        "nvjpegGetHardwareDecoderInfo": [void, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint)],
        "nvjpegGetProperty": [integer, ctypes.POINTER(integer)],
    }
    for name, argtypes in optional.items():
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, integer
    for name, argtypes in declared.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, integer
    return lib


def version(lib) -> str:
    """libnvjpeg's release, major.minor.patch, or "unknown" where it does not say."""
    if not hasattr(lib, "nvjpegGetProperty"):
        return "unknown"
    numbers = []
    for prop in range(3):  # libraryPropertyType: MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        value = ctypes.c_int(-1)
        if lib.nvjpegGetProperty(prop, ctypes.byref(value)) != 0:
            return "unknown"
        numbers.append(str(value.value))
    return ".".join(numbers)


def drain(stream) -> None:
    """Wait on the host for the work queued on ``stream``, if there is any.

    nvjpeg's hardware decoder writes its outputs when it is called, not when the stream gets to it
    (reported on an H100 for nvJPEG 12.3 to 13.2, where torchvision's and TorchCodec's GPU decodes
    overwrote tensors that queued kernels were still reading).  The caching allocator hands out memory in stream order,
    so a block freed while queued work still reads it may be a new output at once.  Where nothing is
    queued (each served batch starts on an idle stream) this costs one query."""
    if stream is not None and not stream.query():
        stream.synchronize()


class _State:
    """One decoder state, the batch size it was initialised for, and its last part's event and inputs.
    Used only under the decoder's engine lock."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.state = ctypes.c_void_p()
        decoder.call("nvjpegJpegStateCreate", decoder.handle, ctypes.byref(self.state))
        self.pooled = self.pool()
        self.size: int | None = None
        self.done: torch.cuda.Event | None = None
        self.inputs: list[torch.Tensor] = []  # what the engines may still read

    def pool(self) -> bool:
        """Ask nvjpeg to keep this state's buffers in a memory pool across batches (what nvImageCodec's
        hardware decoder does, for its speed), where the library has the call and the decoder wants it."""
        decoder = self.decoder
        if not decoder.pooling or not hasattr(decoder.lib, "nvjpegDecodeBatchedPreAllocate"):
            return False
        try:
            decoder.call("nvjpegDecodeBatchedPreAllocate", decoder.handle, self.state, 1, 1, 1, _CSS_444, _OUTPUT_RGBI)
        except NvjpegError:
            return False  # an optimisation only: the state decodes without it
        return True

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        self.inputs = []

    def reset(self) -> None:
        """A fresh state after a refusal: nvjpeg may leave the old one unusable."""
        self.wait()
        with contextlib.suppress(NvjpegError):
            self.decoder.call("nvjpegJpegStateDestroy", self.state)
        self.state = ctypes.c_void_p()
        self.decoder.call("nvjpegJpegStateCreate", self.decoder.handle, ctypes.byref(self.state))
        self.pooled = self.pool()
        self.size = None

    def submit(self, datas: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], stream) -> None:
        """Decode one part into ``outputs`` (HxWx3 each) on ``stream`` (a torch CUDA stream, or None off CUDA)."""
        self.wait()
        decoder, count = self.decoder, len(datas)
        if self.size != count:
            decoder.call("nvjpegDecodeBatchedInitialize", decoder.handle, self.state, count, 1, _OUTPUT_RGBI)
            self.size = count
        images = (Image * count)()
        for image, out in zip(images, outputs):
            image.channel[0], image.pitch[0] = out.data_ptr(), out.shape[1] * 3
        pointers = (ctypes.c_void_p * count)(*[data.data_ptr() for data in datas])
        lengths = (ctypes.c_size_t * count)(*[data.numel() for data in datas])
        self.inputs = list(datas)
        handle = stream.cuda_stream if stream is not None else 0
        decoder.call("nvjpegDecodeBatched", decoder.handle, self.state, pointers, lengths, images, handle)
        if stream is not None:
            # a blocking event: a thread that waits for the engines gives its core up meanwhile
            self.done = torch.cuda.Event(blocking=True)
            self.done.record(stream)


class Decoder:
    """The hardware JPEG decoder of one device.

    The engines are fed the way DALI feeds them: nvjpeg's decode calls are made one at a time (its host
    work per call is what paces the engines, and calls made side by side on separate handles or states
    slowed each other down), while everything around them (nvjpeg's header check of each image, the
    order of a batch, the output allocation) runs on the callers' threads at once.  Two callers with a
    batch each thus keep the engines busy: one checks and allocates while the other's batch is submitted.
    The calls rotate over ``states`` decoder states, so that a state is reused only once its previous
    batch is off the engines.  With ``lanes`` above one, a batch is cut into that many parts, checked side
    by side on a host thread each.

    Args:
        lib: libnvjpeg (or a stand-in with the same calls).
        device: where the images go.
        lanes: parts of a batch checked at once, each on a thread of its own.
        pool: keep each state's buffers in nvjpeg's memory pool (``nvjpegDecodeBatchedPreAllocate``) where
            the library has the call.
        flags: ``nvjpegCreateEx``'s flags for the handle (``NO_PIPELINE``, ``INTERPOLATED_UPSAMPLING``).
        sort_from: hand a part of at least this many images to nvjpeg largest image first (the results keep
            the caller's order); None: never.  See :data:`SORT_FROM`.
        states: decoder states the calls rotate over.  See :data:`STATES`.
    """

    def __init__(self, lib, device: torch.device, lanes: int = LANES, pool: bool = True, flags: int = 0,
                 sort_from: int | None = None, states: int = STATES):
        if lanes < 1 or states < 1:
            raise ValueError(f"lanes and states must be at least 1, got {lanes} and {states}")
        self.lib, self.device, self.pooling = lib, torch.device(device), pool
        self.sort_from, self.parts = sort_from, lanes
        self.lock = threading.Lock()  # one decode call at a time
        self.handle = ctypes.c_void_p()
        self.headers = threading.local()  # each thread's header stream, for the checks it makes
        with self._on_device():
            self.call("nvjpegCreateEx", _BACKEND_HARDWARE, None, None, flags, ctypes.byref(self.handle))
            self.engines = self._engines()
            self.states = [_State(self) for _ in range(states)]
        self.threads = ThreadPoolExecutor(lanes, thread_name_prefix="nvjpeg-lane") if lanes > 1 else None
        self.turn = 0

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise NvjpegError(name, status)

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _engines(self) -> tuple[int, int] | None:
        """(hardware JPEG engines, cores per engine), where the library says."""
        if not hasattr(self.lib, "nvjpegGetHardwareDecoderInfo"):
            return None
        engines, cores = ctypes.c_uint(0), ctypes.c_uint(0)
        try:
            self.call("nvjpegGetHardwareDecoderInfo", self.handle, ctypes.byref(engines), ctypes.byref(cores))
        except NvjpegError:
            return None
        return engines.value, cores.value

    def _header(self) -> ctypes.c_void_p:
        """This thread's header stream (nvjpeg's parsed JPEG header), made on its first check."""
        header = getattr(self.headers, "stream", None)
        if header is None:
            header = ctypes.c_void_p()
            self.call("nvjpegJpegStreamCreate", self.handle, ctypes.byref(header))
            self.headers.stream = header
        return header

    def takes(self, data: torch.Tensor) -> bool:
        """Whether the hardware decoder accepts this JPEG (baseline, a subsampling the engines read)."""
        supported = ctypes.c_int(-1)
        try:
            header = self._header()
            self.call("nvjpegJpegStreamParseHeader", self.handle, data.data_ptr(), data.numel(), header)
            self.call("nvjpegDecodeBatchedSupported", self.handle, header, ctypes.byref(supported))
        except NvjpegError:
            return False
        return supported.value == 0

    def _outputs(self, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """HxWx3 uint8 images for a part, in one allocation (each starting on an ALIGN boundary): one call to
        the caching allocator instead of one per image, and a single block to reuse where images of many
        sizes come."""
        starts, end = [], 0
        for height, width in sizes:
            starts.append(end)
            end += -(-height * width * 3 // ALIGN) * ALIGN
        buffer = torch.empty(end, dtype=torch.uint8, device=self.device)
        # one view op an image (a slice and a view cost twice the host time)
        return [buffer.as_strided((h, w, 3), (w * 3, 3, 1), start) for (h, w), start in zip(sizes, starts)]

    def _submit(self, datas: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], stream) -> None:
        """One decode call, made while no other call of this decoder is made, on the next state; a state
        nvjpeg refused is made afresh before the error goes on."""
        with self.lock:
            state = self.states[self.turn % len(self.states)]
            self.turn += 1
            try:
                state.submit(datas, outputs, stream)
            except NvjpegError:
                state.reset()
                raise

    def _part(self, datas: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], stream) -> list[torch.Tensor | None | bool]:
        """Decode one part of a batch: an image each, None where nvjpeg refused it, False where the
        engines do not take it."""
        with self._on_device(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            results: list[torch.Tensor | None | bool] = [self.takes(data) for data in datas]
            taken = [i for i, ok in enumerate(results) if ok]
            if not taken:
                return results
            if self.sort_from is not None and len(taken) >= self.sort_from:
                taken.sort(key=lambda i: -sizes[i][0] * sizes[i][1])
            outputs = self._outputs([sizes[i] for i in taken])
            decoded: list[torch.Tensor | None] = list(outputs)
            try:
                self._submit([datas[i] for i in taken], outputs, stream)
            except NvjpegError:
                # one damaged file refuses its whole part: decode the part one image at a time
                for k, i in enumerate(taken):
                    try:
                        self._submit([datas[i]], [outputs[k]], stream)
                    except NvjpegError:
                        decoded[k] = None
            for i, image in zip(taken, decoded):
                results[i] = image
            return results

    def decode(self, datas: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor | None | bool]:
        """HxWx3 uint8 RGB images of contiguous 1-D uint8 CPU ``datas`` ((height, width) each in ``sizes``),
        ordered on the current CUDA stream; None where nvjpeg refused the image, False where the engines
        do not take it (see :meth:`takes`).  Safe to call from several threads at once."""
        results: list[torch.Tensor | None | bool] = [None] * len(datas)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        cut = parts(len(datas), self.parts)
        # a batch of one part (a single image, say) is decoded on the caller's thread: handing it to a
        # thread of its own costs more than it saves (on an H200, c=1 p50 3.34 ms against 2.77 on one lane)
        threads = self.threads if len(cut) > 1 else None
        jobs = []
        for part in cut:
            args = ([datas[i] for i in part], [sizes[i] for i in part], stream)
            # a state's buffers are made by whichever thread first needs it: the lanes run in the caller's mode
            jobs.append((part, submit_in_callers_mode(threads, self._part, *args) if threads else self._part(*args)))
        if threads:
            # every part is finished before the call returns, even where one of them failed
            futures.wait([job for _, job in jobs])
            jobs = [(part, job.result()) for part, job in jobs]
        for part, images in jobs:
            for i, image in zip(part, images):
                results[i] = image
        return results


_decoders: dict[tuple[int, int], Decoder | str] = {}
_decoders_lock = threading.Lock()


def decoder(device: torch.device, lanes: int = LANES) -> Decoder | str:
    """The decoder of a CUDA device with ``lanes`` parts in flight, made once per process, or why there is none."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _decoders_lock:
        found = _decoders.get((index, lanes))
        if found is None:
            lib = library()
            if isinstance(lib, str):
                found = lib
            else:
                try:
                    found = Decoder(lib, torch.device("cuda", index), lanes, sort_from=SORT_FROM)
                    log.info("decoder=nvjpeg on cuda:%d: libnvjpeg %s (%s)", index, version(lib), getattr(lib, "_name", "?"))
                except NvjpegError as exc:
                    found = ("this GPU has no hardware JPEG decoder (A100, H100, H200 and later have one)"
                             if exc.status == _ARCH_MISMATCH else f"nvjpeg's hardware decoder could not start: {exc}")
            _decoders[(index, lanes)] = found
        return found


def problem(device: torch.device, lanes: int = LANES) -> str | None:
    """Why the hardware decoder cannot run on ``device``, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "nvjpeg's hardware decoder needs a CUDA GPU"
    found = decoder(device, lanes)
    return found if isinstance(found, str) else None
