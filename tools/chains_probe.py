"""A served configuration's chains with no server: what its instances' work gets out of the device by itself.

Each instance is a process of its own, as Triton's stubs are, running the model's chain (or the part of it asked
for) on batches of the sizes Triton forms under load, all at once. Set beside the bench's served rows and its
``floor`` (Triton and the stubs with no work), it says which of the two holds the served rate; the parts say which
step of the chain does, as the instances scale from one process to N.

usage: python tools/chains_probe.py [--config examples/resnet18/fused8.toml] [--processes 1,8] [--batches 12,24]
                                    [--parts decode,pre,model,chain] [--seconds 3] [--corpus-sizes three] [--mps]
                                    [--decode-slots 0,2,4] [--out DIR]

Parts: ``decode`` the chain's first step alone; ``pre`` every step before the model; ``model`` the model's step
alone, on the outputs of the steps before it, made once for each batch size and fed again every batch; ``chain`` all
of it, the outputs to the host included, as a served instance answers. Each batch ends with its stream synchronised.
The processes are not pinned to cores (served instances are, with ``instance_affinity``). With ``--mps`` the
processes share the GPU through an MPS daemon of the probe's own (one GPU context for all, as the bench's ``--mps``
serves), instead of each taking it in time slices with a context of its own. ``--decode-slots`` repeats each row
with at most N processes inside nvjpeg's decode call at once (0: no limit), for the decoder nvjpeg drives directly.
Rows, in img/s, with the SMs' and the JPEG engines' busy share over each row (``nvidia-smi dmon``, one-second
samples, the row's two warm-up batches included), go to DIR/chains_probe.md. Runs on a GPU, or slowly on the CPU
(``--device cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from google.protobuf import json_format

from tritonpipe.errors import TritonpipeError
from tritonpipe.harness.bench.report import fmt_percent
from tritonpipe.harness.corpus import photo_corpus, synthetic_corpus
from tritonpipe.harness.probe import GpuBusyMeter
from tritonpipe.model.runtime import ModelRuntime
from tritonpipe.pipeline.files import read_config_file
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.mps import MpsDaemon
from tritonpipe.stages.base import DATA, ERROR
from tritonpipe.stages.control import run_chain

PARTS = ("decode", "pre", "model", "chain")
_instance: dict = {}  # each process's runtime, stream and corpus, built once by its pool's initializer


def _start(config: dict, version: str, device: str, images: list[bytes], slots: dict) -> None:
    device = torch.device(device)
    _limit_decode_calls(slots)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        runtime = ModelRuntime(config, Path(version), device)
        runtime.warm_up()
    (key,) = runtime.inputs.values()
    tensors = [torch.frombuffer(bytearray(image), dtype=torch.uint8)[None] for image in images]
    _instance.update(runtime=runtime, stream=stream, key=key, tensors=tensors)


def _limit_decode_calls(slots: dict) -> None:
    """nvjpeg's decode calls made through one of the row's slots (a semaphore shared by the processes), where the
    row has a limit (``--decode-slots``): at most that many processes are inside a decode call at once."""
    from tritonpipe.kernels import nvjpeg

    submit = nvjpeg.Decoder._submit

    def limited(self, *args, **kwargs):
        slot = slots.get(_instance.get("limit", 0))
        with slot if slot is not None else contextlib.nullcontext():
            return submit(self, *args, **kwargs)

    nvjpeg.Decoder._submit = limited


def _row(args: tuple) -> tuple[int, float]:
    """This process's share of one row: ``part`` on batches of ``batch`` for ``seconds``; (images, seconds)."""
    part, batch, seconds, barrier, limit = args
    _instance["limit"] = limit  # the row's --decode-slots value, which _limit_decode_calls reads
    runtime, stream, key, tensors = (_instance[name] for name in ("runtime", "stream", "key", "tensors"))
    head, tail = runtime.halves()
    offset = hash(multiprocessing.current_process().name) % len(tensors)
    fed: list[dict] = []  # the model part's inputs: the steps before it, run once

    def one() -> None:
        nonlocal offset
        if part == "model":
            items = [dict(item) for item in fed]
            run_chain(tail, items)
        else:
            items = [{key: tensors[(offset + i) % len(tensors)]} for i in range(batch)]
            offset += batch
        if part == "chain":
            runtime.run(items)
            runtime.responses(items)
        elif part != "model":
            run_chain(head[:1] if part == "decode" else head, items)
        failed = next((item[ERROR] for item in items if ERROR in item), None)
        if failed is not None:
            raise RuntimeError(f"a corpus image failed: {failed}")
        if stream is not None:
            stream.synchronize()

    done = 0
    with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if part == "model":
            if not tail:
                raise RuntimeError("the model part needs a chain of more than one step")
            fed[:] = [{key: tensors[(offset + i) % len(tensors)]} for i in range(batch)]
            run_chain(head, fed)
            if failed := next((item[ERROR] for item in fed if ERROR in item), None):
                raise RuntimeError(f"a corpus image failed: {failed}")
            fed[:] = [{DATA: item[DATA], **({"color": item["color"]} if "color" in item else {})} for item in fed]
        for _ in range(2):
            one()
        barrier.wait()  # every process of the row begins at once
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            one()
            done += batch
        elapsed = time.perf_counter() - began
    return done, elapsed


