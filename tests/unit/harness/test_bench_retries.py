"""A level perf_analyzer cannot measure stably is tried again, more loosely each time, and the report says so.

perf_analyzer itself cannot be made unstable on demand, so its outcomes are given here; the rest of the sweep
(the statistics, the metrics page) is answered with nothing, as a server without them would."""

import pytest

from tritonpipe.harness.bench import runner
from tritonpipe.harness.bench.perf import PerfError, PerfRow, PerfSettings
from tritonpipe.harness.bench.report import markdown

UNSTABLE = PerfError("Failed to obtain stable measurement within 10 measurement windows for concurrency 1.")


class Server:
    grpc_url, metrics_url = "127.0.0.1:1", "http://127.0.0.1:1/metrics"
    process = None  # no server process: the host's cores are still read


def sweep(monkeypatch, tmp_path, outcomes):
    """Run one level against perf_analyzer outcomes given in turn; the settings each try had, the lines said, the row."""
    tries, said = [], []

    def run_perf(install, model, url, input_json, concurrency, settings, workdir, log):
        tries.append(settings)
        outcome = outcomes[len(tries) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return PerfRow(concurrency, outcome, 1.0, 1.1, 1.2, 1.5)

    monkeypatch.setattr(runner, "run_perf", run_perf)
    monkeypatch.setattr(runner, "fetch_stats", lambda url: {})
    monkeypatch.setattr(runner, "_metrics_page", lambda server, say: None)
    monkeypatch.setattr(runner, "gpu_memory_mb", lambda: None)
    monkeypatch.setattr(runner, "breakdown", lambda *args, **kwargs: [])
    options = runner.BenchOptions(concurrency=[1], output=tmp_path, progress=False,
                                  perf=PerfSettings(measurement_interval_ms=2000))
    rows, _, _ = runner._sweep("floor", "python_floor", ["python_floor"], Server(), None, tmp_path / "in.json", options,
                               tmp_path, said.append)
    return tries, said, rows[0]


def test_a_stable_level_is_measured_once_as_asked(monkeypatch, tmp_path):
    tries, _, row = sweep(monkeypatch, tmp_path, [1500.0])
    assert [(t.measurement_interval_ms, t.stability_percentage) for t in tries] == [(2000, 10.0)]
    assert row.throughput == 1500.0 and row.note == ""


def test_twice_unstable_is_measured_a_third_time_with_windows_further_apart_and_said(monkeypatch, tmp_path):
    tries, said, row = sweep(monkeypatch, tmp_path, [UNSTABLE, UNSTABLE, 1757.0])
    assert [(t.measurement_interval_ms, t.stability_percentage) for t in tries] == [(2000, 10.0), (4000, 10.0), (4000, 25.0)]
    assert row.throughput == 1757.0
    assert row.note == "windows within 25% of each other, not 10%: perf_analyzer found no stable 10% twice"
    assert any("unstable again; retrying with windows within 25% of each other" in line for line in said)
    report = markdown([row], [], {})
    assert "Measured more loosely:\n\n- floor at 1: windows within 25% of each other" in report


@pytest.mark.parametrize("third", [UNSTABLE, PerfError("perf_analyzer exited with code 99")])
def test_a_level_unstable_three_times_fails_alone_with_the_last_reason(monkeypatch, tmp_path, third):
    tries, said, row = sweep(monkeypatch, tmp_path, [UNSTABLE, UNSTABLE, third])
    assert len(tries) == 3 and row.throughput is None and row.note == str(third).splitlines()[0]
    assert said[-1].startswith("[floor] concurrency 1: FAILED")


def test_a_failure_other_than_instability_is_not_tried_again(monkeypatch, tmp_path):
    tries, _, row = sweep(monkeypatch, tmp_path, [PerfError("perf_analyzer exited with code 99"), 1.0])
    assert len(tries) == 1 and row.throughput is None
