"""A generated Python model's stage chain, built from its config as Triton's stub builds it.

The generic Triton model and the soak tool's in-process reference both run models through
this class, so the reference computes exactly what the server does.  Nothing here imports
Triton or tritonclient.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..contract import ModelParams, warmup_batches
from ..errors import ConfigError, InternalError
from ..pipeline.grammar import parse_backend
from ..spec import TORCH_TO_TRITON, TRITON_TO_TORCH
from ..stages import build_stage, load_plugin
from ..stages.base import DATA, ERROR, Role, Stage
from ..stages.control import run_chain
from ..stages.fold import fold_post_decode

log = logging.getLogger("tritonpipe")

#: cached GPU memory kept after warm-up, in multiples of the largest batch's temporaries
RESERVE_FACTOR = 4
#: torch's caching allocator serves blocks below 1 MiB from a separate pool of small segments
SMALL_BLOCK = 1 << 20
#: item key holding how many rows the request brought, so each response is checked to carry as many
REQUEST_ROWS = "tritonpipe.request_rows"


def wait_for_gpu(stream, how: str = "spin") -> None:
    """Wait until the work queued on ``stream`` (a torch CUDA stream) is done, as ``how`` says:
    ``spin`` is CUDA's own wait (the thread keeps its core busy); ``yield`` polls an event and gives the
    core to other threads (and the GIL to this process's) between polls; ``block`` sleeps on an event the
    GPU signals.  Spinning answers soonest; the other two leave the cores to the other instances' stubs."""
    if how == "spin":
        stream.synchronize()
        return
    done = torch.cuda.Event(blocking=how == "block")
    done.record(stream)
    if how == "block":
        done.synchronize()
        return
    while not done.query():
        os.sched_yield()  # lets the GIL go too


def pick_device(kind: str, index: int = 0, *, strict: bool = False) -> torch.device:
    """Where a chain runs for an instance kind: ``cpu``, or ``gpu`` (``cuda``) / ``auto`` (the GPU when torch sees one).

    Triton's spellings (``GPU``, ``KIND_GPU``, ``KIND_AUTO``) are accepted, so the served model,
    the soak's reference and the benchmark decide alike.  Without a GPU, ``gpu`` falls back to the
    CPU as Triton's ``KIND_AUTO`` does, unless ``strict``.
    """
    wanted = kind.lower().removeprefix("kind_")
    wanted = "gpu" if wanted == "cuda" else wanted
    if strict and wanted not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"unknown device {kind!r}: cpu, gpu (or cuda) or auto")
    if wanted in ("gpu", "auto") and torch.cuda.is_available():
        return torch.device("cuda", index)
    if wanted == "gpu" and strict:
        raise ConfigError("a GPU was asked for (device gpu), but torch sees no CUDA GPU")
    return torch.device("cpu")


