"""The parameters the generator writes into a Python model's ``config.pbtxt`` and the model reads.

One typed description, :class:`ModelParams`, holds the names, the encoding (what the generator
writes) and the decoding (what the generic model reads back), so both sides change together.
Only the standard library is imported: the model side must not pull in tritonclient or a TOML
loader.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

PARAM_PIPELINE = "tritonpipe.pipeline"
PARAM_INPUTS = "tritonpipe.inputs"
PARAM_OUTPUTS = "tritonpipe.outputs"
PARAM_PLUGINS = "tritonpipe.plugins"
PARAM_WARMUP = "tritonpipe.warmup"
PARAM_HOST_OUTPUTS = "tritonpipe.host_outputs"
PARAM_EXECUTION_TIMEOUT = "tritonpipe.execution_timeout"
PARAM_CORES = "tritonpipe.cores"
PARAM_OVERLAP = "tritonpipe.overlap"
PARAM_GPU_WAIT = "tritonpipe.gpu_wait"
PARAM_PIN_INPUTS = "tritonpipe.pin_inputs"

#: how a GPU instance waits for its batch's GPU work: see :func:`tritonpipe.model.runtime.wait_for_gpu`
GPU_WAITS = ("spin", "yield", "block")

#: Triton's readiness endpoint: the server owner waits on it and the Kubernetes probes ask it
READY_PATH = "/v2/health/ready"

_WARMUP_OFF = ("off", "none", "no", "false", "0")
_MAX_SIDE = 16384


def string_parameters(config: dict) -> dict[str, str]:
    """A model config's ``parameters`` in Triton's JSON form (what the stub is given) as plain strings."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def parse_warmup(text: str, where: str = "warmup") -> tuple[int, int] | None:
    """``"off"`` -> None, ``"1080x1920"`` -> (1080, 1920)."""
    text = str(text).strip().lower()
    if text in _WARMUP_OFF:
        return None
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", text)
    if not match or not all(1 <= int(v) <= _MAX_SIDE for v in match.groups()):
        raise ConfigError(
            f"{where}: warmup must be off or a sample image size HxW (each side 1-{_MAX_SIDE}) like 1080x1920, "
            f"got {text!r}"
        )
    return int(match.group(1)), int(match.group(2))


def warmup_batches(max_batch: int) -> list[int]:
    """The batch sizes the generic model warms up with, largest first.

    ``max_batch`` and each power of two below it (12 -> [12, 8, 4, 2, 1]); ``[1]`` for a model
    that does not batch (``max_batch`` 0 or 1).
    """
    if max_batch <= 1:
        return [1]
    return [max_batch] + [1 << k for k in range(max_batch.bit_length() - 1, -1, -1) if 1 << k < max_batch]


