"""tritonpipe export-example: make an example's ONNX models (random weights from a seed) and its sample JPEG.

  resnet18          examples/resnet18: resnet18.onnx, the classifier
  detect_classify   examples/detect_classify: detector.onnx (FCOS head on a MobileNetV3 FPN, as a
                    YOLO-style head) and classifier.onnx (the same ResNet-18)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonpipe.examples import DETECT_DIR, EXAMPLE_DIR, export_classifier, export_detector, sample_jpeg

from ._cli import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tritonpipe export-example", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", choices=("resnet18", "detect_classify"), default="resnet18",
                        help="which example (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="folder to write into (default: the example's folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="export again even if the files exist")
    args = parser.parse_args(argv)

    def body() -> int:
        detect = args.example == "detect_classify"
        folder = args.output or (DETECT_DIR if detect else EXAMPLE_DIR)
        models = {folder / ("classifier.onnx" if detect else "resnet18.onnx"): ("torchvision resnet18", export_classifier)}
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
