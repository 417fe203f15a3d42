"""A validated graph -> the Triton models that serve it.

Each node's chain is cut where a model stage stands: the preprocessing stages on either
side become one fused Python model each, the model stage becomes a model of its own, and an
ensemble joins everything when there is more than one model.  Tensor descriptions are
propagated through every stage so that a type or shape mismatch is found here.

The pipeline's input is what its first stage takes (:meth:`Stage.entry_spec`): encoded images
for decoders, a model's first input for a model stage.  A model's other inputs are read by
name, from a node's ``map`` or else from the request, which then carries them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from ..contract import FanOutParams
from ..engines.base import TensorIO
from ..errors import ConfigError
from ..pipeline.graph import Graph, Node
from ..pipeline.resolved import ResolvedStage, Role
from ..pipeline.settings import NodeSettings
from ..registry import did_you_mean
from ..spec import SpecError, TensorSpec
from ..stages.base import DATA, RESULT
from ..stages.control import Sequential
from .cores import Workers

#: the Triton name of a preprocessing model's primary input
PYTHON_INPUT = "INPUT"


@dataclass
class Port:
    """A model input or output: its Triton name, description, and the item key it maps to."""

    name: str
    spec: TensorSpec
    key: str


@dataclass
class ModelPlan:
    name: str
    node: str
    tree: ResolvedStage  # always a Sequential
    settings: NodeSettings
    inputs: list[Port]
    outputs: list[Port]
    wants_gpu: bool
    is_model_stage: bool
    #: every model of the repository, among which the host's cores are shared out
    peers: tuple[Workers, ...] = ()


@dataclass
class Step:
    model: str
    input_map: dict[str, str]  # model input -> ensemble tensor
    output_map: dict[str, str]  # model output -> ensemble tensor


@dataclass
class RepositoryPlan:
    name: str
    models: list[ModelPlan]
    steps: list[Step] = field(default_factory=list)
    ensemble_inputs: list[Port] = field(default_factory=list)
    ensemble_outputs: list[Port] = field(default_factory=list)
    #: for a graph that fans out: the orchestrator's plan (the entry model; no ensemble then)
    fan_out: FanOutParams | None = None

    @property
    def needs_ensemble(self) -> bool:
        return len(self.models) > 1 and self.fan_out is None


def _segments(tree: ResolvedStage, fuse: bool = False) -> list[tuple[bool, list[ResolvedStage]]]:
    """Split a node's top-level chain into (is_model, stages) runs; ``fuse`` keeps it whole."""
    chain = tree.children if tree.role == Role.SEQUENCE else (tree,)
    segments: list[tuple[bool, list[ResolvedStage]]] = []
    for child in chain:
        if child.contains(Role.MODEL):
            _check_model_branch(child)
        if child.contains(Role.MODEL) and not fuse:
            segments.append((True, [child]))
        elif segments and not segments[-1][0]:
            segments[-1][1].append(child)
        else:
            segments.append((False, [child]))
    return segments


def _check_model_branch(node: ResolvedStage) -> None:
    """A model stage may only be wrapped (SyncTensor[Torch[TensorrtTensor]]), not mixed with other work."""
    current = node
    while current.role != Role.MODEL:
        if len(current.children) != 1:
            raise ConfigError(
                f"{current.name}[...] mixes a model stage with other stages; put the model stage in its own "
                "element of the chain, e.g. S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]"
            )
        current = current.children[0]


def entry_spec(tree: ResolvedStage) -> TensorSpec:
    """What a chain takes as ``data``: the first stage's :meth:`~Stage.entry_spec`, past wrappers."""
    node = tree
    while node.role in (Role.WRAPPER, Role.SEQUENCE) and node.children:
        node = node.children[0]
    return node.cls.entry_spec(dict(node.params))


def named_inputs(tree: ResolvedStage, available: Collection[str] = ()) -> list[TensorIO]:
    """Inputs besides ``data`` that the stages of a chain read from their items, by name.

    A model stage's other inputs, what other stages declare (:meth:`Stage.extra_inputs`), and
    those of their optional inputs (:meth:`Stage.optional_inputs`) among ``available``.
    """
    ios: list[TensorIO] = []
    for node in tree.walk():
        if node.role == Role.MODEL:
            ios += node.cls.io(dict(node.params))[0][1:]
            continue
        params = dict(node.params)
        ios += [TensorIO(key, spec) for key, spec in node.cls.extra_inputs(params).items()]
        ios += [TensorIO(key, spec) for key, spec in node.cls.optional_inputs(params).items() if key in available]
    return ios


