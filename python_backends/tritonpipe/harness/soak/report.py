"""The soak's results: counts by verdict and input kind, latency, memory, the fault; as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..probe import Memory
from .faults import FaultReport
from .load import VERDICTS, Outcome


@dataclass
class SoakReport:
    model: str
    protocol: str
    requests: int
    concurrency: int
    bad: int
    counts: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    latency_ms: dict[str, float | None]
    memory: dict[str, Memory]
    duration_s: float
    warmup: dict[str, int]
    examples: list[dict]  # a few wrong or lost requests, for diagnosis
    fault: FaultReport | None = None

    @property
    def rss_growth_mb(self) -> float | None:
        """Growth from after warm-up to the end; None when unknown or a stub came or went."""
        before, after = self.memory["after_warmup"], self.memory["after"]
        if before.total_mb is None or after.total_mb is None or before.stubs != after.stubs:
            return None
        return after.total_mb - before.total_mb

    @property
    def ok(self) -> bool:
        """Nothing wrong; nothing lost unless a fault was injected on purpose (then nothing hung)."""
        if self.counts["wrong"]:
            return False
        return self.fault.hung == 0 if self.fault else self.counts["lost"] == 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"] = {k: {**asdict(v), "total_mb": v.total_mb} for k, v in self.memory.items()}
        data["rss_growth_mb"] = self.rss_growth_mb
        data["ok"] = self.ok
        return data


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and mean of durations in seconds, in milliseconds."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(values) * 1000
    return {
        "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
    }


def count_verdicts(outcomes: list[Outcome]) -> dict[str, int]:
    """Outcomes per verdict; every verdict appears, "refused" only when some were."""
    counts = {verdict: 0 for verdict in VERDICTS}
    for outcome in outcomes:
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
    return counts


def verdicts_by_kind(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    by_kind: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        by_kind.setdefault(outcome.kind, {}).setdefault(outcome.verdict, 0)
        by_kind[outcome.kind][outcome.verdict] += 1
    return by_kind


def _value(value: float | None) -> str:
    """A measurement for the table: one decimal, or n/a when it was not taken."""
    return "n/a" if value is None else f"{value:.1f}"


def format_report(report: SoakReport) -> str:
    """A plain-text table of the run."""
    c = report.counts
    lines = [
        f"soak of {report.model!r} over {report.protocol}: {report.requests} requests "
        f"({report.bad} bad) at concurrency {report.concurrency} in {report.duration_s:.1f} s",
        "",
        f"  {'correct':<22}{c['correct']:>8}",
        f"  {'rejected as expected':<22}{c['rejected']:>8}",
        f"  {'wrong':<22}{c['wrong']:>8}",
        f"  {'lost':<22}{c['lost']:>8}",
    ]
    if c.get("refused"):
        lines.append(f"  {'refused (stopping)':<22}{c['refused']:>8}")
    kinds = ", ".join(f"{kind}: {counts}" for kind, counts in sorted(report.by_kind.items()))
    lines += [f"  by input: {kinds}", ""]
    lat = report.latency_ms
    lines.append(f"  latency ms   p50 {_value(lat['p50'])}   p90 {_value(lat['p90'])}   p99 {_value(lat['p99'])}")
    lines += ["", f"  {'memory MB':<14}{'server':>10}{'stubs':>10}{'total':>10}{'GPU':>10}"]
    for name, label in (("before", "before"), ("after_warmup", "after warm-up"), ("after", "after")):
        m = report.memory.get(name, Memory())
        lines.append(
            f"  {label:<14}{_value(m.server_mb):>10}{_value(m.stubs_mb):>10}{_value(m.total_mb):>10}{_value(m.gpu_mb):>10}"
            + (f"   ({m.stubs} stubs)" if m.stubs else "")
        )
    lines.append(f"  RSS growth after warm-up: {_value(report.rss_growth_mb)} MB")
    fault = report.fault
    if fault is not None:
        lines += ["", f"  fault: {fault.kind} after {fault.after} requests ({fault.target or 'not reached'})"]
        if fault.target:
            lines.append(f"    in flight then {fault.in_flight}; of those answered {fault.completed}")
            lines.append(f"    failed with an error {fault.errors}; hung (client timeout) {fault.hung}")
            if fault.kind == "kill-stub":
                lines.append(f"    answered after the kill {fault.ok_after}; stub restarted: {fault.stub_restarted}; "
                             f"recovered: {fault.recovered}")
                lines.append(f"    recovery: {fault.affected} requests affected; {_value(fault.recovery_s)} s until requests stopped failing")
            else:
                lines.append(f"    not sent {fault.not_sent}; refused while stopping {fault.refused}; "
                             f"server exit code {fault.server_exit_code} after {_value(fault.server_exit_s)} s")
            for message, count in sorted(fault.error_messages.items(), key=lambda kv: -kv[1])[:3]:
                lines.append(f"    {count} x {message}")
    for example in report.examples[:5]:
        lines.append(f"  {example['verdict']}: request {example['index']} ({example['kind']}) "
                     f"{example['status']} {example['message'][:160]}")
    if not report.ok:
        verdict = "FAILED"
    elif fault is not None and (report.counts["lost"] or fault.errors):
        verdict = "OK: nothing wrong, nothing hung; the failures above came from the injected fault"
    else:
        verdict = "OK"
    return "\n".join(lines + ["", verdict])
