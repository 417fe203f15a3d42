"""``max``/``min`` parsing into optimization profiles, and the errors for shapes that cannot work."""

import pytest

from tritonpipe.engines.base import TensorIO
from tritonpipe.engines.profiles import Profile, largest_batch, parse_setting, pick_profile, resolve_profiles
from tritonpipe.engines.tensorrt_engine import parse_layer_precisions, resolve_precision
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.spec import TensorSpec

IMAGE = TensorIO("x", TensorSpec("FP32", (-1, 3, 224, 224), batched=True))
MASK = TensorIO("mask", TensorSpec("FP32", (-1, 10), batched=True))
FREE = TensorIO("x", TensorSpec("FP32", (-1, 3, -1, -1), batched=True))


@pytest.mark.parametrize(
    "text, want",
    [
        ("4", [[(4,)]]),
        (4, [[(4,)]]),
        ("4x3x224x224", [[(4, 3, 224, 224)]]),
        ("1,1", [[(1,), (1,)]]),
        ("4x3x224x224, 4x10", [[(4, 3, 224, 224), (4, 10)]]),
        ("4;8", [[(4,)], [(8,)]]),
        ("4X3X2X2", [[(4, 3, 2, 2)]]),
    ],
)
def test_parse_setting(text, want):
    assert parse_setting("max", text) == want


@pytest.mark.parametrize(
    "text, words",
    [("", "empty"), ("4xx3", "neither"), ("a", "neither"), ("4,", "neither"), ("0", "positive"), ("4x-1x2", "positive"), ("4;;8", "neither")],
)
def test_malformed_settings(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_setting("max", text)


def test_batch_sizes_take_the_model_dims():
    (profile,) = resolve_profiles("1", "8", [IMAGE])
    assert profile == Profile(min=((1, 3, 224, 224),), max=((8, 3, 224, 224),))
    assert profile.max_batch == 8


def test_one_batch_for_several_inputs_and_one_shape_per_input():
    (profile,) = resolve_profiles("1", "4", [IMAGE, MASK])
    assert profile.max == ((4, 3, 224, 224), (4, 10))
    (profile,) = resolve_profiles("1x3x224x224,1x10", "4x3x224x224,4x10", [IMAGE, MASK])
    assert profile.min == ((1, 3, 224, 224), (1, 10))


def test_one_min_for_several_profiles():
    profiles = resolve_profiles("1", "4;16", [IMAGE])
    assert [p.max_batch for p in profiles] == [4, 16]
    assert all(p.min[0][0] == 1 for p in profiles)
    profiles = resolve_profiles("1;5", "4;16", [IMAGE])
    assert [p.min[0][0] for p in profiles] == [1, 5]


def test_free_dims_need_full_shapes_only_for_builds():
    (profile,) = resolve_profiles("1", "4", [FREE])
    assert profile.max == ((4, 3, -1, -1),)
    with pytest.raises(ConfigError, match="free dims; give full shapes, e.g. min=1x3x224x224"):
        resolve_profiles("1", "4", [FREE], need_static=True)
    (profile,) = resolve_profiles("1x3x64x64", "4x3x512x512", [FREE], need_static=True)
    assert profile.max == ((4, 3, 512, 512),)


@pytest.mark.parametrize(
    "lo, hi, inputs, words",
    [
        ("8", "4", [IMAGE], r"min 8x3x224x224 exceeds max 4x3x224x224"),
        ("1x3x300x300", "4x3x200x200", [FREE], "exceeds"),
        ("1", "4x3x224", [IMAGE], "has 3 dims but input 'x' has 4"),
        ("1", "4x3x224x224", [IMAGE, MASK], "1 shapes given but the model has 2 inputs"),
        ("1", "4,4,4", [IMAGE, MASK], "3 shapes given"),
        ("1;2;3", "4;8", [IMAGE], "min gives 3 profiles but max gives 2"),
        ("1", "4x3x100x100", [IMAGE], "dim 1 fixed at 224|dim 2 fixed at 224"),
        ("1", "4x3x224x224,8x10", [IMAGE, MASK], "share the batch size"),
        ("1", "4;2x3x224", [IMAGE], "profile 1: max: shape 2x3x224"),
    ],
)
def test_inconsistent_shapes_are_rejected(lo, hi, inputs, words):
    with pytest.raises(ConfigError, match=words):
        resolve_profiles(lo, hi, inputs)


def test_a_fixed_batch_axis_is_named():
    fixed = TensorIO("x", TensorSpec("FP32", (1, 3, 224, 224), batched=True))
    with pytest.raises(ConfigError, match="fixed batch at 1.*dynamic batch axis"):
        resolve_profiles("1", "4", [fixed])
    assert resolve_profiles("1", "1", [fixed])[0].max == ((1, 3, 224, 224),)


def test_pick_profile_prefers_the_smallest_that_fits():
    profiles = resolve_profiles("1;5", "16;8", [IMAGE])
    assert pick_profile(profiles, [(2, 3, 224, 224)]) == 0
    assert pick_profile(profiles, [(6, 3, 224, 224)]) == 1
    assert pick_profile(profiles, [(17, 3, 224, 224)]) is None
    assert pick_profile(profiles, [(2, 3, 100, 224)]) is None
    assert Profile.from_json(profiles[1].to_json()) == profiles[1]


def test_triton_max_batch_size_from_shapes():
    assert largest_batch("4x3x224x224,4x10;8x3x224x224,8x10") == 8
    node = lambda max_: load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 4, "resize_w": 4, "max": max_}).entry
    assert node(4).settings.max == 4
    assert node("4x3x224x224").settings.max == 4
    assert node("4;16").settings.max == 16
    with pytest.raises(ConfigError, match="'max' must be in"):
        node(0)
    with pytest.raises(ConfigError, match="positive"):
        node("0x3x224x224")


def test_precision_fallbacks():
    assert resolve_precision("fp32", True, True, True) == ((), None)
    assert resolve_precision("fp16", True, True, False) == (("FP16",), None)
    flags, note = resolve_precision("fp16", False, True, False)
    assert flags == () and "no fast FP16; building in fp32" in note
    assert resolve_precision("int8", True, True, True) == (("INT8", "FP16"), None)
    flags, note = resolve_precision("int8", True, True, False)
    assert flags == ("FP16",) and "calibrate_input" in note and "building in fp16" in note
    flags, note = resolve_precision("best", True, False, True)
    assert flags == ("FP16",) and "no fast INT8" in note
    with pytest.raises(ConfigError, match="one of"):
        resolve_precision("fp8", True, True, True)


def test_layer_precisions():
    assert parse_layer_precisions("a, b", "c") == (("a", "fp32"), ("b", "fp32"), ("c", "fp16"))
    assert parse_layer_precisions("", "") == ()
    with pytest.raises(ConfigError, match="both"):
        parse_layer_precisions("a", "a")
