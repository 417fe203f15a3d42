"""In-process GPU preprocessing, taken apart: decode alone, post-decode alone, and both, for
tritonpipe's kernels (the per-size resize and the one-launch batch resize), nvImageCodec and DALI
where they are installed, on the benchmark's 3-size corpus and on a corpus of distinct sizes.

usage: python tools/preprocess_probe.py [--out DIR] [--batch 64] [--seconds 3] [--photos 64]

Each row prints img/s and host CPU ms per image, and the table goes to DIR/preprocess_probe.md.
Rows whose library is missing say so and the rest go on.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from tritonpipe.harness.corpus import photo_corpus, synthetic_corpus
from tritonpipe.harness.probe import GpuBusyMeter
from tritonpipe.kernels import batch_resize, geometry

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIDE = 224


def timed(step, images_per_step: int, seconds: float, warmup: int = 3) -> tuple[float, float]:
    """(img/s, host CPU ms per image) of ``step`` run back to back for ``seconds``, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    cpu0, start, done = os.times(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        done += images_per_step
    torch.cuda.synchronize()
    wall, cpu1 = time.perf_counter() - start, os.times()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000 / max(done, 1)
    return done / wall, cpu


OUT = Path("probe_out")


class Busy:
    """The JPEG engines' and the SMs' busy share, from ``nvidia-smi dmon`` sampled once a second for the whole probe
    (the bench's :class:`GpuBusyMeter`, stopped when the probe exits)."""

    def __init__(self) -> None:
        self.meter = GpuBusyMeter().__enter__()
        atexit.register(self.meter.__exit__, None, None, None)

    def between(self, start: float, end: float) -> str:
        """'jpg % / sm %' averaged over the samples taken between half a second after ``start`` and half a second
        after ``end``, or ''."""
        found = self.meter.between(start - 0.5, end + 0.25)  # the meter's window opens a second in, closes 0.25 s late
        if found is None or found.sm is None or found.jpeg is None:
            return ""
        return f"{found.jpeg:.0f} / {found.sm:.0f}"


BUSY: Busy | None = None


def save(report: list) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    report = [row + ("",) * (5 - len(row)) for row in report]
    lines = ["| corpus | what | img/s | host ms/img | JPEG engines / SMs busy % |", "|---|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in report]
    (OUT / "preprocess_probe.md").write_text(f"# preprocessing probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n")


def cycler(items: list, batch: int):
    order = itertools.cycle(range(len(items)))
    return lambda: [items[next(order)] for _ in range(batch)]


def old_post(images: list[torch.Tensor]) -> torch.Tensor:
    """What the stages did: one resize per size, then cat, normalise and FP16 in the model stage."""
    mean = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)
    resized = geometry.resize_bilinear_many([image.unsqueeze(0) for image in images], SIDE, SIDE)
    return ((torch.cat(resized) - mean) / std).half()


def new_post(images: list[torch.Tensor]) -> torch.Tensor:
    return batch_resize.resize_batch(images, SIDE, SIDE, mean=MEAN, std=STD, dtype=torch.float16)


def stage_post(images: list[torch.Tensor]) -> torch.Tensor:
    """What the stages do now: the one-launch resize to FP32, then cat, normalise and FP16."""
    mean = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)
    rows = batch_resize.resize_batch(images, SIDE, SIDE).split(1)
    return ((torch.cat(rows) - mean) / std).half()


def nvimgcodec_decoders(count: int, hw_load: float, layout: str = "P_RGB", cpu_threads: int = 0, batch: int = 0):
    """``count`` nvImageCodec decoders (the engines' share ``hw_load``, the rest on its CUDA decoder), their decode
    parameters and the code-stream type; ``cpu_threads`` host threads each (0: nvImageCodec's own default).

    ``batch`` > 0 sets the decoders up as DALI's mixed decoder does: a GPU-only backend between the engines and the
    hybrid one, and the engines' buffers preallocated for batches of that size."""
    from nvidia import nvimgcodec

    kinds = nvimgcodec.BackendKind
    backends = [nvimgcodec.Backend(kinds.HW_GPU_ONLY, load_hint=hw_load), nvimgcodec.Backend(kinds.HYBRID_CPU_GPU)]
    extra = {}  # nvImageCodec's own defaults otherwise
    if batch > 0:
        backends.insert(1, nvimgcodec.Backend(kinds.GPU_ONLY))
        extra["options"] = f"nvjpeg_hw_decoder:preallocate_batch_size={batch}"
    params = nvimgcodec.DecodeParams(
        apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
        sample_format=getattr(nvimgcodec.SampleFormat, layout),
    )
    decoders = [nvimgcodec.Decoder(max_num_cpu_threads=cpu_threads, backends=backends, **extra) for _ in range(count)]
    return decoders, params, nvimgcodec.CodeStream


