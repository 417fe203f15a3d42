"""JPEG decoding with DALI's mixed decoder, a batch cut into chunks that overlap.

DALI's decoder shares each chunk between the hardware JPEG engines (``hw_load``) and nvjpeg's
CUDA decoder, whose Huffman decoding runs on DALI's host threads.  A Triton batch is cut into
chunks of ``chunk`` images, and up to ``depth`` chunks are in DALI at once: while one chunk's
images are copied out, the next is already being parsed and decoded.  Synchronous decoding of
whole batches leaves the engines idle while the host parses; measured figures are in
docs/BENCHMARKS.md.

Each image comes back as a dense 3xHxW uint8 RGB tensor of its own, ordered on the caller's
CUDA stream; EXIF orientation is left to the caller, as for the other decoders.  A chunk that
DALI fails on (a damaged file its parser does not catch) comes back as None for each of its
images, and the caller decodes those on the CPU, where each fails alone.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..optional import importable

log = logging.getLogger("tritonpipe")

#: DALI's best share for the hardware engines on an H200 with 16 cores (docs/BENCHMARKS.md)
HW_DECODER_LOAD = 0.65
CHUNK = 16
DEPTH = 2
MAX_THREADS = 64


def available() -> bool:
    return importable("nvidia.dali")


@dataclass(frozen=True)
class Settings:
    """How DALI decodes.

    Args:
        hw_load: share of each chunk the hardware engines take (0 to 1); nvjpeg's CUDA decoder
            takes the rest.
        threads: DALI's host threads; 0: one per core, up to 16.
        chunk: images per DALI iteration.
        depth: chunks in DALI at once, each in a pipeline of its own.
        huffman_threshold: the CUDA decoder Huffman-decodes images of more pixels than this on
            the GPU, smaller ones on host threads.
    """

    hw_load: float = HW_DECODER_LOAD
    threads: int = 0
    chunk: int = CHUNK
    depth: int = DEPTH
    huffman_threshold: int = 1000 * 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.hw_load <= 1.0:
            raise ValueError(f"hw_load must be in [0, 1], got {self.hw_load!r}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in [0, {MAX_THREADS}], got {self.threads!r}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1 image, got {self.chunk!r}")
        if not 1 <= self.depth <= 8:
            raise ValueError(f"depth must be in [1, 8], got {self.depth!r}")

    def host_threads(self) -> int:
        return self.threads or max(1, min(16, os.cpu_count() or 1))


class Decoder:
    """``depth`` DALI pipelines of one device, taking a batch's chunks in turn; dense CHW images out.

    Each pipeline holds one chunk at a time (DALI's prefetch depth 1: a deeper queue wants that many
    batches fed before its first run, and a Triton batch may hold fewer chunks).  While one pipeline's
    chunk is copied out, the others' chunks are being decoded.
    """

    INPUT = "jpegs"

    def __init__(self, device_index: int, settings: Settings):
        self.device_index = device_index
        self.settings = settings
        self.lock = threading.Lock()
        self.pipes = [self._build() for _ in range(settings.depth)]

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        settings = self.settings

        @pipeline_def(
            batch_size=settings.chunk,
            num_threads=settings.host_threads(),
            device_id=self.device_index,
            prefetch_queue_depth=1,
        )
        def decode_pipeline():
            jpegs = fn.external_source(name=self.INPUT, dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(
                jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=settings.hw_load, adjust_orientation=False,
                hybrid_huffman_threshold=settings.huffman_threshold,
            )
            return fn.transpose(images, perm=[2, 0, 1])  # CHW, as the other decoders give

        pipe = decode_pipeline()
        pipe.build()
        return pipe

    def _take(self, pipe, stream: torch.cuda.Stream) -> list[torch.Tensor]:
        """A pipeline's chunk, copied out into torch tensors on ``stream``.

        The images are read through ``__cuda_array_interface__`` (DALI's ``copy_to_external`` failed
        with cudaErrorInvalidValue beside torch 2.11 + CUDA 13 on an H200), and the copies are waited
        for: DALI reuses the chunk's buffers at the pipeline's next run.
        """
        (images,) = pipe.outputs()
        device = torch.device("cuda", self.device_index)
        with torch.cuda.stream(stream):
            copies = [torch.as_tensor(images[i], device=device).clone() for i in range(len(images))]
        stream.synchronize()
        return copies

    def decode(self, arrays: list[np.ndarray], stream: torch.cuda.Stream) -> list[torch.Tensor | None]:
        """One 3xHxW tensor per encoded array, or None for each image of a chunk DALI failed on."""
        chunk, depth = self.settings.chunk, self.settings.depth
        chunks = [arrays[i : i + chunk] for i in range(0, len(arrays), chunk)]
        results: list[torch.Tensor | None] = []
        with self.lock:
            fed = 0
            try:
                for taken in range(len(chunks)):
                    # chunk k goes to pipeline k % depth, fed only once that pipeline's last chunk is taken
                    while fed < len(chunks) and fed - taken < depth:
                        pipe = self.pipes[fed % depth]
                        pipe.feed_input(self.INPUT, chunks[fed])
                        pipe.schedule_run()
                        fed += 1
                    results += self._take(self.pipes[taken % depth], stream)
            except Exception as exc:  # noqa: BLE001 - the images go to the CPU decoder instead
                log.warning("DALI could not decode a chunk (%s); its images are decoded on the CPU", str(exc)[:300])
                self.pipes = [self._build() for _ in range(depth)]  # a pipeline that raised is not used again
                results += [None] * (len(arrays) - len(results))
        return results


@functools.cache
def decoder(device_index: int, settings: Settings) -> Decoder:
    """The pipeline of one device and settings, built once per process (the instance's one thread
    builds it; a model instance runs one batch at a time)."""
    return Decoder(device_index, settings)


def decode(arrays: list[np.ndarray], device_index: int, stream: torch.cuda.Stream, settings: Settings) -> list:
    """3xHxW uint8 RGB tensors on ``stream`` (None where DALI failed), one per encoded array."""
    if not arrays:
        return []
    return decoder(device_index, settings).decode(arrays, stream)
