"""Settings compared by turns: each variant's run follows the other variants' in every round.

Two runs of one served configuration on one GPU host differ by 5-20%; a comparison made of one
run each can point either way.  ``tritonpipe bench --variant A: --variant B:pin_inputs=true
--rounds 3`` runs A, B, A, B, A, B, each with a server of its own, and reports every run's figure
beside the median of each variant, so that a difference can be read against the spread.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import ConfigError
from ...pipeline.files import parse_overrides
from ...server.mps import find_control
from ...stages.base import Param
from .report import INPROCESS_ROWS, SERVED, Row
from .runner import BenchOptions, BenchResult, check_pipeline, default_model, run_bench
from .stats import BatchTimes, batch_means

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
SUMMARY_COLUMNS = ["variant", "system", "concurrency", "runs", "median", "low", "high", "p50_ms", "p99_ms", "gpu_rise_mb",
                   "sm_busy", "jpeg_busy", "mean_batch", "biased_batch"]


@dataclass(frozen=True)
class Variant:
    """One setting of the comparison: a name and the keys set on top of the shared ``--set`` keys."""

    name: str
    settings: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``"NAME:KEY=VALUE KEY=VALUE"``; ``"NAME:"`` alone is the configuration as given."""
        name, sep, rest = text.partition(":")
        name = name.strip()
        if not sep or not NAME.fullmatch(name):
            raise ConfigError(
                f"--variant takes NAME:KEY=VALUE ... (NAME of letters, digits, '.', '_' or '-'; 'NAME:' for no keys), got {text!r}"
            )
        return cls(name, parse_overrides(rest.split()))

    @property
    def keys(self) -> str:
        """Its keys as given on the command line, or what no keys mean."""
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or "the configuration as given"


@dataclass(frozen=True)
class VariantRow:
    variant: str
    system: str
    concurrency: int
    throughputs: tuple[float | None, ...]  # one per round, None where the level failed
    p50_ms: float | None
    p99_ms: float | None
    gpu_rise_mb: float | None
    sm_busy: float | None = None  # medians over the rounds, % (the bench's GPU busy readings)
    jpeg_busy: float | None = None
    # medians over the rounds of the batches Triton formed for the system's models at the level: the mean batch and
    # the batch the average image sat in (stats.batch_means)
    mean_batch: float | None = None
    biased_batch: float | None = None

    @property
    def measured(self) -> list[float]:
        return [t for t in self.throughputs if t]


#: a variant key that sets how the run serves, not a node key: ``mps=true`` serves that variant under MPS
MPS_KEY = "mps"


def options_for(options: BenchOptions, variant: Variant, round_: int) -> BenchOptions:
    """The bench options of one variant's run: its keys over the shared ones, a results folder of its own."""
    settings = dict(variant.settings)
    mps = options.mps
    if MPS_KEY in settings:
        mps = Param(bool).coerce(MPS_KEY, settings.pop(MPS_KEY))  # spelled as any stage's switch
    return replace(options, settings={**options.settings, **settings}, mps=mps, output=options.output / f"{variant.name}-{round_}",
                   command=f"{options.command} [variant {variant.name}, round {round_}: {variant.keys}]".lstrip())


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _batch_medians(rounds: list[list[BatchTimes]], system: str, level: int) -> tuple[float | None, float | None]:
    """The medians over the rounds of each round's mean and size-biased batch of ``system`` at ``level``."""
    means = [m for m in (batch_means([b for b in batches if (b.system, b.concurrency) == (system, level)])
                         for batches in rounds) if m is not None]
    return _median([m[0] for m in means]), _median([m[1] for m in means])


def summarise(runs: dict[str, list[list[Row]]], systems: tuple[str, ...],
              batches: dict[str, list[list[BatchTimes]]] | None = None) -> list[VariantRow]:
    """Per variant, served system and concurrency: each round's img/s and the medians of the rest; ``batches``: each
    variant's runs' batches (``BenchResult.batches``), for the batch columns."""
    out = []
    for name, rounds in runs.items():
        levels = sorted({(r.system, r.concurrency) for rows in rounds for r in rows if r.system in systems},
                        key=lambda key: (systems.index(key[0]), key[1]))
        for system, level in levels:
            found = [next((r for r in rows if (r.system, r.concurrency) == (system, level)), None) for rows in rounds]
            good = [r for r in found if r is not None and r.throughput]
            rises = [r.gpu_mem_mb - r.gpu_mem_before_mb for r in good if r.gpu_mem_mb is not None and r.gpu_mem_before_mb is not None]
            out.append(VariantRow(
                name, system, level, tuple(r.throughput if r is not None else None for r in found),
                _median([r.p50_ms for r in good if r.p50_ms is not None]),
                _median([r.p99_ms for r in good if r.p99_ms is not None]),
                _median(rises),
                _median([r.sm_busy for r in good if r.sm_busy is not None]),
                _median([r.jpeg_busy for r in good if r.jpeg_busy is not None]),
                *_batch_medians((batches or {}).get(name, []), system, level),
            ))
    return out


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pair(first: float | None, second: float | None, digits: int = 1) -> str:
    return "—" if first is None and second is None else f"{_number(first, digits)} / {_number(second, digits)}"


