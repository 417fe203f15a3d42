"""Whether a repository's instances fit the host that generates it, and whether its GPU models are left at
torchpipe's one-instance, one-request defaults: the generator's warning and note."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .cores import host_cores

#: host memory one Python stub takes once torch is imported (measured: about 700 MB)
STUB_MB = 700
#: CPU instances per core past which more instances only wait for the cores
INSTANCES_PER_CORE = 4


def _instances(config, gpu: bool) -> tuple[int, int, int]:
    """The model's instances: all of them, those on the CPU and those on a GPU (``gpu``: whether KIND_AUTO finds one).

    Triton starts a group's ``count`` on each GPU it lists.
    """
    count = on_cpu = on_gpu = 0
    for group in config.instance_group:
        instances = group.count * max(1, len(group.gpus))
        count += instances
        if group.kind == group.KIND_CPU or (group.kind == group.KIND_AUTO and not gpu):
            on_cpu += instances
        elif group.kind == group.KIND_GPU or group.kind == group.KIND_AUTO:
            on_gpu += instances
    return count, on_cpu, on_gpu


def capacity_warning(configs: dict, available_mb: float, cores: int, gpu: bool) -> str | None:
    """A one-line warning when the repository's instances clearly exceed this host; None when they fit.

    Each instance of a Python model is a stub process of its own (``STUB_MB``); instances on the
    CPU beyond ``INSTANCES_PER_CORE`` per core only queue for the cores.
    """
    stubs: dict[str, int] = {}
    cpu_instances = 0
    for name, config in configs.items():
        if config.backend != "python":
            continue
        count, on_cpu, _ = _instances(config, gpu)
        if count:
            stubs[name] = count
        cpu_instances += on_cpu
    total = sum(stubs.values())
    fits = int(available_mb // STUB_MB)
    problems = []
    if total * STUB_MB > available_mb:
        problems.append(f"at about {STUB_MB} MB each they need about {total * STUB_MB / 1024:,.0f} GB and this host "
                        f"has {available_mb / 1024:,.0f} GB available")
    if cpu_instances > INSTANCES_PER_CORE * cores:
        fits = min(fits, INSTANCES_PER_CORE * cores)
        problems.append(f"{cpu_instances} on the CPU are more than {INSTANCES_PER_CORE} per core for this host's "
                        f"{cores} cores")
    if not problems:
        return None
    biggest = ", ".join(f"{name}: {count}" for name, count in sorted(stubs.items(), key=lambda kv: -kv[1])[:3])
    return (f"WARNING: the repository starts {total} Python instances ({biggest}); {'; '.join(problems)}. Lower "
            f"instance_num (worker_num) to at most {max(1, fits)} instances in all, unless the repository is meant "
            "for a larger host")


def gpu_shape_note(configs: dict, gpu: bool) -> str | None:
    """A one-line note when a model runs on the GPU as one instance taking one request at a time; None otherwise.

    Those are torchpipe's defaults (``instance_num = 1``, ``max = 1``), kept so that its configurations read the
    same here; on a GPU they leave one process feeding the device a request at a time.
    """
    alone = [name for name, config in sorted(configs.items())
             if config.platform != "ensemble" and config.max_batch_size <= 1 and _instances(config, gpu)[2] == 1]
    if not alone:
        return None
    # fuse only means something where a chain was cut at its model stage, into an ensemble
    fuse = "fuse = true, " if any(config.platform == "ensemble" for config in configs.values()) else ""
    return (f"note: {', '.join(alone)} {'runs' if len(alone) == 1 else 'run'} on the GPU as one instance taking one "
            "request at a time (torchpipe's defaults, instance_num = 1 and max = 1). For throughput under load set "
            f"{fuse}instance_num = 8 and max = 64, the fastest GPU shape measured (README, Benchmarks; "
            "examples/resnet18/fused8.toml)")


def host_capacity() -> tuple[float, int, bool]:
    """MB of memory available now, usable cores, and whether a GPU is visible."""
    import torch

    available_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text()
        available_mb = int(meminfo.split("MemAvailable:")[1].split()[0]) / 1024
    return available_mb, len(host_cores()), torch.cuda.is_available()
