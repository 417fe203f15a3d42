"""Property-based fuzzing: the parser and the JPEG decoders fail only with their own error types.

Bounded so that the whole file runs in well under 30 s.
"""

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritonpipe.errors import ConfigError
from tritonpipe.kernels.errors import DecodeError
from tritonpipe.kernels.jpeg import JpegInfo, decode_jpeg_cpu, decode_jpeg_tensor, read_jpeg_info
from tritonpipe.pipeline.grammar import StageNode, parse_backend, render
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages.base import registered_names

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# --- the pipeline language -----------------------------------------------------------------

# characters the grammar gives meaning to, so random text hits its branches often
SYNTAX = st.text(alphabet="SDecodMatRsizeTnr_01[](),=:'\" \t\n\x00é", max_size=40)
NAME = st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True)
KEY = st.from_regex(r"[A-Za-z0-9_]{1,6}(::[A-Za-z0-9_]{1,6})?", fullmatch=True)
VALUE = st.text(max_size=12).filter(lambda v: not ("'" in v and '"' in v))


def _trees(children):
    return st.builds(
        lambda name, params, kids: StageNode(name=name, params=params, children=kids),
        NAME, st.dictionaries(KEY, VALUE, max_size=3), children,
    )


TREES = st.recursive(_trees(st.just([])), lambda inner: _trees(st.lists(inner, max_size=3)), max_leaves=8)


def _shape(node: StageNode):
    return node.name, dict(node.params), [_shape(child) for child in node.children]


@FUZZ
@given(st.one_of(st.text(max_size=60), SYNTAX))
def test_parser_raises_only_config_errors(text):
    try:
        tree = parse_backend(text)
    except ConfigError:
        return
    # whatever parses, renders to a string that parses back to the same tree
    assert _shape(parse_backend(render(tree))) == _shape(tree)


@FUZZ
@given(TREES)
def test_render_round_trips_valid_trees(tree):
    text = render(tree)
    assert _shape(parse_backend(text)) == _shape(tree)
    assert render(parse_backend(text)) == text


def test_render_refuses_what_the_grammar_cannot_write():
    assert _shape(parse_backend(render(StageNode("A", {"k": "a'b\"c"})))) == ("A", {"k": "a'b\"c"}, [])
    with pytest.raises(ConfigError, match="both quote"):
        render(StageNode("A", {"k": "'a,\""}))


STAGE_NAMES = registered_names() + ["S", "Nope"]
BACKENDS = st.one_of(
    SYNTAX,
    st.lists(st.sampled_from(STAGE_NAMES), min_size=1, max_size=4).map(lambda names: f"S[{','.join(names)}]"),
    st.sampled_from(["S[DecodeMat,ResizeMat,cvtColorMat]", "S[DecodeTensor,ResizeTensor]", "SyncTensor", "Torch[Identity]"]),
)
SETTING_KEYS = [
    "resize_h", "resize_w", "color", "max", "instance_num", "batching_timeout", "device_id", "apply_exif",
    "SyncTensor::backend", "ResizeMat::resize_h", "pad_value", "next", "plugins", "name", "model", "save_dir",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8), BACKENDS,
    st.sampled_from(["1", "224", "rgb", "nan", "inf", "0,1", "a,b", "4x3x224x224", "\x00"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
NODE = st.builds(lambda backend, extra: {"backend": backend, **extra}, BACKENDS, st.dictionaries(st.sampled_from(SETTING_KEYS), VALUES, max_size=4))
GRAPH = st.dictionaries(st.sampled_from(["a", "b", "c", "../x"]), NODE, min_size=1, max_size=3)


@FUZZ
@given(st.one_of(NODE, GRAPH, st.dictionaries(st.sampled_from(SETTING_KEYS + ["a"]), VALUES, max_size=4)))
def test_load_graph_raises_only_config_errors(tmp_path_factory, config):
    try:
        load_graph(config, base_dir=tmp_path_factory.getbasetemp())
    except ConfigError:
        pass


@FUZZ
@given(st.text(max_size=120), st.sampled_from([".toml", ".json"]))
def test_load_graph_of_any_file_text_raises_only_config_errors(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"pipeline{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_graph(path)
    except ConfigError:
        pass


# --- the JPEG decoders --------------------------------------------------------------------


def _variants() -> list[bytes]:
    """Baseline, progressive, restart markers, grayscale and 4:4:4, so mutations reach every path."""
    small = np.random.default_rng(7).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    picture = cv2.resize(small, (56, 40), interpolation=cv2.INTER_CUBIC)
    base = cv2.imencode(".jpg", picture)[1].tobytes()
    extra = [
        [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
        [cv2.IMWRITE_JPEG_RST_INTERVAL, 1],
        [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
    ]
    out = [base] + [cv2.imencode(".jpg", picture, flags)[1].tobytes() for flags in extra]
    out.append(cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY))[1].tobytes())
    return out


SEEDS = _variants()

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buffer = bytearray(data)
    for op, at, *rest in mutations:
        at = at % (len(buffer) + 1)
        if op == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << rest[0]
        elif op == "cut":
            del buffer[at:]
        elif op == "insert":
            buffer[at:at] = rest[0]
        elif op == "delete":
            del buffer[at : at + rest[0]]
    return bytes(buffer)


MUTATED = st.one_of(
    st.builds(_mutate, st.sampled_from(SEEDS), st.lists(MUTATION, min_size=1, max_size=4)),
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda tail: b"\xff\xd8" + tail),  # past the SOI check into the header walk
)


@FUZZ
@given(MUTATED)
def test_decoders_raise_only_decode_errors(data):
    try:
        info = read_jpeg_info(data)
    except DecodeError:
        info = None
    else:
        assert isinstance(info, JpegInfo) and info.height > 0 and info.width > 0

    try:
        image = decode_jpeg_cpu(data)
    except DecodeError:
        pass
    else:
        assert info is not None and image.dtype == torch.uint8 and tuple(image.shape) == (info.height, info.width, 3)

    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    (result,) = decode_jpeg_tensor([tensor], torch.device("cpu"))
    if isinstance(result, torch.Tensor):
        assert info is not None and result.dtype == torch.uint8 and tuple(result.shape) == (3, info.height, info.width)
    else:
        assert isinstance(result, DecodeError)
