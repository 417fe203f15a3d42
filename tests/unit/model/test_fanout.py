"""The fan-out orchestrator's plan, run against stand-in models (the served path is in tests/e2e)."""

import asyncio

import pytest
import torch

from tritonpipe.contract import FanOutParams, GatheredOutput
from tritonpipe.errors import ConfigError, InternalError, RequestError
from tritonpipe.model.fanout import FanOut, blames_request


def plan(**extra):
    base = dict(
        first="detect", first_outputs=("boxes", "crops"), items="crops", passed=("boxes",), each="classify",
        each_input="x", gathered=(GatheredOutput("scores", "FP32", (3,)),), max_items=8,
    )
    return FanOutParams(**{**base, **extra})


class Models:
    """detect: one box per value of the request's ``count``; classify: the crop's per-channel sums."""

    def __init__(self, fail_item=None, delay=0.0):
        self.fail_item, self.delay, self.each_calls = fail_item, delay, []

    async def __call__(self, model, inputs, outputs):
        if model == "detect":
            count = int(inputs["count"].item())
            crops = torch.arange(count * 3 * 2 * 2, dtype=torch.float32).reshape(1, count, 3, 2, 2)
            boxes = torch.arange(count * 6, dtype=torch.float32).reshape(1, count, 6)
            return {"boxes": boxes, "crops": crops}
        assert model == "classify" and list(outputs) == ["scores"]
        crop = inputs["x"]
        assert crop.shape == (1, 3, 2, 2)
        self.each_calls.append(crop)
        await asyncio.sleep(self.delay)
        if self.fail_item is not None and torch.equal(crop, self.fail_item):
            raise RequestError("not a face")
        return {"scores": crop.sum(dim=(2, 3))}


def run(fanout, **inputs):
    return asyncio.run(fanout.answer({k: torch.tensor([v]) for k, v in inputs.items()}))


def test_every_item_goes_through_the_second_model_and_comes_back_in_order():
    models = Models()
    out = run(FanOut(plan(), models), count=5)
    crops = torch.arange(5 * 12, dtype=torch.float32).reshape(5, 3, 2, 2)
    assert set(out) == {"boxes", "scores"}  # crops were only the items, not answered
    assert torch.equal(out["scores"], crops.sum(dim=(2, 3)).unsqueeze(0))
    assert out["boxes"].shape == (1, 5, 6)
    assert len(models.each_calls) == 5


def test_no_items_answers_empty_not_an_error():
    out = run(FanOut(plan(), Models()), count=0)
    assert out["scores"].shape == (1, 0, 3) and out["scores"].dtype == torch.float32
    assert out["boxes"].shape == (1, 0, 6)


def test_too_many_items_fail_the_request_or_are_truncated():
    with pytest.raises(RequestError, match="9 items .* exceed max_items=8") as caught:
        run(FanOut(plan(), Models()), count=9)
    assert caught.value.reason == "too_many_items"
    out = run(FanOut(plan(truncate=True), Models()), count=9)
    assert out["scores"].shape == (1, 8, 3)


def test_an_item_that_fails_fails_its_request_naming_the_item():
    crops = torch.arange(4 * 12, dtype=torch.float32).reshape(4, 3, 2, 2)
    with pytest.raises(RequestError, match="item 2 of 4: not a face"):
        run(FanOut(plan(), Models(fail_item=crops[2:3])), count=4)


def test_the_deadline_fails_the_request_with_the_count_answered():
    with pytest.raises(InternalError, match=r"deadline_ms=20 passed with 0 of 3 items answered"):
        run(FanOut(plan(deadline_ms=20), Models(delay=0.5)), count=3)


def test_requests_of_one_batch_fail_alone():
    fanout = FanOut(plan(), Models())
    results = asyncio.run(fanout.answer_all([{"count": torch.tensor([2])}, {"count": torch.tensor([9])}]))
    assert results[0]["scores"].shape == (1, 2, 3)
    assert isinstance(results[1], RequestError)


def test_items_of_more_than_one_image_are_refused():
    async def two_images(model, inputs, outputs):
        return {"boxes": torch.zeros(2, 1, 6), "crops": torch.zeros(2, 1, 3, 2, 2)}

    with pytest.raises(RequestError, match="one image per request"):
        asyncio.run(FanOut(plan(), two_images).answer({}))


def test_the_plan_round_trips_through_the_config_parameter():
    original = plan(truncate=True, deadline_ms=250.0)
    assert FanOutParams.decode(original.encode()) == original
    assert FanOutParams.decode({"tritonpipe.pipeline": "S[DecodeMat]"}) is None
    with pytest.raises(ConfigError, match="tritonpipe.fanout"):
        FanOutParams.decode({"tritonpipe.fanout": "{}"})


def test_truncation_cuts_the_outputs_of_one_row_per_item_alike():
    out = run(FanOut(plan(truncate=True, max_items=3), Models()), count=5)
    assert out["boxes"].shape == (1, 3, 6) and out["scores"].shape == (1, 3, 3)


@pytest.mark.parametrize("message, blamed", [
    ("in ensemble 'spot_per_request', not a JPEG image: it does not start with the JPEG SOI marker FF D8", True),
    ("box 0: box [70, 0, 90, 10] (x1, y1, x2, y2) is empty or inverted inside the 64x64 (WxH) image", True),
    ("in ensemble 'spot_per_request', InternalError: the engine failed", False),
    ("RuntimeError: CUDA out of memory", False),
    ("in ensemble 'a', in ensemble 'b', torch.OutOfMemoryError: no memory", False),
    ("Stub process 'spot_per_item_0_0' is not healthy.", False),
    ("Exceeds maximum queue size", False),
])
def test_a_bls_error_blames_the_request_only_when_the_generic_model_says_so(message, blamed):
    assert blames_request(message) is blamed


def test_the_deadline_covers_the_per_request_part_too():
    async def slow_first(model, inputs, outputs):
        await asyncio.sleep(0.5)

    with pytest.raises(InternalError, match="deadline_ms=20 passed before 'detect' answered"):
        asyncio.run(FanOut(plan(deadline_ms=20), slow_first).answer({}))


def test_an_items_error_keeps_its_reason():
    crops = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 3, 2, 2)

    class Reasoned(Models):
        async def __call__(self, model, inputs, outputs):
            if model == "classify" and torch.equal(inputs["x"], crops[1:2]):
                raise RequestError("not a face", reason="bad_crop")
            return await super().__call__(model, inputs, outputs)

    with pytest.raises(RequestError, match="item 1 of 2: not a face") as caught:
        run(FanOut(plan(), Reasoned()), count=2)
    assert caught.value.reason == "bad_crop"
