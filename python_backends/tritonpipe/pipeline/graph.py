"""Configurations -> a validated graph of nodes, each holding a resolved stage tree.

:func:`load_graph` accepts three forms:

- a single node, torchpipe's dict::

      {"backend": "S[DecodeMat,ResizeMat]", "instance_num": 2, "max": 4, "resize_h": 224, "resize_w": 224}

- a graph: a dict of dicts (or TOML tables) whose nodes name their successor with ``next``;
  top-level keys that are not tables, and the keys of a ``[global]`` table, apply to every node;
  ``map = "decode[result:data]"`` routes outputs of earlier nodes to a node's inputs;
- a list of ``(name, stage, config)`` entries, each a node linked to the next; a stage is a
  pipeline string, a function or a ``torch.nn.Module`` (see :mod:`.objects`).

A path to a TOML or JSON file holding one of the first two is read first (:mod:`.files`).
Each node's keys are routed to its stages and settings (:mod:`.routing`, :mod:`.settings`);
this module then checks the ``next`` and ``map`` links and orders the nodes from the entry.
Loading reads the configuration file and the plugin files it names, and imports those
plugins; the list form also writes every ``torch.nn.Module`` it holds, exported with
``torch.export``, into a temporary folder that lives as long as the :class:`Graph`.

:func:`set_node_keys` writes keys into the nodes of a configuration that take them, by the
same routing.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stages import importing_file, load_plugin
from ..stages.base import DATA, did_you_mean
from .files import read_config_file
from .names import check_name
from .objects import node_tables
from .resolved import ResolvedStage
from .routing import resolve_stages, takes_key
from .settings import NodeSettings, node_settings

#: torchpipe's table of keys for every node
GLOBAL_TABLE = "global"
_MAP_ENTRY_RE = re.compile(r"\s*([A-Za-z0-9_\-]*)\s*\[([^\[\]]*)\]\s*(?:,|$)")


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

    def predecessors(self) -> dict[str, list[str]]:
        """Node name -> the nodes that name it in ``next``, in the graph's order."""
        return _predecessors(self.nodes)


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
    raw_nodes, shared = _split_nodes(config, graph_name)
    nodes: dict[str, Node] = {}
    for node_name, raw in raw_nodes.items():
        check_name("node name", node_name)
        nodes[node_name] = _resolve_node(node_name, _node_keys(node_name, raw, shared), base)
    ordered = _order(nodes)
    _link_maps(ordered)
    return Graph(name=graph_name, nodes=ordered, plugins=plugin_paths)


def set_node_keys(
    config: dict[str, Any], keys: Mapping[str, Any], base_dir: str | Path | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``config`` with each of ``keys`` set on every node that takes it, winning over the node's own keys.

    A key goes where :func:`load_graph` would route it: a Triton key to every node, a stage
    parameter to the nodes with a stage that declares it, ``Stage::key`` to the nodes with
    that stage.  The loader gives a stage parameter the first value that the node's keys route
    to it, so the keys set here are written first in each node, ``Stage::key`` ones before the
    others; the keys every node shares (top-level ones, ``[global]``) are written into each
    node table after them, which loads the same.  The plugins the configuration names
    (relative to ``base_dir``, by default the working directory) are loaded first, so that
    their stages are known.

    Returns the new configuration (the caller's is left as it is) and the keys no node takes.
    """
    _check_keys(config)
    merged = _merge_global(config)
    base = Path(base_dir or Path.cwd()).resolve()
    for plugin in _as_list(merged.get("plugins", []), "plugins"):
        load_plugin(_config_plugin(base, plugin))
    keys = dict(sorted(keys.items(), key=lambda item: "::" not in item[0]))
    if "backend" in merged:
        nodes = {str(merged.get("name", "pipeline")): merged}
        top: dict[str, Any] = {}
    else:
        top = {k: merged[k] for k in ("name", "plugins") if k in merged}
        tables, shared = _split_nodes({k: v for k, v in merged.items() if k not in top}, "")
        nodes = {node_name: _node_keys(node_name, table, shared) for node_name, table in tables.items()}
    given: dict[str, dict[str, Any]] = {node_name: {} for node_name in nodes}
    untaken = []
    for key, value in keys.items():
        hits = [
            node_name for node_name, raw in nodes.items()
            if takes_key(f"node {node_name!r}", {**raw, **given[node_name]}, key)  # as the node will be loaded
        ]
        for node_name in hits:
            given[node_name][key] = value
        if not hits:
            untaken.append(key)
    written = {
        node_name: {**given[node_name], **{k: v for k, v in raw.items() if k not in given[node_name]}}
        for node_name, raw in nodes.items()
    }
    if "backend" in merged:
        return next(iter(written.values())), untaken
    return {**top, **written}, untaken


def _split_nodes(config: dict[str, Any], single_name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The node tables of a configuration (past its ``[global]`` table) and the keys every node shares.

    A configuration with a ``backend`` key is one node, named ``single_name``.
    """
    if "backend" in config:
        return {single_name: config}, {}
    raw_nodes = {k: v for k, v in config.items() if isinstance(v, dict)}
    shared = {k: v for k, v in config.items() if not isinstance(v, dict)}
    if not raw_nodes:
        raise ConfigError("the configuration has no 'backend' key and no node tables; give at least one node")
    return raw_nodes, shared


def _node_keys(node_name: str, raw: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """A node's keys: its table's over the shared ones; a ConfigError when none gives its backend."""
    merged = {**shared, **raw}
    if "backend" not in merged:
        raise ConfigError(f"node {node_name!r} has no 'backend' key")
    return merged


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
    tree, triton = resolve_stages(where, raw, base)
    settings = node_settings(where, triton)
    links = parse_map(raw["map"], where) if "map" in raw else []
    return Node(node_name, tree, settings, next=_as_list(raw.get("next", []), f"{where}: next"), map=links)


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


def _predecessors(nodes: dict[str, Node]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in nodes}
    for node in nodes.values():
        for target in node.next:
            found[target].append(node.name)
    return found


def _link_maps(nodes: dict[str, Node]) -> None:
    """Name every map source and check it runs before the node that reads it (nodes in topological order)."""
    before: dict[str, set[str]] = {name: set() for name in nodes}
    for node in nodes.values():
        for target in node.next:
            before[target] |= before[node.name] | {node.name}
    predecessors = _predecessors(nodes)
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
        if links and DATA not in {link.target_key for link in links}:
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
