"""Model plans -> ``ModelConfig`` protobuf objects, and the checks Triton would make on load.

Configs are built with Triton's own schema (``tritonclient.grpc.model_config_pb2``) so that
every field name and enum is checked by protobuf itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..choices import DEVICES
from ..contract import ModelParams
from ..engines.base import NativeModel
from ..errors import ConfigError
from ..pipeline.settings import NodeSettings
from ..spec import ENCODED_IMAGE, TensorSpec
from .cores import host_cores, share_cores
from .plan import ModelPlan, Port, RepositoryPlan

#: engines whose model steps Triton can serve with its own backend (``--native``)
NATIVE = ("tensorrt", "onnxruntime")
#: the local response cache, which a model's ``response_cache`` needs on the server
RESPONSE_CACHE_FLAG = "--cache-config=local,size=268435456"
#: Triton's rate limiter, which reads the instances' priorities (``instance_affinity``)
RATE_LIMIT_FLAG = "--rate-limit=execution_count"
#: the priority of every instance but the first with ``instance_affinity``.  The rate limiter gives an idle
#: model's next batch to the idle instance with the fewest executions times its priority, so the first
#: instance (priority 1) takes batches whenever it is idle until it has run this many times as often
AFFINITY_PRIORITY = 1000


def data_type(spec: TensorSpec) -> int:
    return mc.DataType.Value(f"TYPE_{spec.dtype}")


def _tensor(message, port: Port) -> None:
    message.name = port.name
    message.data_type = data_type(port.spec)
    message.dims.extend(port.spec.triton_dims)


def _set_param(config: mc.ModelConfig, key: str, value: str) -> None:
    config.parameters[key].string_value = value


def python_model_config(model: ModelPlan, device: str, plugins: list[str], terminal: bool = False) -> mc.ModelConfig:
    """The config of one generic Python-backend model running ``model.tree``.

    ``terminal``: no other model reads this model's outputs, so they only go back to clients.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    config = mc.ModelConfig(name=model.name, backend="python", max_batch_size=model.settings.max)
    for port in model.inputs:
        _tensor(config.input.add(), port)
        if port.spec == ENCODED_IMAGE:
            # encoded files differ in length; each request then arrives as its own [1, nbytes] tensor
            config.input[-1].allow_ragged_batch = True
    for port in model.outputs:
        _tensor(config.output.add(), port)

    if model.wants_gpu and device != "cpu":
        kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_AUTO
        _instance_groups(config, model.settings, kind)
        # GPU tensors from the previous step arrive on the GPU instead of being copied to the host
        _set_param(config, "FORCE_CPU_ONLY_INPUT_TENSORS", "no")
    else:
        config.instance_group.add(count=model.settings.instance_num, kind=mc.ModelInstanceGroup.KIND_CPU)
    _schedule(config, model)

    on_gpu = config.instance_group[0].kind != mc.ModelInstanceGroup.KIND_CPU
    params = ModelParams(
        pipeline=model.tree.render(),
        inputs={p.name: p.key for p in model.inputs},
        outputs={p.name: p.key for p in model.outputs},
        plugins=list(plugins),
        warmup=model.settings.warmup if on_gpu else None,
        # responses go to the client through host memory anyway: one copy per batch is
        # cheaper than Triton fetching each response's GPU tensor on its own
        host_outputs=on_gpu and terminal,
        execution_timeout=model.settings.execution_timeout,
        # decided over every model at once: each instance is a process with threads of its own
        cores=share_cores(model.peers, device, host_cores()).get(model.name),
        # the tail thread answers through response senders; GPU tensors for the next model stay on execute's return
        overlap=model.settings.overlap and (terminal or not on_gpu),
        gpu_wait=model.settings.gpu_wait if on_gpu else "spin",
        pin_inputs=model.settings.pin_inputs and on_gpu,
    )
    for key, value in params.encode().items():
        _set_param(config, key, value)
    return config


