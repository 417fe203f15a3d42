"""Per-stage metrics on Triton's own ``/metrics``, through the Python backend's custom-metrics API.

Every instance of a model adds to the same series (Triton keys a metric by its family and labels).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import RequestError

log = logging.getLogger("tritonpipe")

IMAGES = "tritonpipe_stage_images"
DURATION_US = "tritonpipe_stage_duration_us"
BATCH_SECONDS = "tritonpipe_stage_batch_duration_seconds"
REJECTS = "tritonpipe_stage_rejects"
#: a gauge per GPU instance: the device memory torch's caching allocator holds in the instance's process
GPU_CACHE_BYTES = "tritonpipe_gpu_cache_bytes"
#: the steps of ``execute`` around the stages, reported as pseudo-stages named ``execute:<step>``:
#: reading the requests, building the outputs, waiting for the GPU, writing the responses
STEP_PREFIX = "execute:"
STEPS = ("read", "outputs", "synchronize", "respond")
#: the GPU time of a batch's chain (CUDA events), which overlaps the steps and the stages
GPU_STEP = "gpu"
#: with ``overlap``: how long ``execute`` waited for the tail thread to take its batch
WAIT_STEP = "wait"
#: how often an instance's stage tallies reach Triton's /metrics
FLUSH_SECONDS = 0.5
#: seconds one stage takes for one batch: from a resize of a small image to a large model batch
BATCH_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
#: the ``le`` labels of :data:`BATCH_BUCKETS`' series, then the last one's
BUCKET_LABELS = [f"{bound:g}" for bound in BATCH_BUCKETS] + ["+Inf"]


def reject_reason(exc: BaseException) -> str:
    """The ``reason`` label: the RequestError's own tag, else ``internal`` (the server's fault)."""
    return exc.reason if isinstance(exc, RequestError) else "internal"


class StageMetrics:
    """A :class:`~tritonpipe.stages.control.StageSink` that counts into Triton's metric families.

    Each update of a Triton metric is a round trip from the stub to the server process (about
    50 µs, with the GIL held), three or more per stage and batch.  So ``record`` only adds to this
    process's own tallies, and a thread of its own hands them to Triton every ``flush_seconds``, off
    the requests' path, as one increment per series.  The batch-duration histogram is kept the same
    way: its ``_bucket`` (cumulative, by ``le``), ``_sum`` and ``_count`` series are counters that
    take a flush's counts at once, where a Triton histogram would take one round trip per batch
    (on a 2-core host that cost 4% of the rate at concurrency 1).  ``flush_seconds=0`` updates
    Triton at once.

    Args:
        pb_utils: ``triton_python_backend_utils``, as the stub provides it.
        model: the model's name, the ``model`` label.
        flush_seconds: how often the tallies reach Triton; 0: at every ``record``.
        gpu_cache: returns the bytes torch's caching allocator holds on the instance's GPU; given, every
            flush sets the instance's ``tritonpipe_gpu_cache_bytes`` gauge (labels ``model``, ``instance``),
            so that a rise in the GPU's memory reads apart into torch's cache and the rest.
        instance: the instance's name, the gauge's ``instance`` label.
    """

    def __init__(self, pb_utils: Any, model: str, flush_seconds: float = FLUSH_SECONDS, *,
                 gpu_cache: Callable[[], float] | None = None, instance: str = ""):
        family = pb_utils.MetricFamily
        self.model = model
        self._gpu_cache = gpu_cache
        self._cache_family = self._cache = None
        if gpu_cache is not None:
            try:
                self._cache_family = family(GPU_CACHE_BYTES, "device memory torch's caching allocator holds in the instance, in bytes", family.GAUGE)
                self._cache = self._cache_family.Metric(labels={"model": model, "instance": instance or model})
            except Exception as exc:  # noqa: BLE001 - a reading: the model serves without it
                log.warning("%s: no %s gauge (%s)", model, GPU_CACHE_BYTES, exc)
                self._cache_family = self._cache = None
        self._images = family(IMAGES, "images (requests) that entered the stage", family.COUNTER)
        self._duration = family(DURATION_US, "cumulative wall time of the stage's calls, in microseconds", family.COUNTER)
        about = "wall time of one call of the stage on one batch, in seconds"
        self._buckets = family(f"{BATCH_SECONDS}_bucket", f"{about}: calls that took at most le", family.COUNTER)
        self._batch_sum = family(f"{BATCH_SECONDS}_sum", f"{about}: their sum", family.COUNTER)
        self._batch_count = family(f"{BATCH_SECONDS}_count", f"{about}: how many", family.COUNTER)
        self._rejects = family(REJECTS, "requests the stage failed, by reason", family.COUNTER)
        self._metrics: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._counts: dict[tuple[Any, str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[str, list[int]] = {}  # stage -> batches per bucket, the last past every bound
        self._bucketed: set[str] = set()  # stages whose bucket series Triton has, all of them, from the first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_seconds > 0:
            self._thread = threading.Thread(target=self._flush_every, args=(flush_seconds,), name="tritonpipe-metrics", daemon=True)
            self._thread.start()

    def _metric(self, family: Any, stage: str, extra: tuple[tuple[str, str], ...] = ()) -> Any:
        key = (id(family), stage, *extra)
        metric = self._metrics.get(key)
        if metric is None:
            metric = self._metrics[key] = family.Metric(labels={"model": self.model, "stage": stage, **dict(extra)})
        return metric

    def record(self, stage: str, seconds: float, images: int, errors: list[BaseException]) -> None:
        with self._lock:
            counts = self._counts
            for family, amount in ((self._images, images), (self._duration, seconds * 1e6)):
                counts[(family, stage, ())] = counts.get((family, stage, ()), 0.0) + amount
            for exc in errors:
                key = (self._rejects, stage, (("reason", reject_reason(exc)),))
                counts[key] = counts.get(key, 0.0) + 1
            counts[(self._batch_count, stage, ())] = counts.get((self._batch_count, stage, ()), 0.0) + 1
            counts[(self._batch_sum, stage, ())] = counts.get((self._batch_sum, stage, ()), 0.0) + seconds
            bins = self._histograms.setdefault(stage, [0] * len(BUCKET_LABELS))
            bins[bisect.bisect_left(BATCH_BUCKETS, seconds)] += 1  # the first bound at or above it
        if self._thread is None:
            self.flush()

    def flush(self) -> None:
        """Hand every tally so far to Triton.

        Each update keeps the GIL for its round trip, and a flush is a hundred or more of them (on an H200
        host 4-7 ms of a stub's CPU per flush): the thread lets the GIL go between updates (``_yield``), so
        that ``execute`` waits for one update at most, not for the interpreter's 5 ms switch interval.

        The batch counts (``..._batch_duration_seconds_count``) go last: a reader that sees a stage's count
        reach N sees everything else of those N batches too (their images, rejects, durations and buckets)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            histograms, self._histograms = self._histograms, {}
        last = [(key, amount) for key, amount in counts.items() if key[0] is self._batch_count]
        for (family, stage, extra), amount in counts.items():
            if family is not self._batch_count:
                self._metric(family, stage, extra).increment(amount)
                self._yield()
        for stage, bins in histograms.items():
            below = 0
            for label, count in zip(BUCKET_LABELS, bins):
                below += count
                # every bucket's series from the stage's first flush on, so that a quantile sees them all
                if below or stage not in self._bucketed:
                    self._metric(self._buckets, stage, (("le", label),)).increment(below)
                    self._yield()
            self._bucketed.add(stage)
        for (family, stage, extra), amount in last:
            self._metric(family, stage, extra).increment(amount)
            self._yield()
        if self._cache is not None:
            with contextlib.suppress(Exception):  # a reading: never worth failing anything for
                self._cache.set(float(self._gpu_cache()))

    def _yield(self) -> None:
        if self._thread is not None:  # on the flushing thread; with flush_seconds=0 the caller is execute itself
            time.sleep(0)  # lets the GIL go to a thread that waits for it

    def _flush_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.flush()

    def close(self) -> None:
        """Hand over what is left, then drop the metrics before their families, the order the stub requires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        self._metrics.clear()
        self._cache = None
