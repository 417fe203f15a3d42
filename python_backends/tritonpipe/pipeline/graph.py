"""Configurations -> a validated graph of nodes, each holding a resolved stage tree.

Two forms are accepted:

- a single node, torchpipe's dict::

      {"backend": "S[DecodeMat,ResizeMat]", "instance_num": 2, "max": 4, "resize_h": 224, "resize_w": 224}

- a graph: a dict of dicts (or TOML tables) whose nodes name their successor with ``next``;
  top-level keys that are not tables, and the keys of a ``[global]`` table, apply to every node.
- a list of ``(name, stage, config)`` entries, each a node linked to the next; a stage is a
  pipeline string, a function or a ``torch.nn.Module`` (see :mod:`.objects`).
  ``map = "decode[result:data]"`` routes outputs of earlier nodes to a node's inputs.

Resolution looks every stage name up in the registry, hands each node key to the stages
that declare it (``Stage::key`` scopes a key to one stage), coerces and range-checks every
value, and checks the ``next`` and ``map`` links.  Nothing here touches the disk except reading files.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import parse_warmup
from ..engines.profiles import largest_batch
from ..errors import ConfigError
from ..stages import importing_file, load_plugin
from ..stages.base import Param, Stage, check_params, did_you_mean, find_stage, registered_names
from .grammar import SHOWN_CHARS, PipelineSyntaxError, StageNode, parse_backend
from .objects import node_tables
from .resolved import ResolvedStage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: node keys that configure Triton rather than a stage
TRITON_KEYS = {
    "instance_num": Param(int, 1, low=1, high=1024, doc="instances of the model (instance_group.count)"),
    "worker_num": Param(int, 1, low=1, high=1024, doc="another name for instance_num"),
    "cores_per_worker": Param(
        int, 0, low=0, high=4096,
        doc="cores of each CPU instance: its torch and OpenCV threads, and the cores it is pinned to, disjoint across "
        "the repository; 0: the instances share the cores left",
    ),
    "pin_cores": Param(bool, True, doc="with cores_per_worker: pin each CPU instance to its own cores"),
    "oversubscribe": Param(bool, False, doc="with cores_per_worker: allow more cores in all than the host has"),
    "batching_timeout": Param(float, 0.0, low=0.0, high=60_000.0, doc="ms a batch waits to fill"),
    "max": Param(int, 1, low=1, high=1 << 20, doc="largest batch (max_batch_size); of shapes, the largest first dim"),
    "device_id": Param(str, "", doc="GPU indices for the instances, e.g. 0 or 0,1"),
    "fuse": Param(bool, False, doc="run the model stage inside the preprocessing model: one model, no ensemble hop"),
    "warmup": Param(
        str, "1080x1920",
        doc="GPU instances run their chain at load on a sample JPEG of this HxW, once per batch bucket; off to skip",
    ),
    "execution_timeout": Param(
        float, 60.0, low=0.0, high=86_400.0,
        doc="seconds a batch may run; past it its requests fail and the instance's stub exits to be replaced; 0: no limit",
    ),
    "instances_per_gpu": Param(
        str, "", doc="GPU:count pairs, e.g. 0:2,1:1; GPU models take these instead of instance_num and device_id",
    ),
    "preferred_batch_size": Param(
        str, "", doc="batch sizes the dynamic batcher forms as soon as it can, e.g. 4 or 4,8; each at most max",
    ),
    "max_queue_size": Param(
        int, 0, low=0, high=1 << 31, doc="requests a model queues before it rejects more with UNAVAILABLE; 0: no limit",
    ),
    "queue_timeout": Param(
        float, 0.0, low=0.0, high=86_400_000.0, doc="ms a request may wait in the queue (default_timeout_microseconds); 0: forever",
    ),
    "timeout_action": Param(
        str, "reject", choices=("reject", "delay"),
        doc="what a request past queue_timeout gets: reject (UNAVAILABLE) or delay (runs after the others)",
    ),
    "allow_timeout_override": Param(bool, False, doc="a request's own timeout may replace queue_timeout"),
    "priority_levels": Param(int, 0, low=0, high=1 << 16, doc="request priority levels (1 is the highest); 0: none"),
    "default_priority_level": Param(
        int, 0, low=0, high=1 << 16, doc="priority of a request that names none; 0: the lowest, priority_levels",
    ),
    "response_cache": Param(
        bool, False, doc="Triton answers repeated identical requests from its cache (the server's cache is turned on)",
    ),
}
_STRUCTURE_KEYS = ("backend", "next", "map")
#: torchpipe's table of keys for every node
GLOBAL_TABLE = "global"
#: torchpipe keys with no counterpart here -> what to do instead
TORCHPIPE_ONLY = {
    "filter": "Triton runs every step of an ensemble; a stage that refuses a request (C10Exception) ends it instead",
    "interpreter::backend": "Triton schedules the nodes itself (dynamic batching and ensembles); drop it",
    "pipelinev3::backend": "Triton schedules the nodes itself (dynamic batching and ensembles); drop it",
    "baselineschedule::backend": "Triton batches and runs instances itself: set instance_num, max and batching_timeout",
    "precision::output::fp32": "precision::fp32 keeps named layers in FP32",
    "precision::output::fp16": "precision::fp16 runs named layers in FP16",
}
#: keys whose torchpipe values may combine several settings with '&'
_NO_AMPERSAND = ("backend", "model", "max", "min", "instance_num")
_MAP_ENTRY_RE = re.compile(r"\s*([A-Za-z0-9_\-]*)\s*\[([^\[\]]*)\]\s*(?:,|$)")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")


@dataclass
class NodeSettings:
    instance_num: int = 1
    #: threads (and pinned cores) of each CPU instance; 0: a share of the cores nobody asked for
    cores_per_worker: int = 0
    pin_cores: bool = True
    oversubscribe: bool = False
    batching_timeout: float = 0.0
    max: int = 1
    gpus: tuple[int, ...] = ()
    fuse: bool = False
    #: (height, width) of the load-time sample image, or None for no warm-up
    warmup: tuple[int, int] | None = (1080, 1920)
    #: seconds a batch may run before the instance gives up on it; 0 for no limit
    execution_timeout: float = 60.0
    #: (gpu, count) pairs, each one instance group; empty: instance_num on each of ``gpus``
    gpu_instances: tuple[tuple[int, int], ...] = ()
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0
    #: ms, 0 for no queue timeout
    queue_timeout: float = 0.0
    timeout_action: str = "reject"
    allow_timeout_override: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    response_cache: bool = False

    @property
    def queue_policy(self) -> bool:
        """Whether any setting needs Triton's dynamic batcher, the scheduler that owns queues and priorities."""
        return bool(self.max_queue_size or self.queue_timeout or self.priority_levels or self.allow_timeout_override)


