"""Throughput of the two-stage pipeline against the same two steps run one after the other in one process.

    python examples/pipeline_from_python/bench.py --workers 4 --cores-per-worker 3 --model-cores 0 --images 480

Both run on the benchmark's corpus (synthetic JPEGs of 640x480, 1280x720 and 1920x1080).  For each
stage of the pipeline it prints its workers, the cores they are pinned to, and the cores they kept
busy during the timed run (their CPU time over the wall time, from /proc).
"""

import argparse
import os
import time
from pathlib import Path

import torch
from preprocess import preprocess
from stages import pipeline_stages

from tritonpipe import pipe
from tritonpipe.harness.corpus import synthetic_corpus
from tritonpipe.server.procs import python_stubs

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def allowed_cores(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


def sequential(images: list[bytes], model: torch.nn.Module, device: torch.device) -> float:
    """img/s of preprocess then the model, one image after the other, in this process."""
    model = model.to(device).half() if device.type == "cuda" else model.to(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        for image in images[:8]:
            model(preprocess(image)[None].to(device, dtype))
        start = time.perf_counter()
        for image in images:
            model(preprocess(image)[None].to(device, dtype)).float().cpu()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="instances of each stage")
    parser.add_argument("--cores-per-worker", type=int, default=4, help="cores of each preprocessing worker")
    parser.add_argument("--model-cores", type=int, default=0, help="cores of each inference worker; 0: unset")
    parser.add_argument("--oversubscribe", action="store_true")
    parser.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"))
    parser.add_argument("--images", type=int, default=480)
    args = parser.parse_args()
    images = synthetic_corpus(args.images).images
    stages = pipeline_stages(args.workers, args.cores_per_worker, args.model_cores, args.oversubscribe)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    with pipe(stages, device=args.device) as pipeline:
        pipeline.run(images[: 4 * args.workers])  # warm: every worker has run
        stubs = python_stubs(pipeline.server.process.pid)
        before = {stub.pid: cpu_seconds(stub.pid) for stub in stubs}
        start = time.perf_counter()
        pipeline.run(images)
        wall = time.perf_counter() - start
        busy = {stub.pid: cpu_seconds(stub.pid) - before[stub.pid] for stub in stubs}
        pinned = {stub.pid: allowed_cores(stub.pid) for stub in stubs}
    print(f"pipeline: {len(images) / wall:.1f} img/s ({len(images)} images, {wall:.1f} s)")
    for model in ("preprocess", "inference"):
        mine = [stub for stub in stubs if stub.model == model]
        cores = " ".join(pinned[stub.pid] for stub in mine)
        used = sum(busy[stub.pid] for stub in mine) / wall
        print(f"  {model}: {len(mine)} workers, allowed cores [{cores}], {used:.1f} cores busy")
    print(f"sequential, one process ({torch.get_num_threads()} torch threads, {device}): "
          f"{sequential(images, stages[1][1], device):.1f} img/s")


if __name__ == "__main__":
    main()
