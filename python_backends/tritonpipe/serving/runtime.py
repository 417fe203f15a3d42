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
from ..pipeline.spec import TRITON_TO_TORCH
from ..repository.keys import PARAM_INPUTS, PARAM_OUTPUTS, PARAM_PIPELINE, PARAM_PLUGINS, PARAM_WARMUP
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
        self.input_configs = {i["name"]: i for i in config.get("input", [])}
        self.max_batch = int(config.get("max_batch_size", 0))
        self.warmup = params.get(PARAM_WARMUP, "")
        self.root = build_stage(parse_backend(self.pipeline), device, version_dir)

    def run(self, items: list[dict[str, Any]]) -> None:
        """Run the chain; each item ends with its result under its output keys, or an ``error``."""
        run_chain([self.root], items)

    def warm_up(self) -> tuple[int, str | None]:
        """Run the chain on sample requests at load, once per batch bucket, largest first.

        Every allocation a full batch needs (decoder buffers, the caching allocator's blocks, one
        CUDA graph per power-of-two batch) then happens before the first request, so memory stays
        flat while traffic grows and no request pays for a graph capture.  Encoded-image inputs get
        a synthetic JPEG of the configured size, other inputs zeros.  Returns the number of sample
        requests run and, if the chain refused the samples, why (the model still serves).
        """
        if not self.warmup:
            return 0, None
        from ..pipeline.graph import parse_warmup

        size = parse_warmup(self.warmup)
        if size is None:
            return 0, None
        sample = {key: self._sample(name, size) for name, key in self.inputs.items()}
        batches = [self.max_batch] if self.max_batch > 1 else []
        batches += [1 << k for k in range(max(1, self.max_batch).bit_length() - 1, -1, -1) if 1 << k < self.max_batch]
        batches = batches or [1]
        count = 0
        for batch in batches:
            items = [{key: value.clone() for key, value in sample.items()} for _ in range(batch)]
            self.run(items)
            count += batch
            failed = next((item["error"] for item in items if "error" in item), None)
            if failed is not None:
                return count, f"{type(failed).__name__}: {failed}"
        return count, None

    def _sample(self, name: str, size: tuple[int, int]) -> torch.Tensor:
        config = self.input_configs.get(name, {})
        dtype = str(config.get("data_type", "TYPE_UINT8")).removeprefix("TYPE_")
        dims = [int(d) for d in config.get("dims", [-1])]
        lead = [1] if self.max_batch > 0 else []
        if dtype == "UINT8" and dims == [-1]:
            from ..examples import sample_jpeg

            data = sample_jpeg(*size, seed=0)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(*lead, len(data))
        return torch.zeros(*lead, *[max(d, 1) for d in dims], dtype=TRITON_TO_TORCH[dtype])

    def output(self, item: dict[str, Any], name: str) -> torch.Tensor:
        """Output ``name`` of a finished item, shaped as the response carries it."""
        value = item[self.outputs[name]]
        if isinstance(value, (list, tuple)):  # a vector of per-image tensors (Tensor2Vector)
            value = torch.stack(list(value))
        if value.dim() == self.output_ranks[name] - 1:
            value = value.unsqueeze(0)
        return value.contiguous()
