"""The served peers: hand-written preprocessing models in front of the pack's model stage.

``baseline`` is the PIL model a Triton user writes first (one image per call, CPU instances);
``dali-served`` is Triton + DALI as users run it (DALI's classifier pipeline in a GPU model, one
DALI run per batch at prefetch depth 1, as Triton's DALI backend runs it).  Their models join the
repository built for the pipeline, so every ensemble shares one model-stage model (the same
file, instances and batching) and they differ only before it.  ``floor`` is no peer but a
yardstick: a Python model with the pipeline's signature that does no work (see ``floor_model.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ...errors import ConfigError
from ...repository.generate import ModelFiles
from ...repository.plan import RepositoryPlan

ENSEMBLE = "baseline"
PRE = "baseline_pre"
MODEL_SOURCE = Path(__file__).with_name("pil_model.py")

FLOOR = "python_floor"
FLOOR_SOURCE = Path(__file__).with_name("floor_model.py")
#: the output types ``floor_model.py`` answers zeros of
FLOOR_TYPES = {mc.TYPE_BOOL, mc.TYPE_UINT8, mc.TYPE_INT8, mc.TYPE_INT16, mc.TYPE_INT32, mc.TYPE_INT64, mc.TYPE_FP16,
               mc.TYPE_FP32, mc.TYPE_FP64, mc.TYPE_BF16}

DALI_ENSEMBLE = "dali_served"
DALI_PRE = "dali_served_pre"
DALI_SOURCE = Path(__file__).with_name("dali_model.py")
#: DALI's default share for the hardware JPEG engines, and the one its users keep
DALI_HW_DECODER_LOAD = 0.65


@dataclass
class Peer:
    """A served peer's models: its ensemble, its preprocessing model and the shared model-stage model."""

    ensemble: str
    pre: str
    model: str

    @property
    def models(self) -> list[str]:
        return [self.ensemble, self.pre, self.model]


def model_stage_name(plan: RepositoryPlan, system: str = "baseline") -> str:
    """The repository's one model-stage model, by its Triton name (``system`` names the peer in errors)."""
    names = [m.name for m in plan.models if m.is_model_stage]
    if len(names) != 1:
        raise ConfigError(
            f"the {system} system needs a pipeline with exactly one model stage, this one has {len(names)}; "
            f"leave {system!r} out of --systems (--systems ensemble,floor,inprocess measures any pipeline)"
        )
    return names[0] if plan.needs_ensemble else plan.name


def _image_size(
    plan: RepositoryPlan, configs: dict[str, mc.ModelConfig], model: str, system: str = "baseline"
) -> tuple[int, int]:
    """(height, width) the model stage takes: its own dims, else what the pack's step feeds it."""
    config = configs[model]
    first = config.input[0]
    if first.data_type != mc.TYPE_FP32 or len(first.dims) != 3 or first.dims[0] not in (3, -1):
        raise ConfigError(
            f"the {system} system makes FP32 [3,H,W] images, but {model!r} takes "
            f"{mc.DataType.Name(first.data_type)}{list(first.dims)}"
        )
    height, width = first.dims[1], first.dims[2]
    if (height < 0 or width < 0) and plan.needs_ensemble:
        feed = next(s for s in plan.steps if s.model == model).input_map[first.name]
        for step in plan.steps:
            for port, tensor in step.output_map.items():
                dims = next((o.dims for o in configs[step.model].output if o.name == port), [])
                if tensor == feed and len(dims) == 3:
                    height, width = dims[1], dims[2]
    if height < 0 or width < 0:
        raise ConfigError(f"cannot tell the image size {model!r} takes; give its model fixed H and W")
    return int(height), int(width)


def _pre_config(name: str, batch: int, height: int, width: int) -> mc.ModelConfig:
    """A preprocessing model's config: JPEG bytes in, FP32 [3,H,W] out."""
    pre = mc.ModelConfig(name=name, backend="python", max_batch_size=batch)
    pre.input.add(name="INPUT", data_type=mc.TYPE_UINT8, dims=[-1])
    pre.output.add(name="OUTPUT", data_type=mc.TYPE_FP32, dims=[3, height, width])
    pre.parameters["height"].string_value = str(height)
    pre.parameters["width"].string_value = str(width)
    return pre


def _ensemble(name: str, pre: str, model_config: mc.ModelConfig) -> mc.ModelConfig:
    """The ensemble of ``pre`` and the shared model-stage model."""
    ensemble = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=model_config.max_batch_size)
    ensemble.input.add(name="INPUT", data_type=mc.TYPE_UINT8, dims=[-1])
    for output in model_config.output:
        ensemble.output.add().CopyFrom(output)
    first = ensemble.ensemble_scheduling.step.add(model_name=pre, model_version=-1)
    first.input_map["INPUT"] = "INPUT"
    first.output_map["OUTPUT"] = f"{pre}.OUTPUT"
    second = ensemble.ensemble_scheduling.step.add(model_name=model_config.name, model_version=-1)
    second.input_map[model_config.input[0].name] = f"{pre}.OUTPUT"
    for output in model_config.output:
        second.output_map[output.name] = output.name
    return ensemble


