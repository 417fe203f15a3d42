"""One error taxonomy: who is blamed decides the status a client sees."""

import math

import pytest

from tritonpipe.errors import ConfigError, InternalError, RequestError, TritonpipeError, is_bad_input
from tritonpipe.pipeline.graph import load_graph


def test_only_request_errors_blame_the_client():
    assert is_bad_input(RequestError("bad jpeg"))
    for exc in (ValueError("inside torch"), TypeError("x"), ConfigError("cfg"), InternalError("model"), KeyError("k")):
        assert not is_bad_input(exc)


def test_every_error_shares_one_base():
    from tritonpipe.client.client import InferError
    from tritonpipe.harness.bench.perf import PerfError
    from tritonpipe.pipeline.grammar import PipelineSyntaxError
    from tritonpipe.server.bundle import UnsafeArchiveError
    from tritonpipe.server.owner import ServerError
    from tritonpipe.spec import SpecError

    for cls in (ConfigError, RequestError, InternalError, InferError, PerfError, PipelineSyntaxError,
                UnsafeArchiveError, ServerError, SpecError):
        assert issubclass(cls, TritonpipeError), cls


def test_unknown_stage_lookup_is_a_config_error():
    from tritonpipe.stages.base import lookup

    with pytest.raises(ConfigError, match="did you mean 'ResizeMat'"):
        lookup("ResizeMatt")


@pytest.mark.parametrize("value", [math.nan, "nan", math.inf, "-inf"])
def test_nan_and_infinity_are_refused_before_anything_is_written(value):
    with pytest.raises(ConfigError, match="batching_timeout"):
        load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8, "max": 4, "batching_timeout": value})


def test_non_string_keys_are_refused():
    with pytest.raises(ConfigError, match="key"):
        load_graph({"backend": "DecodeMat", 3: "x"})
