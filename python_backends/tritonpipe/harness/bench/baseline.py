"""The baseline system: a hand-written PIL preprocessing model in front of the pack's model stage.

Its models join the repository built for the pipeline, so both ensembles share one
model-stage model (the same file, instances and batching) and differ only before it.
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


@dataclass
class Baseline:
    ensemble: str
    pre: str
    model: str  # the shared model-stage model

    @property
    def models(self) -> list[str]:
        return [self.ensemble, self.pre, self.model]


def model_stage_name(plan: RepositoryPlan) -> str:
    """The repository's one model-stage model, by its Triton name."""
    names = [m.name for m in plan.models if m.is_model_stage]
    if len(names) != 1:
        raise ConfigError(
            f"the baseline needs a pipeline with exactly one model stage, this one has {len(names)}; "
            "leave 'baseline' out of --systems (--systems ensemble,inprocess measures a pipeline without a model stage)"
        )
    return names[0] if plan.needs_ensemble else plan.name


def _image_size(plan: RepositoryPlan, configs: dict[str, mc.ModelConfig], model: str) -> tuple[int, int]:
    """(height, width) the model stage takes: its own dims, else what the pack's step feeds it."""
    config = configs[model]
    first = config.input[0]
    if first.data_type != mc.TYPE_FP32 or len(first.dims) != 3 or first.dims[0] not in (3, -1):
        raise ConfigError(
            f"the baseline makes FP32 [3,H,W] images, but {model!r} takes "
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


def baseline_configs(model_config: mc.ModelConfig, height: int, width: int, instances: int) -> dict[str, mc.ModelConfig]:
    """Configs of the PIL preprocessing model and the ensemble joining it to ``model_config``."""
    batch = max(model_config.max_batch_size, 1)
    pre = mc.ModelConfig(name=PRE, backend="python", max_batch_size=batch)
    pre.input.add(name="INPUT", data_type=mc.TYPE_UINT8, dims=[-1])
    pre.output.add(name="OUTPUT", data_type=mc.TYPE_FP32, dims=[3, height, width])
    pre.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    pre.parameters["height"].string_value = str(height)
    pre.parameters["width"].string_value = str(width)

    ensemble = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=min(batch, model_config.max_batch_size))
    ensemble.input.add(name="INPUT", data_type=mc.TYPE_UINT8, dims=[-1])
    for output in model_config.output:
        ensemble.output.add().CopyFrom(output)
    first = ensemble.ensemble_scheduling.step.add(model_name=PRE, model_version=-1)
    first.input_map["INPUT"] = "INPUT"
    first.output_map["OUTPUT"] = f"{PRE}.OUTPUT"
    second = ensemble.ensemble_scheduling.step.add(model_name=model_config.name, model_version=-1)
    second.input_map[model_config.input[0].name] = f"{PRE}.OUTPUT"
    for output in model_config.output:
        second.output_map[output.name] = output.name
    return {PRE: pre, ENSEMBLE: ensemble}


def add_baseline(
    plan: RepositoryPlan, configs: dict[str, mc.ModelConfig], instances: int | None = None
) -> tuple[Baseline, dict[str, mc.ModelConfig], ModelFiles]:
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
    return Baseline(ENSEMBLE, PRE, model), models, {PRE: {"model.py": MODEL_SOURCE}}
