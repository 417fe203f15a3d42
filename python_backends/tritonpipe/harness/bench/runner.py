"""One benchmark run: build the repository, measure each system, write the report."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from ...choices import DEFAULT_CONCURRENCY, SYSTEMS
from ...contract import PARAM_PIPELINE
from ...errors import ConfigError
from ...examples import EXAMPLE_DIR, export_classifier
from ...model.runtime import pick_device
from ...pipeline.files import read_config_file
from ...pipeline.grammar import parse_backend
from ...pipeline.graph import Graph, load_graph, set_node_keys
from ...repository.configs import validate_repository
from ...repository.generate import GeneratedRepository, build_repository, write_repository
from ...stages import load_builtin_stages
from ...stages.base import Role, find_stage
from ..corpus import Corpus, load_corpus, photo_corpus, synthetic_corpus, write_input_data
from ..probe import GpuBusyMeter, cores_busy, gpu_memory_mb, sample_cpu
from .peers import FLOOR, Peer, add_baseline, add_dali_served, add_floor
from .perf import PerfError, PerfSettings, is_unstable, run_perf
from .profile import LevelProfiler, Profile, find_pyspy, write_profiles
from .report import SERVED, Row, markdown, model_lines, plot, write_batches, write_breakdown, write_rows, write_stages
from .stats import (
    BatchTimes,
    StageTimes,
    StepTimes,
    batch_times,
    breakdown,
    fetch_metrics_page,
    fetch_stats,
    parse_gpu_cache_mb,
    parse_stage_metrics,
    stage_breakdown,
)

#: the windows' allowed variation (percent) of a level's last try, after two unstable ones: sub-millisecond levels
#: (the floor at concurrency 1) can miss 10% for a whole run, and a figure said to be looser beats none
RELAXED_STABILITY = 25.0

#: the shipped example (examples/resnet18/pipeline.toml) without its model file
DEFAULT_PIPELINE: dict[str, Any] = {
    "name": "resnet18",
    "backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]",
    "resize_h": 224,
    "resize_w": 224,
    "color": "rgb",
    "mean": "123.675,116.28,103.53",
    "std": "58.395,57.12,57.375",
    "instance_num": 2,
    "max": 8,
    "batching_timeout": 0,
}


@dataclass
class BenchOptions:
    config: Path | None = None
    model: Path | None = None
    engine: str | None = None
    corpus: Path | None = None
    corpus_count: int = 48
    corpus_sizes: str = "three"  # or "distinct": photo_corpus
    seed: int = 0
    systems: tuple[str, ...] = SYSTEMS
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    perf: PerfSettings = field(default_factory=PerfSettings)
    instances: int | None = None
    max_batch: int | None = None
    batching_timeout: float | None = None
    #: node keys set on every node that takes them, as ``--set KEY=VALUE`` writes them; ``Stage::key`` for one stage
    settings: dict[str, str] = field(default_factory=dict)
    baseline_instances: int | None = None
    dali_instances: int | None = None  # the dali-served peer's DALI model; None: the model stage's count
    device: str = "auto"
    triton_home: str | None = None
    output: Path = Path("bench_results")
    inprocess_batch: int = 64
    inprocess_seconds: float = 10.0
    server_timeout: float = 600.0
    mps: bool = False  # serve under a CUDA MPS daemon of the server's own
    profile: bool = False  # sample the served models' stubs with py-spy at every level (profile.md)
    progress: bool = True
    command: str = ""


@dataclass
class BenchResult:
    rows: list[Row]
    steps: list[StepTimes]
    markdown: str
    files: dict[str, Path]
    stages: list[StageTimes] = field(default_factory=list)
    batches: list[BatchTimes] = field(default_factory=list)


def apply_overrides(config: dict[str, Any], /, *, base_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """``config`` with each override set on the nodes that take it; None leaves a key as the config has it.

    Keys are routed as the loader routes them: Triton keys reach every node, ``model`` and
    ``engine`` the nodes whose stages take them, ``Stage::key`` the nodes with that stage (and
    only that stage reads it).  ``base_dir`` is the folder of the plugins the config names.
    """
    load_builtin_stages()
    given = {key: value for key, value in overrides.items() if value is not None}
    config, untaken = set_node_keys(config, given, base_dir)
    if untaken:
        key = untaken[0]
        flag = f"--{key}" if key in ("model", "engine") else f"--set {key}"  # the options with a flag of their own
        raise ConfigError(f"{flag} given, but no stage of the pipeline takes {key!r}")
    return config


def default_model(output: Path) -> Path:
    """The example's classifier: the checkout's file, else exported once into ``output``."""
    shipped = EXAMPLE_DIR / "resnet18.onnx"
    if shipped.is_file():
        return shipped
    cached = output / "model" / "resnet18.onnx"
    if not cached.is_file():
        print(f"exporting the example classifier to {cached} ...", flush=True)
        export_classifier(cached)
    return cached


def load_pipeline(options: BenchOptions) -> tuple[Graph, str]:
    """The graph to benchmark and a one-line description of it."""
    if options.config is not None:
        config, base_dir = read_config_file(options.config), Path(options.config).resolve().parent
        model = options.model.resolve() if options.model else None
        what = str(options.config)
    else:
        config, base_dir = dict(DEFAULT_PIPELINE), Path.cwd()
        model = (options.model or default_model(options.output)).resolve()
        what = "built-in default (the resnet18 example)"
    config = apply_overrides(config, base_dir=base_dir, **options.settings)
    config = apply_overrides(
        config, base_dir=base_dir, model=str(model) if model else None, engine=options.engine,
        instance_num=options.instances, max=options.max_batch, batching_timeout=options.batching_timeout,
    )
    graph = load_graph(config, base_dir=base_dir)
    backends = "; ".join(f"{n.name}: {_outline(n.tree)}" for n in graph.nodes.values())
    return graph, f"{what} -> {backends}"


def check_pipeline(options: BenchOptions) -> tuple[Graph, str]:
    """:func:`load_pipeline`, once the run's repository has been built in memory: every key, stage and
    config the run would be refused for is refused here, before anything is written."""
    graph, pipeline = load_pipeline(options)
    build_repository(graph, options.device)
    return graph, pipeline


def _outline(node) -> str:
    """A stage tree by names only: S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]."""
    name = "S" if node.name == "Sequential" else node.name
    return f"{name}[{','.join(_outline(c) for c in node.children)}]" if node.children else name


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{', '.join(names)}; {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only: {os.cpu_count()} cores, {cpu}"


def _versions() -> str:
    import torch

    def version(package: str) -> str:
        try:
            from importlib.metadata import version as lookup_version

            return lookup_version(package)
        except Exception:  # noqa: BLE001 - informational only
            return "?"

    own = version("tritonpipe")
    return (
        f"tritonpipe {own if own != '?' else '(source tree)'}, torch {torch.__version__}, "
        f"tritonclient {version('tritonclient')}, Python {platform.python_version()}"
    )


def _sweep(
    system: str,
    model: str,
    models: list[str],
    server,
    install,
    input_json: Path,
    options: BenchOptions,
    workdir: Path,
    say: Callable[[str], None],
    order: dict[str, list[str]] | None = None,
    profiles: list[Profile] | None = None,
    batches: list[BatchTimes] | None = None,
) -> tuple[list[Row], list[StepTimes], list[StageTimes]]:
    """One system's levels: its rows, Triton's per-request times and its stages' times by level; each level's
    batches by size go into ``batches`` where given."""
    from tqdm import tqdm

    rows = []
    step_rows: list[StepTimes] = []
    stage_rows: list[StageTimes] = []
    ensemble = models[0] if len(models) > 1 else None
    page = _metrics_page(server, say)
    level_counters, level_stages, cache = fetch_stats(server.grpc_url), _parsed(page, parse_stage_metrics), _parsed(page, parse_gpu_cache_mb)
    levels = tqdm(options.concurrency, desc=system, unit="level", disable=not options.progress, leave=False)
    for concurrency in levels:
        levels.set_postfix_str(f"concurrency {concurrency}")
        say(f"[{system}] concurrency {concurrency}: perf_analyzer on {model!r} ...")
        log = options.output / "perf_logs" / f"{system}_c{concurrency}.log"
        mem_before, cache_before = gpu_memory_mb(), cache  # the page read after the level before, or at the start
        cpu_before = sample_cpu(_pid(server))
        settings = options.perf
        profiler = _profiler(system, concurrency, server, models, options) if profiles is not None else None
        meter = GpuBusyMeter()
        try:
            try:
                tries = _tries(settings)
                with meter:
                    for number, (tried, retry_line, note) in enumerate(tries, 1):
                        if retry_line:
                            say(f"[{system}] concurrency {concurrency}: {retry_line}")
                        try:
                            measured = run_perf(install, model, server.grpc_url, input_json, concurrency, tried, workdir, log)
                            break
                        except PerfError as exc:
                            if not is_unstable(exc) or number == len(tries):
                                raise
            finally:
                if profiler is not None:
                    profiles.append(profiler.finish())
        except PerfError as exc:
            mem_after, page = gpu_memory_mb(), _metrics_page(server, say)
            cache = _parsed(page, parse_gpu_cache_mb)
            rows.append(Row(system, concurrency, None, gpu_mem_before_mb=mem_before, gpu_mem_mb=mem_after,
                            torch_cache_before_mb=cache_before, torch_cache_mb=cache, note=str(exc).splitlines()[0][:200]))
            say(f"[{system}] concurrency {concurrency}: FAILED: {exc}")
            # the next level's figures start after this one's traffic
            level_counters, level_stages = fetch_stats(server.grpc_url), _parsed(page, parse_stage_metrics)
            continue
        busy = cores_busy(cpu_before, sample_cpu(_pid(server)))
        mem_after = gpu_memory_mb()
        counters, page = fetch_stats(server.grpc_url), _metrics_page(server, say)
        stages, cache = _parsed(page, parse_stage_metrics), _parsed(page, parse_gpu_cache_mb)
        row = Row(
            system, concurrency, measured.throughput, measured.p50_ms, measured.p90_ms, measured.p95_ms, measured.p99_ms,
            gpu_mem_before_mb=mem_before, gpu_mem_mb=mem_after, torch_cache_before_mb=cache_before, torch_cache_mb=cache,
            note=note, host_cores=busy and busy.host, server_cores=busy and busy.server, stub_cores=busy and busy.stubs,
            **_gpu_busy(meter),
        )
        rows.append(row)
        say(f"[{system}] concurrency {concurrency}: {row.throughput:,.1f} img/s, p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms")
        step_rows += breakdown(system, models, level_counters, counters, ensemble, concurrency)
        if batches is not None:
            # an ensemble's batch statistics add up its steps': it has no instance of its own
            batches += batch_times(system, concurrency, [m for m in models if m != ensemble], level_counters, counters)
        if stages is not None and level_stages is not None:
            stage_rows += stage_breakdown(system, concurrency, models, level_stages, stages, (level_counters, counters), order)
        level_counters, level_stages = counters, stages
    levels.close()
    return rows, step_rows, stage_rows


def _gpu_busy(meter: GpuBusyMeter, window: tuple[float, float] | None = None) -> dict[str, float | None]:
    """A row's SM and JPEG-engine busy shares from ``meter`` (None where it had nothing to read): over the timed
    ``window`` where one is given (an in-process row's, its model loads and warm-up left out), else over the
    whole block."""
    found = meter.between(*window) if window is not None else meter.result
    return {"sm_busy": found and found.sm, "jpeg_busy": found and found.jpeg}


def _pid(server) -> int | None:
    """The server's process id; None for a server this process did not start."""
    return server.process.pid if server.process is not None else None


def _tries(settings: PerfSettings) -> list[tuple[PerfSettings, str, str]]:
    """A level's perf_analyzer settings, in the order tried while it is unstable, each with the line said before it
    and the note its figure carries: as asked; windows twice as long; those windows allowed
    :data:`RELAXED_STABILITY` apart (unless that is no looser than asked)."""
    longer = dataclasses.replace(settings, measurement_interval_ms=settings.measurement_interval_ms * 2)
    tries = [(settings, "", ""), (longer, f"unstable; retrying with {longer.measurement_interval_ms} ms windows", "")]
    wanted = settings.stability_percentage
    if wanted < RELAXED_STABILITY:
        tries.append((dataclasses.replace(longer, stability_percentage=RELAXED_STABILITY),
                      f"unstable again; retrying with windows within {RELAXED_STABILITY:g}% of each other",
                      f"windows within {RELAXED_STABILITY:g}% of each other, not {wanted:g}%: perf_analyzer found no "
                      f"stable {wanted:g}% twice"))
    return tries


def _profiler(system: str, concurrency: int, server, models: list[str], options: BenchOptions) -> LevelProfiler:
    """py-spy on the system's stubs from one measurement window into the level (its first is the warm-up's)."""
    binary = find_pyspy()
    assert binary is not None  # run_bench refused --profile without it
    return LevelProfiler(binary, system, concurrency, options.output / "profile", server_pid=server.process.pid,
                         models=models, delay=options.perf.measurement_interval_ms / 1000).start()


def _stage_order(configs: dict[str, Any]) -> dict[str, list[str]]:
    """Model -> its stages' names in the order its chain runs them, from each config's pipeline string."""
    order = {}
    for name, config in configs.items():
        if PARAM_PIPELINE in config.parameters:
            order[name] = [node.name for node in parse_backend(config.parameters[PARAM_PIPELINE].string_value).walk()]
    return order


def _metrics_page(server, say) -> str | None:
    """The server's /metrics page once the instances have handed their tallies over (the stage tallies and
    the torch-cache gauges); None, and a line that says why, when it cannot be read."""
    try:
        return fetch_metrics_page(server.metrics_url)
    except OSError as exc:
        say(f"stage metrics not read from {server.metrics_url}: {exc}; the report has no per-stage table")
        return None


def _parsed(page: str | None, parse: Callable[[str], Any]) -> Any:
    return parse(page) if page is not None else None


def _unfused(graph: Graph) -> Graph:
    """The graph with every node unfused and renamed ``<name>_unfused``."""
    nodes = {
        f"{node.name}_unfused": dataclasses.replace(
            node, name=f"{node.name}_unfused", next=[f"{n}_unfused" for n in node.next],
            settings=dataclasses.replace(node.settings, fuse=False),
        )
        for node in graph.nodes.values()
    }
    return dataclasses.replace(graph, name=f"{graph.name}_unfused", nodes=nodes)


#: the served peers: system -> the function adding its models beside the pipeline
PEERS = {
    "baseline": lambda plan, configs, options: add_baseline(plan, configs, options.baseline_instances),
    "dali-served": lambda plan, configs, options: add_dali_served(plan, configs, options.dali_instances),
}


def build_bench_repository(
    graph: Graph, output: Path, options: BenchOptions
) -> tuple[GeneratedRepository, dict[str, Peer]]:
    """The pipeline's repository, with the measured peers' models beside it; written once.

    Each peer (the PIL baseline, DALI served) is ensembled with the pipeline's own model-stage
    model.  A fused pipeline has none of its own, so the model stage of its unfused twin joins
    the repository instead.  The ``floor`` model takes the pipeline's own inputs and instances.
    """
    plan, configs, files = build_repository(graph, options.device)
    everything, all_files = dict(configs), dict(files)
    peers: dict[str, Peer] = {}
    wanted = [system for system in PEERS if system in options.systems]
    if wanted:
        fused = any(node.settings.fuse for node in graph.nodes.values())
        source_plan, source_configs, source_files = (
            build_repository(_unfused(graph), options.device) if fused else (plan, configs, files)
        )
        for system in wanted:
            peer, models, model_files = PEERS[system](source_plan, source_configs, options)
            models[peer.model] = source_configs[peer.model]
            model_files[peer.model] = source_files.get(peer.model, {})
            clash = sorted(name for name, config in models.items() if everything.get(name, config) is not config)
            if clash:
                raise ConfigError(f"the pipeline already has models named {clash}; rename the pipeline")
            everything.update(models)
            all_files.update(model_files)
            peers[system] = peer
    if "floor" in options.systems:
        models, model_files = add_floor(plan, configs)
        everything.update(models)
        all_files.update(model_files)
    if everything.keys() != configs.keys():
        validate_repository(everything)
    path = write_repository(everything, all_files, output, entry=plan.name)
    return GeneratedRepository(path, plan, everything), peers


def _served_systems(
    repo: GeneratedRepository, peers: dict[str, Peer], options: BenchOptions, say
) -> dict[str, tuple[str, list[str]]]:
    """system -> (model perf_analyzer calls, models whose statistics matter)."""
    systems: dict[str, tuple[str, list[str]]] = {}
    if "ensemble" in options.systems:
        steps = [s.model for s in repo.plan.steps] if repo.plan.needs_ensemble else []
        if repo.plan.fan_out is not None:  # the orchestrator and every model of its two parts
            steps = sorted(name for name in repo.configs if name != repo.entry)
        systems["ensemble"] = (repo.entry, [repo.entry, *steps])
    for system, peer in peers.items():
        say(f"{system}: {peer.pre} ({_instances(repo.configs[peer.pre])}) -> {peer.model}")
        systems[system] = (peer.ensemble, peer.models)
    if "floor" in options.systems:
        say(f"floor: {FLOOR} ({_instances(repo.configs[FLOOR])}): the pipeline's inputs and outputs, zeros out, no work")
        systems["floor"] = (FLOOR, [FLOOR])
    return systems


def _instances(config: mc.ModelConfig) -> str:
    """A model's instances in words: ``3 GPU instances`` (a count is per GPU its group lists)."""
    count = sum(group.count * max(1, len(group.gpus)) for group in config.instance_group)
    kind = mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind).removeprefix("KIND_")
    return f"{count} {kind} instances"


