"""A generated Python model's stage chain, built from its config as Triton's stub builds it.

The generic Triton model and the soak tool's in-process reference both run models through
this class, so the reference computes exactly what the server does.  Nothing here imports
Triton or tritonclient.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..pipeline.grammar import parse_backend
from ..repository.keys import PARAM_INPUTS, PARAM_OUTPUTS, PARAM_PIPELINE, PARAM_PLUGINS
from ..stages import build_stage, load_plugin
from ..stages.control import run_chain


class ModelRuntime:
    """Builds the chain of one generated model and shapes its outputs per request.

    Args:
        config: the model's config in Triton's JSON form.
        version_dir: the model's version folder (plugins and model files live there), or None.
        device: where the stages run.
    """

    def __init__(self, config: dict[str, Any], version_dir: Path | None, device: torch.device | str):
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if version_dir is not None:
            for plugin in json.loads(params.get(PARAM_PLUGINS, "[]")):
                load_plugin(version_dir / plugin)
        self.pipeline = params[PARAM_PIPELINE]
        #: Triton tensor name -> item key
        self.inputs: dict[str, str] = json.loads(params[PARAM_INPUTS])
        self.outputs: dict[str, str] = json.loads(params[PARAM_OUTPUTS])
        # a response tensor carries the request's batch dimension before the config's dims
        self.output_ranks = {o["name"]: len(o.get("dims", [])) + 1 for o in config.get("output", [])}
        self.root = build_stage(parse_backend(self.pipeline), device, version_dir)

    def run(self, items: list[dict[str, Any]]) -> None:
        """Run the chain; each item ends with its result under its output keys, or an ``error``."""
        run_chain([self.root], items)

    def output(self, item: dict[str, Any], name: str) -> torch.Tensor:
        """Output ``name`` of a finished item, shaped as the response carries it."""
        value = item[self.outputs[name]]
        if isinstance(value, (list, tuple)):  # a vector of per-image tensors (Tensor2Vector)
            value = torch.stack(list(value))
        if value.dim() == self.output_ranks[name] - 1:
            value = value.unsqueeze(0)
        return value.contiguous()
