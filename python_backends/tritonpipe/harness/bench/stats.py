"""Where a request's time goes: Triton's per-model statistics, differenced over one sweep."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one model, as ``/v2/models/stats`` reports them."""

    inferences: int = 0
    executions: int = 0
    requests: int = 0  # successful requests
    ns: tuple[int, ...] = (0,) * len(PHASES)  # summed time per phase, in PHASES order

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.inferences - other.inferences,
            self.executions - other.executions,
            self.requests - other.requests,
            tuple(a - b for a, b in zip(self.ns, other.ns)),
        )


@dataclass
class StepTimes:
    """Average per successful request, in ms.

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

    @property
    def avg_batch(self) -> float:
        return self.requests / self.executions if self.executions else 0.0


def parse_stats(stats: dict) -> dict[str, Counters]:
    """tritonclient's ``get_inference_statistics(as_json=True)`` -> counters by model name."""
    out: dict[str, Counters] = {}
    for entry in stats.get("model_stats", []):
        phases = entry.get("inference_stats", {})
        out[entry["name"]] = Counters(
            inferences=int(entry.get("inference_count", 0)),
            executions=int(entry.get("execution_count", 0)),
            requests=int(phases.get("success", {}).get("count", 0)),
            ns=tuple(int(phases.get(phase, {}).get("ns", 0)) for phase in PHASES),
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
) -> list[StepTimes]:
    """Per-request times of ``models`` over the interval between two snapshots."""
    rows = []
    for model in models:
        delta = after.get(model, Counters()) - before.get(model, Counters())
        total, *phases = [ns / delta.requests / 1e6 if delta.requests else 0.0 for ns in delta.ns]
        if model == ensemble:
            rows.append(StepTimes(system, model, delta.requests, delta.executions, total))
        else:
            rows.append(StepTimes(system, model, delta.requests, delta.executions, total, *phases, total - sum(phases)))
    if ensemble is not None:
        head = next(r for r in rows if r.model == ensemble)
        head.other_ms = head.total_ms - sum(r.total_ms for r in rows if r.model != ensemble)
    return rows