def adder(name: str, batch: int, seconds: float, report: list):
    """``add(what, step)``: one timed row of ``report``, with the engines' busy share while it ran."""

    def add(what: str, step) -> None:
        try:
            rate, cpu = timed(step, batch, seconds)
            end = time.perf_counter()  # the timed part is the last ``seconds``, after the warm-up steps
            busy = BUSY.between(end - seconds, end) if BUSY else ""
            report.append((name, what, f"{rate:,.0f}", f"{cpu:.2f}", busy))
        except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
            report.append((name, what, f"FAILED {type(exc).__name__}: {str(exc)[:120]}", ""))
        print(" | ".join(report[-1]), flush=True)
        save(report)

    return add


def nvimgcodec_arrays(name: str, corpus: list[bytes], batch: int, report: list):
    """The next batch of encoded arrays, each call; None, with a row saying so, where nvImageCodec is missing."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        report.append((name, "nvImageCodec", "not installed", ""))
        return None
    return cycler([np.frombuffer(data, dtype=np.uint8) for data in corpus], batch)


def rows_for(name: str, corpus: list[bytes], batch: int, seconds: float, report: list, nvimgcodec: bool = True) -> None:
    add = adder(name, batch, seconds, report)

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in corpus]
    next_bytes = cycler(tensors, batch)
    decode = lambda: decode_jpeg(next_bytes(), mode=ImageReadMode.RGB, device="cuda")  # noqa: E731
    decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device="cuda")
    next_decoded = cycler(list(decoded), batch)

    worst = 0.0
    for image in decoded:
        want = torch.nn.functional.interpolate(image.unsqueeze(0).float(), size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        got = batch_resize.resize_batch([image], SIDE, SIDE)
        worst = max(worst, (got - want).abs().max().item())
    report.append((name, "check: batch resize vs F.interpolate on the GPU, largest difference", f"{worst:.2e}", ""))
    print(" | ".join(report[-1]), flush=True)
    batch_resize.FP_FUSION = False
    worst = max(
        (batch_resize.resize_batch([image], SIDE, SIDE) - torch.nn.functional.interpolate(
            image.unsqueeze(0).float(), size=(SIDE, SIDE), mode="bilinear", align_corners=False)).abs().max().item()
        for image in decoded
    )
    batch_resize.FP_FUSION = True
    report.append((name, "check: the same without fused multiply-adds", f"{worst:.2e}", ""))
    print(" | ".join(report[-1]), flush=True)

    add("post-decode alone: per-size resize + cat + normalise + FP16 (before)", lambda: old_post(next_decoded()))
    add("post-decode alone: one-launch resize + cat + normalise + FP16 (the stages now)", lambda: stage_post(next_decoded()))
    add("post-decode alone: one launch with normalise and FP16 folded in", lambda: new_post(next_decoded()))
    add("torchvision decode alone", decode)
    add("torchvision decode + per-size post (before)", lambda: old_post(decode()))
    add("torchvision decode + one-launch post", lambda: new_post(decode()))

    if not nvimgcodec:
        return
    next_arrays = nvimgcodec_arrays(name, corpus, batch, report)
    if next_arrays is None:
        return
    decoders, params, code_stream = nvimgcodec_decoders(4, 1.0)
    stream = torch.cuda.current_stream().cuda_stream

    def nv_decode(decoder, chunk):
        images = decoder.decode([code_stream(a) for a in chunk], params=params, cuda_stream=stream)
        return [torch.from_dlpack(image) for image in images]

    add("nvImageCodec decode alone (one decoder, engines only)", lambda: nv_decode(decoders[0], next_arrays()))
    add("nvImageCodec decode + one-launch post", lambda: new_post(nv_decode(decoders[0], next_arrays())))

    # each decoder has a thread of its own: nvImageCodec decoders must not be called from two threads at once
    lanes = [(decoder, ThreadPoolExecutor(1)) for decoder in decoders]
    for chunks, count in ((2, 2), (4, 2), (4, 4), (8, 4)):
        def staggered(chunks=chunks, count=count):
            arrays_now = next_arrays()
            size = -(-len(arrays_now) // chunks)
            parts = [arrays_now[i : i + size] for i in range(0, len(arrays_now), size)]
            futures = [lanes[i % count][1].submit(nv_decode, lanes[i % count][0], part) for i, part in enumerate(parts)]
            return new_post([image for future in futures for image in future.result()])

        add(f"nvImageCodec, batch in {chunks} chunks over {count} decoders, one thread each + one-launch post", staggered)

    # two batches in flight: batch k+1 decodes on the other decoder while batch k is resized
    for depth in (2, 3):
        pending = [lanes[i][1].submit(nv_decode, lanes[i][0], next_arrays()) for i in range(depth - 1)]
        turn = itertools.count(depth - 1)

        def overlapped(pending=pending, turn=turn, depth=depth):
            lane = lanes[next(turn) % depth]
            pending.append(lane[1].submit(nv_decode, lane[0], next_arrays()))
            return new_post(pending.pop(0).result())

        add(f"nvImageCodec, {depth} batches in flight on {depth} decoders + one-launch post", overlapped)
        for future in pending:
            future.result()


def layout_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """nvImageCodec's decode alone with planar (3xHxW) or interleaved (HxWx3) output, on the caller's stream or
    nvImageCodec's own, and interleaved output followed by the one-launch post reading HWC in place."""
    add = adder(name, batch, seconds, report)
    next_arrays = nvimgcodec_arrays(name, corpus, batch, report)
    if next_arrays is None:
        return
    ours = torch.cuda.current_stream().cuda_stream
    for layout in ("P_RGB", "I_RGB"):
        (decoder,), params, code_stream = nvimgcodec_decoders(1, 1.0, layout)

        def step(decoder=decoder, params=params, code_stream=code_stream, stream=ours):
            images = decoder.decode([code_stream(a) for a in next_arrays()], params=params, cuda_stream=stream)
            return [torch.from_dlpack(image) for image in images]

        add(f"nvImageCodec decode alone, engines only, {layout}, on the caller's stream", step)
        add(f"nvImageCodec decode alone, engines only, {layout}, on its own stream",
            lambda step=step: step(stream=0))
        if layout == "I_RGB":
            add("nvImageCodec I_RGB + one-launch post reading HWC in place",
                lambda step=step: batch_resize.resize_batch(step(), SIDE, SIDE, channels_last=True, mean=MEAN, std=STD,
                                                            dtype=torch.float16))


