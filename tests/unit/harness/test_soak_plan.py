"""The soak's request planning and bad inputs, checked by decoding them with OpenCV and PIL."""

import io
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image

from tritonpipe.errors import ConfigError
from tritonpipe.harness.soak import BAD_KINDS, bad_input, plan_requests, soak_images
from tritonpipe.harness.soak.plan import SOAK_SIZES


@pytest.fixture(scope="module")
def corpus():
    return soak_images(None, seed=0)


def test_builtin_corpus_is_small_deterministic_jpegs(corpus):
    assert len(corpus) == 32 and corpus == soak_images(None, seed=0) and corpus != soak_images(None, seed=1)
    shapes = {Image.open(io.BytesIO(image)).size[::-1] for image in corpus}
    assert shapes == set(SOAK_SIZES)
    assert all(Image.open(io.BytesIO(image)).format == "JPEG" for image in corpus)


def test_plan_has_exactly_the_asked_share_of_bad_inputs_in_turn(corpus):
    requests = plan_requests(1000, 0.1, corpus, seed=3)
    kinds = Counter(r.kind for r in requests)
    assert kinds == {"good": 900, **{kind: 25 for kind in BAD_KINDS}}
    assert [r.index for r in requests] == list(range(1000))
    bad = [r.kind for r in requests if r.kind != "good"]
    assert bad[: 2 * len(BAD_KINDS)] == list(BAD_KINDS) * 2
    assert all(r.payload in corpus for r in requests if r.kind == "good")


def test_plan_is_deterministic_and_seeded(corpus):
    assert plan_requests(200, 0.2, corpus, seed=1) == plan_requests(200, 0.2, corpus, seed=1)
    assert plan_requests(200, 0.2, corpus, seed=1) != plan_requests(200, 0.2, corpus, seed=2)


def test_plan_edges(corpus):
    assert plan_requests(0, 0.5, corpus) == []
    assert {r.kind for r in plan_requests(20, 0.0, corpus)} == {"good"}
    assert "good" not in {r.kind for r in plan_requests(20, 1.0, corpus)}
    warmup = plan_requests(5, 0.0, corpus, start=-5)
    assert [r.index for r in warmup] == [-5, -4, -3, -2, -1]


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_fraction_outside_zero_to_one_is_refused(corpus, fraction):
    with pytest.raises(ConfigError, match="bad fraction"):
        plan_requests(10, fraction, corpus)


def test_bad_inputs_are_what_their_names_say(corpus):
    source = corpus[7 % len(corpus)]
    truncated = bad_input("truncated", 7, corpus)
    assert source.startswith(truncated) and len(truncated) == len(source) // 2
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated)).load()

    random = bad_input("random", 7, corpus, seed=2)
    assert 16 <= len(random) < 4096 and random == bad_input("random", 7, corpus, seed=2)
    assert random != bad_input("random", 8, corpus, seed=2)
    assert cv2.imdecode(np.frombuffer(random, np.uint8), cv2.IMREAD_COLOR) is None

    png = Image.open(io.BytesIO(bad_input("png", 7, corpus)))
    jpeg = Image.open(io.BytesIO(source))
    assert png.format == "PNG" and png.size == jpeg.size

    assert bad_input("empty", 7, corpus) == b""


def test_unknown_bad_kind_names_the_choices(corpus):
    with pytest.raises(ConfigError, match="'huge'.*truncated"):
        bad_input("huge", 0, corpus)
