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

from .errors import ConfigError

PARAM_PIPELINE = "tritonpipe.pipeline"
PARAM_INPUTS = "tritonpipe.inputs"
PARAM_OUTPUTS = "tritonpipe.outputs"
PARAM_PLUGINS = "tritonpipe.plugins"
PARAM_WARMUP = "tritonpipe.warmup"
PARAM_HOST_OUTPUTS = "tritonpipe.host_outputs"
PARAM_EXECUTION_TIMEOUT = "tritonpipe.execution_timeout"
PARAM_CORES = "tritonpipe.cores"

_WARMUP_OFF = ("off", "none", "no", "false", "0")
_MAX_SIDE = 16384


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
    """

    pipeline: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    plugins: list[str] = field(default_factory=list)
    warmup: tuple[int, int] | None = None
    host_outputs: bool = False
    execution_timeout: float = 0.0
    cores: CpuCores | None = None

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
        return cls(
            pipeline=pipeline,
            inputs=inputs,
            outputs=outputs,
            plugins=plugins,
            warmup=parse_warmup(warmup, PARAM_WARMUP) if warmup else None,
            host_outputs=params.get(PARAM_HOST_OUTPUTS) == "yes",
            execution_timeout=execution_timeout,
            cores=CpuCores.decode(params[PARAM_CORES]) if PARAM_CORES in params else None,
        )

    @classmethod
    def from_config(cls, config: dict) -> ModelParams:
        """From a model config in Triton's JSON form (what the stub is given)."""
        return cls.decode({k: v["string_value"] for k, v in config.get("parameters", {}).items()})