def decoder_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """tritonpipe's JPEG decode with each engine-driving decoder (as DecodeTensor calls it), alone and + the one-launch post."""
    from tritonpipe.kernels import jpeg

    add = adder(name, batch, seconds, report)
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in corpus]
    next_bytes = cycler(tensors, batch)
    device = torch.device("cuda", 0)
    for decoder, lanes in (("torchvision", 0), ("nvjpeg", 1), ("nvjpeg", 2), ("nvjpeg", 3), ("nvjpeg", 4)):
        decode = lambda decoder=decoder, lanes=lanes: jpeg.decode_jpeg_tensor(  # noqa: E731
            next_bytes(), device, gpu_decoder=decoder, nvjpeg_lanes=max(lanes, 1))
        label = f"decoder={decoder}" + (f", decode_depth {lanes}" if lanes else "")
        add(f"decode_jpeg_tensor, {label}, alone", decode)
        add(f"decode_jpeg_tensor, {label} + one-launch post", lambda decode=decode: new_post(decode()))


def share_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """torchvision's decoder on the engines with a share of each batch's bytes on nvImageCodec's CUDA decoder
    meanwhile (``cuda_decoder_share``: Huffman decoding on host threads, one per core), + the one-launch post."""
    from tritonpipe.kernels import jpeg, nvimgcodec

    add = adder(name, batch, seconds, report)
    if not nvimgcodec.available():
        report.append((name, "cuda_decoder_share", "nvImageCodec not installed", ""))
        return
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in corpus]
    next_bytes = cycler(tensors, batch)
    device = torch.device("cuda", 0)
    for share in (0.0, 0.2, 0.35, 0.5):
        def step(share=share):
            images = jpeg.decode_jpeg_tensor(next_bytes(), device, cuda_decoder_share=share)
            return batch_resize.resize_batch(images, SIDE, SIDE, mean=MEAN, std=STD, dtype=torch.float16)

        add(f"torchvision decode, cuda_decoder_share {share} + one-launch post", step)