def native_model_config(model: ModelPlan, native: NativeModel, device: str) -> mc.ModelConfig:
    """The config of a model step served by Triton's own TensorRT or ONNX Runtime backend."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    max_batch = native.max_batch or model.settings.max
    if model.settings.max > max_batch:
        raise ConfigError(
            f"model {model.name!r}: max={model.settings.max} exceeds the plan's largest profile batch {max_batch}; "
            "rebuild the plan with a larger --max or lower max"
        )
    config = mc.ModelConfig(
        name=model.name, platform=native.platform, default_model_filename=native.filename, max_batch_size=max_batch
    )
    for port in model.inputs:
        _tensor(config.input.add(), port)
    for port in model.outputs:
        _tensor(config.output.add(), port)
    if native.platform == "tensorrt_plan" and device == "cpu":
        raise ConfigError(f"model {model.name!r}: a TensorRT plan needs a GPU; drop --device cpu or --native tensorrt")
    if device == "cpu":
        config.instance_group.add(count=model.settings.instance_num, kind=mc.ModelInstanceGroup.KIND_CPU)
    elif native.platform == "tensorrt_plan" or device == "gpu":
        _instance_groups(config, model.settings, mc.ModelInstanceGroup.KIND_GPU)
    else:
        _instance_groups(config, model.settings, mc.ModelInstanceGroup.KIND_AUTO)
    _schedule(config, model)
    if native.cuda_graphs:
        config.optimization.cuda.graphs = True
    return config


def _instance_groups(config: mc.ModelConfig, settings: NodeSettings, kind: int) -> None:
    """Triton's ``count`` is per listed GPU: uneven counts need one group per GPU."""
    if settings.gpu_instances:
        for gpu, count in settings.gpu_instances:
            config.instance_group.add(count=count, kind=kind, gpus=[gpu])
    else:
        config.instance_group.add(count=settings.instance_num, kind=kind, gpus=settings.gpus)


def _schedule(config: mc.ModelConfig, model: ModelPlan) -> None:
    """Dynamic batching, queue policy, priorities and the response cache of one composing model."""
    settings = model.settings
    too_big = [size for size in settings.preferred_batch_sizes if size > config.max_batch_size]
    if too_big:
        raise ConfigError(
            f"model {model.name!r}: preferred_batch_size {too_big[0]} exceeds its max_batch_size {config.max_batch_size}"
        )
    if config.max_batch_size > 1 or settings.queue_policy or settings.preferred_batch_sizes:
        batching = config.dynamic_batching
        batching.max_queue_delay_microseconds = int(round(settings.batching_timeout * 1000))
        batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
        if settings.priority_levels:
            batching.priority_levels = settings.priority_levels
            batching.default_priority_level = settings.default_priority_level or settings.priority_levels
        if settings.queue_policy:
            policy = batching.default_queue_policy
            policy.max_queue_size = settings.max_queue_size
            policy.default_timeout_microseconds = int(round(settings.queue_timeout * 1000))
            policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.Value(settings.timeout_action.upper())
            policy.allow_timeout_override = settings.allow_timeout_override
    if settings.response_cache:
        config.response_cache.enable = True
    if _wants_affinity(settings.instance_affinity, config):
        _prefer_first_instance(config)


def _wants_affinity(setting: str, config: mc.ModelConfig) -> bool:
    """``instance_affinity`` for this model: true, false, or auto (on where its instances run on a GPU: GPU
    groups, or Triton's choice on a host where torch sees a GPU).  With 8 GPU instances on an H100 it took
    p50 at concurrency 1 from 3.07 to 2.40 ms and cost 0-3% of the throughput at 128 and 256."""
    if setting != "auto":
        return setting == "true"
    kinds = {group.kind for group in config.instance_group}
    if kinds == {mc.ModelInstanceGroup.KIND_GPU}:
        return True
    return kinds == {mc.ModelInstanceGroup.KIND_AUTO} and _gpu_visible()


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _prefer_first_instance(config: mc.ModelConfig) -> None:
    """The first instance in a group of its own at priority 1 (on the first GPU its group lists), every other
    instance at :data:`AFFINITY_PRIORITY`; one instance in all needs nothing."""
    groups = list(config.instance_group)
    first = groups[0]
    if len(groups) == 1 and first.count == 1 and len(first.gpus) <= 1:
        return

    def part(group: mc.ModelInstanceGroup, count: int, gpus) -> mc.ModelInstanceGroup:
        copy = mc.ModelInstanceGroup()
        copy.CopyFrom(group)
        copy.count = count
        del copy.gpus[:]
        copy.gpus.extend(gpus)
        return copy

    split = [part(first, 1, first.gpus[:1])]
    if first.count > 1:
        split.append(part(first, first.count - 1, first.gpus[:1]))
    if len(first.gpus) > 1:
        split.append(part(first, first.count, first.gpus[1:]))
    split += [part(group, group.count, group.gpus) for group in groups[1:]]
    del config.instance_group[:]
    for index, group in enumerate(split):
        group.rate_limiter.priority = 1 if index == 0 else AFFINITY_PRIORITY
        config.instance_group.append(group)


def server_flags(configs: Iterable[mc.ModelConfig]) -> list[str]:
    """The ``tritonserver`` flags these models need: the response cache, the rate limiter."""
    configs = list(configs)
    flags = []
    if any(config.response_cache.enable for config in configs):
        flags.append(RESPONSE_CACHE_FLAG)
    if any(group.HasField("rate_limiter") for config in configs for group in config.instance_group):
        flags.append(RATE_LIMIT_FLAG)
    return flags