def _measure_served(
    repo, served, corpus: Corpus, options: BenchOptions, workdir: Path, say, profiles: list[Profile] | None = None,
    batches: list[BatchTimes] | None = None,
) -> tuple[list[Row], list[StepTimes], list[StageTimes]]:
    from ...server.install import locate_triton
    from ...server.owner import TritonServer

    rows: list[Row] = []
    steps: list[StepTimes] = []
    stages: list[StageTimes] = []
    install = locate_triton(options.triton_home)
    input_json = write_input_data(corpus.images, workdir / "input_data.json", repo.plan.ensemble_inputs[0].name)
    say(f"starting tritonserver on {repo.path} ...")
    # the server's log (the models' warnings among it) stays beside the report, this run's alone
    (options.output / "server.log").unlink(missing_ok=True)
    server = TritonServer(repo.path, install=install, mps=options.mps, log_file=options.output / "server.log")
    try:
        server.start(timeout=options.server_timeout)
        order = _stage_order(repo.configs)
        for system, (model, models) in served.items():
            system_rows, system_steps, system_stages = _sweep(
                system, model, models, server, install, input_json, options, workdir, say, order, profiles, batches
            )
            rows += system_rows
            steps += system_steps
            stages += system_stages
    finally:
        server.close()
    return rows, steps, stages


