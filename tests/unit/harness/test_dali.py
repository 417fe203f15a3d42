"""DALI as the benchmark's fourth system: measured where it imports, reported beside the others."""

import sys

import pytest

from tritonpipe.harness.bench import dali, report
from tritonpipe.harness.bench.report import Row


def test_missing_dali_is_one_line_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # an import of it now fails
    reason = dali.dali_available()
    assert reason is not None and "\n" not in reason and "pip install nvidia-dali" in reason


def test_report_gives_ratios_to_dali_in_the_same_run():
    rows = [
        Row("ensemble", 128, 6000.0, 20.0, 25.0, 26.0, 30.0),
        Row("inprocess", 64, 5000.0, 12.0),
        Row("inprocess-pre", 64, 7500.0, note="tritonpipe's preprocessing model alone"),
        Row("inprocess-pre-2", 64, 10300.0, note="the same, 2 batches in flight"),
        Row("dali", 64, 10000.0, note="decoders.image mixed"),
        Row("dali-hw-only", 64, 9000.0, note="hw 1.0"),
    ]
    text = report.markdown(rows, [], {"date": "today"})
    assert "ensemble/DALI" in text and "0.60×" in text
    table = text[text.index("Preprocessing in one process") :]
    assert "inprocess-pre" in table and "0.75" in table and "dali-hw-only" in table and "0.90" in table
    assert "| inprocess-pre-2 | 64 | 10,300.0 | 1.03× |" in table  # beside DALI, not among the served levels


def test_no_dali_row_means_no_dali_ratio():
    text = report.markdown([Row("ensemble", 1, 100.0, 1.0, 1.0, 1.0, 1.0), Row("dali", 64, None, note="not installed")],
                           [], {})
    assert "ensemble/DALI" not in text


@pytest.mark.gpu
@pytest.mark.skipif(dali.dali_available() is not None, reason="needs nvidia-dali")
def test_dali_pipeline_runs_on_the_corpus():
    from tritonpipe.harness.corpus import synthetic_corpus

    result = dali.run_dali(synthetic_corpus(8, seed=0).images, batch=8, threads=4, seconds=0.5)
    assert result.images >= 8 and result.throughput > 0