def baseline_configs(model_config: mc.ModelConfig, height: int, width: int, instances: int) -> dict[str, mc.ModelConfig]:
    """Configs of the PIL preprocessing model and the ensemble joining it to ``model_config``."""
    pre = _pre_config(PRE, max(model_config.max_batch_size, 1), height, width)
    pre.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    return {PRE: pre, ENSEMBLE: _ensemble(ENSEMBLE, PRE, model_config)}


def dali_served_configs(
    model_config: mc.ModelConfig, height: int, width: int, instances: int, cores: int
) -> dict[str, mc.ModelConfig]:
    """Configs of the DALI preprocessing model and the ensemble joining it to ``model_config``.

    The DALI model has ``instances`` GPU instances, the model stage's batch size and batching,
    ragged JPEG inputs (requests of any length batch together) and the host's cores shared out
    among its instances as DALI threads.
    """
    pre = _pre_config(DALI_PRE, max(model_config.max_batch_size, 1), height, width)
    pre.input[0].allow_ragged_batch = True
    pre.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    pre.dynamic_batching.CopyFrom(model_config.dynamic_batching)
    pre.parameters["hw_decoder_load"].string_value = str(DALI_HW_DECODER_LOAD)
    pre.parameters["threads"].string_value = str(max(2, cores // max(instances, 1)))
    pre.parameters["output_device"].string_value = "cpu"
    return {DALI_PRE: pre, DALI_ENSEMBLE: _ensemble(DALI_ENSEMBLE, DALI_PRE, model_config)}


def add_baseline(
    plan: RepositoryPlan, configs: dict[str, mc.ModelConfig], instances: int | None = None
) -> tuple[Peer, dict[str, mc.ModelConfig], ModelFiles]:
    """The baseline's two models for the repository built from ``plan``: their configs and files.

    Nothing is written; the caller adds them (and the shared model-stage model) to the
    repository it writes.
    """
    model = model_stage_name(plan)
    clash = {PRE, ENSEMBLE} & set(configs)
    if clash:
        raise ConfigError(f"the pipeline already has models named {sorted(clash)}; rename the pipeline")
    height, width = _image_size(plan, configs, model)
    models = baseline_configs(configs[model], height, width, instances or os.cpu_count() or 1)
    return Peer(ENSEMBLE, PRE, model), models, {PRE: {"model.py": MODEL_SOURCE}}


def add_dali_served(
    plan: RepositoryPlan, configs: dict[str, mc.ModelConfig], instances: int | None = None
) -> tuple[Peer, dict[str, mc.ModelConfig], ModelFiles]:
    """The ``dali-served`` peer's two models for the repository built from ``plan``; nothing is written.

    ``instances``: the DALI model's instance count; by default the model stage's.
    """
    model = model_stage_name(plan, "dali-served")
    clash = {DALI_PRE, DALI_ENSEMBLE} & set(configs)
    if clash:
        raise ConfigError(f"the pipeline already has models named {sorted(clash)}; rename the pipeline")
    height, width = _image_size(plan, configs, model, "dali-served")
    instances = instances or sum(group.count for group in configs[model].instance_group) or 1
    models = dali_served_configs(configs[model], height, width, instances, os.cpu_count() or 1)
    return Peer(DALI_ENSEMBLE, DALI_PRE, model), models, {DALI_PRE: {"model.py": DALI_SOURCE}}


def floor_config(plan: RepositoryPlan, configs: dict[str, mc.ModelConfig]) -> mc.ModelConfig:
    """The ``floor`` model's config: the entry's inputs and outputs; the instances, batch size and batching
    of the model that takes the requests first (the entry itself, or an ensemble's first step)."""
    entry = configs[plan.name]
    front = configs[plan.steps[0].model] if plan.needs_ensemble and plan.steps else entry
    floor = mc.ModelConfig(name=FLOOR, backend="python", max_batch_size=entry.max_batch_size)
    for spec in entry.input:
        added = floor.input.add()
        added.CopyFrom(spec)
        # requests of any length batch together, as they do in front of a pipeline that takes encoded images
        added.allow_ragged_batch = added.allow_ragged_batch or any(d < 0 for d in spec.dims)
    for spec in entry.output:
        if spec.data_type not in FLOOR_TYPES:
            raise ConfigError(
                f"the floor answers zeros of numeric outputs; {spec.name!r} is {mc.DataType.Name(spec.data_type)}: "
                "leave 'floor' out of --systems"
            )
        floor.output.add().CopyFrom(spec)
    floor.instance_group.extend(front.instance_group)
    if front.HasField("dynamic_batching"):
        floor.dynamic_batching.CopyFrom(front.dynamic_batching)
    return floor


def add_floor(plan: RepositoryPlan, configs: dict[str, mc.ModelConfig]) -> tuple[dict[str, mc.ModelConfig], ModelFiles]:
    """The ``floor`` model for the repository built from ``plan``: its config and files; nothing is written."""
    if FLOOR in configs:
        raise ConfigError(f"the pipeline already has a model named {FLOOR!r}; rename the pipeline")
    return {FLOOR: floor_config(plan, configs)}, {FLOOR: {"model.py": FLOOR_SOURCE}}