def _items_per_image(repo, corpus: Corpus, device: str) -> str:
    """How many items (crops, say) a graph that fans out makes of the corpus's images, for items/s beside img/s."""
    import torch

    from ..chain import Chain

    try:
        with torch.inference_mode():
            chain = Chain.of_repository(repo, pick_device(device, strict=True))
            requests = [{chain.inputs[0]: torch.frombuffer(bytearray(image), dtype=torch.uint8)[None]} for image in corpus.images]
            answers = chain.run(requests)
    except Exception as exc:  # noqa: BLE001 - a count the report can go without
        return f"not counted: the in-process chain failed ({type(exc).__name__}: {exc})"[:300]
    gathered = repo.plan.fan_out.gathered[0].name
    counts = [answer[gathered].shape[1] for answer in answers if not isinstance(answer, BaseException)]
    if not counts:
        return "none: every corpus image failed in the in-process chain"
    mean = sum(counts) / len(counts)
    return f"{mean:.2f} on average ({min(counts)} to {max(counts)}); items/s = img/s x {mean:.2f}"


def _measure_inprocess(
    repo, corpus: Corpus, options: BenchOptions, say
) -> tuple[list[Row], list[StepTimes], list[StageTimes]]:
    from ..chain import run_inprocess

    say(f"[inprocess] batch {options.inprocess_batch} for {options.inprocess_seconds:g} s ...")
    meter = GpuBusyMeter()
    try:
        with meter:
            result = run_inprocess(
                repo, corpus.images, device=options.device, batch=options.inprocess_batch,
                seconds=options.inprocess_seconds, progress=options.progress, gpu_memory=gpu_memory_mb,
            )
    except Exception as exc:  # noqa: BLE001 - the other systems' results still count
        say(f"[inprocess] FAILED: {exc}")
        return [Row("inprocess", options.inprocess_batch, None, note=f"{type(exc).__name__}: {exc}"[:200])], [], []
    note = f"batch {result.batch} on {result.device}, {len(result.batch_ms)} batches, no server"
    split = [f"{name} takes ≤{n} per call" for name, n in result.chunks.items() if n < result.batch]
    if split:
        note += f"; {', '.join(split)} (its max_batch_size; raise it with --max-batch)"
    row = Row(
        "inprocess", result.batch, result.throughput, result.percentile_ms(50), result.percentile_ms(90),
        result.percentile_ms(95), result.percentile_ms(99), result.gpu_mem_before_mb, result.gpu_mem_after_mb, note,
        **_gpu_busy(meter, (result.started, result.started + result.seconds)),
    )
    say(f"[inprocess] {result.throughput:,.1f} img/s on {result.device}")
    steps = [StepTimes("inprocess", name, result.images, len(result.batch_ms), ms) for name, ms in result.model_ms.items()]
    stages = [
        StageTimes("inprocess", result.batch, t.model, t.stage, t.images, t.calls, t.seconds * 1000.0 / t.calls,
                   t.seconds * 1000.0 / t.images)
        for t in result.stages if t.calls and t.images
    ]
    return [row], steps, stages


