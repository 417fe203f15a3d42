"""A stand-in for the stub's ``MetricFamily``, recording what StageMetrics adds."""


class _Metric:
    def __init__(self):
        self.total = 0.0
        self.observed = []

    def increment(self, amount):
        self.total += amount

    def observe(self, seconds):
        self.observed.append(seconds)


class FakeMetricsModule:
    def __init__(self):
        self.metrics = {}
        module = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name = name

            def Metric(self, labels, buckets=None):  # noqa: N802 - the stub's spelling
                return module.metrics.setdefault((self.name, frozenset(labels.items())), _Metric())

        self.MetricFamily = MetricFamily

    def value(self, name, **labels):
        return self.metrics[(name, frozenset(labels.items()))].total
