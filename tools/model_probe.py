"""The torch engine's layout and graph options, one model four ways: as it is, ``freeze``, ``channels_last`` and
both, each in FP16 with CUDA graphs on the first GPU.

usage: python tools/model_probe.py [MODEL.ts] [--inputs x:FP32:3x224x224] [--batches 1,8,27,64] [--out DIR]

Without MODEL, a torchvision ResNet-18 with random weights (seed 0) is scripted into DIR and used.  For each way
and batch size the table gives the GPU time of one ``engine.run`` (CUDA events, median of 200 after 20 warm-up
calls, with the GPU kept busy while the host queues the call, so that the events time the GPU's own work), the
host time of the call, and the largest difference from the plain engine's outputs.  A way that fails says why in
its row.  The table goes to DIR/model_probe.md.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

WAYS = {"plain": {}, "freeze": {"freeze": True}, "channels_last": {"channels_last": True},
        "both": {"freeze": True, "channels_last": True}}
SPIN_CYCLES = 4_000_000  # about 2 ms of GPU work queued ahead of each timed call


def timed(engine, x, warm: int = 20, runs: int = 200) -> tuple[float, float]:
    """Medians of (GPU ms, host ms) of ``engine.run([x])``."""
    import torch

    for _ in range(warm):
        engine.run([x])
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        began = time.perf_counter()
        engine.run([x])
        host.append((time.perf_counter() - began) * 1e3)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def _why(exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [""])[0].replace("|", "/")
    return f"{type(exc).__name__}: {text}"[:150]


def _resnet18(out: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    path = out / "resnet18.ts"
    torch.jit.script(torchvision.models.resnet18().eval()).save(str(path))
    return path


def probe(path: Path, inputs: str, batches: list[int]) -> list[str]:
    """The table's lines, and each way's engine description after it."""
    import torch

    from tritonpipe.engines.torch_engine import TorchEngine, describe_torch
    from tritonpipe.spec import TRITON_TO_TORCH

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    engine_inputs = describe_torch(path, inputs)[0]
    if len(engine_inputs) != 1 or any(d < 0 for d in engine_inputs[0].spec.shape[1:]):
        raise SystemExit("error: the probe feeds one input of fixed per-request dims; give --inputs like x:FP32:3x224x224")
    spec = engine_inputs[0].spec
    xs = {b: torch.randn(b, *spec.shape[1:], device=device).to(TRITON_TO_TORCH[spec.dtype]) for b in batches}
    lines = ["| way | batch | GPU ms | host ms | max abs diff vs plain |", "|---|---:|---:|---:|---:|"]
    plain, described = {}, []
    for name, options in WAYS.items():
        try:
            engine = TorchEngine(path, device, inputs, precision="fp16", cuda_graph=True, **options)
        except Exception as exc:  # noqa: BLE001 - a way that fails gets a row saying why
            lines.append(f"| {name} | all | error | | {_why(exc)} |")
            continue
        described.append(f"- {name}: {engine.description}")
        for b in batches:
            try:
                out = engine.run([xs[b]])[0]
                if name == "plain":
                    plain[b] = out
                diff = f"{(out.float() - plain[b].float()).abs().max().item():.4g}" if b in plain else "no plain output"
                gpu_ms, host_ms = timed(engine, xs[b])
                lines.append(f"| {name} | {b} | {gpu_ms:.3f} | {host_ms:.3f} | {diff} |")
            except Exception as exc:  # noqa: BLE001
                lines.append(f"| {name} | {b} | error | | {_why(exc)} |")
        del engine
        torch.cuda.empty_cache()
    return [*lines, "", *described]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a TorchScript or torch.export file (default: ResNet-18, random weights)")
    parser.add_argument("--inputs", default="x:FP32:3x224x224", help="the model's input, per request, as the torch engine's inputs key")
    parser.add_argument("--batches", default="1,8,27,64", help="batch sizes, comma-separated")
    parser.add_argument("--out", default="probe_out", help="folder for model_probe.md (and the default model)")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes whole numbers separated by commas, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error("--batches takes sizes of 1 or more")
    if args.model and not Path(args.model).is_file():
        parser.error(f"no model file {args.model}")
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; this host has none")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.model) if args.model else _resnet18(out)
    head = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {path.name}"
    table = "\n".join([f"# model probe\n\n{head}\n", *probe(path, args.inputs, batches)]) + "\n"
    (out / "model_probe.md").write_text(table)
    print(table, end="")
    print(f"table: {out / 'model_probe.md'}")


if __name__ == "__main__":
    main()