def _measure_pre_in_flight(repo, corpus: Corpus, options: BenchOptions, say) -> list[Row]:
    """tritonpipe's preprocessing alone with two batches in flight (DALI's pipeline keeps two at prefetch 2)."""
    from ..chain import run_preprocessing_in_flight

    batch = options.inprocess_batch
    say(f"[inprocess-pre-2] the preprocessing alone, 2 batches of {batch} in flight, for {options.inprocess_seconds:g} s ...")
    meter = GpuBusyMeter()
    try:
        with meter:
            rate, what, window = run_preprocessing_in_flight(repo, corpus.images, device=options.device, batch=batch,
                                                             seconds=options.inprocess_seconds)
    except ConfigError as exc:  # nothing to run alone, or stages that take one batch at a time: said, not failed
        say(f"[inprocess-pre-2] not measured: {exc}")
        return []
    except Exception as exc:  # noqa: BLE001 - the other systems' results still count
        say(f"[inprocess-pre-2] FAILED: {exc}")
        return [Row("inprocess-pre-2", batch, None, note=f"{type(exc).__name__}: {exc}"[:200])]
    say(f"[inprocess-pre-2] {rate:,.1f} img/s")
    return [Row("inprocess-pre-2", batch, rate, note=f"{what}, 2 batches in flight, a host thread and CUDA stream each",
                **_gpu_busy(meter, window))]


