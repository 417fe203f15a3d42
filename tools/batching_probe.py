"""Triton's dynamic batcher under a closed loop, on its own: which batches N instances get, and what that costs.

Each served model is the bench's ``floor`` (the Python stub reading each request and answering zeros) with a
stand-in for a pipeline's work: every batch sleeps ``--fixed-ms + --per-image-ms x its requests`` before it
answers. Set those from a bench report's "fixed per batch" and "per image" on your GPU host (scaled up on a
small host with ``--scale``, so that Triton's own time stays small beside them). perf_analyzer then keeps
``--concurrency`` requests in flight against each ``--max`` (max_batch_size), one after another on one server per
``--instances`` count.

Under a closed loop a batcher that takes everything queued makes uneven batches: a large batch answers many
clients at once, they come back together, and the next free instance takes them all. Time is then spent on small
batches, each paying the fixed cost, while most requests wait in large ones. A smaller ``max`` evens the batches out,
up to the point where it caps them below what the load fills. The table says which ``max`` served most, with the
mean batch, the size-biased mean (the batch the average request sits in) and the line fitted to the batches' times.

On a GPU the instances share the device, above all the JPEG engines, which take one decode call after another.
``--engine-ms`` and ``--engine-per-image-ms`` add such a part: each batch first holds a lock that all instances
share for that long, then sleeps its own ``--fixed-ms + --per-image-ms`` x its requests.  With it the instance
count matters (``--instances 4,8``): more instances overlap more of their own work, but each takes smaller batches,
and so more calls, each paying the engine's fixed cost.

usage: python tools/batching_probe.py [--fixed-ms 4.9] [--per-image-ms 0.66] [--engine-ms 0] [--engine-per-image-ms 0]
                                      [--scale 20] [--instances 8] [--max 64,32,24,16] [--concurrency 128,256]
                                      [--batching-timeout 0] [--preferred 32,64] [--seconds 4] [--out DIR]

Rows go to DIR/batching_probe.md; the figures are requests/s and ms of the scaled model, divided back by
``--scale`` (read them as the unscaled pipeline's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from tritonpipe.harness.bench.peers import FLOOR_SOURCE
from tritonpipe.harness.bench.perf import PerfError, PerfSettings, run_perf
from tritonpipe.harness.bench.stats import batch_means, batch_times, fetch_stats, per_batch_fit
from tritonpipe.harness.corpus import synthetic_corpus, write_input_data
from tritonpipe.repository.configs import to_text
from tritonpipe_tools._cli import positive_ints, run

INPUT, OUTPUT = "INPUT", "OUTPUT"


def probe_config(name: str, cap: int, instances: int, fixed_ms: float, per_image_ms: float, delay_us: int = 0,
                 preferred: tuple[int, ...] = (), engine: tuple[float, float, str] | None = None) -> mc.ModelConfig:
    """The floor with ``cap`` as its max_batch_size, ``instances`` CPU instances, Triton's dynamic batcher (waiting up
    to ``delay_us`` for a batch of a ``preferred`` size, those of them up to ``cap``), and the stand-in work: its own,
    and ``engine`` (ms a call, ms a request, the lock file every instance of every model takes it under)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=cap)
    config.input.add(name=INPUT, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    config.output.add(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[1])
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.dynamic_batching.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.dynamic_batching.preferred_batch_size.extend(size for size in preferred if size <= cap)
    for key, value in (("fixed_ms", fixed_ms), ("per_request_ms", per_image_ms)):
        config.parameters[key].string_value = f"{value:g}"
    if engine is not None:
        for key, value in zip(("engine_ms", "engine_per_request_ms", "engine_lock"), engine):
            config.parameters[key].string_value = value if isinstance(value, str) else f"{value:g}"
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--fixed-ms", type=float, default=4.9, help="each batch's cost whatever its size (ms)")
    parser.add_argument("--per-image-ms", type=float, default=0.66, help="what each request adds to its batch (ms)")
    parser.add_argument("--engine-ms", type=float, default=0.0,
                        help="each batch's call on a part the instances take one at a time, whatever its size (ms)")
    parser.add_argument("--engine-per-image-ms", type=float, default=0.0,
                        help="what each request adds to its batch's call on that shared part (ms)")
    parser.add_argument("--scale", type=float, default=20.0,
                        help="times the model is slowed by, so that Triton's own costs stay small beside its sleep")
    parser.add_argument("--instances", type=positive_ints, default=(8,), help="instance counts, comma-separated")
    parser.add_argument("--max", type=positive_ints, default=(64, 32, 24, 16), help="max_batch_size values, comma-separated")
    parser.add_argument("--concurrency", type=positive_ints, default=(128, 256), help="requests in flight, comma-separated")
    parser.add_argument("--batching-timeout", type=float, default=0.0,
                        help="how long Triton's batcher may wait for a fuller batch (ms, of the unscaled pipeline)")
    parser.add_argument("--preferred", type=positive_ints, default=(),
                        help="Triton's preferred_batch_size values, comma-separated (those up to each --max)")
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer's measurement window")
    parser.add_argument("--out", default="probe_out")
    args = parser.parse_args()
    if min(args.fixed_ms, args.per_image_ms, args.engine_ms, args.engine_per_image_ms, args.batching_timeout) < 0 or \
            min(args.scale, args.seconds) <= 0:
        parser.error("--fixed-ms, --per-image-ms, --engine-ms, --engine-per-image-ms and --batching-timeout must be at "
                     "least 0, --scale and --seconds above 0")
    sys.exit(run(lambda: _report(args), expected=(PerfError,)))


def _report(args) -> None:
    """Measure, then print the table and write it to DIR/batching_probe.md."""
    rows = _measure(args)
    batcher = (f", preferred batches {','.join(map(str, args.preferred))}" if args.preferred else "") + (
        f", batching timeout {args.batching_timeout:g} ms" if args.batching_timeout else "")
    engine = (f", after {args.engine_ms:g} ms + {args.engine_per_image_ms:g} ms a request on a part the instances take "
              "one at a time") if args.engine_ms or args.engine_per_image_ms else ""
    lines = [f"# batching probe: each batch {args.fixed_ms:g} ms + {args.per_image_ms:g} ms a request{engine}{batcher} "
             f"(run {args.scale:g}x slower, figures scaled back)", "",
             "| concurrency | instances | max | req/s | p50 ms | mean batch | size-biased batch | fitted fixed ms "
             "| fitted ms a request |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c} | {n} | {cap} | {rate:,.0f} | {p50:.1f} | {mean:.1f} | {biased:.1f} | {fixed} | {per} |"
              for c, n, cap, rate, p50, mean, biased, fixed, per in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batching_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _measure(args) -> list[tuple]:
    """Every row: one server per instance count (its models' stubs only), perf_analyzer on each max in turn."""
    from tritonpipe.server.install import locate_triton

    install = locate_triton(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritonpipe-batching-probe-") as folder:
        work = Path(folder)
        input_json = write_input_data(synthetic_corpus(3, 0).images, work / "input.json", INPUT)
        engine = None
        if args.engine_ms or args.engine_per_image_ms:
            engine = (args.engine_ms * args.scale, args.engine_per_image_ms * args.scale, str(work / "engine.lock"))
        for instances in dict.fromkeys(args.instances):  # a count given twice is measured once
            rows += _measure_instances(args, install, work / f"i{instances}", instances, input_json, engine)
    rows.sort(key=lambda row: row[:2])
    return rows


def _measure_instances(args, install, work: Path, instances: int, input_json: Path, engine) -> list[tuple]:
    from tritonpipe.server.owner import TritonServer

    names = {cap: f"probe_i{instances}_max{cap}" for cap in args.max}
    for cap, name in names.items():
        (work / "repo" / name / "1").mkdir(parents=True)
        (work / "repo" / name / "1" / "model.py").write_text(FLOOR_SOURCE.read_text())
        config = probe_config(name, cap, instances, args.fixed_ms * args.scale, args.per_image_ms * args.scale,
                              round(args.batching_timeout * args.scale * 1000), tuple(args.preferred), engine)
        (work / "repo" / name / "config.pbtxt").write_text(to_text(config))
    settings = PerfSettings(measurement_interval_ms=int(args.seconds * 1000), stability_percentage=100.0)
    server = TritonServer(work / "repo", install=install, log_file=work / "server.log")
    rows = []
    try:
        server.start()
        for concurrency in args.concurrency:
            for cap, name in names.items():
                before = fetch_stats(server.grpc_url)
                measured = run_perf(install, name, server.grpc_url, input_json, concurrency, settings, work,
                                    work / f"perf_{name}_{concurrency}.log")
                batches = batch_times("probe", concurrency, [name], before, fetch_stats(server.grpc_url))
                means = batch_means(batches)
                if means is None:
                    raise PerfError(f"Triton counted no batches of {name} at concurrency {concurrency}")
                fit = per_batch_fit(batches)
                fixed, per = (f"{fit[0] / args.scale:.2f}", f"{fit[1] / args.scale:.3f}") if fit else ("—", "—")
                row = (concurrency, instances, cap, measured.throughput * args.scale, measured.p50_ms / args.scale,
                       *means, fixed, per)
                print(f"concurrency {concurrency}, {instances} instances, max {cap}: {row[3]:,.0f} req/s, "
                      f"mean batch {row[5]:.1f}", flush=True)
                rows.append(row)
    finally:
        server.close()
    return rows


if __name__ == "__main__":
    main()
