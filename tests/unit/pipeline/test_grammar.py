import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.grammar import PipelineSyntaxError, parse_backend, render
from tritonpipe.pipeline.graph import load_graph


def names(node):
    return [n.name for n in node.walk()]


def test_single_name():
    node = parse_backend("DecodeMat")
    assert node.name == "DecodeMat" and not node.children and not node.params


def test_wrapper_and_chain_and_nesting():
    node = parse_backend("S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]")
    assert names(node) == ["S", "DecodeTensor", "ResizeTensor", "cvtColorTensor", "SyncTensor", "TensorrtTensor"]
    assert node.children[3].children[0].name == "TensorrtTensor"


def test_inline_params_and_whitespace():
    node = parse_backend("  Sequential [ ResizeTensor ( resize_h = 224 , resize_w=112 ) , Identity ] ")
    assert node.children[0].params == {"resize_h": "224", "resize_w": "112"}
    assert node.children[1].name == "Identity"


def test_quoted_values_and_scoped_keys():
    node = parse_backend("ResizePadTensor(pad_value='1,2,3', X::y=4)")
    assert node.params == {"pad_value": "1,2,3", "X::y": "4"}


def test_render_round_trip():
    text = 'S[A(x=1,y="a,b"),B[C(z=2)]]'
    assert render(parse_backend(text)) == text
    assert render(parse_backend(render(parse_backend(text)))) == text


@pytest.mark.parametrize(
    "text, message, column",
    [
        ("S[DecodeMat,ResizeMat", "unbalanced bracket", 21),
        ("S[DecodeMat,ResizeMat]]", "unbalanced bracket", 22),
        ("ResizeMat(resize_h=1", "unbalanced bracket", 20),
        ("S[DecodeMat,,ResizeMat]", "expected a stage name", 12),
        ("S[DecodeMat ResizeMat]", "unbalanced bracket", 12),
        ("ResizeMat(resize_h)", "expected '='", 18),
    ],
)
def test_syntax_errors_point_at_the_position(text, message, column):
    with pytest.raises(PipelineSyntaxError) as info:
        parse_backend(text)
    assert message in info.value.reason
    assert info.value.position == column
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 2 == column


def test_unknown_stage_is_located_and_suggested():
    with pytest.raises(PipelineSyntaxError) as info:
        load_graph({"backend": "S[DecodeMat,ResizeMatt]", "resize_h": 2, "resize_w": 2})
    assert info.value.position == len("S[DecodeMat,")
    assert "did you mean 'ResizeMat'" in str(info.value)


def test_unknown_inline_param_is_located_and_suggested():
    with pytest.raises(PipelineSyntaxError) as info:
        load_graph({"backend": "S[DecodeMat,ResizeMat(resize_hh=2,resize_w=2)]"})
    assert info.value.position == len("S[DecodeMat,ResizeMat(")
    assert "'resize_h'" in str(info.value)


def test_names_are_case_insensitive():
    graph = load_graph({"backend": "s[decodemat,CvtColorMat,cvtcolormat]"})
    tree = graph.entry.tree
    assert names(tree) == ["Sequential", "DecodeMat", "cvtColorMat", "cvtColorMat"]


def test_empty_backend_is_rejected():
    with pytest.raises(ConfigError):
        parse_backend("   ")


def test_a_long_string_is_shown_as_the_part_around_the_mistake():
    hostile = "S[" * 100_000 + "Identity" + "]" * 100_000
    with pytest.raises(PipelineSyntaxError) as info:
        parse_backend(hostile)
    message, shown, caret = str(info.value).split("\n")
    assert message == "stages are nested more than 64 deep"
    assert len(shown) < 160 and shown.strip().startswith("...S[S[") and "(column 129; the string has 300008 characters)" in shown
    # the caret stands under the 65th stage name, column 129 of the string
    assert shown[caret.index("^")] == "S" and info.value.position == 128


def test_a_mistake_near_the_end_of_a_long_string_is_shown_with_the_end():
    text = "S[DecodeMat," + "ResizeMat," * 30 + "Bad("
    with pytest.raises(PipelineSyntaxError) as info:
        parse_backend(text)
    _, shown, caret = str(info.value).split("\n")
    assert shown.strip().startswith("...") and "Bad(   (column" in shown and len(shown) < 160
    assert caret.index("^") == shown.index("Bad(") + 4  # just after the parenthesis: the end of the string
