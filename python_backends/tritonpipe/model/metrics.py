"""Per-stage metrics on Triton's own ``/metrics``, through the Python backend's custom-metrics API.

Every instance of a model adds to the same series (Triton keys a metric by its family and labels).
"""

from __future__ import annotations

from typing import Any

from ..errors import RequestError

IMAGES = "tritonpipe_stage_images"
DURATION_US = "tritonpipe_stage_duration_us"
BATCH_SECONDS = "tritonpipe_stage_batch_duration_seconds"
REJECTS = "tritonpipe_stage_rejects"
#: seconds one stage takes for one batch: from a resize of a small image to a large model batch
BATCH_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


def reject_reason(exc: BaseException) -> str:
    """The ``reason`` label: the RequestError's own tag, else ``internal`` (the server's fault)."""
    return exc.reason if isinstance(exc, RequestError) else "internal"


class StageMetrics:
    """A :class:`~tritonpipe.stages.control.StageSink` that counts into Triton's metric families.

    Args:
        pb_utils: ``triton_python_backend_utils``, as the stub provides it.
        model: the model's name, the ``model`` label.
    """

    def __init__(self, pb_utils: Any, model: str):
        family = pb_utils.MetricFamily
        self.model = model
        self._images = family(IMAGES, "images (requests) that entered the stage", family.COUNTER)
        self._duration = family(DURATION_US, "cumulative wall time of the stage's calls, in microseconds", family.COUNTER)
        self._batches = family(BATCH_SECONDS, "wall time of one call of the stage on one batch", family.HISTOGRAM)
        self._rejects = family(REJECTS, "requests the stage failed, by reason", family.COUNTER)
        self._metrics: dict[tuple[str, ...], Any] = {}

    def _metric(self, family: Any, stage: str, **extra: str) -> Any:
        key = (id(family), stage, *extra.values())
        metric = self._metrics.get(key)
        if metric is None:
            labels = {"model": self.model, "stage": stage, **extra}
            metric = family.Metric(labels=labels, buckets=BATCH_BUCKETS) if family is self._batches else family.Metric(labels=labels)
            self._metrics[key] = metric
        return metric

    def record(self, stage: str, seconds: float, images: int, errors: list[BaseException]) -> None:
        self._metric(self._images, stage).increment(images)
        self._metric(self._duration, stage).increment(seconds * 1e6)
        self._metric(self._batches, stage).observe(seconds)
        for exc in errors:
            self._metric(self._rejects, stage, reason=reject_reason(exc)).increment(1)

    def close(self) -> None:
        """Drop the metrics before their families, the order the stub requires."""
        self._metrics.clear()