def _small_pool_size(size: tuple[int, int]) -> tuple[int, int] | None:
    """The configured sample scaled down until its decoded RGB image just fits a small block."""
    height, width = size
    scale = (0.95 * SMALL_BLOCK / (3 * height * width)) ** 0.5
    if scale >= 1:
        return None
    return max(1, int(height * scale)), max(1, int(width * scale))


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in CPU memory: one device-to-host copy when they share a dtype and device."""
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return tensors
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return [t.cpu() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class ModelRuntime:
    """Builds the chain of one generated model and shapes its outputs per request.

    Args:
        config: the model's config in Triton's JSON form.
        version_dir: the model's version folder (plugins and model files live there), or None.
        device: where the stages run.
    """

    def __init__(self, config: dict[str, Any], version_dir: Path | None, device: torch.device | str):
        params = ModelParams.from_config(config)
        if version_dir is not None:
            for plugin in params.plugins:
                load_plugin(version_dir / plugin)
        self.pipeline = params.pipeline
        #: Triton tensor name -> item key
        self.inputs: dict[str, str] = params.inputs
        self.outputs: dict[str, str] = params.outputs
        #: Triton output name -> (dtype, per-request dims) from the config, which every response must match
        self.output_specs = {
            o["name"]: (
                TRITON_TO_TORCH.get(str(o.get("data_type", "")).removeprefix("TYPE_")),
                [int(d) for d in o.get("dims", [])],  # int64 dims may arrive as strings
            )
            for o in config.get("output", [])
        }
        self.input_configs = {i["name"]: i for i in config.get("input", [])}
        self.max_batch = int(config.get("max_batch_size", 0))
        self.warmup = params.warmup
        self.host_outputs = params.host_outputs
        self.execution_timeout = params.execution_timeout
        self.overlap = params.overlap
        self.gpu_wait = params.gpu_wait
        self.pin_inputs = params.pin_inputs
        self.device = torch.device(device)
        self.root = build_stage(parse_backend(self.pipeline), device, version_dir)
        for line in fold_post_decode(self.root):
            log.info("%s", line)
        self.last_stage = _last_leaf(self.root).name

    def run(self, items: list[dict[str, Any]]) -> None:
        """Run the chain; each item ends with its result under its output keys, or an ``error``."""
        self._count_rows(items)
        run_chain([self.root], items)

    def halves(self) -> tuple[list[Stage], list[Stage]]:
        """The chain cut before its last step: an overlapping instance runs the first part in execute, the last on its tail thread.

        ``S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]`` gives the decode and the
        resize, then the model.  :meth:`run_head` then :meth:`run_tail` compute what :meth:`run`
        does.  A chain of one step is all head.
        """
        if self.root.role == Role.SEQUENCE and len(self.root.children) > 1:
            return self.root.children[:-1], self.root.children[-1:]
        return [self.root], []

    def run_head(self, items: list[dict[str, Any]]) -> None:
        """The first half of :meth:`halves`, on items fresh from their requests."""
        self._count_rows(items)
        run_chain(self.halves()[0], items)

    def run_tail(self, items: list[dict[str, Any]]) -> None:
        """The second half of :meth:`halves`, on items :meth:`run_head` left."""
        run_chain(self.halves()[1], items)

    def _count_rows(self, items: list[dict[str, Any]]) -> None:
        first = next(iter(self.inputs.values()), None)
        for item in items:
            data = item.get(first)
            if self.max_batch > 0 and isinstance(data, torch.Tensor) and data.dim() > 0:
                item[REQUEST_ROWS] = data.shape[0]

    def warm_up(self) -> tuple[int, str | None]:
        """Run the chain on sample requests at load, once per batch bucket, largest first.

        Every allocation a full batch needs (decoder buffers, the caching allocator's blocks, one
        CUDA graph per power-of-two batch) then happens before the first request, so memory stays
        flat while traffic grows and no request pays for a graph capture.  Encoded-image inputs get
        a synthetic JPEG of the configured size and, for the allocator's pool of small blocks, one
        just under 1 MiB decoded; other inputs get zeros.  Returns the number of sample requests
        run and, if the chain refused the samples, why (the model still serves).
        """
        size = self.warmup
        if size is None:
            return 0, None
        sizes = [size] + ([small] if (small := _small_pool_size(size)) else [])
        samples = [{key: self._sample(name, s) for name, key in self.inputs.items()} for s in sizes]
        if not any(self._is_encoded(name) for name in self.inputs):
            samples = samples[:1]  # no image input: the size makes no difference
        batches = warmup_batches(self.max_batch)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        count = 0
        for batch in batches:
            for sample in samples:
                items = [{key: value.clone() for key, value in sample.items()} for _ in range(batch)]
                self.run(items)
                count += batch
                failed = next((item[ERROR] for item in items if ERROR in item), None)
                if failed is not None:
                    return count, f"{type(failed).__name__}: {failed}"
        if on_gpu:
            self._keep_working_set()
        return count, None

    def _keep_working_set(self) -> None:
        """Leave the caching allocator enough free cached memory for any batch.

        Decoded images differ in size from batch to batch.  Blocks of 1 MiB and more are carved
        out of one large cached block, which coalesces again once the batch is freed; smaller ones
        come from 2 MiB segments, of which every image of the largest batch gets one (room for
        its decoded image and its resized copy).  The allocator then has no reason to ask the
        driver for new segments when the mix of sizes changes.
        """
        torch.cuda.synchronize(self.device)
        held = torch.cuda.memory_allocated(self.device)
        working = torch.cuda.max_memory_allocated(self.device) - held
        extra = held + RESERVE_FACTOR * working - torch.cuda.memory_reserved(self.device)
        small = SMALL_BLOCK - 512  # two fit one 2 MiB segment
        blocks = [torch.empty(small, dtype=torch.uint8, device=self.device) for _ in range(2 * max(1, self.max_batch))]
        if extra > 2 * SMALL_BLOCK:
            blocks.append(torch.empty(extra, dtype=torch.uint8, device=self.device))
        del blocks  # freed to the cache, not to the driver

    def _dtype_dims(self, name: str) -> tuple[str, list[int]]:
        config = self.input_configs.get(name, {})
        dims = [int(d) for d in config.get("dims", [-1])]  # int64 dims may arrive as strings
        return str(config.get("data_type", "TYPE_UINT8")).removeprefix("TYPE_"), dims

    def _is_encoded(self, name: str) -> bool:
        return self._dtype_dims(name) == ("UINT8", [-1])

    def _sample(self, name: str, size: tuple[int, int]) -> torch.Tensor:
        dtype, dims = self._dtype_dims(name)
        lead = [1] if self.max_batch > 0 else []
        if self._is_encoded(name):
            from ..examples import sample_jpeg

            data = sample_jpeg(*size, seed=0)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(*lead, len(data))
        return torch.zeros(*lead, *[max(d, 1) for d in dims], dtype=TRITON_TO_TORCH[dtype])

    def responses(self, items: list[dict[str, Any]]) -> list[dict[str, torch.Tensor] | BaseException]:
        """Each finished item's output tensors by Triton name, or the error it failed with.

        With host outputs, each output comes to the CPU in one transfer for the whole batch.
        """
        results: list[dict[str, torch.Tensor] | BaseException] = []
        for item in items:
            if ERROR in item:
                results.append(item[ERROR])
                continue
            try:
                results.append({name: self.output(item, name) for name in self.outputs})
            except Exception as exc:  # noqa: BLE001 - an output that cannot be shaped fails its request alone
                results.append(exc)
        if self.host_outputs:
            done = [r for r in results if isinstance(r, dict)]
            for name in self.outputs:
                for r, tensor in zip(done, _to_host([r[name] for r in done])):
                    r[name] = tensor
        return results

    def output(self, item: dict[str, Any], name: str) -> torch.Tensor:
        """Output ``name`` of a finished item, shaped as the response carries it.

        Raises :class:`InternalError` when it is not what the model config declares: a stage that
        answers with another dtype, shape or number of rows would otherwise be served as success.
        """
        key = self.outputs[name]
        # the chain leaves its last stage's result under "data"; extra outputs keep their own keys
        producer = f"stage {self.last_stage}" if key == DATA else f"the stage writing {key!r}"
        if key not in item:
            raise InternalError(f"{producer} wrote no {key!r} for output {name!r}")
        value = item[key]
        if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            value = torch.stack(list(value))  # a vector of per-image tensors (Tensor2Vector)
        if not isinstance(value, torch.Tensor):
            raise InternalError(f"{producer} gave output {name!r} as a {type(value).__name__}, not a tensor")
        dtype, dims = self.output_specs[name]
        if self.max_batch > 0:
            if value.dim() == len(dims):
                value = value.unsqueeze(0)
            dims = [item.get(REQUEST_ROWS, -1), *dims]
        if (
            (dtype is not None and value.dtype != dtype)
            or value.dim() != len(dims)
            or any(want >= 0 and want != got for want, got in zip(dims, value.shape))
        ):
            raise InternalError(
                f"{producer} gave output {name!r} as {_describe(value.dtype, list(value.shape))}, but the model "
                f"config declares {_describe(dtype, dims)} for this request"
            )
        return value.contiguous()


def _describe(dtype: torch.dtype | None, dims: list[int]) -> str:
    name = TORCH_TO_TRITON.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "any type"
    return f"{name}[{'x'.join('?' if d < 0 else str(d) for d in dims)}]"


def _last_leaf(stage: Any) -> Any:
    """The stage that writes a chain's ``result``: the last one that wraps nothing."""
    children = getattr(stage, "children", None) or []
    return _last_leaf(children[-1]) if children else stage


