"""Judging the soak's answers: output matching, verdicts, and the in-process reference."""

import threading
import time

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import json_format

from tritonpipe.client.client import InferError
from tritonpipe.errors import ConfigError
from tritonpipe.harness.chain import Chain
from tritonpipe.harness.soak import Expected, Reference, Request, judge, matches
from tritonpipe.harness.soak.faults import FaultReport, summarise_fault
from tritonpipe.harness.soak.load import LoadRun
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository

GOOD = Request(1, "good", b"\xff\xd8jpeg")
BAD = Request(2, "truncated", b"\xff\xd8")
WANT = {"OUTPUT": np.arange(6, dtype=np.uint8).reshape(1, 2, 3), "SCORES": np.array([[0.5, 0.25]], np.float32)}


def test_equal_outputs_match():
    assert matches({k: v.copy() for k, v in WANT.items()}, WANT) == ""


def test_integer_outputs_must_be_exact_and_floats_get_a_tolerance():
    off_by_one = {**WANT, "OUTPUT": WANT["OUTPUT"] + 1}
    assert matches(off_by_one, WANT) == "OUTPUT: max difference 1 > 0"
    close = {**WANT, "SCORES": WANT["SCORES"] + 5e-5}
    assert matches(close, WANT) == ""
    far = {**WANT, "SCORES": WANT["SCORES"] + 1e-3}
    assert matches(far, WANT).startswith("SCORES: max difference 0.000999") and matches(far, WANT).endswith("> 0.0001")
    assert matches(far, WANT, atol=1e-2) == ""


def test_missing_reshaped_or_retyped_outputs_are_named():
    assert matches({"SCORES": WANT["SCORES"]}, WANT) == "OUTPUT: got nothing, expected uint8[1, 2, 3]"
    assert matches({**WANT, "OUTPUT": WANT["OUTPUT"].reshape(1, 3, 2)}, WANT) == "OUTPUT: got uint8[1, 3, 2], expected uint8[1, 2, 3]"
    assert matches({**WANT, "OUTPUT": WANT["OUTPUT"].astype(np.int32)}, WANT).startswith("OUTPUT: got int32")


def test_nan_matches_nan_only():
    want = {"X": np.array([np.nan, 1.0], np.float32)}
    assert matches({"X": want["X"].copy()}, want) == ""
    assert "max difference inf" in matches({"X": np.array([0.0, 1.0], np.float32)}, want)


def failing(status, message="boom"):
    def call(payload):
        raise InferError(message, status)

    return call


def test_verdicts():
    good, refused = Expected(outputs=WANT), Expected(error="INVALID_ARG", message="not a JPEG")
    assert judge(GOOD, good, lambda p: WANT).verdict == "correct"
    assert judge(GOOD, good, lambda p: {**WANT, "OUTPUT": WANT["OUTPUT"] * 0}).verdict == "wrong"
    assert judge(BAD, refused, failing("INVALID_ARG")).verdict == "rejected"
    # a good input refused, or a bad one accepted, is wrong
    assert judge(GOOD, good, failing("INVALID_ARG")).verdict == "wrong"
    accepted = judge(BAD, refused, lambda p: WANT)
    assert accepted.verdict == "wrong" and "not a JPEG" in accepted.message
    # the reference's internal failure must not come back as the client's fault
    assert judge(BAD, Expected(error="INTERNAL"), failing("INVALID_ARG")).verdict == "wrong"
    for status in ("INTERNAL", "TIMEOUT", "UNAVAILABLE"):
        assert judge(GOOD, good, failing(status)).verdict == "lost"


def test_refusals_after_a_stop_are_counted_apart():
    stopped = threading.Event()
    stopped.set()
    good = Expected(outputs=WANT)
    assert judge(GOOD, good, failing("UNAVAILABLE"), stopped=stopped).verdict == "refused"
    assert judge(GOOD, good, failing("NOT_FOUND"), stopped=stopped).verdict == "refused"
    assert judge(GOOD, good, failing("TIMEOUT"), stopped=stopped).verdict == "lost"
    assert judge(GOOD, good, failing("UNAVAILABLE"), stopped=threading.Event()).verdict == "lost"


class _Bar:
    def update(self, n):
        pass