def infer_tree(node: ResolvedStage, spec: TensorSpec) -> TensorSpec:
    """Propagate a tensor description through a stage tree."""
    for child in node.children:
        spec = infer_tree(child, spec)
    return node.cls.infer(dict(node.params), spec)


def extra_outputs(node: ResolvedStage) -> dict[str, TensorSpec]:
    extras: dict[str, TensorSpec] = {}
    for n in node.walk():
        extras.update(n.cls.extra_outputs(dict(n.params)))
    return extras


def _sequence(children: list[ResolvedStage]) -> ResolvedStage:
    return ResolvedStage(Sequential, {}, tuple(children))


def _segment_name(node: Node, index: int, count: int, is_model: bool, used: set[str]) -> str:
    if count == 1:
        return node.name
    base = f"{node.name}_{'model' if is_model else 'pre' if index == 0 else 'post'}"
    name, suffix = base, 2
    while name in used:
        name, suffix = f"{base}{suffix}", suffix + 1
    return name


def plan_repository(graph: Graph, entry: TensorSpec | None = None) -> RepositoryPlan:
    """Cut every node into models, propagate descriptions, and wire the ensemble.

    ``entry`` is what the request brings as the entry node's ``data``; None: what its first stage
    takes (:func:`entry_spec`).  The per-item part of a graph that fans out is fed items.
    """
    plan = RepositoryPlan(name=graph.name, models=[])
    #: node name -> its outputs by item key ("result" and extra outputs): (ensemble tensor, spec)
    produced: dict[str, dict[str, tuple[str, TensorSpec]]] = {}
    requested: dict[str, Port] = {}  # ensemble inputs by name
    used_names: set[str] = set()
    terminal_ports: list[tuple[str, Port]] = []
    extra_ports: list[tuple[str, Port]] = []
    predecessors = _predecessors(graph)

    for node in graph.nodes.values():
        fed = _node_inputs(node, predecessors[node.name], produced)
        segments = _segments(node.tree, node.settings.fuse)
        outputs: dict[str, tuple[str, TensorSpec]] = {}
        read_by_name: set[str] = set()
        for index, (is_model, stages) in enumerate(segments):
            name = _segment_name(node, index, len(segments), is_model, used_names)
            if name in used_names:
                raise ConfigError(f"two models would be named {name!r}; rename a node")
            used_names.add(name)
            tree = _sequence(stages)
            try:
                if fed is None:  # the pipeline's entry: the request brings what the first stage takes
                    fed = {DATA: ("", entry or entry_spec(tree))}
                model, spec = _plan_model(name, node, tree, fed[DATA][1], is_model, available=set(fed))
            except SpecError as exc:
                raise ConfigError(f"node {node.name!r}, model {name!r}: {exc}") from None
            plan.models.append(model)
            step = Step(model=name, input_map={}, output_map={})
            for port in model.inputs:
                read_by_name.add(port.key)
                step.input_map[port.name] = _input_tensor(node, port, fed, requested, plan)
            for port in model.outputs:
                tensor = f"{name}.{port.name}"
                step.output_map[port.name] = tensor
                if port.key != DATA:
                    extra_ports.append((tensor, port))
                    outputs[port.key] = (tensor, port.spec)
            plan.steps.append(step)
            # the node's later models read what its earlier ones wrote (a letterbox's inverse_transform)
            fed = {**fed, **outputs, DATA: (step.output_map[model.outputs[0].name], spec)}
        unread = sorted({link.target_key for link in node.map} - read_by_name)
        if unread:
            raise ConfigError(
                f"node {node.name!r}: map feeds {', '.join(map(repr, unread))}, which no stage of the node reads"
                f"{did_you_mean(unread[0], sorted(read_by_name - {DATA}))}; it reads "
                f"{', '.join(map(repr, sorted(read_by_name)))}"
            )
        produced[node.name] = {**outputs, RESULT: fed[DATA]}
        if not node.next:
            terminal_ports.append((fed[DATA][0], plan.models[-1].outputs[0]))
    plan.ensemble_inputs = list(requested.values())
    peers = tuple(Workers(model.name, model.settings, model.wants_gpu) for model in plan.models)
    for model in plan.models:
        model.peers = peers

    names: set[str] = set()
    for tensor, port in terminal_ports + extra_ports:
        public = port.name if len(terminal_ports) == 1 or port.key != DATA else f"{tensor.split('.')[0]}_{port.name}"
        if public in names:
            public = tensor.replace(".", "_")
        names.add(public)
        plan.ensemble_outputs.append(Port(public, port.spec, tensor))
    both = sorted(names & set(requested))
    if both:
        raise ConfigError(f"the pipeline would have an input and an output both named {both[0]!r}; rename the model's")
    return plan


