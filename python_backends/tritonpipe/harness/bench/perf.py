"""Running the real perf_analyzer at one concurrency level and reading its CSV."""

from __future__ import annotations

import csv
import io
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import TritonpipeError
from ...server.install import TritonInstall

# perf_analyzer's CSV reports latencies in microseconds under these headers
_COLUMNS = {
    "concurrency": "Concurrency",
    "throughput": "Inferences/Second",
    "p50": "p50 latency",
    "p90": "p90 latency",
    "p95": "p95 latency",
    "p99": "p99 latency",
}


class PerfError(TritonpipeError):
    """perf_analyzer failed or wrote something unreadable."""


@dataclass(frozen=True)
class PerfSettings:
    measurement_interval_ms: int = 5000
    measurement_mode: str = "time_windows"
    measurement_request_count: int = 50
    stability_percentage: float = 10.0
    max_trials: int = 10
    percentile: int | None = None
    shared_memory: str = "none"
    extra_args: tuple[str, ...] = ()
    timeout_s: float = 1200.0


@dataclass
class PerfRow:
    concurrency: int
    throughput: float  # requests (= images) per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    columns: dict[str, str] = field(default_factory=dict)  # the raw row, for anything else


def parse_perf_csv(text: str) -> list[PerfRow]:
    """Rows of perf_analyzer's ``-f`` CSV; the first block only (later blocks hold metrics)."""
    block = []
    for line in text.splitlines():
        if not line.strip():
            if block:
                break
            continue
        block.append(line)
    if not block:
        raise PerfError("perf_analyzer's CSV is empty")
    reader = csv.DictReader(io.StringIO("\n".join(block)))
    missing = [name for name in _COLUMNS.values() if name not in (reader.fieldnames or [])]
    if missing:
        raise PerfError(f"perf_analyzer's CSV lacks columns {missing}; it has {reader.fieldnames}")
    rows = []
    for raw in reader:
        try:
            rows.append(
                PerfRow(
                    concurrency=int(raw[_COLUMNS["concurrency"]]),
                    throughput=float(raw[_COLUMNS["throughput"]]),
                    **{f"{p}_ms": float(raw[_COLUMNS[p]]) / 1000.0 for p in ("p50", "p90", "p95", "p99")},
                    columns=dict(raw),
                )
            )
        except (TypeError, ValueError) as exc:
            raise PerfError(f"unreadable perf_analyzer CSV row {raw}: {exc}") from None
    return rows


def perf_command(
    binary: str | Path,
    model: str,
    url: str,
    input_json: str | Path,
    concurrency: int,
    csv_path: str | Path,
    settings: PerfSettings,
) -> list[str]:
    command = [
        str(binary), "-m", model, "-u", url, "-i", "grpc",
        "--input-data", str(input_json),
        # an explicit end keeps one sync thread per request however large the level
        "--concurrency-range", f"{concurrency}:{concurrency}:1",
        "--measurement-interval", str(settings.measurement_interval_ms),
        "--measurement-mode", settings.measurement_mode,
        "--stability-percentage", f"{settings.stability_percentage:g}",
        "--max-trials", str(settings.max_trials),
        "-f", str(csv_path),
    ]
    if settings.measurement_mode == "count_windows":
        command += ["--measurement-request-count", str(settings.measurement_request_count)]
    if settings.percentile is not None:
        command += ["--percentile", str(settings.percentile)]
    if settings.shared_memory != "none":
        command += ["--shared-memory", settings.shared_memory]
    return command + list(settings.extra_args)


def run_perf(
    install: TritonInstall,
    model: str,
    url: str,
    input_json: Path,
    concurrency: int,
    settings: PerfSettings,
    workdir: Path,
    log_path: Path,
) -> PerfRow:
    """One concurrency level; perf_analyzer's own output goes to ``log_path``."""
    binary = install.perf_analyzer()
    if binary is None:
        raise PerfError("perf_analyzer not found: it ships with tritonclient[all] or a bundle made by tritonpipe bundle (bin/)")
    csv_path = workdir / f"perf_{model}_{concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    command = perf_command(binary, model, url, input_json, concurrency, csv_path, settings)
    env = dict(os.environ, LD_LIBRARY_PATH=install.library_path(workdir))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=settings.timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise PerfError(f"perf_analyzer ran past {settings.timeout_s:.0f} s (log: {log_path})") from None
    if code != 0 or not csv_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-4:])
        raise PerfError(f"perf_analyzer exited with code {code}: {tail} (log: {log_path})")
    rows = parse_perf_csv(csv_path.read_text())
    return next((r for r in rows if r.concurrency == concurrency), rows[0])


def is_unstable(error: PerfError) -> bool:
    return "stable measurement" in str(error)