class Watchdog:
    """Calls ``on_expire(context)`` from its own thread when a watched block runs past ``timeout`` s.

    Python cannot interrupt a running torch op or a stuck plugin, so only another thread can
    notice; the generic model then fails the batch's requests and exits its stub, which the
    server owner replaces.

    Entering and leaving a block only sets one attribute: the thread looks every ``poll`` seconds
    (a tenth of the timeout, from 10 ms to 1 s), so a batch never wakes it.  Waking a thread at the start
    and end of every batch cost measurable host CPU per batch, and the GIL handed to it each time.
    An overrun is noticed up to ``poll`` seconds late.

    Args:
        timeout: seconds one watched block may take.
        on_expire: called once per block that overran, with the context given to :meth:`watch`.
    """

    def __init__(self, timeout: float, on_expire: Callable[[Any], None]):
        self.timeout = timeout
        self.on_expire = on_expire
        self.poll = max(0.01, min(1.0, timeout / 10))
        self._watched: tuple[float, Any] | None = None  # (deadline, context), written and read whole
        self._expired: tuple[float, Any] | None = None  # the block last called back for; only this thread writes it
        threading.Thread(target=self._watch, name="tritonpipe-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, context: Any) -> Iterator[None]:
        self._watched = (time.monotonic() + self.timeout, context)
        try:
            yield
        finally:
            self._watched = None

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll)
            watched = self._watched
            if watched is not None and watched is not self._expired and watched[0] <= time.monotonic():
                self._expired = watched  # once per block
                self.on_expire(watched[1])
