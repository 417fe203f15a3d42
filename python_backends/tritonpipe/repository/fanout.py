"""A graph that fans out, served: its two parts as models, and the orchestrator model that joins them.

The per-request part is served as ``NAME_per_request`` and the per-item part as
``NAME_per_item`` (each an ensemble, or a single model under that name); the orchestrator,
``NAME``, is what clients call.  It takes the per-request part's inputs and answers the per-item
part's outputs gathered one row per item (``[1, N, ...]`` for each request, N from 0 up), then
the per-request part's outputs but the items.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from ..contract import FanOutParams, GatheredOutput
from ..errors import ConfigError
from ..pipeline.fanout import FanOutSplit
from ..pipeline.graph import Graph
from ..spec import TensorSpec
from ..stages.base import DATA, RESULT
from .plan import Port, RepositoryPlan, plan_repository

#: requests one orchestrator instance takes at once (one image each)
ORCHESTRATOR_BATCH = 64
#: instances of the orchestrator: each answers its batch's requests at once, so two keep one busy while the other waits
ORCHESTRATOR_INSTANCES = 2


def plan_fan_out(graph: Graph, split: FanOutSplit) -> tuple[RepositoryPlan, tuple[RepositoryPlan, RepositoryPlan]]:
    """The repository's plan (every model of both parts, the orchestrator's ports) and the two parts' plans."""
    first = plan_repository(split.per_request)
    items, item_spec = _items(first, split)
    each = plan_repository(split.per_item, entry=item_spec)
    shared = (*first.models[0].peers, *each.models[0].peers)
    for model in (*first.models, *each.models):
        model.peers = shared  # the host's cores are shared out over both parts at once
    node = graph.nodes[split.node]
    entry_inputs = _entry_ports(first, inputs=True)
    passed = [port for port in _entry_ports(first, inputs=False) if port.name != items.name]
    gathered = [
        Port(port.name, TensorSpec(port.spec.dtype, (1, -1, *port.spec.shape[1:]), batched=True), port.key)
        for port in _entry_ports(each, inputs=False)
    ]
    clash = sorted({p.name for p in passed} & {p.name for p in gathered})
    if clash:
        raise ConfigError(
            f"the pipeline would answer two outputs named {clash[0]!r}: one per request and one per item "
            f"(from {split.node!r}); rename one model's output"
        )
    each_inputs = _entry_ports(each, inputs=True)
    if len(each_inputs) != 1:
        raise ConfigError(
            f"node {split.node!r} runs once per item and may take only the item, but its part reads "
            f"{', '.join(repr(p.name) for p in each_inputs)}"
        )
    if not each_inputs[0].spec.accepts(item_spec):
        raise ConfigError(
            f"node {split.node!r}: each item is {item_spec.describe()} (a row of {split.source}[{split.key}]), "
            f"but its first stage takes {each_inputs[0].spec.describe()}"
        )
    settings = node.settings
    params = FanOutParams(
        first=first.name, first_outputs=(*(p.name for p in passed), items.name), items=items.name,
        passed=tuple(p.name for p in passed), each=each.name, each_input=each_inputs[0].name,
        gathered=tuple(GatheredOutput(p.name, p.spec.dtype, tuple(p.spec.shape[2:])) for p in gathered),
        max_items=settings.max_items, truncate=settings.too_many == "truncate", deadline_ms=settings.deadline_ms,
    )
    plan = RepositoryPlan(
        name=graph.name, models=[*first.models, *each.models], ensemble_inputs=entry_inputs,
        ensemble_outputs=[*gathered, *passed], fan_out=params,
    )
    return plan, (first, each)


def _items(first: RepositoryPlan, split: FanOutSplit) -> tuple[Port, TensorSpec]:
    """The per-request part's output that holds the items, and what one item is (``[1, ...]``)."""
    key = DATA if split.key == RESULT else split.key
    models = [model for model in first.models if model.node == split.source]
    found = next(((m, p) for m in reversed(models) for p in m.outputs if p.key == key), None)
    if found is None:
        raise ConfigError(f"node {split.node!r}: for_each reads {split.source}[{split.key}], which node {split.source!r} does not give")
    model, port = found
    if first.needs_ensemble:
        tensor = f"{model.name}.{port.name}"
        public = next((p for p in first.ensemble_outputs if p.key == tensor), None)
        if public is None:
            raise ConfigError(
                f"node {split.node!r}: its items, {split.source}[{split.key}], must be an output of the nodes run per "
                f"request, but {split.source!r} also leads to other nodes; end that part with {split.source!r}"
            )
        port = Port(public.name, public.spec, public.key)
    spec = port.spec
    if not spec.batched or len(spec.shape) < 3 or spec.shape[0] != 1:
        raise ConfigError(
            f"node {split.node!r}: for_each runs once per row of {split.source}[{split.key}], which must be 1xNx... "
            f"(N items per request, as CropResizeTensor or Yolo11Post give them), but it is {spec.describe()}"
        )
    return port, TensorSpec(spec.dtype, (1, *spec.shape[2:]), batched=True)


def _entry_ports(plan: RepositoryPlan, inputs: bool) -> list[Port]:
    """What a part's entry (its ensemble, or its one model) takes or answers."""
    if plan.needs_ensemble:
        return list(plan.ensemble_inputs if inputs else plan.ensemble_outputs)
    model = plan.models[0]
    return list(model.inputs if inputs else model.outputs)


def orchestrator_config(
    plan: RepositoryPlan, parts: tuple[RepositoryPlan, RepositoryPlan], configs: dict[str, mc.ModelConfig]
) -> mc.ModelConfig:
    """The orchestrator's config: the per-request part's inputs, the answered outputs, and its plan as a parameter."""
    first, _ = parts
    entry = configs[first.name]
    config = mc.ModelConfig(name=plan.name, backend="python", max_batch_size=ORCHESTRATOR_BATCH)
    config.input.extend(entry.input)
    for tensor in config.input:
        tensor.allow_ragged_batch = True  # each request is answered on its own, never concatenated with others
    # the per-item answers first: they are the pipeline's result (pipe() reads the first output so)
    for gathered in plan.fan_out.gathered:
        out = config.output.add(name=gathered.name, data_type=mc.DataType.Value(f"TYPE_{gathered.dtype}"))
        out.dims.extend([-1, *gathered.dims])
    by_name = {o.name: o for o in entry.output}
    for name in plan.fan_out.passed:
        config.output.append(by_name[name])
    config.instance_group.add(count=ORCHESTRATOR_INSTANCES, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.dynamic_batching.SetInParent()  # a batch is what queued meanwhile; its requests are answered at once
    for key, value in plan.fan_out.encode().items():
        config.parameters[key].string_value = value
    return config
