"""The stage contract and the registry of stage names.

A stage is a small class with torchpipe's contract::

    class MyStage(Stage):
        params = {"factor": Param(float, 2.0, low=0.0)}

        def init(self, params):          # params: validated, defaults filled in
            self.factor = params["factor"]

        def forward(self, batch):        # batch: list of dicts, one per request
            for item in batch:
                item["result"] = item["data"] * self.factor

``forward`` reads ``item["data"]`` and writes ``item["result"]``; it may read and write
other keys (``"color"``, extra outputs).  Stages are registered under a name with
:func:`register` and are then usable in pipeline strings.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, RequestError
from ..registry import Registry, did_you_mean, origin
from ..spec import ENCODED_IMAGE, SpecError, TensorSpec

#: item keys of the stage contract: what a stage reads, what it writes, and a request's own failure
DATA = "data"
RESULT = "result"
ERROR = "error"

_REQUIRED = object()
#: the words a boolean parameter takes for true, and for false (any case)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
#: ``Stage.max()`` of a stage that takes batches of any size
UNBOUNDED = 1 << 30


def _yes_no(value: Any) -> str:
    """A boolean or a yes/no word as ``true`` / ``false``; any other value as its stripped text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    lowered = str(value).strip().lower()
    return "true" if lowered in TRUE_WORDS else "false" if lowered in FALSE_WORDS else str(value).strip()


@dataclass(frozen=True)
class Param:
    """One parameter a stage accepts, with its type, default and valid range."""

    kind: type
    default: Any = _REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""
    #: the value names a file that the generator copies into the model repository
    file: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def coerce(self, name: str, value: Any) -> Any:
        """Convert ``value`` (possibly a string from a pipeline or CLI) and check its range."""
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in TRUE_WORDS + FALSE_WORDS:
                        raise ValueError
                    value = lowered in TRUE_WORDS
                else:
                    value = bool(value)
            elif self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if isinstance(value, bool):
                    raise ValueError
                value = int(str(value).strip()) if isinstance(value, str) else int(value)
            elif self.kind is float:
                value = float(value)
                if value != value:  # NaN passes every range check
                    raise ValueError
            elif self.choices is not None and "true" in self.choices and "false" in self.choices:
                value = _yes_no(value)  # auto/true/false keys take a yes/no as a boolean key does
            else:
                value = str(value).strip()
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {name!r} must be {self.kind.__name__}, got {value!r}") from None
        if self.choices is not None and str(value).lower() not in self.choices:
            raise ConfigError(f"parameter {name!r} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.choices is not None:
            value = str(value).lower()
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ConfigError(f"parameter {name!r} must be in [{_fmt(self.low)}, {_fmt(self.high)}], got {value!r}")
        return value

    def describe(self) -> str:
        parts = [self.kind.__name__]
        if not self.required:
            parts.append(f"default {self.default!r}")
        if self.choices:
            parts.append("/".join(self.choices))
        if self.low is not None or self.high is not None:
            parts.append(f"[{_fmt(self.low)}, {_fmt(self.high)}]")
        return ", ".join(parts)


def _fmt(bound: float | None) -> str:
    return "-inf" if bound is None else str(bound)


class Role(str, enum.Enum):
    """What a stage is to the generator: what a stage class declares as its ``role``.

    Members are strings, equal to the declared ones, and print as them.
    """

    #: a step fused with its neighbours into one preprocessing model
    PROCESS = "process"
    #: gets a Triton model of its own
    MODEL = "model"
    #: wraps child stages, like ``SyncTensor[...]``
    WRAPPER = "wrapper"
    #: chains child stages, like ``S[A,B]``
    SEQUENCE = "sequence"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Stage:
    """Base class of every stage.

    Class attributes describe the stage to the generator:

    - ``params``: the parameters it takes;
    - ``wants_gpu``: it runs on the GPU when the instance has one (it still runs on the CPU);
    - ``role``: a :class:`Role`: ``PROCESS`` (a preprocessing step fused with its neighbours into
      one model), ``MODEL`` (gets a Triton model of its own), ``WRAPPER`` (wraps child stages,
      like ``SyncTensor[...]``) or ``SEQUENCE`` (chains them, like ``S[...]``).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[dict[str, Param]] = {}
    wants_gpu: ClassVar[bool] = False
    role: ClassVar[Role] = Role.PROCESS
    #: what the stage reads from ``data`` and writes to ``result``, for the stage table
    input_doc: ClassVar[str] = "any"
    output_doc: ClassVar[str] = "same as input"
    #: ``forward`` changes tensors of its items in place; the runner then hands it copies, so that a
    #: failed batch can be retried from untouched inputs (a stage caught doing it undeclared is
    #: switched to copies)
    mutates_inputs: bool = False
    #: ``device`` is set by the runner before ``init``; ``children`` only for wrappers.
    device: torch.device = torch.device("cpu")
    children: list[Stage]

    def init(self, params: dict[str, Any]) -> None:
        """Prepare the stage; ``params`` holds every declared parameter."""

    def forward(self, batch: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def one_batch_at_a_time(self) -> str | None:
        """Why ``forward`` cannot run on two batches at once, each on a thread of its own (one line), or None:
        it can, unless the stage keeps state across one call."""
        return None

    def max(self) -> int:
        """The most items one ``forward`` call takes; a chain splits larger batches to fit.

        Unbounded by default; a stage that handles one item at a time returns 1.
        """
        return UNBOUNDED

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        """What this stage produces from ``spec``; raise :class:`SpecError` if it cannot take it.

        The default keeps the description, which suits stages that only move or copy data.
        """
        return spec

    @classmethod
    def entry_spec(cls, params: dict[str, Any]) -> TensorSpec:
        """What the request carries as ``data`` when this stage comes first in a pipeline.

        Encoded images by default; a stage that takes tensors from the request says which.
        """
        return ENCODED_IMAGE

    @classmethod
    def extra_inputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        """Inputs besides ``data`` that the stage reads from each item, by item key.

        A graph routes them in with ``map`` (``detect[result:box]``); otherwise the request carries them.
        """
        return {}

    @classmethod
    def optional_inputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        """Inputs the stage reads from each item when they are there, by item key.

        They reach the stage when an earlier stage of its node or a ``map`` gives them; the
        request is never asked for them.
        """
        return {}

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        """Outputs besides ``result`` that the stage writes into each item, by item key."""
        return {}


class MapStage(Stage):
    """A stage that handles one request at a time; a failure stays with its request."""

    #: on a CPU instance, ``apply`` may run for several items of a batch at once, on the instance's threads
    #: (:func:`cpu_threads`): for work that lets the GIL go (OpenCV, libjpeg-turbo) and touches only its item
    concurrent: ClassVar[bool] = False

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward(self, batch: list[dict[str, Any]]) -> None:
        pool = cpu_threads() if self.concurrent and self.device.type == "cpu" and len(batch) > 1 else None
        if pool is None:
            for item in batch:
                self._apply_to(item)
        else:
            list(pool.map(self._apply_to, batch))

    def _apply_to(self, item: dict[str, Any]) -> None:
        try:
            item[RESULT] = self.apply(item[DATA], item)
        except Exception as exc:  # noqa: BLE001 - the error belongs to this request
            item[ERROR] = exc


_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, the pool)
_pool_lock = threading.Lock()


def cpu_threads() -> ThreadPoolExecutor | None:
    """Threads for the per-image work of a CPU instance, as many as its torch threads (its share of the host's
    cores, which the generic model sets at load), or None where that is one.  Without them a batch's images
    are decoded one after another on one core, whatever cores the instance was given."""
    global _pool
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    with _pool_lock:
        if _pool is None or _pool[0] != threads:
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="tritonpipe-item"))
        return _pool[1]


# --- registry -------------------------------------------------------------------------

_STAGES: Registry[type[Stage]] = Registry("stage")


def register(name: str, *aliases: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: make a stage usable in pipeline strings as ``name`` (and aliases).

    Names match case-insensitively.  Registering a taken name raises ``ConfigError``
    naming both definitions.
    """

    def decorate(cls: type[Stage]) -> type[Stage]:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"@register({name!r}) needs a subclass of tritonpipe.Stage, got {cls!r}")
        _STAGES.add((name, *aliases), cls, origin(cls))
        cls.name = name
        cls.aliases = tuple(aliases)
        return cls

    return decorate


