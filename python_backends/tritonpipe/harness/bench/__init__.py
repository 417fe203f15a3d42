"""``tritonpipe bench``: the pack's pipeline against a hand-written PIL baseline, DALI served and in one process,
a do-nothing floor, and the in-process limit.

Every system runs on the same JPEG corpus and the same model-stage model; the served ones are driven by the
real ``perf_analyzer`` over gRPC.
"""

from ...choices import SYSTEMS
from .perf import PerfSettings
from .report import Row
from .runner import DEFAULT_CONCURRENCY, BenchOptions, BenchResult, run_bench

__all__ = ["DEFAULT_CONCURRENCY", "SYSTEMS", "BenchOptions", "BenchResult", "PerfSettings", "Row", "run_bench"]
