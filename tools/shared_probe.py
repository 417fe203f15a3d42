"""The shared process (``shared_process``) measured without a server: instances are processes of their own,
each sending batches of a served size, as Triton's stubs do.

usage: python tools/shared_probe.py [--config examples/resnet18/fused8.toml] [--device cuda] [--instances 8] [--workers 2,4]
                                    [--batches 12,24] [--parts head,chain] [--seconds 5] [--corpus-sizes three]
                                    [--image-size HxW] [--out DIR]

Rows, in img/s:

- one process running the steps before the model on batches of 64, two in flight on two threads (the bench's
  ``inprocess-pre-2`` row): what one process gets out of the decoder;
- N instance processes, each running its whole chain (decode, resize, the model, outputs to the host) on batches
  of B, side by side: what served instances do without ``shared_process``;
- the same with ``shared_process = head`` and ``chain``: the instances send their batches to one shared process,
  which merges them.

The shared process's own log lines (its merged batches and where their time went, every 10 s) come on stderr.
The table goes to DIR/shared_probe.md.  Runs on a GPU (``--device cuda``) or, slowly, on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch
from google.protobuf import json_format

from tritonpipe.harness.chain import run_preprocessing_in_flight
from tritonpipe.harness.corpus import photo_corpus, synthetic_corpus
from tritonpipe.model.runtime import ModelRuntime
from tritonpipe.model.shared_client import SharedClient
from tritonpipe.pipeline.files import read_config_file
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.stages.base import ERROR


def instance(args: tuple) -> tuple[int, float]:
    """One instance process: its whole chain on batches of ``batch`` for ``seconds``, the shared process's part there
    where ``shared``.  Returns (images, seconds)."""
    config_text, version, device, batch, seconds, images, shared, workers, barrier = args
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        runtime = ModelRuntime(json.loads(config_text), Path(version), device)
        (key,) = runtime.inputs.values()
        tensors = [torch.frombuffer(bytearray(image), dtype=torch.uint8)[None] for image in images]
        client = SharedClient(config_text, Path(version), device, [key], os.getppid(), workers=workers) if shared else None
        offset = (os.getpid() * 7) % len(tensors)
        done = 0

        def one() -> None:
            nonlocal offset
            items = [{key: tensors[(offset + i) % len(tensors)]} for i in range(batch)]
            offset += batch
            runtime.run(items, client.run if client is not None else None)
            failed = next((item[ERROR] for item in items if ERROR in item), None)
            if failed is not None:
                raise RuntimeError(f"a corpus image failed: {failed}")
            runtime.responses(items)  # the outputs to the host, as a served instance answers
            if stream is not None:
                stream.synchronize()

        for _ in range(3):
            one()
        barrier.wait()  # every instance begins at once
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            one()
            done += batch
        elapsed = time.perf_counter() - began
    if client is not None:
        client.close()
    return done, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/resnet18/fused8.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--batches", default="12,24", help="batch sizes of each instance, comma-separated")
    parser.add_argument("--parts", default="head,chain", help="shared_process values to measure, comma-separated")
    parser.add_argument("--workers", default="", help="merged batches the shared process keeps in flight, "
                        "comma-separated values to measure (default: its own)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--corpus-sizes", choices=("three", "distinct"), default="three")
    parser.add_argument("--image-size", default="", help="HxW: a corpus of this one size instead (small images show "
                        "what each batch costs apart from decoding)")
    parser.add_argument("--out", default="probe_out")
    args = parser.parse_args()
    config_path = Path(args.config).resolve()
    device = torch.device("cuda", 0) if args.device.startswith("cuda") else torch.device("cpu")
    if args.image_size:
        corpus = synthetic_corpus(48, 0, sizes=(tuple(int(side) for side in args.image_size.lower().split("x")),))
    else:
        corpus = synthetic_corpus(48, 0) if args.corpus_sizes == "three" else photo_corpus(64, 0)
    images = list(corpus.images)
    worker_counts = [int(count) for count in args.workers.split(",")] if args.workers else [None]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritonpipe-shared-probe-") as folder:
        repos = {}
        for part in ["off", *args.parts.split(",")]:
            config = read_config_file(config_path)
            config.update(shared_process=part, instance_num=args.instances)
            graph = load_graph(config, name=config.get("name", "model"), base_dir=config_path.parent)
            repos[part] = generate_repository(graph, Path(folder) / part, device="gpu" if device.type == "cuda" else "cpu")
        rate, what = run_preprocessing_in_flight(repos["off"], images, device=device.type, batch=64, seconds=args.seconds)
        rows.append(("one process: the steps before the model, batches of 64, 2 in flight", rate))
        print(f"{rows[-1][0]}: {rate:,.0f} img/s ({what})", flush=True)
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, context.Pool(args.instances) as pool:
            barrier = manager.Barrier(args.instances)
            for batch in (int(b) for b in args.batches.split(",")):
                for part, repo in repos.items():
                    entry = repo.plan.name
                    config_text = json.dumps(json_format.MessageToDict(repo.configs[entry], preserving_proto_field_name=True))
                    for workers in [None] if part == "off" else worker_counts:
                        work = (config_text, str(repo.path / entry / "1"), str(device), batch, args.seconds, images,
                                part != "off", workers, barrier)
                        runs = pool.map(instance, [work] * args.instances)
                        rate = sum(done for done, _ in runs) / max(elapsed for _, elapsed in runs)
                        label = f"{args.instances} instances, batches of {batch}, " + (
                            "each its whole chain" if part == "off" else f"shared_process = {part}"
                            + (f", {workers} in flight" if workers is not None else ""))
                        rows.append((label, rate))
                        print(f"{label}: {rate:,.0f} img/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# shared process probe, {name}, {corpus.description}", "", "| what | img/s |", "|---|---:|"]
    lines += [f"| {label} | {rate:,.0f} |" for label, rate in rows]
    (out / "shared_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
