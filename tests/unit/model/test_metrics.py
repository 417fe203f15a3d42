"""The stage timing hook in run_chain and the sink that turns it into Triton metrics."""

import sys
import threading
import time

import pytest
import torch
from tests.unit.model import fake_metrics
from tests.unit.model.fake_metrics import FakeMetricsModule

from tritonpipe.errors import InternalError, RequestError
from tritonpipe.kernels.errors import DecodeError
from tritonpipe.kernels.jpeg import read_jpeg_info
from tritonpipe.model.metrics import (
    BATCH_BUCKETS,
    BATCH_SECONDS,
    BUCKET_LABELS,
    GPU_CACHE_BYTES,
    IMAGES,
    REJECTS,
    StageMetrics,
    reject_reason,
)
from tritonpipe.pipeline.grammar import parse_backend
from tritonpipe.stages import build_stage
from tritonpipe.stages.control import run_chain, set_stage_sink


class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, stage, seconds, images, errors):
        self.calls.append((stage, images, [type(e).__name__ for e in errors]))


@pytest.fixture
def recorder():
    sink = Recorder()
    set_stage_sink(sink)
    yield sink
    set_stage_sink(None)


def test_run_chain_reports_each_leaf_stage_once_with_its_rejects(recorder):
    chain = build_stage(parse_backend("S[Identity,S[Identity,C10Exception]]"), "cpu")
    run_chain([chain], [{"data": 1}])
    assert recorder.calls == [("Identity", 1, []), ("Identity", 1, []), ("C10Exception", 1, ["RequestError"])]


def test_no_sink_no_reports():
    chain = build_stage(parse_backend("S[Identity]"), "cpu")
    items = [{"data": 1}]
    run_chain([chain], items)  # nothing to report to: must not fail
    assert items[0]["data"] == 1


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n" + bytes(16), "not_jpeg"), (b"\xff\xd8\xff", "truncated"),
])
def test_decoder_refusals_carry_a_reason(data, reason):
    with pytest.raises(DecodeError) as refused:
        read_jpeg_info(data)
    assert refused.value.reason == reason
    # the decode stage hands the reason on to the request's error, the rejects metric's label
    item = {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)}
    build_stage(parse_backend("DecodeTensor"), "cpu").forward([item])
    assert isinstance(item["error"], RequestError) and reject_reason(item["error"]) == reason


def test_reasons_of_other_failures():
    assert reject_reason(RequestError("bad")) == "bad_input"
    assert reject_reason(InternalError("broken")) == "internal" == reject_reason(RuntimeError("x"))


def test_stage_metrics_label_and_count():
    module = FakeMetricsModule()
    metrics = StageMetrics(module, "m", flush_seconds=0)
    metrics.record("DecodeMat", 0.002, 3, [RequestError("x", reason="truncated"), RuntimeError("y")])
    metrics.record("DecodeMat", 0.001, 1, [])
    assert module.value(IMAGES, model="m", stage="DecodeMat") == 4
    assert module.value(REJECTS, model="m", stage="DecodeMat", reason="truncated") == 1
    assert module.value(REJECTS, model="m", stage="DecodeMat", reason="internal") == 1


def test_tallies_reach_triton_from_their_own_thread_and_all_of_them_by_close():
    import time

    module = FakeMetricsModule()
    metrics = StageMetrics(module, "m", flush_seconds=0.05)
    for _ in range(200):
        metrics.record("ResizeMat", 0.001, 2, [RequestError("x", reason="too_large")])
    deadline = time.monotonic() + 10
    while not module.callers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert module.callers == {"tritonpipe-metrics"}  # record itself never waits on the server
    metrics.record("ResizeMat", 0.001, 2, [])
    metrics.close()  # hands over what the thread had not sent yet
    assert module.value(IMAGES, model="m", stage="ResizeMat") == 402
    assert module.value(REJECTS, model="m", stage="ResizeMat", reason="too_large") == 200
    # every batch counted in the duration histogram's series, none lost
    assert module.value(f"{BATCH_SECONDS}_count", model="m", stage="ResizeMat") == 201
    assert module.value(f"{BATCH_SECONDS}_sum", model="m", stage="ResizeMat") == pytest.approx(0.201)
    assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="ResizeMat", le="0.001") == 201
    assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="ResizeMat", le="+Inf") == 201
    assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="ResizeMat", le="0.0005") == 0


def test_the_duration_histogram_counts_each_batch_in_every_bucket_at_or_above_it_in_few_updates():
    module = FakeMetricsModule()
    metrics = StageMetrics(module, "m", flush_seconds=0.05)
    metrics.close()  # no thread from here on: every flush below is this test's
    module.updates = 0
    durations = [0.0004, 0.0005, 0.0007, 0.003, 0.003, 0.2, 7.0]
    for seconds in durations:
        metrics.record("DecodeTensor", seconds, 1, [])
    metrics.flush()
    for label, bound in zip(BUCKET_LABELS, BATCH_BUCKETS + [float("inf")]):
        want = sum(seconds <= bound for seconds in durations)
        assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="DecodeTensor", le=label) == want, label
    assert module.kinds[f"{BATCH_SECONDS}_bucket"] == "counter"
    # one update per series touched, not one per batch: 14 buckets, the sum, the count, images and duration
    assert module.updates <= len(BUCKET_LABELS) + 4
    metrics.record("DecodeTensor", 0.003, 1, [])
    metrics.flush()
    assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="DecodeTensor", le="0.005") == 6
    assert module.value(f"{BATCH_SECONDS}_bucket", model="m", stage="DecodeTensor", le="0.001") == 3
    assert module.value(f"{BATCH_SECONDS}_count", model="m", stage="DecodeTensor") == 8