def _dali_missing(options: BenchOptions) -> str | None:
    """Why DALI cannot be measured here (one line), or None."""
    from .dali import dali_available

    missing = dali_available()
    if missing is None and pick_device(options.device).type != "cuda":
        missing = "DALI's mixed decoder needs a GPU"
    return missing


def _without_missing_dali(options: BenchOptions, header: dict[str, str], say) -> BenchOptions:
    """``options`` without the DALI systems where DALI cannot run; the report says once why."""
    dali_systems = [s for s in options.systems if s.startswith("dali")]
    missing = _dali_missing(options) if dali_systems else None
    if missing is None:
        return options
    # not a failed measurement: the report says once why DALI is absent, and the rest stands
    say(f"[{','.join(dali_systems)}] not measured: {missing}")
    header["DALI"] = f"not measured: {missing}"
    return dataclasses.replace(options, systems=tuple(s for s in options.systems if not s.startswith("dali")))


def _inprocess_pre(repo, rows: list[Row], steps: list[StepTimes], stages: list[StageTimes]) -> list[Row]:
    """tritonpipe's preprocessing alone: from the in-process run's per-model times, or, where the model stage is
    fused into the preprocessing model, from its stage times (every stage but the model stage)."""
    whole = next((r for r in rows if r.system == "inprocess" and r.throughput), None)
    if whole is None:
        return []
    stage_models = _model_stage_models(repo)
    if stage_models:
        pre = [s.total_ms for s in steps if s.system == "inprocess" and s.model not in stage_models]
        note = "tritonpipe's preprocessing model alone, from the in-process run's per-model times"
    else:
        pre = [s.ms_per_image for s in stages if s.system == "inprocess" and _is_preprocessing(s.stage)]
        note = ("the fused model's stages before the model stage, from the in-process run's stage times: one batch at "
                "a time, each stage waited for")
    per_image_ms = sum(pre)
    if not per_image_ms:
        return []
    return [Row("inprocess-pre", whole.concurrency, 1000.0 / per_image_ms, note=note)]


