"""What the generic model sends: outputs checked against the config, retries from untouched inputs, the watchdog."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format

from tritonpipe.errors import InternalError
from tritonpipe.model.runtime import ModelRuntime, Watchdog
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository

STAGES = Path(__file__).resolve().parents[2] / "e2e" / "safety_stages.py"


def runtime(tmp_path, backend, **keys) -> ModelRuntime:
    graph = load_graph({"name": "m", "backend": backend, "plugins": [str(STAGES)], "max": 8, **keys})
    repo = generate_repository(graph, tmp_path / "repo")
    config = json.loads(json_format.MessageToJson(repo.configs["m"], preserving_proto_field_name=True))
    return ModelRuntime(config, None, "cpu")  # the plugin is loaded already, from its own file


def request(*values: int) -> dict:
    return {"data": torch.tensor([list(values)], dtype=torch.uint8)}  # [1, n], as Triton hands it over


def served(model: ModelRuntime, items: list[dict]) -> list:
    model.run(items)
    return model.responses(items)


@pytest.mark.parametrize(
    "first_byte, got", [(1, "FP64[1x4]"), (2, "INT64[1x4]"), (3, "FP32[1x5]"), (4, "FP32[2x4]")]
)
def test_an_output_unlike_the_config_fails_its_request_alone(tmp_path, first_byte, got):
    model = runtime(tmp_path, "WrongOutput")
    good, bad, good_too = served(model, [request(0, 9, 9), request(first_byte, 9), request(0, 9)])
    assert torch.equal(good["OUTPUT"], torch.full((1, 4), 3.0)) and good["OUTPUT"].dtype == torch.float32
    assert torch.equal(good_too["OUTPUT"], torch.full((1, 4), 2.0))
    assert isinstance(bad, InternalError)
    assert str(bad) == (
        f"stage WrongOutput gave output 'OUTPUT' as {got}, but the model config declares FP32[1x4] for this request"
    )


def test_a_request_of_two_rows_needs_two_rows_back(tmp_path):
    model = runtime(tmp_path, "WrongOutput")
    two_rows = {"data": torch.zeros(2, 3, dtype=torch.uint8)}
    (result,) = served(model, [two_rows])  # WrongOutput answers one row
    assert isinstance(result, InternalError) and "declares FP32[2x4]" in str(result)


def values(results) -> list:
    return [float(r["OUTPUT"]) if isinstance(r, dict) else type(r).__name__ for r in results]


def test_a_stage_that_changes_its_inputs_in_place_is_not_retried_from_changed_inputs(tmp_path):
    model = runtime(tmp_path, "S[ByteValue,AddOneInPlace]")
    # the batch fails on the 0; retrying 7 and 8 from their changed inputs would answer 9 and 10
    first = served(model, [request(7), request(0), request(8)])
    assert values(first) == ["InternalError"] * 3  # it changed all three before failing
    assert "stage AddOneInPlace changed this request's input in place" in str(first[0])
    assert "ValueError: a request with value 0" in str(first[0])
    # caught once, the stage gets copies from then on, and the good requests get their own answers
    assert values(served(model, [request(7), request(0), request(8)])) == [8.0, "ValueError", 9.0]


def test_a_stage_that_declares_it_changes_inputs_gets_copies(tmp_path):
    model = runtime(tmp_path, "S[ByteValue,AddOneInPlaceDeclared]")
    assert values(served(model, [request(7), request(0), request(8)])) == [8.0, "ValueError", 9.0]


def test_watchdog_calls_back_for_an_overrun_only():
    expired = []
    fired = threading.Event()

    def on_expire(context):
        expired.append(context)
        fired.set()

    dog = Watchdog(0.5, on_expire)
    with dog.watch("quick"):
        pass
    with dog.watch("stuck"):
        assert fired.wait(30)  # the block is still running: only another thread can notice
    with dog.watch("quick again"):
        pass
    assert expired == ["stuck"]


def test_a_block_that_stays_stuck_is_called_back_once_and_the_next_one_is_watched_again():
    expired = []
    dog = Watchdog(0.05, expired.append)
    with dog.watch("stuck"):
        deadline = time.monotonic() + 30
        while not expired and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(dog.poll * 5)  # several more looks at the same overrun block
    assert expired == ["stuck"]
    with dog.watch("stuck again"):
        deadline = time.monotonic() + 30
        while len(expired) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert expired == ["stuck", "stuck again"]
