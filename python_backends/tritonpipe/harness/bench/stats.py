"""Where a request's time goes: Triton's per-model statistics (per request, and per batch by batch size) and,
inside each model, tritonpipe's own stage metrics, each differenced over each concurrency level."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...model.metrics import BATCH_SECONDS, DURATION_US, FLUSH_SECONDS, GPU_CACHE_BYTES, IMAGES

PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one model, as ``/v2/models/stats`` reports them."""

    inferences: int = 0
    executions: int = 0
    requests: int = 0  # successful requests
    ns: tuple[int, ...] = (0,) * len(PHASES)  # summed time per phase, in PHASES order
    # by batch size (``batch_stats``): (size, executions, compute input ns, compute infer ns, compute output ns),
    # each batch once; the phases above count a batch once per request, so a large batch weighs in them as many
    # times as it holds requests
    sizes: tuple[tuple[int, int, int, int, int], ...] = ()

    def __sub__(self, other: Counters) -> Counters:
        earlier = {size[0]: size for size in other.sizes}
        sizes = []
        for size in self.sizes:
            before = earlier.get(size[0], (size[0], 0, 0, 0, 0))
            if size[1] > before[1]:
                sizes.append((size[0], *(a - b for a, b in zip(size[1:], before[1:]))))
        return Counters(
            self.inferences - other.inferences,
            self.executions - other.executions,
            self.requests - other.requests,
            tuple(a - b for a, b in zip(self.ns, other.ns)),
            tuple(sizes),
        )

    @property
    def infer_ms_per_batch(self) -> float | None:
        """Compute infer per execution, whatever its batch, in ms, or None where no execution was counted."""
        batches = sum(size[1] for size in self.sizes)
        return sum(size[3] for size in self.sizes) / batches / 1e6 if batches > 0 else None


@dataclass
class StepTimes:
    """Average per successful request, in ms, over one concurrency level (``concurrency``; None: an in-process
    row).  Triton gives each request of a batch that batch's compute phases, so a large batch weighs in them as
    many times as it holds requests (:func:`batch_times` counts each batch once).

    For an ensemble the phases are left out (Triton sums its steps' compute there) and
    ``other_ms`` is its own overhead: end-to-end time minus its steps' times.  For a model,
    ``other_ms`` is what no phase accounts for.
    """

    system: str
    model: str
    requests: int
    executions: int
    total_ms: float
    queue_ms: float | None = None
    compute_input_ms: float | None = None
    compute_infer_ms: float | None = None
    compute_output_ms: float | None = None
    other_ms: float | None = None
    concurrency: int | None = None

    @property
    def avg_batch(self) -> float:
        return self.requests / self.executions if self.executions else 0.0


def parse_stats(stats: dict) -> dict[str, Counters]:
    """tritonclient's ``get_inference_statistics(as_json=True)`` -> counters by model name."""
    out: dict[str, Counters] = {}
    for entry in stats.get("model_stats", []):
        phases = entry.get("inference_stats", {})
        sizes = sorted(
            (int(size.get("batch_size", 0)), int(size.get("compute_infer", {}).get("count", 0)),
             *(int(size.get(phase, {}).get("ns", 0)) for phase in PHASES[2:]))
            for size in entry.get("batch_stats", [])
        )
        out[entry["name"]] = Counters(
            inferences=int(entry.get("inference_count", 0)),
            executions=int(entry.get("execution_count", 0)),
            requests=int(phases.get("success", {}).get("count", 0)),
            ns=tuple(int(phases.get(phase, {}).get("ns", 0)) for phase in PHASES),
            sizes=tuple(size for size in sizes if size[1] > 0),
        )
    return out


def fetch_stats(grpc_url: str) -> dict[str, Counters]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        return parse_stats(client.get_inference_statistics("", as_json=True))
    finally:
        client.close()


def breakdown(
    system: str,
    models: list[str],
    before: dict[str, Counters],
    after: dict[str, Counters],
    ensemble: str | None = None,
    concurrency: int | None = None,
) -> list[StepTimes]:
    """Per-request times of ``models`` over the interval between two snapshots (the level at ``concurrency``)."""
    rows = []
    for model in models:
        delta = after.get(model, Counters()) - before.get(model, Counters())
        total, *phases = [ns / delta.requests / 1e6 if delta.requests else 0.0 for ns in delta.ns]
        if model == ensemble:
            rows.append(StepTimes(system, model, delta.requests, delta.executions, total, concurrency=concurrency))
        else:
            rows.append(StepTimes(system, model, delta.requests, delta.executions, total, *phases, total - sum(phases),
                                  concurrency=concurrency))
    if ensemble is not None:
        head = next(r for r in rows if r.model == ensemble)
        head.other_ms = head.total_ms - sum(r.total_ms for r in rows if r.model != ensemble)
    return rows


@dataclass
class BatchTimes:
    """The batches of one size that one model ran over one concurrency level, in ms per batch."""

    system: str
    concurrency: int
    model: str
    batch_size: int
    batches: int
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float


def batch_times(system: str, concurrency: int, models: list[str], before: dict[str, Counters],
                after: dict[str, Counters]) -> list[BatchTimes]:
    """Each model's batches over the level between two snapshots, by size (Triton's ``batch_stats``): what an
    instance is busy with per batch, outside the stub's ``execute`` (compute input and output) and in it."""
    rows = []
    for model in models:
        delta = after.get(model, Counters()) - before.get(model, Counters())
        for size, count, *ns in delta.sizes:
            rows.append(BatchTimes(system, concurrency, model, size, count, *(total / count / 1e6 for total in ns)))
    return rows


