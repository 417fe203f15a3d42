"""JPEG decoding with nvImageCodec: the hardware JPEG engines and the CUDA decoder on one batch.

A batch is dealt out to ``threads`` decoders, balanced by bytes, and each decodes its share on a
thread of its own.  nvImageCodec releases the GIL while it decodes, so the parsing and Huffman
work of one share can run while the engines and the GPU work on another, where one synchronous
call per batch leaves the engines idle while the host parses (what that bought, per host, is in
docs/BENCHMARKS.md).  Every decoder orders its output on the caller's CUDA stream.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..optional import importable

#: share of a batch sent to the hardware JPEG engines by default; the CUDA decoder takes the rest.
#: Measured on an H200 with the benchmark's corpus, one decoder per batch: 1.0 decoded 6,624 img/s
#: with 0.19 ms of host CPU per image, 0.65 (DALI's best, with DALI's own pipelining) 6,166 img/s
#: with 0.76 ms; the engines refuse what they cannot decode (progressive, 4:1:1), which then takes
#: the CUDA decoder whatever the share.
HW_DECODER_LOAD = 1.0
MAX_THREADS = 32
#: nvImageCodec's (and DALI's) default: the CUDA decoder Huffman-decodes images of more pixels than
#: this on the GPU, and smaller ones on host threads.
HYBRID_HUFFMAN_THRESHOLD = 1000 * 1000


@dataclass(frozen=True)
class Settings:
    """How a batch is decoded.

    Args:
        hw_load: share of each decoder's images the hardware engines take (0 to 1).
        threads: decoders working on one batch at once, each on its share.
        cpu_threads: host threads of each decoder (parsing, Huffman decoding); 0: one per core.
        fancy_upsampling: interpolate 4:2:0 and 4:2:2 chroma as libjpeg-turbo (and so Pillow)
            does, instead of replicating it.
        huffman_threshold: the CUDA decoder Huffman-decodes images of more pixels (width x
            height) than this on the GPU, and the others on host threads; 0 sends every image's
            Huffman decoding to the GPU.
    """

    hw_load: float = HW_DECODER_LOAD
    threads: int = 1
    cpu_threads: int = 0
    fancy_upsampling: bool = False
    huffman_threshold: int = HYBRID_HUFFMAN_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.0 <= self.hw_load <= 1.0:
            raise ValueError(f"hw_load must be in [0, 1], got {self.hw_load!r}")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {self.threads!r}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be 0 (one per core) or more, got {self.cpu_threads!r}")
        if self.huffman_threshold < 0:
            raise ValueError(f"huffman_threshold must be 0 or more pixels, got {self.huffman_threshold!r}")

    def options(self) -> str:
        """The nvImageCodec decoder options string these settings give."""
        options = [f":fancy_upsampling={int(self.fancy_upsampling)}"]
        if self.huffman_threshold != HYBRID_HUFFMAN_THRESHOLD:
            # a per-decoder option: only the CUDA decoder's plugin reads it
            options.append(f"nvjpeg_cuda_decoder:hybrid_huffman_threshold={self.huffman_threshold}")
        return " ".join(options)


def available() -> bool:
    return importable("nvidia.nvimgcodec")


def deal(sizes: Sequence[int], shares: int) -> list[list[int]]:
    """Indices of ``sizes`` dealt into at most ``shares`` groups of near-equal total size.

    Largest first, each to the lightest group so far; indices keep their order inside a group.
    """
    if shares < 1:
        raise ValueError(f"shares must be at least 1, got {shares}")
    groups: list[list[int]] = [[] for _ in range(min(shares, len(sizes)))]
    totals = [0] * len(groups)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = totals.index(min(totals))
        groups[lightest].append(index)
        totals[lightest] += sizes[index]
    return [sorted(group) for group in groups if group]


class Pool:
    """Decoders that share out each batch, and the threads that drive them.

    Args:
        decoders: objects with nvImageCodec's ``decode(code_streams, params=, cuda_stream=)``.
        params: the decode parameters every call gets.
        code_stream: makes a decoder's input from an encoded array.
    """

    def __init__(self, decoders: list[Any], params: Any, code_stream: Any):
        if not decoders:
            raise ValueError("a decoder pool needs at least one decoder")
        self.decoders = decoders
        self.params = params
        self.code_stream = code_stream
        self.executor = ThreadPoolExecutor(len(decoders) - 1, thread_name_prefix="nvimgcodec") if len(decoders) > 1 else None
        self.lock = threading.Lock()  # a decoder decodes one batch at a time

    def _decode(self, decoder: Any, arrays: list[np.ndarray], stream: int) -> list[Any]:
        code_streams = [self.code_stream(array) for array in arrays]
        images = decoder.decode(code_streams, params=self.params, cuda_stream=stream)
        if len(images) == len(arrays):
            return list(images)
        # some releases leave failed images out of the list: then only one at a time tells which
        return [decoder.decode(code_stream, params=self.params, cuda_stream=stream) for code_stream in code_streams]

    def decode(self, arrays: list[np.ndarray], stream: int) -> list[Any]:
        groups = deal([len(array) for array in arrays], len(self.decoders))
        if not groups:
            return []
        shares = [[arrays[i] for i in group] for group in groups]
        results: list[Any] = [None] * len(arrays)
        with self.lock:
            futures = [
                self.executor.submit(self._decode, decoder, share, stream)
                for decoder, share in zip(self.decoders[1:], shares[1:])
            ]
            try:
                decoded = [self._decode(self.decoders[0], shares[0], stream)]
            finally:
                wait(futures)  # no decoder may still be busy when the next batch comes
            decoded += [future.result() for future in futures]
        for group, images in zip(groups, decoded):
            for index, image in zip(group, images):
                results[index] = image
        return results


def make_pool(device_index: int, settings: Settings) -> Pool:
    """``settings.threads`` nvImageCodec decoders of one device."""
    from nvidia import nvimgcodec

    kinds = nvimgcodec.BackendKind
    backends = [nvimgcodec.Backend(kinds.HYBRID_CPU_GPU), nvimgcodec.Backend(kinds.CPU_ONLY)]
    if settings.hw_load > 0:
        backends.insert(0, nvimgcodec.Backend(kinds.HW_GPU_ONLY, load_hint=settings.hw_load))
    options = settings.options()
    decoders = [
        nvimgcodec.Decoder(device_id=device_index, max_num_cpu_threads=settings.cpu_threads, backends=backends, options=options)
        for _ in range(settings.threads)
    ]
    # orientation is applied by the caller for every decoder alike; P_RGB gives 3xHxW
    params = nvimgcodec.DecodeParams(
        apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB, sample_format=nvimgcodec.SampleFormat.P_RGB
    )
    return Pool(decoders, params, nvimgcodec.CodeStream)  # a CodeStream reads the array's bytes in place


_pools: dict[tuple[int, Settings], Pool] = {}
_pools_lock = threading.Lock()


def pool(device_index: int, settings: Settings) -> Pool:
    """The decoders of one device and settings; made once per process (each allocates engine buffers)."""
    with _pools_lock:
        found = _pools.get((device_index, settings))
        if found is None:
            found = _pools[(device_index, settings)] = make_pool(device_index, settings)
        return found


def decode(arrays: list[np.ndarray], device_index: int, stream: int, settings: Settings) -> list[Any]:
    """One nvImageCodec image (DLPack-capable, 3xHxW RGB on the GPU) or None per encoded array.

    ``stream`` is the CUDA stream (as an integer handle) the images are ordered on.
    """
    return pool(device_index, settings).decode(arrays, stream)
