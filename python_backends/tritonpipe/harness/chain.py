"""The in-process limit: the generated models' stage trees called directly, no server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from ..errors import ConfigError
from ..model.runtime import ModelRuntime
from ..repository.generate import VERSION, GeneratedRepository


def pick_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one; ``gpu`` insists on it."""
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if device == "gpu":
        raise ConfigError("--device gpu was asked for, but torch sees no CUDA GPU")
    return torch.device("cpu")


@dataclass
class InprocessResult:
    device: str
    batch: int
    images: int
    seconds: float
    batch_ms: list[float]
    model_ms: dict[str, float] = field(default_factory=dict)  # per image, by model
    chunks: dict[str, int] = field(default_factory=dict)  # models called with fewer images at a time
    gpu_mem_before_mb: float | None = None
    gpu_mem_after_mb: float | None = None

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency of an image is the time of its batch."""
        return float(np.percentile(self.batch_ms, q)) if self.batch_ms else 0.0


class Chain:
    """The repository's Python models in ensemble order, each built as Triton would build it."""

    def __init__(self, repo: GeneratedRepository, device: torch.device):
        plan = repo.plan
        names = [step.model for step in plan.steps] if plan.needs_ensemble else [plan.name]
        model_stages = {m.name if plan.needs_ensemble else plan.name for m in plan.models if m.is_model_stage}
        self.device = device
        self.models: list[tuple[str, ModelRuntime, int]] = []  # name, its chain, largest call
        for name in names:
            config = repo.configs[name]
            if config.backend != "python":
                raise ConfigError(f"model {name!r} is not a Python model; the in-process run cannot call it")
            as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
            runtime = ModelRuntime(as_json, repo.path / name / VERSION, device)
            # an engine's profiles stop at max_batch_size, as the server's batches do
            largest = config.max_batch_size if name in model_stages and config.max_batch_size > 0 else 0
            self.models.append((name, runtime, largest))

    def chunks(self) -> dict[str, int]:
        """Models that are called with at most this many images at a time."""
        return {name: largest for name, _, largest in self.models if largest}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, inputs: list[torch.Tensor], timings: dict[str, float] | None = None) -> list[torch.Tensor]:
        """The last model's primary output per input, as the server would return it."""
        items: list[dict[str, Any]] = [{"data": tensor} for tensor in inputs]
        for name, runtime, largest in self.models:
            start = time.perf_counter()
            step = largest or len(items)
            for first in range(0, len(items), step):
                runtime.run(items[first : first + step])
            failed = next((item["error"] for item in items if "error" in item), None)
            if failed is not None:
                raise RuntimeError(f"in-process {name}: {failed}") from failed
            primary = next(iter(runtime.outputs))
            for item in items:
                # what the model's response and the next model's request do to the shape
                item["data"] = runtime.output(item, primary)
            if timings is not None:
                self.sync()
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        self.sync()
        return [item["data"] for item in items]


def run_inprocess(
    repo: GeneratedRepository,
    images: list[bytes],
    *,
    device: str = "auto",
    batch: int = 64,
    seconds: float = 10.0,
    warmup: int = 2,
    min_batches: int = 3,
    progress: bool = True,
    gpu_memory=None,
) -> InprocessResult:
    """Decode and infer the corpus in batches of ``batch`` for about ``seconds``; images/s and batch times."""
    from tqdm import tqdm

    target = pick_device(device)
    # requests arrive as [1, nbytes] uint8 host tensors, as in the server
    tensors = [torch.frombuffer(bytearray(image), dtype=torch.uint8)[None] for image in images]
    batches = [[tensors[(start + i) % len(tensors)] for i in range(batch)] for start in range(0, len(tensors), batch)]
    with torch.inference_mode():
        chain = Chain(repo, target)
        for index in range(warmup):
            chain.run(batches[index % len(batches)])
        before = gpu_memory() if gpu_memory else None
        batch_ms: list[float] = []
        timings: dict[str, float] = {}
        bar = tqdm(desc=f"in-process batch {batch} on {target}", unit="img", disable=not progress, leave=False)
        started = time.perf_counter()
        while len(batch_ms) < min_batches or time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            # timing each model adds one sync between models, which the server also has
            chain.run(batches[len(batch_ms) % len(batches)], timings)
            batch_ms.append((time.perf_counter() - tick) * 1000.0)
            bar.update(batch)
        elapsed = time.perf_counter() - started
        bar.close()
        after = gpu_memory() if gpu_memory else None
    images_done = batch * len(batch_ms)
    per_image = {name: total / images_done * 1000.0 for name, total in timings.items()}
    return InprocessResult(str(target), batch, images_done, elapsed, batch_ms, per_image, chain.chunks(), before, after)
