"""tritonpipe build-engine: build a TensorRT plan from an ONNX model, ahead of serving.

Beside the plan it writes PLAN.json: the fingerprint the plan was built for (model hash, GPU,
TensorRT version, settings) and its inputs, outputs and profiles, which lets tritonpipe generate
describe the plan (and write native tensorrt_plan configs) on a host without TensorRT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonpipe.choices import PRECISIONS
from tritonpipe.errors import ConfigError

from ._cli import run

EPILOG = """examples:
  tritonpipe build-engine model.onnx -o model.plan --max 8x3x224x224 --min 1x3x224x224 --precision fp16
  tritonpipe build-engine model.onnx --max "4;16" --fp32-layers /head/Softmax
  tritonpipe build-engine model.onnx --precision int8 --calibrate-input calib/ --calibrate-cache calib.cache

--max/--min take a batch size (4), a shape (4x3x224x224), one per input (4x3x224x224,4x10),
and one setting per optimization profile separated by ';'.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe build-engine", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("-o", "--output", help="plan file to write (default: the model's name with .plan)")
    parser.add_argument("--max", default="1", help="largest batch or shapes (default: %(default)s)")
    parser.add_argument("--min", default="1", help="smallest batch or shapes (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="default: %(default)s; falls back to what the GPU supports")
    parser.add_argument("--fp32-layers", default="", metavar="NAMES", help="comma-separated layers kept in FP32")
    parser.add_argument("--fp16-layers", default="", metavar="NAMES", help="comma-separated layers run in FP16")
    parser.add_argument("--calibrate-input", default="", metavar="PATH", help="INT8 calibration data: a .pt file or a folder of them")
    parser.add_argument("--calibrate-cache", default="", metavar="FILE", help="INT8 calibration cache (read if present, written after)")
    parser.add_argument("--workspace", type=int, default=0, metavar="MB", help="builder workspace limit in MiB (0: TensorRT's default)")
    parser.add_argument("--gpu", type=int, default=0, help="GPU index to build for (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="overwrite an existing plan")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from tritonpipe.engines.base import describe_onnx
        from tritonpipe.engines.profiles import fmt, resolve_profiles
        from tritonpipe.engines.tensorrt_engine import BuildSettings, build_plan_file, import_tensorrt, parse_layer_precisions

        onnx = Path(args.model)
        if onnx.suffix.lower() != ".onnx" or not onnx.is_file():
            raise ConfigError(f"{args.model!r} is not an ONNX file")
        output = Path(args.output) if args.output else onnx.with_suffix(".plan")
        if output.exists() and not args.force:
            raise ConfigError(f"{output} exists; pass --force to overwrite it")
        inputs, _ = describe_onnx(onnx)
        settings = BuildSettings(
            profiles=tuple(resolve_profiles(args.min, args.max, inputs, need_static=True)),
            precision=args.precision,
            layer_precisions=parse_layer_precisions(args.fp32_layers, args.fp16_layers),
            calibrate_input=args.calibrate_input,
            calibrate_cache=args.calibrate_cache,
            workspace_mb=args.workspace,
        )
        import_tensorrt()  # the clear "not installed" error comes before anything touches CUDA
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("building a TensorRT engine needs a CUDA GPU; none is visible here")
        build_plan_file(onnx, output, settings, torch.device("cuda", args.gpu), progress=not args.no_progress)
        print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and {output.name}.json")
        for index, profile in enumerate(settings.profiles):
            ranges = ", ".join(f"{io.name} {fmt(lo)}..{fmt(hi)}" for io, lo, hi in zip(inputs, profile.min, profile.max))
            print(f"  profile {index}: {ranges}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
