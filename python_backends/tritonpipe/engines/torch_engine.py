"""Torch engine: TorchScript (``.ts``/``.pt``/``.pth``/``.jit``) and ``torch.export`` (``.pt2``) files.

On a GPU the model runs in FP16 unless ``precision=fp32``: floating inputs are cast to the model's
dtype and floating outputs back to their declared type, so the served types do not change.  When
every per-request dimension is fixed, each batch size is captured once as a CUDA graph and replayed
afterwards.  On the CPU the model runs eagerly in FP32.

Two layout and graph options. ``channels_last`` runs the module and its 4-D floating inputs in
channels_last memory format on a GPU; the stage turns it on by default, since served on an H100 it was
1.02-1.12x as fast.  It applies only to a module with 4-D weights (convolutions), and is tried at load on a
batch of one of zeros (free dims ``TRIAL_SIDE`` long): a module that fails that trial in channels_last (one that
flattens a feature map with ``view``, say) runs in the default layout, with a warning.  ``freeze`` (the stage
turns it on for a GPU by default: ResNet-18 FP16 at batch 1 took 0.30 instead of 0.40 ms of GPU time on an H100)
freezes a TorchScript module (BatchNorm folded into the convolutions; on a GPU also ``optimize_for_inference``,
which fuses conv+add+relu through cuDNN).

Inputs and outputs: a ``torch.export`` file describes itself (names and shapes from its signature
and example values; outputs are called ``output0``, ``output1``...).  A TorchScript file cannot,
so it needs ``inputs``; its outputs come from one dry run on the CPU unless ``outputs`` is given.
Both take ``"name:TYPE:DIMS[,name:TYPE:DIMS...]"`` with per-request DIMS (no batch), e.g.
``inputs="x:FP32:3x224x224"``; ``-1`` marks a free dimension.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InternalError
from ..spec import TORCH_TO_TRITON, TRITON_TO_TORCH, TensorSpec
from .base import TensorIO

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".jit")
EXPORT_SUFFIXES = (".pt2",)
TORCH_SUFFIXES = TORCHSCRIPT_SUFFIXES + EXPORT_SUFFIXES
#: a free dim's length in the trial batch that checks channels_last at load: large enough that a feature map
#: downsampled 32x keeps more than one pixel, where a view across channels and pixels fails in that layout
TRIAL_SIDE = 256


def parse_io(what: str, text: str) -> list[TensorIO]:
    """``"x:FP32:3x224x224,mask:INT64:-1"`` -> TensorIO list (shapes get a leading free batch dim)."""
    ios: list[TensorIO] = []
    for entry in str(text).split(","):
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"{what}: {entry.strip()!r} should look like name:FP32:3x224x224")
        name, dtype, dims = parts[0], parts[1].upper(), parts[2].lower()
        if dtype not in TRITON_TO_TORCH:
            raise ConfigError(f"{what}: {name!r} has unknown type {parts[1]!r}; use one of {', '.join(TRITON_TO_TORCH)}")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise ConfigError(f"{what}: {name!r} has dims {parts[2]!r}; write them like 3x224x224") from None
        if any(d == 0 or d < -1 for d in shape):
            raise ConfigError(f"{what}: {name!r} dims must be positive or -1, got {parts[2]!r}")
        if any(io.name == name for io in ios):
            raise ConfigError(f"{what}: {name!r} is given twice")
        ios.append(TensorIO(name, TensorSpec(dtype, (-1, *shape), batched=True)))
    return ios


def _spec(value: Any, what: str) -> TensorSpec:
    if not isinstance(value, torch.Tensor) or value.dtype not in TORCH_TO_TRITON:
        raise ConfigError(f"{what} is {type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' ' + str(value.dtype)}, not a tensor Triton can carry")
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)  # symbolic dims are free
    return TensorSpec(TORCH_TO_TRITON[value.dtype], shape, batched=True)


def _as_list(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return list(result.values())
    if isinstance(result, (list, tuple)):
        return list(result)
    raise ConfigError(f"the model returned {type(result).__name__}; return a tensor, a tuple or a dict of tensors")


def _export_io(path: Path) -> tuple[list[TensorIO], list[TensorIO]]:
    program = torch.export.load(str(path))
    signature = program.graph_signature
    nodes = list(program.graph.nodes)
    user_inputs = set(signature.user_inputs)
    inputs = [TensorIO(n.name, _spec(n.meta.get("val"), f"input {n.name!r}")) for n in nodes if n.op == "placeholder" and n.name in user_inputs]
    returned = next(n for n in nodes if n.op == "output").args[0]
    user_outputs = [a for a in returned if getattr(a, "name", None) in set(signature.user_outputs)]
    outputs = [TensorIO(f"output{i}", _spec(a.meta.get("val"), f"output {i}")) for i, a in enumerate(user_outputs)]
    return inputs, outputs


def _dry_run_outputs(path: Path, inputs: list[TensorIO]) -> list[TensorIO]:
    free = [io.name for io in inputs if any(d < 0 for d in io.spec.shape[1:])]
    if free:
        raise ConfigError(f"inputs {', '.join(free)} have free dims, so the outputs cannot be found by a dry run; give outputs=")
    dummy = [torch.zeros((1, *io.spec.shape[1:]), dtype=TRITON_TO_TORCH[io.spec.dtype]) for io in inputs]
    with torch.inference_mode():
        results = _as_list(load_module(path, torch.device("cpu"))(*dummy))
    specs = [_spec(r, f"output {i}") for i, r in enumerate(results)]
    return [TensorIO(f"output{i}", TensorSpec(s.dtype, (-1, *s.shape[1:]), batched=True)) for i, s in enumerate(specs)]


@functools.lru_cache(maxsize=32)
def _describe(path: str, mtime: int, inputs_text: str, outputs_text: str) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]:
    file = Path(path)
    if file.suffix.lower() in EXPORT_SUFFIXES:
        found_in, found_out = _export_io(file)
        inputs = parse_io("inputs", inputs_text) if inputs_text else found_in
        if len(inputs) != len(found_in):
            raise ConfigError(f"inputs names {len(inputs)} tensors but {file.name} takes {len(found_in)}")
        outputs = parse_io("outputs", outputs_text) if outputs_text else found_out
    else:
        if not inputs_text:
            raise ConfigError(
                f"{file.name} is TorchScript, which does not describe its inputs; give inputs=\"x:FP32:3x224x224\" "
                "(per-request dims), or export the model with torch.export to a .pt2 file"
            )
        inputs = parse_io("inputs", inputs_text)
        outputs = parse_io("outputs", outputs_text) if outputs_text else _dry_run_outputs(file, inputs)
    return tuple(inputs), tuple(outputs)


def describe_torch(path: Path, inputs_text: str = "", outputs_text: str = "") -> tuple[list[TensorIO], list[TensorIO]]:
    """Inputs and outputs of a torch model file (see the module doc for ``inputs``/``outputs``)."""
    try:
        inputs, outputs = _describe(str(path), path.stat().st_mtime_ns, inputs_text.strip(), outputs_text.strip())
    except (RuntimeError, ValueError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read torch model {path.name}: {exc}") from None
    return list(inputs), list(outputs)


def load_module(path: Path, device: torch.device) -> Any:
    if path.suffix.lower() in EXPORT_SUFFIXES:
        return torch.export.load(str(path)).module().to(device)  # exported modules refuse .eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still loads
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _layout_applies(device: torch.device) -> bool:
    """Whether channels_last is used on ``device``: on a GPU only (the CPU's speed with it is not measured)."""
    return device.type == "cuda"


def _has_4d_weights(module: Any) -> bool:
    """Whether ``module`` has a 4-D floating weight (a 2-D convolution's), which channels_last speeds up."""
    return any(p.dim() == 4 and p.is_floating_point() for p in module.parameters())


def prepare_module(
    module: Any, path: Path, device: torch.device, half: bool, channels_last: bool, freeze: bool,
    check: Callable[[Any], Any] | None = None,
) -> tuple[Any, list[str]]:
    """``module`` in FP16 and channels_last as asked, then frozen, in that order: ``.half()`` and
    ``.to(memory_format=)`` do not reach the constants of a frozen module.  Also what was done, for the description.
    ``check`` runs the optimized module once: cuDNN's fused operations are chosen at the first call, so one that
    fails there leaves the module frozen but not optimized."""
    done = []
    if half:
        module = module.half()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if not freeze:
        return module, done
    if path.suffix.lower() in EXPORT_SUFFIXES:
        log.info("freeze applies to TorchScript only; %s (torch.export) runs as it is", path.name)
        return module, done
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated like torch.jit, still works
        try:
            frozen = torch.jit.freeze(module)  # a frozen copy: the module itself is left as it was
        except Exception as exc:  # noqa: BLE001 - a model that cannot be frozen still runs
            log.warning("%s runs unfrozen: torch.jit.freeze refused it (%s); freeze = false skips the attempt",
                        path.name, _first_line(exc))
            return module, done
        done.append("frozen")
        if device.type == "cuda":  # on the CPU it would convert to MKLDNN layouts
            try:
                optimized = torch.jit.optimize_for_inference(frozen)  # in place: the frozen copy is changed too
                if check is not None:
                    check(optimized)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s runs frozen but not optimized for inference (%s)", path.name, _first_line(exc))
                frozen = torch.jit.freeze(module)
            else:
                frozen = optimized
                done.append("optimized for inference")
        module = frozen
    return module, done


class TorchEngine:
    def __init__(
        self,
        path: Path,
        device: torch.device,
        inputs_text: str = "",
        outputs_text: str = "",
        precision: str = "fp16",
        cuda_graph: bool = True,
        freeze: bool = False,
        channels_last: bool = False,
    ):
        self.inputs, self.outputs = describe_torch(path, inputs_text, outputs_text)
        self.device = device
        half = device.type == "cuda" and precision != "fp32"
        if half and precision in ("int8", "best"):
            log.info("the torch engine has no INT8; %s runs in FP16", path.name)
        self.compute = torch.float16 if half else torch.float32
        self.channels_last = channels_last and _layout_applies(device)
        if channels_last and not self.channels_last:
            log.info("channels_last applies on a GPU only; %s runs in the default layout on the CPU", path.name)
        static = all(d >= 0 for io in self.inputs for d in io.spec.shape[1:])
        check = self._dry_run if static else None
        module = load_module(path, device)
        if self.channels_last and not _has_4d_weights(module):
            log.info("channels_last: %s has no 4-D weights, so it runs in the default layout", path.name)
            self.channels_last = False
        self.module, done = prepare_module(module, path, device, half, self.channels_last, freeze, check)
        if self.channels_last:
            try:
                self._dry_run(self.module)
            except Exception as exc:  # noqa: BLE001 - e.g. a view across channels and pixels
                log.warning("%s runs in the default layout: a trial batch failed in channels_last (%s)", path.name, _first_line(exc))
                self.channels_last = False
                self.module, done = prepare_module(load_module(path, device), path, device, half, False, freeze, check)
        self.use_graphs = cuda_graph and device.type == "cuda" and static
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        kind = "torch.export" if path.suffix.lower() in EXPORT_SUFFIXES else "TorchScript"
        done += ["CUDA graphs"] if self.use_graphs else []
        self.description = f"torch ({', '.join([kind, str(device), 'fp16' if half else 'fp32', *done])})"

    def _dry_run(self, module: Any) -> None:
        """``module`` called once on a batch of one of zeros (free dims ``TRIAL_SIDE`` long), waited for."""
        zeros = [
            torch.zeros((1, *(d if d >= 0 else TRIAL_SIDE for d in io.spec.shape[1:])), dtype=TRITON_TO_TORCH[io.spec.dtype])
            for io in self.inputs
        ]
        with torch.no_grad():
            module(*(self._feed(t, io) for t, io in zip(zeros, self.inputs)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _layout(self, tensor: torch.Tensor) -> torch.memory_format:
        """The memory format the module is fed ``tensor`` in."""
        if self.channels_last and tensor.dim() == 4 and tensor.is_floating_point():
            return torch.channels_last
        return torch.contiguous_format

    def _feed(self, tensor: torch.Tensor, io: TensorIO) -> torch.Tensor:
        dtype = TRITON_TO_TORCH[io.spec.dtype]
        if not dtype.is_floating_point:
            return tensor.to(self.device, dtype)
        if self._layout(tensor) == torch.channels_last:
            return tensor.to(self.device, self.compute, memory_format=torch.channels_last)  # one copy for both
        return tensor.to(self.device, self.compute)

    def _call(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return _as_list(self.module(*inputs))

    def _replay(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The graph's outputs for ``inputs``, as views of its static outputs (the next replay overwrites them).
        Batches are padded with zeros up to a power of two, so a handful of graphs cover every batch size."""
        count = inputs[0].shape[0]
        bucket = 1 << max(0, count - 1).bit_length()
        key = tuple((bucket, *t.shape[1:]) for t in inputs)
        if key not in self.graphs:
            # in the fed tensors' layout (new_zeros would not keep channels_last), so copy_ stays a plain copy
            static_in = [
                torch.empty((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=self._layout(t)).zero_()
                for t in inputs
            ]
            for target, source in zip(static_in, inputs):
                target[:count].copy_(source)
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):  # warm up off the capture, as CUDA graphs require
                for _ in range(2):
                    self._call(static_in)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self._call(static_in)
            self.graphs[key] = (graph, static_in, static_out)
            log.info("captured a CUDA graph for input shapes %s", key)
        graph, static_in, static_out = self.graphs[key]
        for target, source in zip(static_in, inputs):
            target[:count].copy_(source)  # straight into the graph's input: no padded copy first
            if count < bucket:
                target[count:].zero_()
        graph.replay()
        return [t[:count] for t in static_out]

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feeds = [self._feed(t, io) for t, io in zip(inputs, self.inputs)]
        with torch.no_grad():
            results = self._replay(feeds) if self.use_graphs else self._call(feeds)
        if len(results) != len(self.outputs):
            raise InternalError(f"the model returned {len(results)} tensors but {len(self.outputs)} outputs are declared")
        outputs = []
        for result, io in zip(results, self.outputs):
            declared = TRITON_TO_TORCH[io.spec.dtype]
            if result.is_floating_point() and result.dtype != declared:
                result = result.to(declared)  # a copy: the graph's own outputs are left behind
            elif self.use_graphs:
                result = result.clone()  # the next replay overwrites the graph's outputs
            outputs.append(result)
        return outputs
