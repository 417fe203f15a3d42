"""A validated graph -> the Triton models that serve it.

Each node's chain is cut where a model stage stands: the preprocessing stages on either
side become one fused Python model each, the model stage becomes a model of its own, and an
ensemble joins everything when there is more than one model.  Tensor descriptions are
propagated through every stage so that a type or shape mismatch is found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engines.base import TensorIO
from ..errors import ConfigError
from ..pipeline.graph import Graph, Node, NodeSettings
from ..pipeline.resolved import ResolvedStage
from ..spec import ENCODED_IMAGE, SpecError, TensorSpec
from ..stages.control import Sequential

PRIMARY_KEY = "data"


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

    @property
    def needs_ensemble(self) -> bool:
        return len(self.models) > 1


def _segments(tree: ResolvedStage, fuse: bool = False) -> list[tuple[bool, list[ResolvedStage]]]:
    """Split a node's top-level chain into (is_model, stages) runs; ``fuse`` keeps it whole."""
    chain = tree.children if tree.role == "sequence" else (tree,)
    segments: list[tuple[bool, list[ResolvedStage]]] = []
    for child in chain:
        if child.contains("model"):
            _check_model_branch(child)
        if child.contains("model") and not fuse:
            segments.append((True, [child]))
        elif segments and not segments[-1][0]:
            segments[-1][1].append(child)
        else:
            segments.append((False, [child]))
    return segments


def _check_model_branch(node: ResolvedStage) -> None:
    """A model stage may only be wrapped (SyncTensor[Torch[TensorrtTensor]]), not mixed with other work."""
    current = node
    while current.role != "model":
        if len(current.children) != 1:
            raise ConfigError(
                f"{current.name}[...] mixes a model stage with other stages; put the model stage in its own "
                "element of the chain, e.g. S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]"
            )
        current = current.children[0]


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


def plan_repository(graph: Graph) -> RepositoryPlan:
    """Cut every node into models, propagate descriptions, and wire the ensemble."""
    plan = RepositoryPlan(name=graph.name, models=[])
    produced: dict[str, tuple[str, TensorSpec]] = {}  # node name -> (ensemble tensor, spec) of its result
    plan.ensemble_inputs = [Port("INPUT", ENCODED_IMAGE, PRIMARY_KEY)]
    used_names: set[str] = set()
    terminal_ports: list[tuple[str, Port]] = []
    extra_ports: list[tuple[str, Port]] = []

    predecessors: dict[str, str] = {}
    for node in graph.nodes.values():
        for target in node.next:
            if target in predecessors:
                raise ConfigError(
                    f"node {target!r} has several predecessors ({predecessors[target]!r}, {node.name!r}); "
                    "each node takes one input"
                )
            predecessors[target] = node.name

    for node in graph.nodes.values():
        source_tensor, spec = produced.get(predecessors.get(node.name, ""), ("INPUT", ENCODED_IMAGE))
        segments = _segments(node.tree, node.settings.fuse)
        for index, (is_model, stages) in enumerate(segments):
            name = _segment_name(node, index, len(segments), is_model, used_names)
            if name in used_names:
                raise ConfigError(f"two models would be named {name!r}; rename a node")
            used_names.add(name)
            tree = _sequence(stages)
            try:
                model, spec = _plan_model(name, node, tree, spec, is_model)
            except SpecError as exc:
                raise ConfigError(f"node {node.name!r}, model {name!r}: {exc}") from None
            plan.models.append(model)
            step = Step(model=name, input_map={model.inputs[0].name: source_tensor}, output_map={})
            for port in model.outputs:
                tensor = f"{name}.{port.name}"
                step.output_map[port.name] = tensor
                if port.key != PRIMARY_KEY:
                    extra_ports.append((tensor, port))
            plan.steps.append(step)
            source_tensor = step.output_map[model.outputs[0].name]
        produced[node.name] = (source_tensor, spec)
        if not node.next:
            last = plan.models[-1]
            terminal_ports.append((source_tensor, last.outputs[0]))

    names: set[str] = set()
    for tensor, port in terminal_ports + extra_ports:
        public = port.name if len(terminal_ports) == 1 or port.key != PRIMARY_KEY else f"{tensor.split('.')[0]}_{port.name}"
        if public in names:
            public = tensor.replace(".", "_")
        names.add(public)
        plan.ensemble_outputs.append(Port(public, port.spec, tensor))
    return plan


def _plan_model(
    name: str, node: Node, tree: ResolvedStage, spec: TensorSpec, is_model: bool
) -> tuple[ModelPlan, TensorSpec]:
    wants_gpu = any(n.cls.wants_gpu for n in tree.walk())
    if is_model:
        stage = tree.find("model")
        model_inputs, model_outputs = stage.cls.io(dict(stage.params))
        if len(model_inputs) != 1:
            raise ConfigError(
                f"node {node.name!r}: the model has {len(model_inputs)} inputs "
                f"({', '.join(io.name for io in model_inputs)}); a pipeline step feeds exactly one"
            )
        out_spec = infer_tree(tree, spec)
        inputs = [Port(model_inputs[0].name, model_inputs[0].spec, PRIMARY_KEY)]
        outputs = [Port(model_outputs[0].name, model_outputs[0].spec, PRIMARY_KEY)]
        outputs += [Port(io.name, io.spec, io.name) for io in model_outputs[1:]]
        return ModelPlan(name, node.name, tree, node.settings, inputs, outputs, wants_gpu, True), out_spec
    out_spec = infer_tree(tree, spec)
    inputs = [Port("INPUT", spec, PRIMARY_KEY)]
    primary = "OUTPUT"
    stage = tree.find("model")
    if stage is not None:  # a fused model stage keeps its model's output names
        primary = stage.cls.io(dict(stage.params))[1][0].name
    outputs = [Port(primary, out_spec, PRIMARY_KEY)]
    outputs += [Port(key, extra, key) for key, extra in extra_outputs(tree).items()]
    return ModelPlan(name, node.name, tree, node.settings, inputs, outputs, wants_gpu, False), out_spec


__all__ = ["ModelPlan", "Port", "RepositoryPlan", "Step", "TensorIO", "plan_repository"]
