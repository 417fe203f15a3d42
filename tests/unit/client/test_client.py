"""The client's protocol-neutral failure status, from tritonclient's own exceptions."""

import pytest
from tritonclient.utils import InferenceServerException

from tritonpipe.client.client import InferError, PipelineClient, status_of
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