def find_stage(name: str) -> type[Stage] | None:
    """The stage class registered as ``name``, or None."""
    from . import load_builtin_stages

    load_builtin_stages()
    return _STAGES.get(name)


def lookup(name: str) -> type[Stage]:
    """The stage class registered as ``name``; ``ConfigError`` with suggestions otherwise."""
    from . import load_builtin_stages

    load_builtin_stages()
    return _STAGES.find(name)


def registered_names() -> list[str]:
    from . import load_builtin_stages

    load_builtin_stages()
    return _STAGES.names()


def check_params(cls: type[Stage], given: dict[str, Any]) -> dict[str, Any]:
    """Coerce ``given`` against ``cls.params``, fill defaults, reject unknown or missing ones."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key not in cls.params:
            raise ConfigError(
                f"stage {cls.name} takes no parameter {key!r}{did_you_mean(key, list(cls.params))}"
            )
        out[key] = cls.params[key].coerce(key, value)
    for key, param in cls.params.items():
        if key not in out:
            if param.required:
                raise ConfigError(f"stage {cls.name} needs parameter {key!r} ({param.doc or param.describe()})")
            out[key] = param.default
    return out


__all__ = [
    "ConfigError",
    "MapStage",
    "Param",
    "SpecError",
    "Stage",
    "RequestError",
    "TensorSpec",
    "check_params",
    "did_you_mean",
    "lookup",
    "register",
    "registered_names",
]