def batch_means(rows: list[BatchTimes]) -> tuple[float, float] | None:
    """``(mean batch, size-biased mean batch)`` of ``rows``: the average batch, and the batch the average image sits
    in (each batch weighted by its size). Far apart, the batches are uneven: most images wait in large batches while
    many small ones each pay a batch's fixed cost. None where no batch ran."""
    count = sum(row.batches for row in rows)
    images = sum(row.batch_size * row.batches for row in rows)
    if count <= 0 or images <= 0:
        return None
    return images / count, sum(row.batch_size ** 2 * row.batches for row in rows) / images


def per_batch_fit(rows: list[BatchTimes]) -> tuple[float, float] | None:
    """``(fixed, per image)`` ms of the line ``fixed + per image x size`` closest to every batch's whole time in an
    instance (compute input + infer + output; least squares over the batches), or None where the sizes spread too
    little to fit a line (a standard deviation under one image: nearly every batch of one size)."""
    weights = [row.batches for row in rows]
    total = sum(weights)
    if len(rows) < 2 or total <= 0:
        return None
    times = [row.compute_input_ms + row.compute_infer_ms + row.compute_output_ms for row in rows]
    mean_size = sum(w * row.batch_size for w, row in zip(weights, rows)) / total
    mean_time = sum(w * t for w, t in zip(weights, times)) / total
    spread = sum(w * (row.batch_size - mean_size) ** 2 for w, row in zip(weights, rows))
    if spread < total:
        return None
    slope = sum(w * (row.batch_size - mean_size) * (t - mean_time) for w, row, t in zip(weights, rows, times)) / spread
    return mean_time - slope * mean_size, slope


# --- inside a model: tritonpipe's stage metrics ----------------------------------------------

_STAGE_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class StageTally:
    """Cumulative stage metrics of one (model, stage), every instance together."""

    images: float = 0.0
    duration_us: float = 0.0
    batches: float = 0.0

    def __sub__(self, other: StageTally) -> StageTally:
        return StageTally(self.images - other.images, self.duration_us - other.duration_us, self.batches - other.batches)


@dataclass
class StageTimes:
    """One stage of one model over one concurrency level."""

    system: str
    concurrency: int
    model: str
    stage: str
    images: int
    batches: int
    ms_per_batch: float
    ms_per_image: float
    compute_infer_ms: float | None = None  # the model's, per request, over the same interval
    compute_infer_batch_ms: float | None = None  # the model's, per execution (batch), over the same interval


def parse_stage_metrics(text: str) -> dict[tuple[str, str], StageTally]:
    """Triton's Prometheus page -> tallies by (model, stage) from the tritonpipe_stage_* families."""
    series = {IMAGES: "images", DURATION_US: "duration_us", f"{BATCH_SECONDS}_count": "batches"}
    found: dict[tuple[str, str], dict[str, float]] = {}
    for name, labels, value in _STAGE_SAMPLE.findall(text):
        field_name = series.get(name)
        if field_name is None:
            continue
        tags = dict(_LABEL.findall(labels))
        if "model" in tags and "stage" in tags:
            values = found.setdefault((tags["model"], tags["stage"]), {})
            values[field_name] = values.get(field_name, 0.0) + float(value)
    return {key: StageTally(**values) for key, values in found.items()}


def parse_gpu_cache_mb(text: str) -> float | None:
    """Triton's Prometheus page -> MiB that torch's caching allocators hold in every tritonpipe GPU
    instance together (the ``tritonpipe_gpu_cache_bytes`` gauges), or None where there is none."""
    values = [float(value) for name, _, value in _STAGE_SAMPLE.findall(text) if name == GPU_CACHE_BYTES]
    return sum(values) / 2**20 if values else None


def fetch_metrics_page(metrics_url: str, settle_s: float = FLUSH_SECONDS + 0.25) -> str:
    """Triton's Prometheus page once the instances have handed theirs over (they do every FLUSH_SECONDS)."""
    import time
    import urllib.request

    time.sleep(settle_s)
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return response.read().decode(errors="replace")


def stage_breakdown(
    system: str,
    concurrency: int,
    models: list[str],
    before: dict[tuple[str, str], StageTally],
    after: dict[tuple[str, str], StageTally],
    counters: tuple[dict[str, Counters], dict[str, Counters]] | None = None,
    order: dict[str, list[str]] | None = None,
) -> list[StageTimes]:
    """Per-stage times of ``models`` between two snapshots: model by model as ``models`` lists them,
    and each model's stages in ``order`` (model -> stage names as its chain runs them)."""
    rows = []
    for (model, stage), tally in after.items():
        if model not in models:
            continue
        delta = tally - before.get((model, stage), StageTally())
        if delta.batches <= 0:
            continue
        infer = per_batch = None
        if counters is not None:
            change = counters[1].get(model, Counters()) - counters[0].get(model, Counters())
            infer = change.ns[PHASES.index("compute_infer")] / change.requests / 1e6 if change.requests else None
            per_batch = change.infer_ms_per_batch
        rows.append(StageTimes(
            system, concurrency, model, stage, round(delta.images), round(delta.batches),
            delta.duration_us / delta.batches / 1e3, delta.duration_us / delta.images / 1e3 if delta.images else 0.0, infer,
            per_batch,
        ))

    def place(row: StageTimes) -> tuple[int, int]:
        stages = (order or {}).get(row.model, [])
        return models.index(row.model), stages.index(row.stage) if row.stage in stages else len(stages)

    return sorted(rows, key=place)
