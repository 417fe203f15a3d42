"""tritonpipe export-example: make an example's ONNX models (random weights from a seed) and its sample JPEG.

  resnet18          examples/resnet18: resnet18.onnx, the classifier
  detect_classify   examples/detect_classify: detector.onnx (FCOS head on a MobileNetV3 FPN, as a
                    YOLO-style head) and classifier.onnx (the same ResNet-18)

With --torchscript, the classifier also as TorchScript (resnet18.ts or classifier.ts, the same weights), which the
torch engine runs: examples/resnet18/fused8.toml, the configuration of the GPU benchmarks, takes resnet18.ts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonpipe.examples import (
    DETECT_DIR,
    EXAMPLE_DIR,
    export_classifier,
    export_classifier_torchscript,
    export_detector,
    sample_jpeg,
)

from ._cli import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tritonpipe export-example", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", choices=("resnet18", "detect_classify"), default="resnet18",
                        help="which example (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="folder to write into (default: the example's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--torchscript", action="store_true",
                        help="also save the classifier as TorchScript (.ts), for the torch engine")
    parser.add_argument("--force", action="store_true", help="export again even if the files exist")
    args = parser.parse_args(argv)

    def body() -> int:
        detect = args.example == "detect_classify"
        folder = args.output or (DETECT_DIR if detect else EXAMPLE_DIR)
        classifier = folder / ("classifier" if detect else "resnet18")
        models = {classifier.with_suffix(".onnx"): ("torchvision resnet18", export_classifier)}
        if args.torchscript:
            models[classifier.with_suffix(".ts")] = ("torchvision resnet18 as TorchScript", export_classifier_torchscript)
        if detect:
            models[folder / "detector.onnx"] = ("an FCOS detector on MobileNetV3", export_detector)
        for path, (what, export) in models.items():
            if args.force or not path.exists():
                print(f"exporting {what} (seed {args.seed}) to {path} ...", flush=True)
                export(path, seed=args.seed)
        jpeg_path = folder / "sample.jpg"
        if args.force or not jpeg_path.exists():
            jpeg_path.write_bytes(sample_jpeg())
        print("\n".join(str(p) for p in [*models, jpeg_path]))
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
