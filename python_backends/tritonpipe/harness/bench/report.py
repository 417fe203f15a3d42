"""Results -> CSV files, a markdown report and an optional plot."""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...model.metrics import GPU_STEP, STEP_PREFIX, STEPS, WAIT_STEP
from .stats import BatchTimes, StageTimes, StepTimes, batch_means, per_batch_fit

TITLES = {
    "ensemble": "tritonpipe ensemble",
    "baseline": "PIL baseline ensemble",
    "dali-served": "Triton + DALI ensemble",
    "floor": "Python-backend floor (no work)",
    "inprocess": "in-process (no server)",
    "dali": "DALI in-process preprocessing",
}
#: the served systems, in the report's column order
SERVED = ("ensemble", "baseline", "dali-served", "floor")
#: the in-process rows: tritonpipe's own chain and DALI's, with and without the model stage
INPROCESS_ROWS = ("inprocess", "inprocess-pre", "inprocess-pre-2", "dali", "dali-hw-only", "dali+model")


@dataclass
class Row:
    system: str
    concurrency: int  # requests in flight; the batch size for the in-process run
    throughput: float | None  # images per second
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    gpu_mem_before_mb: float | None = None
    gpu_mem_mb: float | None = None  # after the level
    # of that, what torch's caching allocators held in the tritonpipe GPU instances, before and after the level
    torch_cache_before_mb: float | None = None
    torch_cache_mb: float | None = None
    note: str = ""
    # cores busy on average over the level: the whole host, the server process, its Python stubs together
    host_cores: float | None = None
    server_cores: float | None = None
    stub_cores: float | None = None
    # the GPUs' SMs and hardware JPEG engines busy on average over the level or in-process run (%, nvidia-smi dmon)
    sm_busy: float | None = None
    jpeg_busy: float | None = None


ROW_COLUMNS = [f.name for f in fields(Row)]
#: a line the served models' stubs write to the server's log (the generic model's handler)
_MODEL_LINE = re.compile(r"^tritonpipe (INFO|WARNING|ERROR): (.+)$")
BREAKDOWN_COLUMNS = [
    "system", "concurrency", "model", "requests", "executions", "avg_batch",
    "total_ms", "queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms", "other_ms",
]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_cores(value: float | None) -> str:
    return "—" if value is None else f"{max(value, 0.0):.2f}"


def fmt_percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def fmt_mem(before: float | None, after: float | None, cache_before: float | None = None, cache_after: float | None = None) -> str:
    if before is None and after is None:
        return "—"
    cell = f"{before or 0:.0f}→{after or 0:.0f}"
    if cache_before is not None and cache_after is not None:
        cell += f" (torch {cache_before:.0f}→{cache_after:.0f})"
    return cell


