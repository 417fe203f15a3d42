"""The soak's report: counts, percentiles, the pass rule and the text table."""

import json

import numpy as np
import pytest

from tritonpipe.harness.probe import Memory
from tritonpipe.harness.soak import FaultReport, Outcome, SoakReport, format_report
from tritonpipe.harness.soak.report import count_verdicts, percentiles, verdicts_by_kind


def outcome(index, kind, verdict, latency=0.01, status="", message=""):
    return Outcome(index, kind, verdict, latency, index, index + latency, status, message)


def report(counts, fault=None, memory=None, examples=()):
    memory = memory or {
        "before": Memory(100.0, 50.0, 2), "after_warmup": Memory(120.0, 60.0, 2, 900.0), "after": Memory(121.0, 61.5, 2, 900.0),
    }
    return SoakReport(
        model="soak", protocol="grpc", requests=sum(counts.values()), concurrency=4, bad=3,
        counts={"correct": 0, "rejected": 0, "wrong": 0, "lost": 0, **counts}, by_kind={"good": {"correct": 7}},
        latency_ms={"p50": 1.25, "p90": 2.0, "p99": 3.0, "mean": 1.5}, memory=memory, duration_s=2.0,
        warmup={"correct": 5}, examples=list(examples), fault=fault,
    )


def test_counts_name_every_verdict_and_add_refused_only_when_seen():
    outcomes = [outcome(0, "good", "correct"), outcome(1, "png", "rejected"), outcome(2, "good", "correct")]
    assert count_verdicts(outcomes) == {"correct": 2, "rejected": 1, "wrong": 0, "lost": 0}
    assert count_verdicts([outcome(0, "good", "refused")])["refused"] == 1
    assert verdicts_by_kind(outcomes) == {"good": {"correct": 2}, "png": {"rejected": 1}}


def test_percentiles_in_milliseconds_agree_with_numpy():
    seconds = list(np.random.default_rng(0).uniform(0.001, 0.1, 101))
    got = percentiles(seconds)
    assert got["p50"] == pytest.approx(np.median(seconds) * 1000) and got["mean"] == pytest.approx(np.mean(seconds) * 1000)
    assert got["p90"] < got["p99"] == pytest.approx(np.percentile(seconds, 99) * 1000)
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_rss_growth_is_after_warm_up_and_unknown_when_stubs_changed():
    assert report({"correct": 7}).rss_growth_mb == 121.0 + 61.5 - 180.0
    changed = {"before": Memory(), "after_warmup": Memory(100.0, 10.0, 2), "after": Memory(100.0, 5.0, 1)}
    assert report({"correct": 7}, memory=changed).rss_growth_mb is None
    unknown = {"before": Memory(), "after_warmup": Memory(), "after": Memory()}
    assert report({"correct": 7}, memory=unknown).rss_growth_mb is None


def test_pass_rule():
    assert report({"correct": 7, "rejected": 3}).ok
    assert not report({"correct": 7, "wrong": 1}).ok
    assert not report({"correct": 7, "lost": 1}).ok
    # with a fault injected on purpose, errors are expected, hangs are not
    assert report({"correct": 7, "lost": 2}, fault=FaultReport("kill-stub", 3, target="x", errors=2)).ok
    assert not report({"correct": 7, "lost": 2}, fault=FaultReport("kill-stub", 3, target="x", hung=1)).ok


def test_text_report_shows_counts_latency_memory_and_verdict():
    text = format_report(report({"correct": 7, "rejected": 3}))
    assert text.startswith("soak of 'soak' over grpc: 10 requests (3 bad) at concurrency 4 in 2.0 s")
    assert "  correct                      7" in text and "  rejected as expected         3" in text
    assert "p50 1.2" in text and "p99 3.0" in text
    assert "  after warm-up      120.0      60.0     180.0     900.0   (2 stubs)" in text
    assert "  before             100.0      50.0     150.0       n/a   (2 stubs)" in text
    assert "RSS growth after warm-up: 2.5 MB" in text
    assert "refused" not in text and text.endswith("\nOK")


def test_text_report_of_a_fault_and_a_failure():
    fault = FaultReport("stop-server", 400, target="tritonserver (pid 9)", in_flight=16, completed=12, refused=4,
                        not_sent=50, server_exit_code=0, server_exit_s=1.5, errors=1,
                        error_messages={"INTERNAL: gone": 1})
    example = {"verdict": "lost", "index": 5, "kind": "good", "status": "INTERNAL", "message": "gone"}
    text = format_report(report({"correct": 7, "lost": 1, "refused": 4}, fault=fault, examples=[example]))
    assert "fault: stop-server after 400 requests (tritonserver (pid 9))" in text
    assert "in flight then 16; of those answered 12" in text
    assert "not sent 50; refused while stopping 4; server exit code 0 after 1.5 s" in text
    assert "1 x INTERNAL: gone" in text and "lost: request 5 (good) INTERNAL gone" in text
    assert "refused (stopping)" in text
    assert text.endswith("the failures above came from the injected fault")
    wrong = format_report(report({"correct": 7, "wrong": 1}))
    assert wrong.endswith("\nFAILED")


def test_fault_not_reached_says_so():
    text = format_report(report({"correct": 7}, fault=FaultReport("kill-stub", 10_000)))
    assert "fault: kill-stub after 10000 requests (not reached)" in text


def test_json_form_carries_memory_totals_and_the_verdict():
    data = report({"correct": 7}).to_dict()
    assert json.loads(json.dumps(data))["memory"]["after"]["total_mb"] == 182.5
    assert data["ok"] is True and data["rss_growth_mb"] == 2.5 and data["fault"] is None
