"""The client's protocol-neutral failure status, from tritonclient's own exceptions; how responses are printed."""

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tritonpipe.client.client import InferError, PipelineClient, status_of, summarize
from tritonpipe.errors import ConfigError


@pytest.mark.parametrize(
    ("status", "name"),
    [
        ("StatusCode.INVALID_ARGUMENT", "INVALID_ARG"), ("400", "INVALID_ARG"),
        ("StatusCode.INTERNAL", "INTERNAL"), ("500", "INTERNAL"),
        ("StatusCode.UNAVAILABLE", "UNAVAILABLE"), ("503", "UNAVAILABLE"),
        ("StatusCode.NOT_FOUND", "NOT_FOUND"), ("404", "NOT_FOUND"),
        ("StatusCode.DEADLINE_EXCEEDED", "TIMEOUT"), ("StatusCode.RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
    ],
)
def test_server_statuses_get_one_name_for_both_protocols(status, name):
    assert status_of(InferenceServerException("failed", status=status)) == name


def test_timeouts_and_lost_connections():
    assert status_of(InferenceServerException("Deadline Exceeded")) == "TIMEOUT"
    assert status_of(InferenceServerException("the request timed out")) == "TIMEOUT"
    assert status_of(InferenceServerException("no status")) == "ERROR"
    assert status_of(TimeoutError()) == "TIMEOUT"
    assert status_of(type("Timeout", (Exception,), {})()) == "TIMEOUT"  # gevent's, from the HTTP client
    assert status_of(ConnectionRefusedError()) == "UNAVAILABLE"
    assert status_of(KeyError("x")) == "KeyError"


def test_infer_error_carries_its_status():
    error = InferError("boom", "INTERNAL")
    assert str(error) == "boom" and error.status == "INTERNAL"


def test_unknown_protocol_is_a_configuration_error():
    with pytest.raises(ConfigError, match=r"protocol must be one of \('grpc', 'http'\), got 'udp'"):
        PipelineClient("127.0.0.1:1", protocol="udp")


def test_only_a_first_output_of_class_scores_gets_top_k():
    scores = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    inverse = np.array([[2.0, 1.5, 0.0, 0.5]], dtype=np.float32)
    image = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    lines = summarize({"logits": scores, "inverse_transform": inverse, "OUTPUT": image}, top_k=2)
    assert lines == [
        "logits: float32[1, 3]  top-2: 1=0.7000, 2=0.2000",
        "inverse_transform: float32[1, 4]  values: 2, 1.5, 0, 0.5",
        "OUTPUT: uint8[2, 3, 4, 4]  min=0 max=95 mean=47.5",
    ]
    # the same [1, 4] first: four class scores
    assert summarize({"inverse_transform": inverse}, top_k=5) == ["inverse_transform: float32[1, 4]  top-4: 0=2.0000, 1=1.5000, 3=0.5000, 2=0.0000"]


def test_strings_and_empty_outputs_are_printed_without_arithmetic():
    lines = summarize({"OUTPUT": np.zeros((1, 0), np.float32), "label": np.array([[b"cat"]], dtype=object)})
    assert lines == ["OUTPUT: float32[1, 0]  values: none", "label: object[1, 1]  values: b'cat'"]