def write_rows(rows: list[Row], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
    return path


def _breakdown_values(step: StepTimes) -> list:
    return [
        step.system, step.concurrency, step.model, step.requests, step.executions, step.avg_batch,
        step.total_ms, step.queue_ms, step.compute_input_ms, step.compute_infer_ms, step.compute_output_ms, step.other_ms,
    ]  # None stays empty in the CSV


def _write_csv(path: Path, columns: list[str], lines) -> Path:
    """``lines`` (lists of values, in ``columns``' order) as CSV: None empty, floats to four places."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for values in lines:
            writer.writerow(["" if v is None else f"{v:.4f}" if isinstance(v, float) else v for v in values])
    return path


def write_breakdown(steps: list[StepTimes], path: Path) -> Path:
    return _write_csv(path, BREAKDOWN_COLUMNS, map(_breakdown_values, steps))


STAGE_COLUMNS = [f.name for f in fields(StageTimes)]


def write_stages(stages: list[StageTimes], path: Path) -> Path:
    return _write_csv(path, STAGE_COLUMNS, (asdict(stage).values() for stage in stages))


def _stage_lines(stages: list[StageTimes]) -> list[str]:
    """The per-stage table: each model's stages, level by level, beside the model's compute infer."""
    out = [
        "", "## Inside the models (ms, from tritonpipe's stage metrics, per concurrency level)", "",
        "A stage's time per batch is the wall time of its Python call on one batch, averaged over every instance's batches; "
        "`compute infer` is Triton's for the model, per request (each request counts its batch's time, so large batches "
        "weigh more in it) and per batch (each batch once, from Triton's per-batch-size statistics, as the stages are "
        "averaged); `execute steps` is the model's own work around the stages per batch (the `execute:` rows: reading the "
        "requests, building the outputs, waiting for the GPU, writing the responses), and `unexplained` is compute infer "
        "per batch less both: the Python stub and Triton's side of the call. `execute:gpu` is the GPU time of the chain "
        "(CUDA events), which overlaps the rest. "
        "A model with `overlap` returns from execute once the tail thread has taken its batch (`execute:wait` is the time "
        "it waited for it): its compute infer does not cover the last stage and the answers, so nothing is `unexplained` there. "
        "Rows of system `inprocess` (concurrency: the batch) come from the in-process run instead, on batches of their own "
        "with the device synchronised after every stage: each stage's time includes the GPU work it queued (the first "
        "stage's, reading the batch), so decode, the post-decode stages and the model read apart.", "",
    ]
    lines = []
    for stage in stages:
        lines.append([stage.system, str(stage.concurrency), stage.model, stage.stage, str(stage.images), str(stage.batches),
                      f"{stage.images / stage.batches:.1f}" if stage.batches else "—", fmt_ms(stage.ms_per_batch),
                      fmt_ms(stage.ms_per_image)])
    out += _table(["system", "concurrency", "model", "stage", "images", "batches", "avg batch", "per batch", "per image"], lines)
    totals: dict[tuple[str, int, str], list[StageTimes]] = {}
    for stage in stages:
        totals.setdefault((stage.system, stage.concurrency, stage.model), []).append(stage)
    summary = []
    for (system, concurrency, model), group in totals.items():
        infer, per_batch = group[0].compute_infer_ms, group[0].compute_infer_batch_ms
        staged = sum(s.ms_per_batch for s in group if not s.stage.startswith(STEP_PREFIX))
        step_rows = [s.ms_per_batch for s in group if s.stage in {STEP_PREFIX + step for step in STEPS}]
        steps = sum(step_rows) if step_rows else None  # the in-process rows have none
        gpu = next((s.ms_per_batch for s in group if s.stage == STEP_PREFIX + GPU_STEP), None)
        overlapped = any(s.stage == STEP_PREFIX + WAIT_STEP for s in group)
        unexplained = per_batch - staged - (steps or 0.0) if per_batch is not None and not overlapped else None
        summary.append([system, str(concurrency), model, fmt_ms(infer), fmt_ms(per_batch), fmt_ms(staged), fmt_ms(steps),
                        fmt_ms(unexplained), fmt_ms(gpu)])
    out += ["", *_table(["system", "concurrency", "model", "compute infer per request", "compute infer per batch",
                         "its stages", "execute steps", "unexplained", "GPU time of the chain"], summary)]
    return out


BATCH_COLUMNS = [f.name for f in fields(BatchTimes)]


def write_batches(batches: list[BatchTimes], path: Path) -> Path:
    return _write_csv(path, BATCH_COLUMNS, (asdict(row).values() for row in batches))


def _size_range(size: int) -> tuple[int, int]:
    """The power-of-two range a batch size falls in: 1, 2-3, 4-7, 8-15, ..."""
    low = 1 << (size.bit_length() - 1)
    return low, 2 * low - 1


def _per_batch(rows: list[BatchTimes], name: str) -> float:
    """``name``'s mean over every batch of ``rows`` (each row stands for its ``batches``)."""
    return sum(getattr(row, name) * row.batches for row in rows) / sum(row.batches for row in rows)


UNEVEN = 1.5
"""How far the size-biased batch may exceed the mean before the report calls a level's batches uneven."""


def _batch_lines(batches: list[BatchTimes]) -> list[str]:
    """The batches each model ran at each level, by size range, and the line that fits their times."""
    out = [
        "", "## The batches Triton formed (ms per batch, from Triton's per-batch-size statistics, per concurrency level)", "",
        "An instance is busy with a batch through its compute input (Triton putting the requests where the stub reads "
        "them), its compute infer (the stub's `execute`) and its compute output (Triton taking the responses); each batch "
        "counts once here, where the per-request figures above count it once per request it holds. `images` is the "
        "share of the level's images that came in batches of that range. `fixed + per image` is the straight line closest "
        "to each batch's whole time (input + infer + output) against its size: what a batch costs whatever its size, and "
        "what each image adds. `batches.csv` has every size.", "",
    ]
    groups: dict[tuple[str, int, str], list[BatchTimes]] = {}
    for row in batches:
        groups.setdefault((row.system, row.concurrency, row.model), []).append(row)
    lines, fits, uneven = [], [], []
    for (system, concurrency, model), group in groups.items():
        means = batch_means(group)
        if means is None:  # no batch ran (Triton's counters differenced over the level hold none)
            continue
        mean, biased = means
        images = sum(row.batch_size * row.batches for row in group)
        ranges: dict[tuple[int, int], list[BatchTimes]] = {}
        for row in group:
            ranges.setdefault(_size_range(row.batch_size), []).append(row)
        for (low, high), members in sorted(ranges.items()):
            input_ms, infer_ms, output_ms, size = (_per_batch(members, name) for name in (
                "compute_input_ms", "compute_infer_ms", "compute_output_ms", "batch_size"))
            count = sum(row.batches for row in members)
            lines.append([system, str(concurrency), model, str(low) if low == high else f"{low}-{high}", str(count),
                          f"{100 * size * count / images:.0f}%", f"{size:.1f}", fmt_ms(input_ms), fmt_ms(infer_ms),
                          fmt_ms(output_ms)])
        fit = per_batch_fit(group)
        fits.append([system, str(concurrency), model, f"{mean:.1f}", f"{biased:.1f}",
                     *((fmt_ms(fit[0]), fmt_ms(fit[1])) if fit else ("—", "—"))])
        if biased >= UNEVEN * mean:
            uneven.append(f"{system} at concurrency {concurrency} ({model}: {biased:.1f} against {mean:.1f})")
    out += _table(["system", "concurrency", "model", "batch sizes", "batches", "images", "avg batch", "compute input",
                   "compute infer", "compute output"], lines)
    out += ["", *_table(["system", "concurrency", "model", "mean batch", "size-biased batch", "fixed per batch",
                         "per image"], fits), "",
            "`size-biased batch` is the batch the average image sits in. Well above the mean batch, the batches are "
            "uneven: under a closed loop a large batch answers its clients together, they come back together and the "
            "next free instance takes them all, while the other instances run small batches that each pay the fixed "
            "cost. A lower `max` can even them out; compare with `--variant NAME:max=N`."]
    if uneven:
        out += ["", f"**Uneven batches** (size-biased at least {UNEVEN}× the mean): " + "; ".join(uneven) + "."]
    return out


def model_lines(server_log: Path) -> list[tuple[str, int]]:
    """The lines the served models wrote to the server's log (what each instance chose at load, its warnings),
    each once, in the order they first came, with how many times it came (once per instance, mostly)."""
    try:
        text = server_log.read_text(errors="replace")
    except OSError:
        return []
    counts = Counter(f"{m[1]}: {m[2]}" if m[1] != "INFO" else m[2]
                     for m in map(_MODEL_LINE.match, text.splitlines()) if m)
    return list(counts.items())


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def markdown(rows: list[Row], steps: list[StepTimes], header: dict[str, str], stages: list[StageTimes] | None = None,
             said: list[tuple[str, int]] | None = None, batches: list[BatchTimes] | None = None) -> str:
    by = {(r.system, r.concurrency): r for r in rows if r.system not in INPROCESS_ROWS}
    present = [s for s in SERVED if any(r.system == s for r in rows)]
    inproc = next((r for r in rows if r.system == "inprocess"), None)
    dali = next((r for r in rows if r.system == "dali" and r.throughput), None)
    has_mem = any(r.gpu_mem_mb is not None or r.gpu_mem_before_mb is not None for r in rows)
    levels = sorted({c for (_, c) in by})

    out = ["# tritonpipe bench", ""]
    out += [f"- {key}: {value}" for key, value in header.items()]
    out += ["", "## Throughput (images/s) and latency (ms) by concurrency", ""]
    columns = ["concurrency"]
    for system in present:
        columns += [f"{system} img/s", f"{system} p50", f"{system} p99"]
        if has_mem:
            columns.append(f"{system} GPU MiB")
    peers = [s for s in present if s not in ("ensemble", "floor")] if "ensemble" in present else []
    columns += [f"ensemble/{peer}" for peer in peers]
    # what the pipeline's own work adds to a request's time, past what the server and a stub cost anyway
    floor = "floor" in present and "ensemble" in present
    if floor:
        columns.append("ensemble p50 over floor")
    if inproc is not None and "ensemble" in present:
        columns.append("ensemble/in-process")
    if dali is not None and "ensemble" in present:
        columns.append("ensemble/DALI")
    lines = []
    for level in levels:
        line = [str(level)]
        for system in present:
            row = by.get((system, level))
            line += [fmt_rate(row and row.throughput), fmt_ms(row and row.p50_ms), fmt_ms(row and row.p99_ms)]
            if has_mem:
                line.append(fmt_mem(row and row.gpu_mem_before_mb, row and row.gpu_mem_mb,
                                    row and row.torch_cache_before_mb, row and row.torch_cache_mb))
        ensemble = by.get(("ensemble", level))
        for peer in peers:
            line.append(fmt_ratio(ratio(ensemble and ensemble.throughput, (by.get((peer, level)) or Row("", 0, None)).throughput)))
        if floor:
            line.append(fmt_ms(_minus(ensemble and ensemble.p50_ms, (by.get(("floor", level)) or Row("", 0, None)).p50_ms)))
        if inproc is not None and "ensemble" in present:
            line.append(fmt_ratio(ratio(ensemble and ensemble.throughput, inproc.throughput)))
        if dali is not None and "ensemble" in present:
            line.append(fmt_ratio(ratio(ensemble and ensemble.throughput, dali.throughput)))
        lines.append(line)
    if levels:
        out += _table(columns, lines)
        if any(r.torch_cache_mb is not None for r in rows):
            out += ["", "GPU MiB is the GPU's memory in use before and after the level (nvidia-smi); in brackets, what torch's "
                    "caching allocators held in tritonpipe's GPU instances then (the `tritonpipe_gpu_cache_bytes` gauges), so "
                    "that a rise reads apart into torch's cache and the rest (the decoders' own buffers, CUDA contexts, the server)."]
    busy = [r for r in rows if r.host_cores is not None or r.server_cores is not None]
    if busy:
        out += ["", "Host CPU over each level (cores busy on average, warm-up windows included; `the rest` is the load "
                "generator, the benchmark and whatever else runs on the host):", ""]
        out += _table(
            ["system", "concurrency", "host", "tritonserver", "its stubs", "the rest"],
            [[r.system, str(r.concurrency), fmt_cores(r.host_cores), fmt_cores(r.server_cores), fmt_cores(r.stub_cores),
              fmt_cores(_minus(_minus(r.host_cores, r.server_cores), r.stub_cores))] for r in busy],
        )
    gpu_busy = [r for r in rows if r.sm_busy is not None or r.jpeg_busy is not None]
    if gpu_busy:
        out += ["", "GPU busy over each level and in-process row (`nvidia-smi dmon`, one-second samples; a level's with "
                "perf_analyzer's warm-up included, an in-process row's over its timed batches only, the concurrency column "
                "then its batch): a unit near 100% is what set the pace.", ""]
        out += _table(["system", "concurrency", "SMs %", "JPEG engines %"],
                      [[r.system, str(r.concurrency), fmt_percent(r.sm_busy), fmt_percent(r.jpeg_busy)] for r in gpu_busy])
    if inproc is not None:
        out += ["", f"In-process limit ({inproc.note or 'no server'}):", ""]
        out += _table(
            ["batch", "img/s", "batch p50 ms", "batch p99 ms"] + (["GPU MiB"] if has_mem else []),
            [[str(inproc.concurrency), fmt_rate(inproc.throughput), fmt_ms(inproc.p50_ms), fmt_ms(inproc.p99_ms)]
             + ([fmt_mem(inproc.gpu_mem_before_mb, inproc.gpu_mem_mb)] if has_mem else [])],
        )
    side = [r for r in rows if r.system in INPROCESS_ROWS[1:]]
    if side:
        out += ["", "Preprocessing in one process, same corpus and GPU (DALI is measured in the same run):", ""]
        out += _table(
            ["system", "batch", "img/s", "vs DALI", "what"],
            [[r.system, str(r.concurrency), fmt_rate(r.throughput),
              fmt_ratio(ratio(r.throughput, dali.throughput if dali else None)), r.note] for r in side],
        )
    failed = [r for r in rows if r.throughput is None and r.note]
    if failed:
        out += ["", "Failed measurements:", ""] + [f"- {r.system} at {r.concurrency}: {r.note}" for r in failed]
    loose = [r for r in rows if r.throughput is not None and r.note and r.system not in INPROCESS_ROWS]
    if loose:
        out += ["", "Measured more loosely:", ""] + [f"- {r.system} at {r.concurrency}: {r.note}" for r in loose]
    if steps:
        out += [
            "", "## Where the time goes (ms per request, by concurrency level)", "",
            "Server rows come from Triton's model statistics over each level. An ensemble's row is its end-to-end server "
            "time, and its `other` is the ensemble's own overhead (total minus its steps' totals); a model's `other` "
            "is time no phase accounts for. Triton gives each request of a batch that batch's compute input, infer and "
            "output: they are the times of the batches the requests were in, a large batch weighing as many times as "
            "it holds requests (the batch table below counts each batch once). In-process rows are wall time per image "
            "of each model's stage tree.", "",
        ]
        out += _table(
            ["system", "concurrency", "model", "requests", "avg batch", "total", "queue", "compute input", "compute infer",
             "compute output", "other"],
            [
                [s.system, "—" if s.concurrency is None else str(s.concurrency), s.model, str(s.requests),
                 f"{s.avg_batch:.1f}", fmt_ms(s.total_ms), fmt_ms(s.queue_ms), fmt_ms(s.compute_input_ms),
                 fmt_ms(s.compute_infer_ms), fmt_ms(s.compute_output_ms), fmt_ms(s.other_ms)]
                for s in steps
            ],
        )
    if stages:
        out += _stage_lines(stages)
    if batches:
        out += _batch_lines(batches)
    if said:
        out += ["", "## What the models said", "",
                "The served models' lines in the server's log, each once, with how many times it came (each instance says "
                "what it chose at load: its stages, the decoder, the model's engine, what the resize folded, the warm-up).", ""]
        out += [f"- {line}" + (f" (x{count})" if count > 1 else "") for line, count in said]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], path: Path) -> Path | None:
    """Throughput and p99 against concurrency, two panels; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in SERVED:
        points = sorted((r.concurrency, r.throughput, r.p99_ms) for r in rows if r.system == system and r.throughput)
        if points:
            xs = [p[0] for p in points]
            left.plot(xs, [p[1] for p in points], marker="o", label=TITLES[system])
            right.plot(xs, [p[2] for p in points], marker="o", label=TITLES[system])
    for row in rows:
        if row.system == "inprocess" and row.throughput:
            left.axhline(row.throughput, linestyle="--", color="gray", label=f"{TITLES['inprocess']}, batch {row.concurrency}")
    levels = sorted({r.concurrency for r in rows if r.system != "inprocess"})
    for axis, label in ((left, "images / s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        if levels:
            axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
