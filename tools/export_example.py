"""tritonpipe export-example: make the example's ResNet-18-shaped ONNX classifier and sample JPEG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonpipe.examples import EXAMPLE_DIR, export_classifier, sample_jpeg

from ._cli import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonpipe export-example", description=__doc__)
    parser.add_argument("--output", type=Path, default=EXAMPLE_DIR, help="folder to write into (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="export again even if the files exist")
    args = parser.parse_args(argv)

    def body() -> int:
        onnx_path, jpeg_path = args.output / "resnet18.onnx", args.output / "sample.jpg"
        if args.force or not onnx_path.exists():
            print(f"exporting torchvision resnet18 (seed {args.seed}) to {onnx_path} ...", flush=True)
            export_classifier(onnx_path, seed=args.seed)
        if args.force or not jpeg_path.exists():
            jpeg_path.write_bytes(sample_jpeg())
        print(f"{onnx_path}\n{jpeg_path}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