def _predecessors(graph: Graph) -> dict[str, list[str]]:
    """The graph's predecessors, once every node with several says which one gives its data."""
    found = graph.predecessors()
    for node in graph.nodes.values():
        if len(found[node.name]) > 1 and not node.map:
            raise ConfigError(
                f"node {node.name!r} has several predecessors ({', '.join(map(repr, found[node.name]))}); say which "
                f"gives its data with map, e.g. map = \"{found[node.name][0]}[result:data]\""
            )
    return found


def _node_inputs(
    node: Node, predecessors: list[str], produced: dict[str, dict[str, tuple[str, TensorSpec]]]
) -> dict[str, tuple[str, TensorSpec]] | None:
    """A node's inputs by item key: (ensemble tensor, spec); None for the entry node, fed by the request."""
    if not node.map:
        return {DATA: produced[predecessors[0]][RESULT]} if predecessors else None
    fed = {}
    for link in node.map:
        outputs = produced[link.source]
        if link.source_key not in outputs:
            raise ConfigError(
                f"node {node.name!r}: map reads {link.source}[{link.source_key}], but node {link.source!r} gives "
                f"{', '.join(map(repr, sorted(outputs)))}{did_you_mean(link.source_key, list(outputs))}"
            )
        fed[link.target_key] = outputs[link.source_key]
    return fed


def _input_tensor(
    node: Node, port: Port, fed: dict[str, tuple[str, TensorSpec]], requested: dict[str, Port], plan: RepositoryPlan
) -> str:
    """The ensemble tensor feeding ``port``: what the node is fed under its key, else an input of the request."""
    if port.key in fed and fed[port.key][0]:
        tensor, spec = fed[port.key]
        if not port.spec.accepts(spec):
            raise ConfigError(
                f"node {node.name!r}: input {port.name!r} expects {port.spec.describe()}, but map gives it "
                f"{spec.describe()} from {tensor!r}"
            )
        return tensor
    known = requested.get(port.name)
    if known is not None and known.spec != port.spec:
        raise ConfigError(
            f"node {node.name!r}: request input {port.name!r} is {known.spec.describe()} for one model and "
            f"{port.spec.describe()} for another; rename one model's input"
        )
    requested[port.name] = port
    return port.name


def _plan_model(
    name: str, node: Node, tree: ResolvedStage, spec: TensorSpec, is_model: bool, available: Collection[str] = ()
) -> tuple[ModelPlan, TensorSpec]:
    wants_gpu = any(n.cls.wants_gpu for n in tree.walk())
    named = [Port(io.name, io.spec, io.name) for io in named_inputs(tree, available)]
    if is_model:
        stage = tree.find(Role.MODEL)
        model_inputs, model_outputs = stage.cls.io(dict(stage.params))
        out_spec = infer_tree(tree, spec)
        inputs = [Port(model_inputs[0].name, model_inputs[0].spec, DATA), *named]
        outputs = [Port(model_outputs[0].name, model_outputs[0].spec, DATA)]
        outputs += [Port(io.name, io.spec, io.name) for io in model_outputs[1:]]
        return ModelPlan(name, node.name, tree, node.settings, inputs, outputs, wants_gpu, True), out_spec
    out_spec = infer_tree(tree, spec)
    inputs = [Port(PYTHON_INPUT, spec, DATA), *named]
    taken = [port.name for port in inputs]
    if len(set(taken)) != len(taken):
        raise ConfigError(f"node {node.name!r}: model {name!r} would have two inputs named {PYTHON_INPUT!r}; rename the model's")
    primary = "OUTPUT"
    stage = tree.find(Role.MODEL)
    if stage is not None:  # a fused model stage keeps its model's output names
        primary = stage.cls.io(dict(stage.params))[1][0].name
    outputs = [Port(primary, out_spec, DATA)]
    outputs += [Port(key, extra, key) for key, extra in extra_outputs(tree).items()]
    return ModelPlan(name, node.name, tree, node.settings, inputs, outputs, wants_gpu, False), out_spec


__all__ = ["ModelPlan", "Port", "RepositoryPlan", "Step", "TensorIO", "plan_repository"]
