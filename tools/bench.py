"""tritonpipe bench: measure a generated pipeline against a PIL baseline, DALI, a do-nothing floor and the in-process limit."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tritonpipe.choices import DEFAULT_CONCURRENCY, DEVICES, ENGINES, MEASUREMENT_MODES, SHARED_MEMORY, SYSTEMS

from ._cli import positive_ints, run

if TYPE_CHECKING:
    from tritonpipe.harness.bench import BenchOptions

EPILOG = """systems (all measured on the same corpus and the same model-stage model):
  ensemble   the repository tritonpipe generates for the pipeline
  baseline   a hand-written PIL preprocessing model (one image per call, CPU instances) in front of it
  dali-served  Triton + DALI as users run it: DALI's classifier preprocessing in a GPU Python model
             (one DALI run per batch, prefetch depth 1, as Triton's DALI backend) in front of it,
             with the model stage's instance count (where nvidia-dali imports and a GPU is used)
  floor      no peer but a yardstick: a Python model with the pipeline's inputs, outputs, instances and
             batching that reads each request and answers zeros; what the server and a stub cost on their
             own, so that the report can give what the pipeline's work adds (ensemble p50 over floor)
  inprocess  the same stage trees called directly in this process at one batch, no server
  dali       DALI's GPU preprocessing in this process (where nvidia-dali imports), alone and followed by the same model stage

examples:
  tritonpipe bench                                   # the resnet18 example, default sweep
  tritonpipe bench --concurrency 1,4,8 --measurement-interval 3000
  tritonpipe bench --config my_pipeline.toml --systems ensemble,inprocess --shared-memory system
  tritonpipe bench --systems ensemble --concurrency 128,256 --rounds 3 \\
      --variant plain: --variant pinned:pin_inputs=true  # plain, pinned, plain, pinned, plain, pinned
  tritonpipe bench --systems ensemble --concurrency 1,128 --profile  # where the stubs' CPU time goes (py-spy)

Writes results.csv, breakdown.csv (Triton's times per request), stages.csv (each stage's time per batch),
batches.csv (Triton's times per batch, by batch size), report.md and throughput_p99.png (with matplotlib) into
--output, and profile.md with --profile; with --variant, one such folder per run (NAME-ROUND/) and variants.md /
variants.csv beside them."""


def _systems(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in SYSTEMS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"choose from {','.join(SYSTEMS)}, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe bench", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what to measure")
    what.add_argument("--config", type=Path, help="pipeline TOML/JSON (default: the resnet18 example's pipeline)")
    what.add_argument("--model", type=Path, help="model file for the model stage (overrides the config's)")
    what.add_argument("--engine", choices=ENGINES, help="engine for the model stage (passed to the config)")
    what.add_argument("--systems", type=_systems, default=SYSTEMS, help=f"comma-separated subset of {','.join(SYSTEMS)}")
    what.add_argument("--corpus", type=Path, help="folder of JPEGs (default: synthetic images)")
    what.add_argument("--corpus-count", type=int, default=48, help="synthetic images (default: %(default)s)")
    what.add_argument(
        "--corpus-sizes", choices=("three", "distinct"), default="three",
        help="synthetic images in three sizes (VGA, 720p, 1080p), or each of its own size (0.1-3 MP, mixed quality and "
             "chroma subsampling: what a batch of user photos looks like); default: %(default)s",
    )
    what.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default: %(default)s)")
    what.add_argument("--device", choices=DEVICES, default="auto", help="where GPU-capable stages run (default: %(default)s)")

    tuning = parser.add_argument_group("serving settings (applied to the generated config)")
    tuning.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="set a node key of every node that takes it (repeatable), as tritonpipe generate --set does; "
             "Stage::key reaches that stage only, e.g. --set ResizeTensor::resize_h=256",
    )
    tuning.add_argument("--instances", type=int, help="instance_num of every node")
    tuning.add_argument("--max-batch", type=int, help="max (max_batch_size) of every node")
    tuning.add_argument("--batching-timeout", type=float, help="batching_timeout (ms) of every node")
    tuning.add_argument("--baseline-instances", type=int, default=os.cpu_count(), help="CPU instances of the PIL model (default: %(default)s)")
    tuning.add_argument(
        "--dali-instances", type=int, metavar="N",
        help="GPU instances of the dali-served peer's DALI model, each with cores/N DALI threads (default: the model stage's count)",
    )

    perf = parser.add_argument_group("perf_analyzer")
    perf.add_argument(
        "--concurrency", type=positive_ints, default=DEFAULT_CONCURRENCY,
        help=f"levels, e.g. 1,8,32 (default: {','.join(map(str, DEFAULT_CONCURRENCY))})",
    )
    perf.add_argument("--measurement-interval", type=int, default=5000, help="window in ms (default: %(default)s)")
    perf.add_argument("--measurement-mode", choices=MEASUREMENT_MODES, default="time_windows")
    perf.add_argument("--measurement-request-count", type=int, default=50, help="requests per window in count_windows mode")
    perf.add_argument("--stability-percentage", type=float, default=10.0, help="allowed variation between windows (default: %(default)s)")
    perf.add_argument("--max-trials", type=int, default=10, help="windows before a level is given up (default: %(default)s)")
    perf.add_argument("--percentile", type=int, help="stabilise on this latency percentile instead of the average")
    perf.add_argument("--shared-memory", choices=SHARED_MEMORY, default="none", help="client-side shared memory for inputs/outputs")
    perf.add_argument("--perf-arg", action="append", default=[], metavar="ARG", help="extra perf_analyzer argument (repeatable), e.g. --perf-arg=--async")
    perf.add_argument("--perf-timeout", type=float, default=1200, help="seconds one level may take (default: %(default)s)")

    turns = parser.add_argument_group("settings compared by turns")
    turns.add_argument(
        "--variant", action="append", default=[], metavar="NAME:KEY=VALUE ...",
        help="a setting to compare (repeatable): its keys, space-separated, on top of --set; 'NAME:' alone is the "
             "configuration as given; mps=true serves that variant under MPS (mps=false without, whatever --mps says). "
             "The variants run in turn, each with a server of its own, --rounds times over, "
             "and variants.md gives each run's img/s beside each variant's median against the first variant's, "
             "with the batches Triton formed (mean and size-biased)",
    )
    turns.add_argument("--rounds", type=int, default=1, help="runs of each variant, taken in turn (default: %(default)s)")

    other = parser.add_argument_group("in-process run and the rest")
    other.add_argument("--inprocess-batch", type=int, default=64, help="batch of the in-process run (default: %(default)s)")
    other.add_argument("--inprocess-seconds", type=float, default=10.0, help="how long it runs (default: %(default)s)")
    other.add_argument("--triton-home", help="folder of a bundle unpacked by tritonpipe bundle (else the nvidia-pytriton wheel)")
    other.add_argument("--mps", action="store_true",
                       help="serve under a CUDA MPS daemon of the server's own (see tritonpipe serve --mps)")
    other.add_argument(
        "--profile", action="store_true",
        help="sample the served models' Python stubs with py-spy (pip install py-spy) from one window into each level "
             "to its end, without pausing them: profile.md says which functions their cores were in, and profile/ "
             "keeps the raw stacks",
    )
    other.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for the models to load")
    other.add_argument("-o", "--output", type=Path, default=Path("bench_results"), help="results folder (default: %(default)s)")
    other.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace, command: str = "") -> BenchOptions:
    from tritonpipe.harness.bench import BenchOptions, PerfSettings
    from tritonpipe.pipeline.files import parse_overrides

    return BenchOptions(
        config=args.config, model=args.model, engine=args.engine, corpus=args.corpus,
        corpus_count=args.corpus_count, corpus_sizes=args.corpus_sizes, seed=args.seed, systems=args.systems,
        concurrency=args.concurrency,
        perf=PerfSettings(
            measurement_interval_ms=args.measurement_interval, measurement_mode=args.measurement_mode,
            measurement_request_count=args.measurement_request_count, stability_percentage=args.stability_percentage,
            max_trials=args.max_trials, percentile=args.percentile, shared_memory=args.shared_memory,
            extra_args=tuple(args.perf_arg), timeout_s=args.perf_timeout,
        ),
        settings=parse_overrides(args.settings), instances=args.instances, max_batch=args.max_batch, batching_timeout=args.batching_timeout,
        baseline_instances=args.baseline_instances, dali_instances=args.dali_instances, device=args.device, triton_home=args.triton_home,
        output=args.output, inprocess_batch=args.inprocess_batch, inprocess_seconds=args.inprocess_seconds,
        server_timeout=args.server_timeout, mps=args.mps, profile=args.profile, progress=not args.no_progress,
        command=command,
    )


def _by_turns(options: BenchOptions, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tritonpipe.harness.bench.variants import Variant, run_variants

    variants = [Variant.parse(text) for text in args.variant]
    result = run_variants(options, variants, args.rounds, say=lambda line: tqdm.write(line, file=sys.stdout))
    _show(result.markdown, result.files)
    return 0 if result.complete else 1


def _show(markdown: str, files: dict[str, Path]) -> None:
    print()
    print(markdown)
    for kind, path in files.items():
        print(f"{kind}: {path}")


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)

    def body() -> int:
        from tqdm import tqdm

        from tritonpipe.harness.bench import run_bench

        options = options_from(args, shlex.join(["tritonpipe", "bench", *raw]))
        if args.variant:
            return _by_turns(options, args)

        # tqdm.write keeps the progress lines clear of the bars
        result = run_bench(options, say=lambda line: tqdm.write(line, file=sys.stdout))
        _show(result.markdown, result.files)
        return 0 if all(r.throughput for r in result.rows) else 1

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
