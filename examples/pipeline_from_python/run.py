"""Serve the two-stage pipeline and check it against the same function and model called directly.

    python examples/pipeline_from_python/run.py                      # 4 workers x 4 cores per stage
    python examples/pipeline_from_python/run.py --workers 1 --cores-per-worker 1 --device cpu
"""

import argparse

import torch
from preprocess import preprocess
from stages import pipeline_stages

from tritonpipe import pipe
from tritonpipe.examples import sample_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cores-per-worker", type=int, default=4)
    parser.add_argument("--oversubscribe", action="store_true")
    parser.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"))
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    stages = pipeline_stages(args.workers, args.cores_per_worker, args.cores_per_worker, args.oversubscribe)
    model = stages[1][1]
    images = [sample_jpeg(480 + 8 * i, 640, seed=i) for i in range(args.images)]
    with pipe(stages, device=args.device) as pipeline:
        outputs = pipeline.run(images)
    with torch.no_grad():
        direct = [model(preprocess(image)[None]) for image in images]
    worst = max(float((got - want).abs().max()) for got, want in zip(outputs, direct))
    print(f"{len(images)} images served; largest difference from the direct calls: {worst:.2e}")


if __name__ == "__main__":
    main()
