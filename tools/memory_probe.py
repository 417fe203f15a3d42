"""GPU memory that torch's caching allocator holds over a long run of DecodeTensor's kernels (decode, then the
one-launch resize with normalise and FP16), for each way of splitting the decode: the GPU decoder alone, a fixed
host share (``cpu_decoder_share``), and the share found batch by batch (``cpu_decoder_balance``); the host's
images in one allocation per batch or one per image; and with the allocator's expandable segments.

usage: python tools/memory_probe.py [--out DIR] [--batches 600] [--variants plain,share,bal,...]

Each variant runs in a process of its own, so that each starts from an empty cache.  One thread decodes
batches of 8 to 64 images (drawn at random, the same draw for every variant) while another resizes the batch
before, both on one stream, as an instance with two batches in flight does, over the distinct-size corpus and the 3-size one together.  A row gives the
cache (``memory_reserved``) after 10% of the batches and at the end, the most allocated at once, the
allocator's segments, how often it had to free its cache and retry, and img/s.  The table goes to
DIR/memory_probe.md.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

# name: (decode_jpeg_tensor's keywords, one allocation per batch for the host's images, allocator settings)
VARIANTS = {
    "plain": ({}, True, ""),
    "share": ({"cpu_decoder_share": 0.1, "cpu_decoder_threads": 4}, False, ""),
    "share-1buf": ({"cpu_decoder_share": 0.1, "cpu_decoder_threads": 4}, True, ""),
    "bal": ({"balance": 0.05, "cpu_decoder_threads": 4}, False, ""),
    "bal-1buf": ({"balance": 0.05, "cpu_decoder_threads": 4}, True, ""),
    "plain-exp": ({}, True, "expandable_segments:True"),
    "bal-exp": ({"balance": 0.05, "cpu_decoder_threads": 4}, False, "expandable_segments:True"),
    "bal-1buf-exp": ({"balance": 0.05, "cpu_decoder_threads": 4}, True, "expandable_segments:True"),
}
MIB = 1 << 20


def one(name: str, batches: int) -> dict:
    """Run one variant here and return its figures (the allocator settings are already in the environment)."""
    import torch

    from preprocess_probe import MEAN, SIDE, STD
    from tritonpipe.harness.corpus import photo_corpus, synthetic_corpus
    from tritonpipe.kernels import batch_resize, jpeg

    keywords, one_buffer, _ = VARIANTS[name]
    keywords = dict(keywords)
    jpeg.HOST_ONE_BUFFER = one_buffer
    device = torch.device("cuda", 0)
    corpus = [torch.frombuffer(bytearray(data), dtype=torch.uint8)
              for data in photo_corpus(64, 0).images + synthetic_corpus(48, 0).images]
    draw = random.Random(7)
    plan = [[draw.randrange(len(corpus)) for _ in range(draw.randint(8, 64))] for _ in range(batches)]
    balance = jpeg.ShareBalance(keywords.pop("balance")) if "balance" in keywords else None
    stream = torch.cuda.Stream(device)
    handed: queue.Queue = queue.Queue(maxsize=1)  # the decoded batch waiting for the tail: two batches in flight
    shares: list[float] = []
    marks: dict[str, float] = {}
    failed: list[str] = []

    def head() -> None:  # decodes batch k+1 while the tail resizes batch k, as an instance's two threads do
        with torch.cuda.stream(stream):
            for k, batch in enumerate(plan):
                if balance is not None:
                    shares.append(balance.share)
                try:
                    images = jpeg.decode_jpeg_tensor([corpus[i] for i in batch], device, gpu_decoder="nvjpeg",
                                                     balance=balance, **keywords)
                except Exception as exc:  # noqa: BLE001 - a probe row: the failure is its figure
                    failed.append(repr(exc)[:200])
                    break
                handed.put((k, images))
        handed.put(None)

    def tail() -> None:
        with torch.cuda.stream(stream):
            while (item := handed.get()) is not None:
                k, images = item
                good = [image for image in images if isinstance(image, torch.Tensor)]
                batch_resize.resize_batch(good, SIDE, SIDE, mean=MEAN, std=STD, dtype=torch.float16)
                del images, good
                stream.synchronize()
                if k == len(plan) // 10:
                    marks["early"] = torch.cuda.memory_reserved(device) / MIB

    workers = [threading.Thread(target=head), threading.Thread(target=tail)]
    start = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    stats = torch.cuda.memory_stats(device)
    return {
        "variant": name,
        "early": marks.get("early", 0.0),
        "end": torch.cuda.memory_reserved(device) / MIB,
        "peak_allocated": torch.cuda.max_memory_allocated(device) / MIB,
        "segments": stats.get("segment.all.current", 0),
        "large_segments": stats.get("segment.large_pool.current", 0),
        "retries": stats.get("num_alloc_retries", 0),
        "img_s": sum(len(batch) for batch in plan) / wall,
        "shares": f"{min(shares):.2f}-{max(shares):.2f}" if shares else "",
        "failed": failed[0] if failed else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="probe_out")
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process and print its figures
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batches)), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; this host has none")
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    lines = ["| variant | cache after 10% MiB | cache at the end MiB | most allocated MiB | segments (large) "
             "| alloc retries | img/s | balance's shares |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in names:
        env = dict(os.environ)
        if VARIANTS[name][2]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = VARIANTS[name][2]
        done = subprocess.run([sys.executable, __file__, "--one", name, "--batches", str(args.batches)], env=env,
                              capture_output=True, text=True)
        figures = next((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")), None)
        if figures is None or figures["failed"]:
            why = figures["failed"] if figures else (done.stderr.strip().splitlines() or ["no output"])[-1]
            lines.append(f"| {name} | FAILED: {why} |||||||")
        else:
            lines.append(f"| {name} | {figures['early']:,.0f} | {figures['end']:,.0f} | {figures['peak_allocated']:,.0f} "
                         f"| {figures['segments']} ({figures['large_segments']}) | {figures['retries']} "
                         f"| {figures['img_s']:,.0f} | {figures['shares']} |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_probe.md").write_text("# memory probe\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