@dataclass(frozen=True)
class CpuCores:
    """The CPU share of one model's instances, decided by the generator across the whole repository.

    Attributes:
        threads: torch and OpenCV threads of each instance.
        sets: the cores each instance is pinned to, by instance index; empty: not pinned.
    """

    threads: int
    sets: tuple[tuple[int, ...], ...] = ()

    def encode(self) -> str:
        return json.dumps({"threads": self.threads, "sets": [list(cores) for cores in self.sets]})

    @classmethod
    def decode(cls, text: str) -> CpuCores:
        try:
            raw = json.loads(text)
            cores = cls(int(raw["threads"]), tuple(tuple(int(c) for c in cores) for cores in raw["sets"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"parameter {PARAM_CORES!r} must be {{\"threads\": N, \"sets\": [[cores], ...]}}, got {text!r}") from None
        if cores.threads < 1:
            raise ConfigError(f"parameter {PARAM_CORES!r}: threads must be at least 1, got {cores.threads}")
        return cores


@dataclass(frozen=True)
class ModelParams:
    """What one generated Python model is told through its config's ``parameters``.

    Attributes:
        pipeline: the model's stage chain, as a pipeline string.
        inputs: Triton input name -> the item key the chain reads it from.
        outputs: Triton output name -> the item key the chain writes it to.
        plugins: files of custom stages, relative to the model's version folder.
        warmup: (height, width) of the load-time sample image, or None for no warm-up.
        host_outputs: copy outputs to the host once per batch (no other model reads them).
        execution_timeout: seconds one batch may run before its requests fail and the stub
            exits, so that it is replaced; 0 for no limit.
        cores: the threads and cores of each CPU instance; None: the instance decides.
        overlap: keep two batches in flight in each instance, the chain's last step and the
            answers of one on a thread of their own while the steps before it take the next.
        gpu_wait: how a GPU instance waits for its batch's GPU work, one of :data:`GPU_WAITS`.
        pin_inputs: a GPU instance page-locks the stub's shared memory, where its inputs arrive.
    """

    pipeline: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    plugins: list[str] = field(default_factory=list)
    warmup: tuple[int, int] | None = None
    host_outputs: bool = False
    execution_timeout: float = 0.0
    cores: CpuCores | None = None
    overlap: bool = False
    gpu_wait: str = "spin"
    pin_inputs: bool = False

    def encode(self) -> dict[str, str]:
        """The ``parameters`` map of the config, as string values."""
        params = {
            PARAM_PIPELINE: self.pipeline,
            PARAM_INPUTS: json.dumps(self.inputs),
            PARAM_OUTPUTS: json.dumps(self.outputs),
        }
        if self.plugins:
            params[PARAM_PLUGINS] = json.dumps(self.plugins)
        if self.warmup is not None:
            params[PARAM_WARMUP] = "x".join(map(str, self.warmup))
        if self.host_outputs:
            params[PARAM_HOST_OUTPUTS] = "yes"
        if self.execution_timeout > 0:
            params[PARAM_EXECUTION_TIMEOUT] = repr(float(self.execution_timeout))
        if self.cores is not None:
            params[PARAM_CORES] = self.cores.encode()
        if self.overlap:
            params[PARAM_OVERLAP] = "yes"
        if self.gpu_wait != "spin":
            params[PARAM_GPU_WAIT] = self.gpu_wait
        if self.pin_inputs:
            params[PARAM_PIN_INPUTS] = "yes"
        return params

    @classmethod
    def decode(cls, params: dict[str, str]) -> ModelParams:
        """Read the parameters back; a missing or malformed one is a ConfigError naming it."""
        try:
            pipeline = params[PARAM_PIPELINE]
            inputs = json.loads(params[PARAM_INPUTS])
            outputs = json.loads(params[PARAM_OUTPUTS])
            plugins = json.loads(params.get(PARAM_PLUGINS, "[]"))
        except KeyError as exc:
            raise ConfigError(f"the model config has no parameter {exc.args[0]!r}; regenerate the repository") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"a tritonpipe parameter of the model config is not valid JSON: {exc}") from None
        warmup = params.get(PARAM_WARMUP, "")
        try:
            execution_timeout = float(params.get(PARAM_EXECUTION_TIMEOUT, "0"))
        except ValueError:
            raise ConfigError(
                f"parameter {PARAM_EXECUTION_TIMEOUT!r} must be a number of seconds, "
                f"got {params[PARAM_EXECUTION_TIMEOUT]!r}"
            ) from None
        gpu_wait = params.get(PARAM_GPU_WAIT, "spin")
        if gpu_wait not in GPU_WAITS:
            raise ConfigError(f"parameter {PARAM_GPU_WAIT!r} must be one of {', '.join(GPU_WAITS)}, got {gpu_wait!r}")
        return cls(
            pipeline=pipeline,
            inputs=inputs,
            outputs=outputs,
            plugins=plugins,
            warmup=parse_warmup(warmup, PARAM_WARMUP) if warmup else None,
            host_outputs=params.get(PARAM_HOST_OUTPUTS) == "yes",
            execution_timeout=execution_timeout,
            cores=CpuCores.decode(params[PARAM_CORES]) if PARAM_CORES in params else None,
            overlap=params.get(PARAM_OVERLAP) == "yes",
            gpu_wait=gpu_wait,
            pin_inputs=params.get(PARAM_PIN_INPUTS) == "yes",
        )

    @classmethod
    def from_config(cls, config: dict) -> ModelParams:
        """From a model config in Triton's JSON form (what the stub is given)."""
        return cls.decode(string_parameters(config))


PARAM_FANOUT = "tritonpipe.fanout"


@dataclass(frozen=True)
class GatheredOutput:
    """An output of the per-item model, answered one row per item: its name, Triton type and per-item dims."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class FanOutParams:
    """What the orchestrator of a graph that fans out is told (``tritonpipe.fanout``, one JSON value).

    Attributes:
        first: the model run once per request; it gets the request's inputs.
        first_outputs: the outputs asked of it.
        items: the one of them whose rows are the items (``[1, N, ...]``).
        passed: those of ``first_outputs`` answered to the client as they came.
        each: the model run once per item.
        each_input: its input that takes one item (``[1, ...]``).
        gathered: its outputs, answered one row per item.
        max_items: most items one request may bring.
        truncate: past ``max_items`` keep the first ones, instead of failing the request.
        deadline_ms: how long one request's items may take in all; 0 for no limit.
    """

    first: str
    first_outputs: tuple[str, ...]
    items: str
    passed: tuple[str, ...]
    each: str
    each_input: str
    gathered: tuple[GatheredOutput, ...]
    max_items: int
    truncate: bool = False
    deadline_ms: float = 0.0

    def encode(self) -> dict[str, str]:
        value = {
            "first": self.first, "first_outputs": list(self.first_outputs), "items": self.items,
            "passed": list(self.passed), "each": self.each, "each_input": self.each_input,
            "gathered": [{"name": o.name, "dtype": o.dtype, "dims": list(o.dims)} for o in self.gathered],
            "max_items": self.max_items, "truncate": self.truncate, "deadline_ms": self.deadline_ms,
        }
        return {PARAM_FANOUT: json.dumps(value)}

    @classmethod
    def from_config(cls, config: dict) -> FanOutParams | None:
        """From a model config in Triton's JSON form; None for a model that does not fan out."""
        return cls.decode(string_parameters(config))

    @classmethod
    def decode(cls, params: dict[str, str]) -> FanOutParams | None:
        """The orchestrator's plan, or None for a model that does not fan out."""
        if PARAM_FANOUT not in params:
            return None
        try:
            raw = json.loads(params[PARAM_FANOUT])
            return cls(
                first=str(raw["first"]), first_outputs=tuple(map(str, raw["first_outputs"])), items=str(raw["items"]),
                passed=tuple(map(str, raw["passed"])), each=str(raw["each"]), each_input=str(raw["each_input"]),
                gathered=tuple(GatheredOutput(str(o["name"]), str(o["dtype"]), tuple(int(d) for d in o["dims"]))
                               for o in raw["gathered"]),
                max_items=int(raw["max_items"]), truncate=bool(raw["truncate"]), deadline_ms=float(raw["deadline_ms"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"parameter {PARAM_FANOUT!r} is malformed ({exc}); regenerate the repository") from None


def instance_index(config: dict[str, Any], instance_name: str) -> int | None:
    """This instance's place among all of the model's instances (``config``: the model's config as the stub gets
    it), group after group.  Triton names an instance ``<group>_<index>``, the index counted within its group, so
    with several groups (``instance_affinity``) it restarts in each."""
    offset = 0
    group_name, _, tail = instance_name.rpartition("_")
    for group in config.get("instance_group", []):
        if group.get("name") == group_name and tail.isdigit():
            return offset + int(tail)
        offset += int(group.get("count", 1))
    return int(tail) if tail.isdigit() else None