def ensemble_config(plan: RepositoryPlan, configs: dict[str, mc.ModelConfig]) -> mc.ModelConfig:
    config = mc.ModelConfig(
        name=plan.name,
        platform="ensemble",
        max_batch_size=min(configs[step.model].max_batch_size for step in plan.steps),
    )
    if all(configs[step.model].response_cache.enable for step in plan.steps):
        # every step would cache: one entry per request at the ensemble answers it before any step runs
        config.response_cache.enable = True
        for step in plan.steps:
            configs[step.model].ClearField("response_cache")
    for port in plan.ensemble_inputs:
        _tensor(config.input.add(), port)
    for port in plan.ensemble_outputs:
        _tensor(config.output.add(), port)
    # tensors clients receive go by their public names, also where a later step reads them (map)
    public = {port.key: port.name for port in plan.ensemble_outputs}
    for step in plan.steps:
        message = config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        for model_input, tensor in step.input_map.items():
            message.input_map[model_input] = public.get(tensor, tensor)
        for model_output, tensor in step.output_map.items():
            message.output_map[model_output] = public.get(tensor, tensor)
    return config


def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def from_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _io_table(config: mc.ModelConfig, field: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {t.name: (t.data_type, tuple(t.dims)) for t in getattr(config, field)}


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x < 0 or y < 0 or x == y for x, y in zip(a, b))


def validate_repository(configs: dict[str, mc.ModelConfig]) -> None:
    """Reject what would make Triton refuse the repository; ``ConfigError`` says what and where."""
    for name, config in configs.items():
        if config.name != name:
            raise ConfigError(f"model folder {name!r} holds a config named {config.name!r}")
        if config.max_batch_size < 0:
            raise ConfigError(f"model {name!r}: max_batch_size must be >= 0, got {config.max_batch_size}")
        for tensor in list(config.input) + list(config.output):
            if not tensor.dims:
                raise ConfigError(f"model {name!r}: tensor {tensor.name!r} has no dims")
            if any(d == 0 or d < -1 for d in tensor.dims):
                raise ConfigError(f"model {name!r}: tensor {tensor.name!r} has invalid dims {list(tensor.dims)}")
        if config.platform == "ensemble":
            _validate_ensemble(config, configs)


def _validate_ensemble(config: mc.ModelConfig, configs: dict[str, mc.ModelConfig]) -> None:
    where = f"ensemble {config.name!r}"
    available = _io_table(config, "input")
    for index, step in enumerate(config.ensemble_scheduling.step):
        composing = configs.get(step.model_name)
        if composing is None:
            raise ConfigError(f"{where}: step {index} names model {step.model_name!r}, which is not in the repository")
        if composing.max_batch_size < config.max_batch_size:
            raise ConfigError(
                f"{where}: max_batch_size {config.max_batch_size} exceeds {step.model_name!r}'s "
                f"{composing.max_batch_size}; lower the ensemble's or raise the model's 'max'"
            )
        inputs, outputs = _io_table(composing, "input"), _io_table(composing, "output")
        for model_input, tensor in step.input_map.items():
            if model_input not in inputs:
                raise ConfigError(f"{where}: {step.model_name!r} has no input {model_input!r}")
            if tensor not in available:
                raise ConfigError(f"{where}: tensor {tensor!r} is used by {step.model_name!r} before anything produces it")
            if available[tensor][0] != inputs[model_input][0] or not _dims_match(available[tensor][1], inputs[model_input][1]):
                have = f"{mc.DataType.Name(available[tensor][0])}{list(available[tensor][1])}"
                need = f"{mc.DataType.Name(inputs[model_input][0])}{list(inputs[model_input][1])}"
                raise ConfigError(f"{where}: {step.model_name!r} input {model_input!r} needs {need} but gets {have}")
        missing = set(inputs) - set(step.input_map)
        if missing:
            raise ConfigError(f"{where}: {step.model_name!r} inputs {sorted(missing)} are not fed")
        for model_output, tensor in step.output_map.items():
            if model_output not in outputs:
                raise ConfigError(f"{where}: {step.model_name!r} has no output {model_output!r}")
            if tensor in available:
                raise ConfigError(f"{where}: tensor {tensor!r} is produced twice")
            available[tensor] = outputs[model_output]
    for tensor in config.output:
        if tensor.name not in available:
            raise ConfigError(f"{where}: output {tensor.name!r} is never produced")
        if available[tensor.name][0] != tensor.data_type or not _dims_match(available[tensor.name][1], tuple(tensor.dims)):
            raise ConfigError(f"{where}: output {tensor.name!r} type or shape differs from its producer")
