"""One soak run: plan the requests, compute their references, warm up, load, inject the fault, report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ...choices import read_marker
from ...client.client import PipelineClient
from ...errors import ConfigError
from ...server.owner import TritonServer
from ...server.procs import find_server_pid
from ..chain import Chain
from ..probe import sample_memory
from .faults import FaultReport, check_stub_recovery, server_stopper, stub_killer, summarise_fault
from .load import Reference, drive
from .plan import plan_requests, soak_images
from .report import SoakReport, count_verdicts, percentiles, verdicts_by_kind


@dataclass
class SoakOptions:
    url: str = ""
    protocol: str = "grpc"
    model: str | None = None
    concurrency: int = 16
    requests: int = 1000
    bad_fraction: float = 0.05
    corpus: Path | None = None
    warmup: int = 100
    timeout: float = 30.0  # seconds a single request may take before it counts as lost
    seed: int = 0
    repository: Path | None = None
    server_pid: int | None = None
    atol: float | None = None
    kill_stub_after: int | None = None
    stop_server_after: int | None = None
    progress: bool = True


def run_soak(options: SoakOptions, server: TritonServer | None = None) -> SoakReport:
    """Drive the model, check every answer, inject the asked-for fault, and report.

    The server's memory (tritonserver plus its Python stub processes) is sampled before, after
    warm-up and after the run.
    """
    if options.stop_server_after is not None and server is None:
        raise ConfigError("stopping the server during the load needs a server started for the run (--serve)")
    if options.kill_stub_after is not None and options.stop_server_after is not None:
        raise ConfigError("inject one fault per run: --kill-stub-after or --stop-server-after")
    url = options.url or (server.grpc_url if options.protocol == "grpc" else server.http_url)
    repository = options.repository or (server.repository if server else None)
    server_pid = server.process.pid if server and server.process else options.server_pid or find_server_pid(url)

    marker = read_marker(repository) if repository else None
    model = options.model or (marker["entry"] if marker else None)
    client = PipelineClient(url, protocol=options.protocol, model=model, timeout=options.timeout)
    reference = Reference(Chain(client.config, client.model, repository))
    client.close()  # an idle HTTP connection would hold up a server's shutdown
    corpus = soak_images(options.corpus, options.seed)

    warmup = plan_requests(options.warmup, 0.0, corpus, options.seed + 1, start=-options.warmup)
    requests = plan_requests(options.requests, options.bad_fraction, corpus, options.seed)
    for request in warmup + requests:  # references first, so the load measures the server only
        reference.expected(request.payload)

    load = {"concurrency": options.concurrency, "atol": options.atol, "progress": options.progress}
    memory = {"before": sample_memory(server_pid)}
    warm = drive(warmup, reference, client, desc="warm-up", **load)
    memory["after_warmup"] = sample_memory(server_pid)
    fault: FaultReport | None = None
    controller = None
    if options.kill_stub_after is not None:
        if server_pid is None:
            raise ConfigError("--kill-stub-after needs the server's process id (--serve or --server-pid)")
        fault = FaultReport("kill-stub", options.kill_stub_after)
        controller = stub_killer(fault, server_pid, [step.name for step in reference.chain.steps])
    elif options.stop_server_after is not None:
        fault = FaultReport("stop-server", options.stop_server_after)
        controller = server_stopper(fault, server, memory)

    state = drive(requests, reference, client, desc="soak", controller=controller, **load)
    if "after" not in memory:
        memory["after"] = sample_memory(server_pid)
    outcomes = sorted(state.outcomes, key=lambda o: o.index)
    if fault is not None:
        summarise_fault(fault, outcomes, state.t0)
        if server_pid is not None:
            check_stub_recovery(fault, outcomes, state.t0, server_pid)

    answered = [o.latency_s for o in outcomes if o.verdict in ("correct", "rejected", "wrong")]
    problems = [o for o in outcomes if o.verdict in ("wrong", "lost")]
    return SoakReport(
        model=client.model, protocol=options.protocol, requests=len(requests), concurrency=options.concurrency,
        bad=sum(r.kind != "good" for r in requests), counts=count_verdicts(outcomes), by_kind=verdicts_by_kind(outcomes),
        latency_ms=percentiles(answered), memory=memory,
        duration_s=max((o.ended for o in outcomes), default=state.t0) - state.t0,
        warmup=count_verdicts(warm.outcomes), examples=[asdict(o) for o in problems[:10]], fault=fault,
    )
