"""A graph that fans out, cut in two: the nodes run once per request, and the nodes run once per item.

A node with ``for_each = true`` runs once per row of its data: the rows of what its data source
gives (``crops`` in ``detect -> crops -> classify``, where ``classify`` has ``for_each``).
Everything from that node on runs per item; everything before it runs per request.  The
generator serves each part as it serves any graph and joins them with an orchestrator model
(see :mod:`tritonpipe.model.fanout`).

Rules, checked here with the offending node named:

- one node of a graph has ``for_each``, and it is not the entry node;
- the per-item nodes are that node and the nodes after it; none of them reads (``map``) a
  per-request node except the ``for_each`` node itself, whose ``data`` is the items; it reads
  nothing else from the per-request part;
- no per-request node names a per-item node in ``next`` except the items' source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..stages.base import DATA, RESULT
from .graph import Graph, MapLink, Node


@dataclass
class FanOutSplit:
    """The two parts of a graph that fans out.

    Attributes:
        per_request: the nodes run once per request; the items' source is among its ends.
        per_item: the nodes run once per item, the ``for_each`` node first.
        node: the ``for_each`` node's name.
        source: the node whose output holds the items, and ``key``, that output's item key.
    """

    per_request: Graph
    per_item: Graph
    node: str
    source: str
    key: str


def split_fan_out(graph: Graph) -> FanOutSplit | None:
    """The graph's two parts, or None when no node has ``for_each``."""
    fanning = [node for node in graph.nodes.values() if node.settings.for_each]
    if not fanning:
        return None
    if len(fanning) > 1:
        raise ConfigError(
            f"nodes {', '.join(repr(n.name) for n in fanning)} all have for_each; one node of a pipeline may fan out"
        )
    node = fanning[0]
    where = f"node {node.name!r}"
    predecessors = graph.predecessors()
    if node.name == graph.entry.name:
        raise ConfigError(f"{where}: for_each needs items from a node before it, but it is the entry node")
    source, key = _items_source(node, predecessors[node.name], where)
    per_item_names = _after(graph, node.name)
    for name in per_item_names:
        other = graph.nodes[name]
        for link in other.map:
            if link.source not in per_item_names and other is not node:
                raise ConfigError(
                    f"node {name!r} runs once per item (after {node.name!r}, which has for_each), but its map reads "
                    f"{link.source}[{link.source_key}], which runs once per request; route it through {node.name!r}"
                )
    for name, other in graph.nodes.items():
        if name in per_item_names:
            continue
        into = [target for target in other.next if target in per_item_names]
        if into and (name != source or into != [node.name]):
            raise ConfigError(
                f"node {name!r} runs once per request, but its next names {', '.join(map(repr, into))}, which runs once "
                f"per item (from {node.name!r}, which has for_each); only the items' source {source!r} may lead there"
            )
    per_request = {
        name: replace(n, next=[t for t in n.next if t not in per_item_names])
        for name, n in graph.nodes.items() if name not in per_item_names
    }
    per_item = {name: graph.nodes[name] for name in graph.nodes if name in per_item_names}
    per_item[node.name] = replace(node, map=[])
    return FanOutSplit(
        per_request=Graph(name=f"{graph.name}_per_request", nodes=per_request, plugins=graph.plugins),
        per_item=Graph(name=f"{graph.name}_per_item", nodes=per_item, plugins=graph.plugins),
        node=node.name, source=source, key=key,
    )


def _items_source(node: Node, predecessors: list[str], where: str) -> tuple[str, str]:
    """(node, item key) whose rows are the items: the map's ``data`` link, else the one predecessor's result."""
    if not node.map:
        if len(predecessors) != 1:
            raise ConfigError(
                f"{where}: for_each takes its items from one node; it has {len(predecessors)} predecessors "
                f"({', '.join(map(repr, predecessors))}): say which with map, e.g. map = \"{predecessors[0]}[result:data]\""
            )
        return predecessors[0], RESULT
    data: list[MapLink] = [link for link in node.map if link.target_key == DATA]
    others = [link for link in node.map if link.target_key != DATA]
    if others:
        link = others[0]
        raise ConfigError(
            f"{where}: with for_each the node reads only its items (data); its map also feeds "
            f"{link.target_key!r} from {link.source}[{link.source_key}]"
        )
    return data[0].source, data[0].source_key


def _after(graph: Graph, start: str) -> set[str]:
    """``start`` and every node reachable from it through ``next``."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.nodes[name].next)
    return seen
