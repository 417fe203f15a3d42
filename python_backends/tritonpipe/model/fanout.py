"""The orchestrator of a graph that fans out: one request in, any number of items through a second model.

A node with ``for_each`` runs once per item of what its predecessor produced (the detector's
boxes, the crops made from them).  A Triton ensemble maps one request to one request, so the
generator writes such a graph as two parts and this orchestrator between them:

1. ``first`` runs once per request and answers, among its outputs, ``items``: a tensor whose
   rows are the items (shape ``[1, N, ...]``, N from 0 up);
2. ``each`` is called once per row, all rows of all requests at once (BLS ``async_exec``), so
   that its dynamic batcher batches the items of many requests together;
3. the request is answered with ``first``'s outputs as they came and ``each``'s outputs gathered
   in item order, one row per item (``[1, N, ...]``; N = 0 gives an empty tensor, not an error).

Limits: more than ``max_items`` rows fail the request (or keep the first ``max_items`` where the
configuration says ``truncate``; ``first``'s outputs of one row per item are then cut alike); a request whose items are not all answered ``deadline_ms``
after it arrived fails with the count answered.  Any failure fails its own request alone.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from ..contract import FanOutParams
from ..errors import InternalError, RequestError, TritonpipeError
from ..spec import TRITON_TO_TORCH

#: calls one model: (model name, inputs by name, wanted output names) -> outputs by name
Call = Callable[[str, dict[str, Any], Sequence[str]], Awaitable[dict[str, torch.Tensor]]]


def item_rows(params: FanOutParams, items: torch.Tensor) -> torch.Tensor:
    """The rows of ``items`` (``[1, N, ...]``) that go through the per-item part, within ``max_items``.

    Past ``max_items`` the request fails, or keeps the first rows where ``truncate`` says so.
    """
    if items.dim() < 2 or items.shape[0] != 1:
        raise RequestError(
            f"send one image per request to a pipeline that fans out: {params.first!r} answered "
            f"{params.items!r} of shape {list(items.shape)}, not [1, items, ...]"
        )
    rows = items[0]
    if rows.shape[0] > params.max_items:
        if not params.truncate:
            raise RequestError(
                f"{rows.shape[0]} items (rows of {params.items!r}) exceed max_items={params.max_items}; raise "
                "max_items, or set too_many = \"truncate\" to keep the first ones",
                reason="too_many_items",
            )
        rows = rows[: params.max_items]
    return rows


def gather(params: FanOutParams, first: dict[str, torch.Tensor], results: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One request's answer: the per-item outputs one row per item (``[1, N, ...]``), then ``first``'s.

    ``results`` are the per-item part's answers, in item order (``[1, ...]`` each).  Where items
    were truncated, ``first``'s outputs of one row per item are cut alike.
    """
    total, count = first[params.items].shape[1], len(results)
    outputs = {}
    for output in params.gathered:
        if results:
            outputs[output.name] = torch.cat([r[output.name] for r in results]).unsqueeze(0)
        else:
            outputs[output.name] = torch.empty((1, 0, *output.dims), dtype=TRITON_TO_TORCH[output.dtype])
    for name in params.passed:
        tensor = first[name]
        cut = count < total and tensor.dim() >= 2 and tensor.shape[1] == total
        outputs[name] = tensor[:, :count] if cut else tensor
    return outputs


class FanOut:
    """Answers requests by the plan in ``params``; ``call`` reaches the other models."""

    def __init__(self, params: FanOutParams, call: Call):
        self.params = params
        self.call = call

    async def answer(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One request's outputs by name; raises the request's own error."""
        params = self.params
        started = time.monotonic()
        first = await self._within(started, self.call(params.first, inputs, params.first_outputs),
                                   lambda: f"before {params.first!r} answered")
        items = first[params.items]
        rows = item_rows(params, items)
        count = rows.shape[0]
        answered = [0]

        async def one(index: int) -> dict[str, torch.Tensor]:
            try:
                out = await self.call(params.each, {params.each_input: rows[index : index + 1].contiguous()},
                                      [o.name for o in params.gathered])
            except TritonpipeError as exc:
                named = type(exc)(f"item {index} of {count}: {exc}")
                named.__dict__.update(exc.__dict__)  # a RequestError keeps its reason
                raise named from None
            answered[0] += 1
            return out

        results = await self._within(started, asyncio.gather(*(one(i) for i in range(count))),
                                     lambda: f"with {answered[0]} of {count} items answered")
        return gather(params, first, results)

    async def _within(self, started: float, work: Awaitable[Any], progress: Callable[[], str]) -> Any:
        """``work``'s result, or an InternalError once ``deadline_ms`` has passed since ``started``."""
        deadline_ms = self.params.deadline_ms
        if deadline_ms <= 0:
            return await work
        try:
            return await asyncio.wait_for(work, max(deadline_ms / 1e3 - (time.monotonic() - started), 0.0))
        except asyncio.TimeoutError:
            raise InternalError(
                f"deadline_ms={deadline_ms:g} passed {progress()}; raise deadline_ms or add instances to the "
                "slow part's models"
            ) from None

    async def answer_all(self, requests_inputs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor] | BaseException]:
        """Every request at once; each gets its outputs or its own exception."""
        return await asyncio.gather(*(self.answer(inputs) for inputs in requests_inputs), return_exceptions=True)


#: how the generic model words a failure that is not the request's fault: the exception's type first
_OUR_FAULT = re.compile(r"(?:in ensemble '[^']*', )*[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt): ")
#: what Triton itself says when a model cannot answer at all
_SERVER_TROUBLE = ("is not healthy", "unavailable", "failed to", "not found", "exceeds maximum queue size", "cancelled")


def blames_request(message: str) -> bool:
    """Whether a BLS error message from one of the generated parts blames the request (INVALID_ARG).

    Triton 2.51 hands BLS callers every error as INTERNAL, whatever the called model said, so the
    orchestrator reads the message: the generic model words a bad request as its reason alone
    (``not a JPEG image: ...``), and anything else with the exception's type first
    (``InternalError: ...``, ``RuntimeError: ...``); Triton's own troubles (a stub that died, a full
    queue) are named as such.
    """
    lowered = message.lower()
    return not _OUR_FAULT.match(message) and not any(phrase in lowered for phrase in _SERVER_TROUBLE)


def bls_call(pb_utils: Any) -> Call:
    """A :data:`Call` over Triton's BLS: the request's own tensors go as they are, outputs come back via DLPack."""
    from torch.utils.dlpack import to_dlpack

    async def call(model: str, inputs: dict[str, Any], outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = [
            value if not isinstance(value, torch.Tensor) else pb_utils.Tensor.from_dlpack(name, to_dlpack(value))
            for name, value in inputs.items()
        ]
        request = pb_utils.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=list(outputs))
        response = await request.async_exec()
        if response.has_error():
            error = response.error()
            invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)
            coded = invalid is not None and hasattr(error, "code") and error.code() == invalid
            bad = coded or blames_request(error.message())
            raise (RequestError if bad else InternalError)(f"{model}: {error.message()}")
        found = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise InternalError(f"{model} answered without its output {name!r}")
            found[name] = torch.from_dlpack(tensor.to_dlpack())
        return found

    return call