@dataclass(frozen=True)
class MapLink:
    """``map = "source[source_key:target_key]"``: the node reads ``target_key`` from ``source``'s ``source_key``."""

    source: str
    source_key: str
    target_key: str


@dataclass
class Node:
    name: str
    tree: ResolvedStage
    settings: NodeSettings
    next: list[str] = field(default_factory=list)
    #: where the node's inputs come from; empty: ``data`` is its one predecessor's ``result``
    map: list[MapLink] = field(default_factory=list)


@dataclass
class Graph:
    name: str
    nodes: dict[str, Node]  # in topological order, entry first
    plugins: list[Path] = field(default_factory=list)
    #: the folder of the models exported from a pipeline list; it lives as long as the graph
    exports: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def entry(self) -> Node:
        return next(iter(self.nodes.values()))


def check_name(what: str, name: str) -> str:
    """Model and node names become folder names: keep them plain."""
    if name == "":
        raise ConfigError(f"{what} is empty; give a name of letters, digits, '_' and '-', at most 128 characters")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not allowed: use letters, digits, '_' and '-' only "
            "(no paths, '..', '/', or NUL), at most 128 characters"
        )
    return name


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON configuration; duplicate keys in JSON are an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":

        def no_duplicates(pairs):
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise ConfigError(f"{path}: key {key!r} appears twice (duplicate node names are not allowed)")
                seen[key] = value
            return seen

        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["resize_h=224", ...]`` (the CLI's ``--set``) -> a dict of node keys."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def compose_config(
    path: str | Path | None, backend: str | None, overrides: dict[str, Any]
) -> tuple[dict[str, Any], Path | None]:
    """A configuration from a file or a backend string, with top-level keys overridden.

    Returns the configuration and the folder its relative file names are resolved against.
    """
    if bool(path) == bool(backend):
        raise ConfigError("give either a configuration file or a backend string")
    if backend:
        return {"backend": backend, **overrides}, None
    return {**read_config_file(path), **overrides}, Path(path).resolve().parent


