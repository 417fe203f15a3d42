"""Misbehaving custom stages for the safety tests: wrong outputs, in-place changes, a hang.

Each request's first byte picks what the stage does, so one served model covers every case.
"""

import time

import torch

from tritonpipe import MapStage, Stage, TensorSpec, register

#: first byte -> what WrongOutput answers instead of FP32 [1, 4]
WRONG = {1: "float64", 2: "int64", 3: "shape", 4: "rows"}


@register("WrongOutput")
class WrongOutput(MapStage):
    """Declares FP32 [4] per request; answers otherwise when the first byte asks it to."""

    def apply(self, data, item):
        value = torch.full((1, 4), float(data.reshape(-1).shape[0]))
        kind = WRONG.get(int(data.reshape(-1)[0]))
        if kind == "float64":
            return value.double()
        if kind == "int64":
            return value.long()
        if kind == "shape":
            return torch.zeros(1, 5)
        if kind == "rows":
            return value.repeat(2, 1)
        return value

    @classmethod
    def infer(cls, params, spec):
        return TensorSpec("FP32", (1, 4), batched=True)


@register("Hang")
class Hang(MapStage):
    """Sleeps for an hour when the first byte is 1; otherwise answers the byte count as FP32 [1, 4]."""

    def apply(self, data, item):
        if int(data.reshape(-1)[0]) == 1:
            time.sleep(3600)
        return torch.full((1, 4), float(data.reshape(-1).shape[0]))

    @classmethod
    def infer(cls, params, spec):
        return TensorSpec("FP32", (1, 4), batched=True)


@register("ByteValue")
class ByteValue(MapStage):
    """The first byte as FP32 [1, 1]."""

    def apply(self, data, item):
        return data.reshape(-1)[:1].float().reshape(1, 1)

    @classmethod
    def infer(cls, params, spec):
        return TensorSpec("FP32", (1, 1), batched=True)


@register("AddOneInPlace")
class AddOneInPlace(Stage):
    """Adds 1 to every input in place, then fails the whole batch if any value is 0 (a bad request)."""

    def forward(self, batch):
        for item in batch:
            item["data"].add_(1)
        if any(float(item["data"]) == 1 for item in batch):
            raise ValueError("a request with value 0")
        for item in batch:
            item["result"] = item["data"]


@register("AddOneInPlaceDeclared")
class AddOneInPlaceDeclared(AddOneInPlace):
    """The same, declaring that it changes its inputs."""

    mutates_inputs = True
