"""The node keys that configure a node's Triton model rather than a stage, declared once.

Each field of :class:`NodeSettings` is one key: its metadata holds the key's :class:`Param`
(type, default, range, meaning), and, where the key is written differently from what the
generator reads, how the written value becomes the field's (``device_id = "0,1"`` ->
``gpus = (0, 1)``).  The field's default is the parsed ``Param`` default.  From these fields come
:data:`TRITON_KEYS` (the keys the loader routes to the settings and the reference documents),
the coercion of a node's values (:func:`node_settings`) and the defaults.  A new key is a new
field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..contract import GPU_WAITS, parse_warmup
from ..engines.profiles import largest_batch
from ..errors import ConfigError
from ..stages.base import Param

_METADATA = "setting"
#: instance_affinity's values; auto: on where the model's instances are on a GPU
AFFINITIES = ("auto", "true", "false")


@dataclass(frozen=True)
class Setting:
    """How one node key fills one field of :class:`NodeSettings`."""

    param: Param
    #: the node key; None: the field's name
    key: str | None = None
    #: the value as written -> the value ``param`` coerces
    prepare: Callable[[Any], Any] | None = None
    #: ``(where, coerced value)`` -> the field's value; raises ConfigError naming ``where``
    parse: Callable[[str, Any], Any] | None = None
    #: other names of the key -> what the reference says of each
    aliases: tuple[tuple[str, str], ...] = ()


def setting(
    param: Param,
    *,
    key: str | None = None,
    prepare: Callable[[Any], Any] | None = None,
    parse: Callable[[str, Any], Any] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Any:
    """A :class:`NodeSettings` field for one node key, its default taken from ``param``."""
    default = param.default if parse is None else parse(f"the default {param.default!r}", param.default)
    declared = Setting(param, key, prepare, parse, tuple((aliases or {}).items()))
    return field(default=default, metadata={_METADATA: declared})


def _parse_gpus(where: str, text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{where}: device_id must be GPU indices like 0 or 0,1, got {text!r}") from None
    if any(g < 0 for g in gpus):
        raise ConfigError(f"{where}: device_id must be non-negative, got {text!r}")
    return gpus


def _parse_gpu_instances(where: str, text: str) -> tuple[tuple[int, int], ...]:
    pairs: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        gpu, colon, count = item.partition(":")
        try:
            gpu_index, instances = int(gpu), int(count)
        except ValueError:
            gpu_index = instances = -1
        if not colon or gpu_index < 0 or not 1 <= instances <= 1024 or gpu_index in pairs:
            raise ConfigError(
                f"{where}: instances_per_gpu must be distinct GPU:count pairs like 0:2,1:1 "
                f"(count 1-1024), got {text!r}"
            )
        pairs[gpu_index] = instances
    return tuple(pairs.items())


def _parse_batch_sizes(where: str, text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = (0,)
    if any(size < 1 for size in sizes):
        raise ConfigError(f"{where}: preferred_batch_size must be batch sizes like 4 or 4,8, got {text!r}")
    return tuple(sorted(set(sizes)))


def _parse_warmup(where: str, text: str) -> tuple[int, int] | None:
    return parse_warmup(text, where)


def _batch_dim(value: Any) -> Any:
    """Shapes like ``4x3x224x224`` (a model's profiles) -> their largest batch, which is what Triton takes."""
    if isinstance(value, str) and any(c in value for c in "xX,;"):
        return largest_batch(value)
    return value


@dataclass
class NodeSettings:
    """A node's Triton settings; each field is declared by the node key that sets it."""

    instance_num: int = setting(
        Param(int, 1, low=1, high=1024, doc="instances of the model (instance_group.count)"),
        aliases={"worker_num": "another name for instance_num"},
    )
    #: threads (and pinned cores) of each CPU instance; 0: a share of the cores nobody asked for
    cores_per_worker: int = setting(Param(
        int, 0, low=0, high=4096,
        doc="cores of each CPU instance: its torch and OpenCV threads, and the cores it is pinned to, disjoint across "
        "the repository; 0: the instances share the cores left",
    ))
    pin_cores: bool = setting(Param(bool, True, doc="with cores_per_worker: pin each CPU instance to its own cores"))
    oversubscribe: bool = setting(Param(bool, False, doc="with cores_per_worker: allow more cores in all than the host has"))
    batching_timeout: float = setting(Param(float, 0.0, low=0.0, high=60_000.0, doc="ms a batch waits to fill"))
    max: int = setting(
        Param(int, 1, low=1, high=1 << 20, doc="largest batch (max_batch_size); of shapes, the largest first dim"),
        prepare=_batch_dim,
    )
    gpus: tuple[int, ...] = setting(
        Param(str, "", doc="GPU indices for the instances, e.g. 0 or 0,1"), key="device_id", parse=_parse_gpus,
    )
    fuse: bool = setting(Param(bool, False, doc="run the model stage inside the preprocessing model: one model, no ensemble hop"))
    #: (height, width) of the load-time sample image, or None for no warm-up
    warmup: tuple[int, int] | None = setting(
        Param(str, "1080x1920",
              doc="GPU instances run their chain at load on a sample JPEG of this HxW, once per batch bucket; off to skip"),
        parse=_parse_warmup,
    )
    #: seconds a batch may run before the instance gives up on it; 0 for no limit
    execution_timeout: float = setting(Param(
        float, 60.0, low=0.0, high=86_400.0,
        doc="seconds a batch may run; past it its requests fail and the instance's stub exits to be replaced; 0: no limit",
    ))
    overlap: bool = setting(Param(
        bool, False,
        doc="two batches in flight per instance: execute runs the steps before the last one, and a thread of the "
        "instance's own runs the last step (the model) and sends the answers while execute takes the next batch; "
        "a GPU model whose outputs feed another model keeps one batch at a time",
    ))
    gpu_wait: str = setting(Param(
        str, "spin", choices=GPU_WAITS,
        doc="how a GPU instance waits for its batch's GPU work before it answers: spin (CUDA's default: the waiting "
        "thread keeps its core busy), yield (it polls and gives the core to other threads between polls) or block "
        "(it sleeps until the GPU signals); the last two leave the cores to other instances under load",
    ))
    pin_inputs: bool = setting(Param(
        bool, False,
        doc="GPU instances page-lock the Python backend's shared memory, where Triton puts each request's inputs, so "
        "that the GPU reads the JPEG bytes without a staging copy (cudaHostRegister; 1.06x decode in one process); "
        "not with overlap",
    ))
    #: (gpu, count) pairs, each one instance group; empty: instance_num on each of ``gpus``
    gpu_instances: tuple[tuple[int, int], ...] = setting(
        Param(str, "", doc="GPU:count pairs, e.g. 0:2,1:1; GPU models take these instead of instance_num and device_id"),
        key="instances_per_gpu", parse=_parse_gpu_instances,
    )
    instance_affinity: str = setting(Param(
        str, "auto", choices=AFFINITIES,
        doc="batches go to the model's first instance whenever it is idle, and to the others only while it is busy, "
        "so that at low load a request finds a process (and a GPU context) that has just run, not the one idle "
        "longest; Triton's rate limiter with instance priorities: tritonserver needs --rate-limit=execution_count, "
        "which tritonpipe serve, bench and generate --k8s add; auto: on for a model of several GPU instances "
        "(--device gpu, or auto on a host that has a GPU), off on the CPU",
    ))
    preferred_batch_sizes: tuple[int, ...] = setting(
        Param(str, "", doc="batch sizes the dynamic batcher forms as soon as it can, e.g. 4 or 4,8; each at most max"),
        key="preferred_batch_size", parse=_parse_batch_sizes,
    )
    max_queue_size: int = setting(Param(
        int, 0, low=0, high=1 << 31, doc="requests a model queues before it rejects more with UNAVAILABLE; 0: no limit",
    ))
    #: ms, 0 for no queue timeout
    queue_timeout: float = setting(Param(
        float, 0.0, low=0.0, high=86_400_000.0, doc="ms a request may wait in the queue (default_timeout_microseconds); 0: forever",
    ))
    timeout_action: str = setting(Param(
        str, "reject", choices=("reject", "delay"),
        doc="what a request past queue_timeout gets: reject (UNAVAILABLE) or delay (runs after the others)",
    ))
    allow_timeout_override: bool = setting(Param(bool, False, doc="a request's own timeout may replace queue_timeout"))
    priority_levels: int = setting(Param(int, 0, low=0, high=1 << 16, doc="request priority levels (1 is the highest); 0: none"))
    default_priority_level: int = setting(Param(
        int, 0, low=0, high=1 << 16, doc="priority of a request that names none; 0: the lowest, priority_levels",
    ))
    response_cache: bool = setting(Param(
        bool, False, doc="Triton answers repeated identical requests from its cache (the server's cache is turned on)",
    ))
    for_each: bool = setting(Param(
        bool, False,
        doc="run the node once per item: per row of its data (a predecessor's 1xNx... result, such as "
        "CropResizeTensor's crops), its answers gathered one row per item; N = 0 answers empty",
    ))
    max_items: int = setting(Param(
        int, 256, low=1, high=1 << 20, doc="with for_each: most items one request may bring; see too_many",
    ))
    too_many: str = setting(Param(
        str, "fail", choices=("fail", "truncate"),
        doc="with for_each: past max_items the request fails alone, or keeps the first max_items items",
    ))
    deadline_ms: float = setting(Param(
        float, 30_000.0, low=0.0, high=86_400_000.0,
        doc="with for_each: ms one request may take in all, its items included; past it the request fails alone; 0: no limit",
    ))

    @property
    def queue_policy(self) -> bool:
        """Whether any setting needs Triton's dynamic batcher, the scheduler that owns queues and priorities."""
        return bool(self.max_queue_size or self.queue_timeout or self.priority_levels or self.allow_timeout_override)


def _by_key() -> dict[str, tuple[str, Setting]]:
    """Node key -> the field it sets and its declaration (an alias's ``param`` carries the alias's meaning)."""
    found: dict[str, tuple[str, Setting]] = {}
    for declared_field in fields(NodeSettings):
        declared = declared_field.metadata.get(_METADATA)
        if declared is None:
            raise TypeError(f"NodeSettings.{declared_field.name} is declared without setting(...)")
        found[declared.key or declared_field.name] = (declared_field.name, declared)
        for alias, doc in declared.aliases:
            found[alias] = (declared_field.name, replace(declared, param=replace(declared.param, doc=doc)))
    return found


_BY_KEY = _by_key()
#: node keys that configure Triton rather than a stage, in the order the reference lists them
TRITON_KEYS: dict[str, Param] = {key: declared.param for key, (_, declared) in _BY_KEY.items()}


def node_settings(where: str, raw: Mapping[str, Any]) -> NodeSettings:
    """A node's settings from its Triton keys as written (``raw`` holds only keys of :data:`TRITON_KEYS`).

    Every value is coerced and range-checked; errors name the node (``where``).
    """
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name, declared = _BY_KEY[key]
        try:
            if declared.prepare is not None:
                value = declared.prepare(value)
            coerced = declared.param.coerce(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        values[name] = coerced if declared.parse is None else declared.parse(where, coerced)
    settings = NodeSettings(**values)
    _check_scheduling(where, settings)
    if settings.pin_inputs and settings.overlap:
        raise ConfigError(
            f"{where}: pin_inputs and overlap cannot be used together: an overlapping instance returns before the GPU "
            "has read a batch's inputs, and page-locked inputs are read after the call that queued the copy; drop one"
        )
    _check_workers(where, raw)
    return settings


def _check_workers(where: str, raw: Mapping[str, Any]) -> None:
    """``worker_num`` (BigDL-Nano's name) and ``instance_num`` may both be given only if they agree."""
    if "worker_num" in raw and "instance_num" in raw:
        workers, instances = (TRITON_KEYS[key].coerce(key, raw[key]) for key in ("worker_num", "instance_num"))
        if workers != instances:
            raise ConfigError(
                f"{where}: worker_num = {workers} and instance_num = {instances} disagree; worker_num is another "
                "name for instance_num: give one of them"
            )


def _check_scheduling(where: str, settings: NodeSettings) -> None:
    """The rules Triton checks on load, caught here with the keys' names."""
    too_big = [size for size in settings.preferred_batch_sizes if size > settings.max]
    if too_big:
        raise ConfigError(f"{where}: preferred_batch_size {too_big[0]} exceeds max={settings.max}; lower it or raise max")
    if settings.default_priority_level > settings.priority_levels:
        raise ConfigError(
            f"{where}: default_priority_level must be in [1, priority_levels={settings.priority_levels}], "
            f"got {settings.default_priority_level}"
        )