def load_graph(
    config: dict[str, Any] | list | str | Path,
    *,
    name: str | None = None,
    plugins: list[str | Path] = (),
    base_dir: str | Path | None = None,
) -> Graph:
    """Turn a configuration (dict, ``(name, stage, config)`` list, or a TOML/JSON path) into a validated :class:`Graph`.

    Relative file parameters (``model=``) are resolved against ``base_dir``, which defaults
    to the configuration file's folder, or the working directory for a dict.
    """
    source = importing_file()
    if source is not None:
        raise ConfigError(
            f"{source} builds a pipeline when it is imported, and the server imports it for its stages; "
            "put that code under if __name__ == \"__main__\":"
        )
    if isinstance(config, (list, tuple)):
        exports = tempfile.TemporaryDirectory(prefix="tritonpipe-exports-")
        try:
            graph = load_graph(node_tables(config, Path(exports.name)), name=name, plugins=plugins, base_dir=base_dir)
        except BaseException:
            exports.cleanup()
            raise
        graph.exports = exports
        return graph
    if isinstance(config, (str, Path)):
        base_dir = base_dir or Path(config).resolve().parent
        config = read_config_file(config)
    if not isinstance(config, dict) or not config:
        raise ConfigError("a configuration must be a non-empty dict, a list of (name, stage, config) or a TOML/JSON file")
    _check_keys(config)
    config = _merge_global(config)  # a new dict: the keys taken out below stay in the caller's
    base = Path(base_dir or Path.cwd()).resolve()

    plugin_paths = [_config_plugin(base, p) for p in _as_list(config.pop("plugins", []), "plugins")]
    plugin_paths += [Path(p).resolve() for p in plugins]
    for plugin in plugin_paths:
        load_plugin(plugin)

    config_name = config.pop("name", "pipeline")
    graph_name = check_name("pipeline name", config_name if name is None else name)
    if "backend" in config:
        raw_nodes = {graph_name: config}
        shared: dict[str, Any] = {}
    else:
        raw_nodes = {k: v for k, v in config.items() if isinstance(v, dict)}
        shared = {k: v for k, v in config.items() if not isinstance(v, dict)}
        if not raw_nodes:
            raise ConfigError("the configuration has no 'backend' key and no node tables; give at least one node")

    nodes: dict[str, Node] = {}
    for node_name, raw in raw_nodes.items():
        check_name("node name", node_name)
        merged = {**shared, **raw}
        if "backend" not in merged:
            raise ConfigError(f"node {node_name!r} has no 'backend' key")
        nodes[node_name] = _resolve_node(node_name, merged, base)
    ordered = _order(nodes)
    _link_maps(ordered)
    return Graph(name=graph_name, nodes=ordered, plugins=plugin_paths)