def test_a_gpu_instance_sets_its_torch_cache_gauge_at_every_flush():
    module = FakeMetricsModule()
    held = iter([1 << 30, 3 << 29])
    metrics = StageMetrics(module, "m", flush_seconds=0, gpu_cache=lambda: next(held), instance="m_0_1")
    assert module.kinds[GPU_CACHE_BYTES] == "gauge"
    metrics.record("DecodeTensor", 0.001, 1, [])
    assert module.value(GPU_CACHE_BYTES, model="m", instance="m_0_1") == 1 << 30
    metrics.flush()
    assert module.value(GPU_CACHE_BYTES, model="m", instance="m_0_1") == 3 << 29  # the latest reading, not a sum
    metrics.close()


def test_a_failing_reading_leaves_the_stage_tallies_alone():
    module = FakeMetricsModule()

    def broken():
        raise RuntimeError("CUDA error: the device is gone")

    metrics = StageMetrics(module, "m", flush_seconds=0, gpu_cache=broken, instance="m_0")
    metrics.record("ResizeTensor", 0.001, 2, [])
    assert module.value(IMAGES, model="m", stage="ResizeTensor") == 2
    assert module.value(GPU_CACHE_BYTES, model="m", instance="m_0") == 0.0  # never set
    metrics.close()


def test_a_cpu_instance_has_no_gauge():
    module = FakeMetricsModule()
    StageMetrics(module, "m", flush_seconds=0).close()
    assert GPU_CACHE_BYTES not in module.kinds


def test_a_stub_without_gauges_still_counts_the_stages():
    module = FakeMetricsModule()
    family = module.MetricFamily

    class NoGauges(family):
        def __init__(self, name, description, kind):
            if kind == family.GAUGE:
                raise ValueError("unknown metric kind")
            super().__init__(name, description, kind)

    module.MetricFamily = NoGauges
    metrics = StageMetrics(module, "m", flush_seconds=0, gpu_cache=lambda: 1.0, instance="m_0")
    metrics.record("DecodeTensor", 0.001, 3, [])
    assert module.value(IMAGES, model="m", stage="DecodeTensor") == 3
    metrics.close()


def test_a_flush_lets_a_thread_that_waits_for_the_gil_run_between_updates(monkeypatch):
    """Each update keeps the GIL in the stub; without a yield, execute would wait out the whole flush."""
    module = FakeMetricsModule()
    metrics = StageMetrics(module, "m", flush_seconds=3600)  # a flushing thread of its own, idle here
    for stage in ("DecodeTensor", "ResizeTensor", "execute:read"):
        metrics.record(stage, 0.003, 4, [])
    progress, seen, stop = [0], [], threading.Event()

    def other():  # stands for execute: it needs the GIL to go on
        while not stop.is_set():
            progress[0] += 1
            time.sleep(0)

    original = fake_metrics._Metric.increment
    monkeypatch.setattr(fake_metrics._Metric, "increment", lambda self, amount: (seen.append(progress[0]), original(self, amount)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)  # no forced switch during the flush: only a yield lets the other thread in
    runner = threading.Thread(target=other)
    try:
        runner.start()
        while progress[0] == 0:
            time.sleep(0.001)
        metrics.flush()
    finally:
        stop.set()
        runner.join()
        sys.setswitchinterval(interval)
        metrics.close()
    assert len(seen) == 3 * (4 + len(BUCKET_LABELS))  # a stage's first flush gives every bucket its series
    moved = sum(b != a for a, b in zip(seen, seen[1:]))
    assert moved >= len(seen) // 2, (moved, len(seen))


def test_a_flush_hands_over_the_batch_counts_last():
    module = FakeMetricsModule()
    metrics = StageMetrics(module, "m", flush_seconds=3600)  # its thread would flush in an hour: flushed below
    metrics.record("DecodeMat", 0.002, 1, [])
    metrics.record("ResizeMat", 0.001, 1, [])
    # a reason first seen after the counts' series were tallied
    metrics.record("DecodeMat", 0.003, 1, [RequestError("too big", reason="too_large")])
    metrics.flush()
    metrics.close()
    counts = [i for i, name in enumerate(module.order) if name == f"{BATCH_SECONDS}_count"]
    assert len(counts) == 2 and counts == list(range(len(module.order) - 2, len(module.order)))
    assert module.value(REJECTS, model="m", stage="DecodeMat", reason="too_large") == 1
    assert module.value(f"{BATCH_SECONDS}_count", model="m", stage="DecodeMat") == 2