def markdown(rows: list[VariantRow], variants: list[Variant], rounds: int, command: str, done: int | None = None) -> str:
    """The summary table; ``done``: how many runs it holds, where fewer than every round of every variant."""
    lines = ["# tritonpipe bench: variants by turns", ""]
    if command:
        lines += [f"- command: `{command}`"]
    lines += [f"- rounds: {rounds}, in this order each round: {', '.join(v.name for v in variants)}"]
    if done is not None and done < rounds * len(variants):
        lines += [f"- runs done: {done} of {rounds * len(variants)}; the table holds what they measured"]
    lines += [f"- {v.name}: {v.keys}" for v in variants]
    first = variants[0].name
    lines += [
        "",
        f"| variant | system | concurrency | img/s by round | median img/s | / {first} | p50 ms | p99 ms | GPU MiB rise | "
        "SMs / JPEG engines busy % | batch: mean / size-biased |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r.system, r.concurrency): _median(r.measured) for r in rows if r.variant == first}
    for r in rows:
        median = _median(r.measured)
        reference = base.get((r.system, r.concurrency))
        ratio = f"{median / reference:.2f}×" if median and reference else "—"
        by_round = " / ".join(_number(t, 0) for t in r.throughputs)
        lines.append(f"| {r.variant} | {r.system} | {r.concurrency} | {by_round} | {_number(median)} | {ratio} | "
                     f"{_number(r.p50_ms, 2)} | {_number(r.p99_ms, 2)} | {_number(r.gpu_rise_mb, 0)} | "
                     f"{_pair(r.sm_busy, r.jpeg_busy, 0)} | {_pair(r.mean_batch, r.biased_batch)} |")
    lines += ["", "Each run has a server of its own and its own results folder (`NAME-ROUND/`, with its report). "
              "Read a difference between medians against the spread of each variant's rounds. `size-biased` is the batch "
              "the average image sat in (over the system's models): far above the mean, the batches were uneven."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[VariantRow], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        for r in rows:
            measured = r.measured
            writer.writerow([r.variant, r.system, r.concurrency, len(measured), _median(measured),
                             min(measured, default=None), max(measured, default=None), r.p50_ms, r.p99_ms, r.gpu_rise_mb,
                             r.sm_busy, r.jpeg_busy, r.mean_batch, r.biased_batch])
    return path


@dataclass
class VariantsResult:
    rows: list[VariantRow]
    markdown: str
    files: dict[str, Path]
    complete: bool  # every level of every run measured


def run_variants(
    options: BenchOptions,
    variants: list[Variant],
    rounds: int,
    say: Callable[[str], None] = print,
    run: Callable[[BenchOptions, Callable[[str], None]], BenchResult] = run_bench,
) -> VariantsResult:
    """Run every variant once per round, in turn; summarise into ``options.output``."""
    if not variants:
        raise ConfigError("give at least one --variant")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must differ, got {', '.join(names)}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    if options.config is None and options.model is None:
        # the example's model: the checkout's file, else exported once (the stages check that it exists)
        options = replace(options, model=default_model(options.output))
    for v in variants:  # every variant's configuration is checked before any run
        try:
            settled = options_for(options, v, 1)
            check_pipeline(settled)
            if settled.mps:
                find_control()  # a host without MPS's control tool is refused before the first run, not at this one
        except ConfigError as exc:
            raise ConfigError(f"variant {v.name!r}: {exc}") from None
    runs: dict[str, list[list[Row]]] = {v.name: [] for v in variants}
    batches: dict[str, list[list[BatchTimes]]] = {v.name: [] for v in variants}
    complete, done = True, 0
    for round_ in range(1, rounds + 1):
        for v in variants:
            say(f"== round {round_}/{rounds}, variant {v.name}")
            result = run(options_for(options, v, round_), say)
            runs[v.name].append(result.rows)
            batches[v.name].append(result.batches)
            complete = complete and all(r.throughput for r in result.rows)
            done += 1
            # the summary so far after every run, so that a comparison stopped part-way keeps what it measured
            rows, text, files = _summary(options, runs, batches, variants, rounds, done)
            if done < rounds * len(variants):
                say(f"so far ({done} of {rounds * len(variants)} runs): {files['variants']}")
    return VariantsResult(rows, text, files, complete)


def _summary(options: BenchOptions, runs: dict[str, list[list[Row]]], batches: dict[str, list[list[BatchTimes]]],
             variants: list[Variant], rounds: int, done: int) -> tuple[list[VariantRow], str, dict[str, Path]]:
    """Summarise the runs so far into ``options.output`` (``variants.md`` and ``variants.csv``)."""
    served = tuple(s for s in options.systems if s in SERVED)
    # the in-process run's side rows (the two-in-flight preprocessing, DALI's engines alone) come with it
    rows = summarise(runs, served + INPROCESS_ROWS + tuple(s for s in options.systems if s not in served + INPROCESS_ROWS),
                     batches)
    text = markdown(rows, variants, rounds, options.command, done)
    options.output.mkdir(parents=True, exist_ok=True)
    files = {"variants": options.output / "variants.md", "variants_csv": write_csv(rows, options.output / "variants.csv")}
    files["variants"].write_text(text)
    return rows, text, files