def _merge_global(config: dict[str, Any]) -> dict[str, Any]:
    """torchpipe's ``[global]`` table read as top-level keys; top-level keys win over it."""
    table = config.get(GLOBAL_TABLE)
    if table is None:
        return dict(config)
    if not isinstance(table, dict) or any(isinstance(v, dict) for v in table.values()):
        raise ConfigError(f"[{GLOBAL_TABLE}] holds keys for every node (instance_num = 2, ...), not nodes or values")
    rest = {k: v for k, v in config.items() if k != GLOBAL_TABLE}
    return {**table, **rest}


def _config_plugin(base: Path, name: str) -> Path:
    """A plugin named by a configuration: a file in the configuration's own folder tree.

    A configuration is often passed around as data; a plugin is code.  Code from elsewhere is
    loaded only when the command line names it (``--plugin``).
    """
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ConfigError(
            f"plugin {name!r} is outside the configuration's folder {str(base)!r}; a configuration may only name "
            "plugins beside it or below it: pass --plugin PATH to load one from elsewhere"
        )
    return path


def _check_keys(config: dict[str, Any], where: str = "the configuration") -> None:
    """Every key is a string, in every table (a Python dict may hold anything)."""
    for key, value in config.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is a {type(key).__name__}; keys must be strings")
        if isinstance(value, dict):
            _check_keys(value, f"table {key!r}")


def _as_list(value: Any, what: str = "a list") -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> names; anything else (numbers, tables, NUL bytes) is a ConfigError."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif value is None:
        items = []
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, Path)) for v in value):
        items = [str(v) for v in value]
    else:
        raise ConfigError(f"{what} must be a name or a list of names, got {value!r}")
    if any("\x00" in v for v in items):
        raise ConfigError(f"{what} must not contain NUL bytes, got {value!r}")
    return items


