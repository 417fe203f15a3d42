"""Soak a served pipeline: many concurrent requests, some of them bad, every answer checked.

- :mod:`.plan`: what is sent (a corpus, bad inputs of each kind, the request mix);
- :mod:`.load`: the threads that send it, the in-process reference and the verdicts;
- :mod:`.faults`: a killed Python stub or a server stopped under load, and what it did;
- :mod:`.report`: the counts, latency and memory, as text or JSON;
- :mod:`.run`: one run from start to report.
"""

from .faults import FaultReport
from .load import VERDICTS, Expected, Outcome, Reference, judge, matches
from .plan import BAD_KINDS, Request, bad_input, plan_requests, soak_images
from .report import SoakReport, format_report
from .run import SoakOptions, run_soak

__all__ = [
    "BAD_KINDS", "VERDICTS", "Expected", "FaultReport", "Outcome", "Reference", "Request", "SoakOptions",
    "SoakReport", "bad_input", "format_report", "judge", "matches", "plan_requests", "run_soak", "soak_images",
]