def split_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """nvImageCodec's own split of each batch between the engines and its CUDA decoder, in one call (what DALI's
    ``hw_decoder_load`` asks of it), one batch at a time and two batches in flight on two decoders (a host thread
    each), interleaved output + the one-launch post reading it in place. Run beside ``dali`` for DALI's rate."""
    add = adder(name, batch, seconds, report)
    next_arrays = nvimgcodec_arrays(name, corpus, batch, report)
    if next_arrays is None:
        return
    stream = torch.cuda.current_stream().cuda_stream
    threads = min(16, os.cpu_count() or 4)  # DALI's rows run 16 host threads
    for load, like_dali in ((1.0, False), (0.8, False), (0.65, False), (1.0, True), (0.8, True), (0.65, True)):
        setup = ", set up as DALI's" if like_dali else ""
        try:
            decoders, params, code_stream = nvimgcodec_decoders(2, load, "I_RGB", cpu_threads=threads,
                                                                batch=batch if like_dali else 0)
        except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
            report.append((name, f"nvImageCodec split{setup}, engines' load {load}", f"FAILED {exc!r}"[:160], ""))
            print(" | ".join(report[-1]), flush=True)
            continue

        def decode(decoder, arrays, params=params, code_stream=code_stream):
            images = decoder.decode([code_stream(a) for a in arrays], params=params, cuda_stream=stream)
            return [torch.from_dlpack(image) for image in images]

        def post(images):
            return batch_resize.resize_batch(images, SIDE, SIDE, channels_last=True, mean=MEAN, std=STD,
                                             dtype=torch.float16)

        add(f"nvImageCodec split{setup}, engines' load {load}, one decoder, decode alone",
            lambda decoders=decoders, decode=decode: decode(decoders[0], next_arrays()))
        lanes = [(decoder, ThreadPoolExecutor(1)) for decoder in decoders]  # a decoder is called from one thread
        pending = [lanes[0][1].submit(decode, lanes[0][0], next_arrays())]
        turn = itertools.count(1)

        def overlapped(pending=pending, turn=turn, lanes=lanes, decode=decode, post=post):
            lane = lanes[next(turn) % 2]
            pending.append(lane[1].submit(decode, lane[0], next_arrays()))
            return post(pending.pop(0).result())

        add(f"nvImageCodec split{setup}, engines' load {load}, 2 batches in flight on 2 decoders + one-launch post",
            overlapped)
        for future in pending:
            future.result()
        for _, pool in lanes:
            pool.shutdown()


def launch_rows(report: list) -> None:
    """Host time of one batch resize (a batch of 1 and of 8), and of its parts, with the GPU idle before each."""
    image = torch.randint(0, 256, (3, 720, 1280), dtype=torch.uint8, device="cuda")

    def host_ms(call, repeat: int = 200) -> str:
        for _ in range(10):
            call()
        total = 0.0
        for _ in range(repeat):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            total += time.perf_counter() - start
        torch.cuda.synchronize()
        return f"{total / repeat * 1e3:.3f}"

    table = torch.zeros((8, 7), dtype=torch.int64)
    for what, call in (
        ("batch resize of 1 image, host ms per call", lambda: batch_resize.resize_batch([image], SIDE, SIDE)),
        ("batch resize of 8 images, host ms per call", lambda: batch_resize.resize_batch([image] * 8, SIDE, SIDE)),
        ("the same, normalise and FP16 folded in", lambda: batch_resize.resize_batch(
            [image] * 8, SIDE, SIDE, mean=MEAN, std=STD, dtype=torch.float16)),
        ("one pin_memory + copy of its 8-row table", lambda: table.pin_memory().to("cuda", non_blocking=True)),
        ("F.interpolate of 1 image", lambda: torch.nn.functional.interpolate(
            image.unsqueeze(0).float(), size=(SIDE, SIDE), mode="bilinear")),
    ):
        report.append(("launch", what, host_ms(call), ""))
        print(" | ".join(report[-1]), flush=True)
    save(report)


def dali_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """DALI's own classifier preprocessing (the benchmark's), at prefetch depth 2 and 1, and its decode alone."""
    from tritonpipe.harness.bench.dali import dali_available, run_dali

    if dali_available() is not None:
        report.append((name, "DALI", "not installed", ""))
        return
    for load, depth, post in ((0.65, 2, True), (0.65, 1, True), (0.65, 2, False), (1.0, 2, False)):
        what = f"DALI decode{' + resize + normalise FP16' if post else ' alone'}, hw_decoder_load {load}, prefetch {depth}"
        try:
            result = run_dali(corpus, batch=batch, threads=min(16, os.cpu_count() or 4), hw_decoder_load=load,
                              size=(SIDE, SIDE), seconds=seconds, prefetch=depth, post=post)
            end = time.perf_counter()  # its timed part is the last ``seconds``
            busy = BUSY.between(end - seconds, end) if BUSY else ""
            report.append((name, what, f"{result.throughput:,.0f}", "", busy))  # run_dali keeps no CPU account
        except Exception as exc:  # noqa: BLE001 - a probe row, reported and skipped
            report.append((name, what, f"FAILED {exc!r}"[:160], ""))
        print(" | ".join(report[-1]), flush=True)
        save(report)