def _resolve_node(node_name: str, raw: dict[str, Any], base: Path) -> Node:
    where = f"node {node_name!r}"
    _refuse_torchpipe_only(where, raw)
    backend = raw["backend"]
    skeleton = _skeleton(parse_backend(backend), backend, _scoped_backends(raw), where)
    stages = list(_flatten(skeleton))
    stage_names = {cls.name.lower() for cls, _, _ in stages}
    given: dict[int, dict[str, Any]] = {id(node): dict(node.params) for _, node, _ in stages}
    settings_raw: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _STRUCTURE_KEYS or key.lower().endswith("::backend"):
            continue
        scope, _, scoped_key = key.partition("::")
        if scoped_key and scope.lower() in stage_names:
            targets = [(cls, node) for cls, node, _ in stages if cls.name.lower() == scope.lower()]
            key = scoped_key
        else:
            targets = [(cls, node) for cls, node, _ in stages if key in cls.params]
        taken = False
        for cls, node in targets:
            if key in cls.params:
                given[id(node)].setdefault(key, value)
                taken = True
        if key in TRITON_KEYS:
            settings_raw[key] = value
            taken = True
        if not taken:
            known = sorted({p for cls, _, _ in stages for p in cls.params} | set(TRITON_KEYS))
            shown = backend if len(backend) <= SHOWN_CHARS else backend[:SHOWN_CHARS] + "..."
            raise ConfigError(f"{where}: no stage of {shown!r} takes parameter {key!r}{did_you_mean(key, known)}")

    def build(entry: _Skeleton) -> ResolvedStage:
        cls, node, children = entry
        try:
            params = check_params(cls, given[id(node)])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for key, param in cls.params.items():
            if param.file and params[key]:
                path = Path(params[key])
                params[key] = str(path if path.is_absolute() else (base / path).resolve())
        return ResolvedStage(cls, params, tuple(build(child) for child in children))

    tree = build(skeleton)
    settings = NodeSettings()
    for key, value in settings_raw.items():
        try:
            if key == "max" and isinstance(value, str) and any(c in value for c in "xX,;"):
                value = largest_batch(value)  # shapes like 4x3x224x224: Triton takes the batch dim
            coerced = TRITON_KEYS[key].coerce(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if key == "device_id":
            settings.gpus = _parse_gpus(where, coerced)
        elif key == "warmup":
            settings.warmup = parse_warmup(coerced, where)
        elif key == "instances_per_gpu":
            settings.gpu_instances = _parse_gpu_instances(where, coerced)
        elif key == "preferred_batch_size":
            settings.preferred_batch_sizes = _parse_batch_sizes(where, coerced)
        elif key == "worker_num":
            settings.instance_num = coerced
        else:
            setattr(settings, key, coerced)
    _check_scheduling(where, settings)
    _check_workers(where, settings_raw)
    links = parse_map(raw["map"], where) if "map" in raw else []
    return Node(node_name, tree, settings, next=_as_list(raw.get("next", []), f"{where}: next"), map=links)


def _refuse_torchpipe_only(where: str, raw: dict[str, Any]) -> None:
    """torchpipe keys that mean nothing to Triton get told what to use instead, not "unknown key"."""
    for key, value in raw.items():
        instead = TORCHPIPE_ONLY.get(key.lower())
        if instead:
            raise ConfigError(f"{where}: {key!r} is torchpipe's and has no counterpart here: {instead}")
        if key in _NO_AMPERSAND and "&" in str(value):
            raise ConfigError(
                f"{where}: {key} = {value!r} combines settings with '&', which torchpipe uses to join models of "
                "fixed batch sizes; here a node serves one model: export it with a dynamic batch dimension "
                "and set min and max (e.g. min = 1, max = 8)"
            )


def parse_map(text: Any, where: str) -> list[MapLink]:
    """``"a[result:data,box:box],b[result:extra]"`` -> links; the node name may be left out (``[result:data]``)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: map must be a string like \"decode[result:data]\", got {text!r}")
    links: list[MapLink] = []
    position = 0
    for match in _MAP_ENTRY_RE.finditer(text):
        if match.start() != position:
            break
        position = match.end()
        for pair in match.group(2).split(","):
            source_key, sep, target_key = (part.strip() for part in pair.partition(":"))
            if not (sep and source_key and target_key):
                raise ConfigError(f"{where}: map entry {pair.strip()!r} should be SOURCE_KEY:TARGET_KEY, e.g. result:data")
            links.append(MapLink(match.group(1), source_key, target_key))
    if position != len(text) or not links:
        raise ConfigError(
            f"{where}: cannot read map = {text!r} past character {position}; write NODE[SOURCE_KEY:TARGET_KEY,...] "
            "separated by commas, e.g. \"decode[result:data],detect[boxes:boxes]\""
        )
    targets = [link.target_key for link in links]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise ConfigError(f"{where}: map feeds {', '.join(map(repr, twice))} more than once")
    return links


#: a stage class, the parsed node it came from (for its inline parameters), and its children
_Skeleton = tuple[type[Stage], StageNode, list]


def _flatten(entry: _Skeleton):
    yield entry
    for child in entry[2]:
        yield from _flatten(child)


def _scoped_backends(raw: dict[str, Any]) -> dict[str, str]:
    """torchpipe's ``SyncTensor::backend = "X"`` is the same as writing ``SyncTensor[X]``."""
    return {k[: -len("::backend")].lower(): v for k, v in raw.items() if k.lower().endswith("::backend")}


def _skeleton(node: StageNode, text: str, scoped: dict[str, str], where: str, used: set[str] | None = None) -> _Skeleton:
    """Look every stage up and attach ``X::backend`` children, without changing the parsed tree."""
    top = used is None
    used = set() if top else used
    cls = find_stage(node.name)
    if cls is None:
        reason = f"unknown stage {node.name!r}{did_you_mean(node.name, registered_names())}"
        raise PipelineSyntaxError(reason, text, node.position)
    for key, position in node.param_positions.items():
        if key not in cls.params:
            reason = f"stage {cls.name} takes no parameter {key!r}{did_you_mean(key, list(cls.params))}"
            raise PipelineSyntaxError(reason, text, position)
    children = [_skeleton(child, text, scoped, where, used) for child in node.children]
    filled = scoped.get(node.name.lower()) if not node.children else None
    if filled is not None:
        used.add(node.name.lower())
        children = [_skeleton(parse_backend(filled), filled, scoped, where, used)]
    if cls.role == "sequence" and not children:
        raise ConfigError(f"{where}: {cls.name} chains other stages; write {cls.name}[A,B]")
    if cls.role not in ("wrapper", "sequence") and children:
        raise ConfigError(f"{where}: {cls.name} is not a wrapper and cannot take [...]")
    if top and set(scoped) - used:
        unused = sorted(k + "::backend" for k in set(scoped) - used)
        raise ConfigError(f"{where}: {', '.join(unused)} names no stage of the backend")
    return cls, node, children


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


def _check_workers(where: str, raw: dict[str, Any]) -> None:
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


def _link_maps(nodes: dict[str, Node]) -> None:
    """Name every map source and check it runs before the node that reads it (nodes in topological order)."""
    before: dict[str, set[str]] = {name: set() for name in nodes}
    predecessors: dict[str, list[str]] = {name: [] for name in nodes}
    for node in nodes.values():
        for target in node.next:
            before[target] |= before[node.name] | {node.name}
            predecessors[target].append(node.name)
    for node in nodes.values():
        where = f"node {node.name!r}"
        links = []
        for link in node.map:
            source = link.source
            if not source:
                if len(predecessors[node.name]) != 1:
                    found = ", ".join(predecessors[node.name]) or "none"
                    raise ConfigError(
                        f"{where}: map [{link.source_key}:{link.target_key}] names no node, which is only allowed "
                        f"with exactly one predecessor (it has: {found}); write NODE[{link.source_key}:{link.target_key}]"
                    )
                source = predecessors[node.name][0]
            if source not in nodes:
                raise ConfigError(f"{where}: map names node {source!r}, which does not exist{did_you_mean(source, list(nodes))}")
            if source not in before[node.name]:
                raise ConfigError(
                    f"{where}: map reads node {source!r}, which does not run before it; link {source!r} to it "
                    "through next first"
                )
            links.append(MapLink(source, link.source_key, link.target_key))
        if links and "data" not in {link.target_key for link in links}:
            raise ConfigError(
                f"{where}: map must feed 'data', the input of the node's first stage; add e.g. "
                f"{links[0].source}[result:data]"
            )
        node.map = links


def _order(nodes: dict[str, Node]) -> dict[str, Node]:
    """Topological order from the single entry node; rejects unknown targets and cycles."""
    for node in nodes.values():
        for target in node.next:
            if target not in nodes:
                raise ConfigError(
                    f"node {node.name!r}: next = {target!r} names no node{did_you_mean(target, list(nodes))}"
                )
            if target == node.name:
                raise ConfigError(f"node {node.name!r} names itself in next: cycles are not allowed")
    incoming = {name: 0 for name in nodes}
    for node in nodes.values():
        for target in node.next:
            incoming[target] += 1
    entries = [n for n, count in incoming.items() if count == 0]
    if not entries:
        raise ConfigError(f"the graph has a cycle through 'next' (nodes: {', '.join(nodes)}); it needs one entry node")
    if len(entries) > 1:
        raise ConfigError(f"the graph has several entry nodes ({', '.join(entries)}); link them with 'next' into one")
    ordered: dict[str, Node] = {}
    ready = list(entries)
    while ready:
        current = ready.pop(0)
        ordered[current] = nodes[current]
        for target in nodes[current].next:
            incoming[target] -= 1
            if incoming[target] == 0:
                ready.append(target)
    if len(ordered) != len(nodes):
        cyclic = sorted(set(nodes) - set(ordered))
        raise ConfigError(f"the graph has a cycle through 'next' among: {', '.join(cyclic)}")
    return ordered