def test_a_request_taken_before_the_stop_and_refused_after_it_counts_as_in_flight_and_refused():
    state = LoadRun([GOOD, BAD], _Bar())
    request, started = state.take()
    at_s, not_sent = state.stop()
    assert (state.take(), not_sent) == (None, 1)
    outcome = judge(request, Expected(outputs=WANT), failing("UNAVAILABLE"), stopped=state.stopping, started=started)
    assert outcome.verdict == "refused" and outcome.started <= state.t0 + at_s <= outcome.ended
    state.done(outcome)
    fault = FaultReport(kind="stop-server", after=1, at_s=at_s, target="tritonserver")
    summarise_fault(fault, state.outcomes, state.t0)
    assert (fault.in_flight, fault.completed, fault.refused, fault.errors, fault.hung) == (1, 0, 1, 0, 0)


def test_a_request_sent_before_the_stop_and_dropped_during_it_is_lost():
    state = LoadRun([GOOD], _Bar())
    request, started = state.take()

    def dropped_while_stopping(payload):
        state.stop()  # the stop begins while the request is with the server
        raise InferError("server is shutting down", "UNAVAILABLE")

    outcome = judge(request, Expected(outputs=WANT), dropped_while_stopping, stopped=state.stopping, started=started)
    assert outcome.verdict == "lost"


def test_an_outcome_keeps_status_first_line_and_timing():
    outcome = judge(GOOD, Expected(outputs=WANT), failing("INTERNAL", "stub died\ntraceback..."))
    assert (outcome.index, outcome.kind, outcome.status, outcome.message) == (1, "good", "INTERNAL", "stub died")
    assert outcome.ended >= outcome.started and outcome.latency_s == outcome.ended - outcome.started

    def broken(payload):
        raise KeyError("x")

    crashed = judge(GOOD, Expected(outputs=WANT), broken)
    assert (crashed.verdict, crashed.status) == ("lost", "KeyError")


@pytest.fixture(scope="module")
def reference():
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 12, "resize_w": 16}, name="soak")
    _, configs, _ = build_repository(graph, device="cpu")
    as_json = {name: json_format.MessageToDict(c, preserving_proto_field_name=True) for name, c in configs.items()}
    return Reference(Chain(as_json.__getitem__, "soak"))


def test_reference_answers_as_opencv_decodes_and_resizes(reference, jpeg_factory):
    image = jpeg_factory(30, 40, seed=1)
    expected = reference.expected(image)
    assert expected.error is None
    (output,) = expected.outputs.values()
    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    want = cv2.resize(decoded, (16, 12), interpolation=cv2.INTER_LINEAR)
    assert output.shape == (1, 12, 16, 3)
    assert np.abs(output[0].astype(int) - want.astype(int)).max() <= 1
    assert reference.expected(image) is expected, "each payload is computed once"


@pytest.mark.parametrize("payload", [b"", b"\xff\xd8\xff\xe0 truncated", bytes(range(200))])
def test_reference_refuses_bad_images_as_the_client_fault(reference, payload):
    expected = reference.expected(payload)
    assert expected.outputs is None and expected.error == "INVALID_ARG" and expected.message


def test_reference_runs_only_tritonpipe_models():
    config = {"onnx": {"name": "onnx", "backend": "onnxruntime", "input": [{"name": "x"}], "output": [{"name": "y"}]}}
    with pytest.raises(ConfigError, match="'onnx'.*onnxruntime"):
        Chain(config.__getitem__, "onnx")


def test_reference_input_keeps_the_request_shape(reference, jpeg_factory):
    (answer,) = reference.chain.run([{"INPUT": torch.frombuffer(bytearray(jpeg_factory(30, 40)), dtype=torch.uint8)[None]}])
    assert not isinstance(answer, BaseException) and next(iter(answer.values())).shape[0] == 1


def test_the_latency_counts_from_the_send_not_from_the_queue():
    taken_long_ago = time.monotonic() - 60.0  # e.g. the reference ran between take and send
    outcome = judge(GOOD, Expected(outputs=WANT), lambda p: WANT, started=taken_long_ago)
    assert outcome.started == taken_long_ago and outcome.latency_s < outcome.ended - outcome.started - 59.0
