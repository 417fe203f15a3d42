"""The host's cores shared out among the CPU instances of a whole repository, before anything is written.

Every instance is its own process; left alone, each would start a torch and an OpenCV thread per
core and the instances would fight over the same cores.  Instances of nodes with
``cores_per_worker`` get that many threads and, unless ``pin_cores = false``, their own cores,
disjoint across the repository; the other CPU instances split the cores left between them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..contract import CpuCores
from ..errors import ConfigError
from ..pipeline.settings import NodeSettings


@dataclass(frozen=True)
class Workers:
    """One Python model's instances, as the share sees them."""

    model: str
    settings: NodeSettings
    wants_gpu: bool


def host_cores() -> list[int]:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return sorted(os.sched_getaffinity(0))


def share_cores(workers: Sequence[Workers], device: str, host: Sequence[int]) -> dict[str, CpuCores]:
    """Threads and cores per model; ``ConfigError`` when the asked cores exceed ``host`` without oversubscribe.

    With ``device`` ``auto`` a model that wants a GPU runs on the CPU only where there is none: it gets
    cores when its node asks for them and is otherwise left to share what it finds.
    """
    surely_cpu = [w for w in workers if device == "cpu" or not w.wants_gpu]
    asking = [w for w in workers if w.settings.cores_per_worker and (w in surely_cpu or device == "auto")]
    asked = sum(w.settings.instance_num * w.settings.cores_per_worker for w in asking)
    if asked > len(host) and not all(w.settings.oversubscribe for w in asking):
        parts = ", ".join(
            f"{w.model}: {w.settings.instance_num} x {w.settings.cores_per_worker}" for w in asking if not w.settings.oversubscribe
        )
        raise ConfigError(
            f"the CPU workers ask for {asked} cores ({parts}) but this host has {len(host)}; lower worker_num or "
            "cores_per_worker, or set oversubscribe = true to let workers share cores"
        )
    shares: dict[str, CpuCores] = {}
    cursor = 0
    for w in asking:
        sets = []
        for _ in range(w.settings.instance_num):
            sets.append(tuple(sorted({host[(cursor + k) % len(host)] for k in range(w.settings.cores_per_worker)})))
            cursor += w.settings.cores_per_worker
        shares[w.model] = CpuCores(w.settings.cores_per_worker, tuple(sets) if w.settings.pin_cores else ())
    sharing = [w for w in surely_cpu if not w.settings.cores_per_worker]
    left = len(host) - asked if asked < len(host) else len(host)
    instances = sum(w.settings.instance_num for w in sharing)
    for w in sharing:
        shares[w.model] = CpuCores(max(1, left // instances))
    return shares