def _is_preprocessing(stage: str) -> bool:
    """Whether the stage named ``stage`` is a processing step (not the model stage, a wrapper or a timing row)."""
    cls = find_stage(stage)
    return cls is not None and cls.role == Role.PROCESS


def _measure_dali(repo, baseline: Peer | None, corpus: Corpus, options: BenchOptions, say) -> list[Row]:
    """DALI's preprocessing in this process, and DALI followed by the same model stage."""
    from .dali import run_dali

    rows: list[Row] = []
    size = _model_input_size(repo)
    try:
        model_step = _model_step(repo, baseline)
    except ConfigError as exc:
        say(f"[dali+model] not measured: {exc}")
        model_step = None
    runs = [("dali", 0.65, None, "decoders.image mixed, hw_decoder_load 0.65, resize antialias off, FP16 CHW normalise"),
            ("dali-hw-only", 1.0, None, "the same, hw_decoder_load 1.0: the hardware engines' share of the corpus"),
            ("dali+model", 0.65, model_step, "DALI (0.65) followed by the served pipeline's model stage")]
    for name, load, model, what in runs:
        if name == "dali+model" and model is None:
            continue
        say(f"[{name}] batch {options.inprocess_batch} for {options.inprocess_seconds:g} s ...")
        meter = GpuBusyMeter()
        try:
            with meter:
                result = run_dali(corpus.images, batch=options.inprocess_batch, hw_decoder_load=load, size=size,
                                  seconds=options.inprocess_seconds, model=model, name=name)
        except Exception as exc:  # noqa: BLE001 - the other systems' results still count
            say(f"[{name}] FAILED: {exc}")
            rows.append(Row(name, options.inprocess_batch, None, note=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        say(f"[{name}] {result.throughput:,.1f} img/s")
        rows.append(Row(name, result.batch, result.throughput, note=what,
                        **_gpu_busy(meter, (result.started, result.started + result.seconds))))
    return rows


def _model_input_size(repo) -> tuple[int, int]:
    """The model stage's input height and width, which DALI resizes to."""
    for model in repo.plan.models:
        if model.is_model_stage:
            dims = model.inputs[0].spec.shape
            if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
                return dims[2], dims[3]
    return 224, 224


def _model_stage_models(repo) -> set[str]:
    """Names of the models that run the model stage alone (none when it is fused)."""
    if not repo.plan.needs_ensemble:
        return set()
    return {m.name for m in repo.plan.models if m.is_model_stage}


def _model_step(repo, baseline: Peer | None):
    """A callable running a model-stage model of the repository on a batched tensor, as the server does."""
    from google.protobuf import json_format

    from ..chain import Chain

    names = [baseline.model] if baseline else sorted(_model_stage_models(repo))
    if not names:
        raise ConfigError("DALI + model needs the model stage in a model of its own: add the baseline system or set fuse = false")
    configs = {n: json_format.MessageToDict(c, preserving_proto_field_name=True) for n, c in repo.configs.items()}
    chain = Chain(configs.__getitem__, names[0], repo.path, pick_device("gpu"), chunked=names)

    def model(batch) -> None:
        chain.run([{chain.inputs[0]: image[None].float()} for image in batch])

    return model


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> BenchResult:
    """Measure the selected systems on one corpus and write the report into ``options.output``."""
    started = time.monotonic()
    plain_say = say

    def say(line: str) -> None:
        plain_say(f"[{time.monotonic() - started:5.0f} s] {line}")

    unknown = set(options.systems) - set(SYSTEMS)
    if unknown or not options.systems:
        raise ConfigError(f"--systems takes a comma-separated subset of {', '.join(SYSTEMS)}, got {', '.join(options.systems)}")
    if options.profile and find_pyspy() is None:
        raise ConfigError("--profile samples the served models' stubs with py-spy, which is not installed here: pip install py-spy")
    if options.profile and not set(options.systems) & set(SERVED):
        raise ConfigError(f"--profile samples served systems; --systems names none ({', '.join(SERVED)})")
    graph, pipeline = check_pipeline(options)
    output = options.output
    output.mkdir(parents=True, exist_ok=True)
    if options.corpus:
        corpus: Corpus = load_corpus(options.corpus)
    elif options.corpus_sizes == "distinct":
        corpus = photo_corpus(options.corpus_count, options.seed)
    else:
        corpus = synthetic_corpus(options.corpus_count, options.seed)
    say(f"corpus: {corpus.description}")
    say(f"pipeline: {pipeline}")
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": _device_line(),
        "versions": _versions(),
        "corpus": corpus.description,
        "pipeline": pipeline,
        "command": f"`{options.command}`" if options.command else "(library call)",
    }
    load_at_start = _load()
    rows: list[Row] = []
    steps: list[StepTimes] = []
    stages: list[StageTimes] = []
    batches: list[BatchTimes] = []
    profiles: list[Profile] | None = [] if options.profile else None
    if options.profile:
        shutil.rmtree(output / "profile", ignore_errors=True)  # an earlier run's raw stacks
    with tempfile.TemporaryDirectory(prefix="tritonpipe-bench-") as tmp:
        workdir = Path(tmp)
        options = _without_missing_dali(options, header, say)
        repo, peers = build_bench_repository(graph, workdir / "repository", options)
        say(f"repository: {', '.join(sorted(repo.configs))} (entry {repo.entry!r})")
        if repo.plan.fan_out is not None:
            header["items per image"] = _items_per_image(repo, corpus, options.device)
            say(f"fan-out: {header['items per image']}")
        served = _served_systems(repo, peers, options, say)
        if served:
            rows, steps, stages = _measure_served(repo, served, corpus, options, workdir, say, profiles, batches)
            header["server log"] = "server.log (the models' warnings and errors, if any)"
        if "inprocess" in options.systems:
            more_rows, more_steps, more_stages = _measure_inprocess(repo, corpus, options, say)
            rows += more_rows + _inprocess_pre(repo, more_rows, more_steps, more_stages)
            rows += _measure_pre_in_flight(repo, corpus, options, say)
            steps += more_steps
            stages += more_stages
        if "dali" in options.systems:
            rows += _measure_dali(repo, peers.get("baseline") or peers.get("dali-served"), corpus, options, say)
    # other work on the host skews every number; this makes a busy host visible
    header["host load"] = f"1-minute load average {load_at_start} at start, {_load()} at end ({os.cpu_count()} cores)"
    if profiles:
        header["profile"] = f"{write_profiles(profiles, output / 'profile.md').name} (py-spy samples of the stubs at every level)"
    text = markdown(rows, steps, header, stages, model_lines(output / "server.log") if served else None, batches)
    files = {
        "csv": write_rows(rows, output / "results.csv"),
        "breakdown": write_breakdown(steps, output / "breakdown.csv"),
        "stages": write_stages(stages, output / "stages.csv"),
        "batches": write_batches(batches, output / "batches.csv"),
        "markdown": output / "report.md",
    }
    if profiles:
        files["profile"] = output / "profile.md"
    files["markdown"].write_text(text)
    png = plot(rows, output / "throughput_p99.png")
    if png is None:
        say("matplotlib is not importable: no plot (pip install matplotlib, or the 'bench' extra)")
    else:
        files["plot"] = png
    return BenchResult(rows, steps, text, files, stages, batches)
