"""DALI, the GPU preprocessing most Triton users run today, measured in this process.

The pipeline is the one DALI users write for a classifier: mixed (GPU + hardware engine)
decode with a load split, a 224x224 bilinear resize without antialiasing, and
``crop_mirror_normalize`` to FP16 CHW.  It runs on the benchmark's own corpus; when a model
callable is given, its output is fed to the same model stage the served pipeline uses, so
"DALI + model" and tritonpipe's served pipeline do the same work.

DALI is optional: :func:`dali_available` says whether it imports, and the benchmark reports
its absence in one line.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...optional import why_missing

#: ImageNet mean and std on the 0-255 scale, as ``crop_mirror_normalize`` takes them
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def dali_available() -> str | None:
    """None when DALI imports, else why not (one line)."""
    missing = why_missing("nvidia.dali")
    return f"DALI is not installed ({missing}); pip install nvidia-dali-cuda130 to compare" if missing else None


@dataclass
class DaliResult:
    name: str
    batch: int
    images: int
    seconds: float
    #: when the timed batches began (``time.perf_counter()``); they ran for ``seconds`` from there
    started: float = 0.0

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _pipeline(images: list[bytes], batch: int, threads: int, device_id: int, hw_decoder_load: float,
              height: int, width: int, prefetch: int = 2, post: bool = True):
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(data, dtype=np.uint8) for data in images]
    cycle = itertools.cycle(arrays)

    def next_batch():
        return [next(cycle) for _ in range(batch)]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch)
    def classifier_preprocessing():
        jpegs = fn.external_source(source=next_batch, batch=True, dtype=types.UINT8, no_copy=False)
        decoded = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        if not post:
            return decoded
        resized = fn.resize(decoded, resize_x=width, resize_y=height, antialias=False)
        return fn.crop_mirror_normalize(resized, dtype=types.FLOAT16, output_layout="CHW", mean=list(MEAN), std=list(STD))

    pipe = classifier_preprocessing()
    pipe.build()
    return pipe


def run_dali(
    images: list[bytes],
    *,
    batch: int = 64,
    threads: int = 16,
    device_id: int = 0,
    hw_decoder_load: float = 0.65,
    size: tuple[int, int] = (224, 224),
    seconds: float = 5.0,
    model: Callable | None = None,
    name: str = "dali",
    prefetch: int = 2,
    post: bool = True,
) -> DaliResult:
    """Images per second of DALI's preprocessing (and of ``model`` on its output, when given).

    ``model`` takes one batched torch tensor (FP16 Nx3xHxW on the GPU) and returns anything;
    the GPU is synchronised before the clock stops.  ``prefetch`` is DALI's prefetch queue depth
    (Triton's DALI backend runs at 1); ``post=False`` measures the decode alone.
    """
    import torch

    if model is not None and not post:
        raise ValueError("a model needs DALI's resized, normalised batch: leave post on")
    pipe = _pipeline(images, batch, threads, device_id, hw_decoder_load, *size, prefetch=prefetch, post=post)

    def step() -> None:
        (out,) = pipe.run()
        if model is not None:
            tensor = torch.from_dlpack(out.as_tensor())
            model(tensor)

    for _ in range(3):  # warm-up: allocations, the decoder's first batches
        step()
    torch.cuda.synchronize(device_id)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += batch
    torch.cuda.synchronize(device_id)
    return DaliResult(name, batch, count, time.perf_counter() - start, start)