def dali_decoder_rows(name: str, corpus: list[bytes], batch: int, seconds: float, report: list) -> None:
    """tritonpipe's DALI decoder (a batch in overlapping chunks) followed by the one-launch post."""
    from tritonpipe.kernels import dali_decode

    if not dali_decode.available():
        report.append((name, "tritonpipe DALI decoder", "not installed", ""))
        return
    arrays = [np.frombuffer(data, dtype=np.uint8) for data in corpus]
    next_arrays = cycler(arrays, batch)
    stream = torch.cuda.current_stream()
    for chunk, depth, load in ((16, 2, 0.65), (16, 3, 0.65), (32, 2, 0.65), (8, 4, 0.65), (16, 4, 0.65), (64, 1, 0.65), (16, 3, 1.0)):
        settings = dali_decode.Settings(hw_load=load, chunk=chunk, depth=depth)
        what = f"tritonpipe DALI decoder, chunks of {chunk}, {depth} pipelines, hw_decoder_load {load}"
        for post, label in ((None, " alone"), (new_post, " + one-launch post")):
            def step(settings=settings, post=post):
                images = dali_decode.decode(next_arrays(), 0, stream, settings)
                return post(images) if post else images

            try:
                # a fresh pipeline's first runs are slow (on an H200 one row read 163 img/s, the same decoder 4,782 the next)
                rate, cpu = timed(step, batch, seconds, warmup=3 + 2 * depth)
                report.append((name, what + label, f"{rate:,.0f}", f"{cpu:.2f}"))
            except Exception as exc:  # noqa: BLE001
                report.append((name, what + label, f"FAILED {exc!r}"[:200], ""))
            print(" | ".join(report[-1]), flush=True)
            save(report)
    images = dali_decode.decode(arrays, 0, stream, dali_decode.Settings())
    reference = decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in corpus], mode=ImageReadMode.RGB, device="cuda")
    if any(image is None for image in images):
        report.append((name, "check: DALI decoder vs torchvision's nvjpeg", "DALI failed", ""))
        return
    worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(images, reference))
    shapes = all(a.shape == b.shape for a, b in zip(images, reference))
    report.append((name, "check: DALI decoder vs torchvision's nvjpeg, same shapes / largest pixel difference", f"{shapes} / {worst:.0f}", ""))
    print(" | ".join(report[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="probe_out")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--photos", type=int, default=64, help="images (and distinct sizes) of the second corpus")
    parser.add_argument("--rows", default="dali,dali-decoder,kernels,nvimgcodec,layouts,decoders,share,launch",
                        help="groups of rows to run (split, not in the default: nvImageCodec's own engines/CUDA "
                        "split, one batch at a time and two in flight)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    corpora = [("3-size", synthetic_corpus(48, 0)), ("distinct-size", photo_corpus(args.photos, 0))]
    global OUT, BUSY
    OUT = Path(args.out)
    BUSY = Busy()
    report: list[tuple[str, ...]] = []
    groups = args.rows.split(",")
    if "launch" in groups:
        launch_rows(report)
    for name, corpus in corpora:
        print(f"corpus {name}: {corpus.description}", flush=True)
        if "layouts" in groups:
            layout_rows(name, corpus.images, args.batch, args.seconds, report)
        if "decoders" in groups:
            decoder_rows(name, corpus.images, args.batch, args.seconds, report)
        if "share" in groups:
            share_rows(name, corpus.images, args.batch, args.seconds, report)
        if "split" in groups:
            split_rows(name, corpus.images, args.batch, args.seconds, report)
        if "dali" in groups:
            dali_rows(name, corpus.images, args.batch, args.seconds, report)
        if "dali-decoder" in groups:
            dali_decoder_rows(name, corpus.images, args.batch, args.seconds, report)
        if "kernels" in groups or "nvimgcodec" in groups:
            rows_for(name, corpus.images, args.batch, args.seconds, report, nvimgcodec="nvimgcodec" in groups)
    save(report)


if __name__ == "__main__":
    main()
