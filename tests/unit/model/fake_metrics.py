"""A stand-in for the stub's ``MetricFamily``, recording what StageMetrics adds."""


import threading


class _Metric:
    def __init__(self, module, name):
        self.name = name
        self.total = 0.0
        self.observed = []
        self.module = module
        self.callers = module.callers

    def increment(self, amount):
        self.callers.add(threading.current_thread().name)
        self.module.updates += 1
        self.module.order.append(self.name)
        self.total += amount

    def observe(self, seconds):
        self.callers.add(threading.current_thread().name)
        self.observed.append(seconds)

    def set(self, value):
        self.callers.add(threading.current_thread().name)
        self.total = value


class FakeMetricsModule:
    def __init__(self):
        self.metrics = {}
        self.kinds: dict[str, str] = {}  # family name -> its kind
        self.callers: set[str] = set()  # threads that updated a metric
        self.updates = 0  # increments, each a round trip to the server in the stub
        self.order: list[str] = []  # the family of each increment, in turn
        module = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name = name
                module.kinds[name] = kind

            def Metric(self, labels, buckets=None):  # noqa: N802 - the stub's spelling
                return module.metrics.setdefault((self.name, frozenset(labels.items())), _Metric(module, self.name))

        self.MetricFamily = MetricFamily

    def value(self, name, **labels):
        return self.metrics[(name, frozenset(labels.items()))].total