@contextlib.contextmanager
def _mps(wanted: bool, folder: Path):
    """An MPS daemon of the probe's own while the block runs, its pipe folder in this process's environment for the
    processes it starts (``--mps``); nothing without it."""
    if not wanted:
        yield
        return
    try:
        daemon = MpsDaemon(folder / "mps").start()
    except TritonpipeError as exc:
        raise SystemExit(f"chains_probe.py: --mps: {exc}") from None
    try:
        with mock.patch.dict(os.environ, daemon.environment()):
            yield
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/resnet18/fused8.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processes", default="1,8", help="instance processes at once, comma-separated")
    parser.add_argument("--batches", default="12,24", help="batch sizes, comma-separated (Triton's at c=128 / 256)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what each process runs, of {', '.join(PARTS)}")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--corpus-sizes", choices=("three", "distinct"), default="three")
    parser.add_argument("--decode-slots", default="0",
                        help="at most this many processes inside nvjpeg's decode call at once, comma-separated; 0: no limit")
    parser.add_argument("--mps", action="store_true", help="the processes share the GPU through an MPS daemon of the probe's own")
    parser.add_argument("--out", default="probe_out")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    counts = [int(count) for count in args.processes.split(",")]
    batches = [int(batch) for batch in args.batches.split(",")]
    limits = [int(slots) for slots in args.decode_slots.split(",")]
    device = torch.device("cuda", 0) if args.device.startswith("cuda") else torch.device("cpu")
    corpus = synthetic_corpus(48, 0) if args.corpus_sizes == "three" else photo_corpus(64, 0)
    config_path = Path(args.config).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritonpipe-chains-probe-") as folder:
        config = read_config_file(config_path)
        graph = load_graph(config, name=config.get("name", "model"), base_dir=config_path.parent)
        repo = generate_repository(graph, Path(folder) / "repo", device="gpu" if device.type == "cuda" else "cpu")
        if len(repo.plan.models) != 1:
            parser.error("the probe runs a configuration of one model (fuse = true)")
        entry = repo.plan.name
        served = json_format.MessageToDict(repo.configs[entry], preserving_proto_field_name=True)
        context = multiprocessing.get_context("spawn")
        slots = {limit: context.Semaphore(limit) for limit in limits if limit > 0}
        start = (served, str(repo.path / entry / "1"), str(device), list(corpus.images), slots)
        with _mps(args.mps, Path(folder)), context.Manager() as manager, context.Pool(max(counts), _start, start) as pool:
            for count in counts:
                for part in parts:
                    for batch in batches:
                        for limit in limits:
                            barrier = manager.Barrier(count)
                            with GpuBusyMeter() as meter:
                                runs = pool.map(_row, [(part, batch, args.seconds, barrier, limit)] * count, chunksize=1)
                            rate = sum(done for done, _ in runs) / max(elapsed for _, elapsed in runs)
                            busy = meter.result
                            sm, jpeg = (fmt_percent(busy.sm), fmt_percent(busy.jpeg)) if busy else (fmt_percent(None),) * 2
                            slots_shown = str(limit) if limit > 0 else "any"
                            rows.append((count, part, batch, slots_shown, rate, sm, jpeg))
                            print(f"{count} processes, {part}, batches of {batch}, decode calls at once: {slots_shown}: "
                                  f"{rate:,.0f} img/s (busy: SMs {sm}, JPEG engines {jpeg}, %)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shared = ", the processes under MPS" if args.mps else ""
    lines = [f"# chains probe, {name}, {config_path.name}, {corpus.description}{shared}", "",
             "| processes | part | batch | decode calls at once | img/s | SMs busy % | JPEG engines busy % |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {count} | {part} | {batch} | {slots} | {rate:,.0f} | {sm} | {jpeg} |"
              for count, part, batch, slots, rate, sm, jpeg in rows]
    (out / "chains_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
