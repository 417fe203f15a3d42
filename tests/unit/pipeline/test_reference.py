"""docs/CONFIG.md is the registry's: every key, with a type, default, range and an example that loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tritonpipe.pipeline import graph, routing, settings
from tritonpipe.pipeline.reference import NODE_KEYS, REGENERATE, TOP_LEVEL_KEYS, config_reference_markdown, example
from tritonpipe.stages.catalog import stage_classes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_MD = Path(__file__).resolve().parents[3] / "docs" / "CONFIG.md"
STAGE_PARAMS = [(name, key, param) for name, cls in stage_classes(include_plugins=False) for key, param in cls.params.items()]


def test_the_reference_page_is_current():
    assert CONFIG_MD.read_text() == config_reference_markdown(), f"refresh it with: {REGENERATE}"


def _row(key: str) -> str:
    return f"| `{key}` |"


def test_every_key_the_loader_reads_has_a_row():
    text = config_reference_markdown()
    assert set(NODE_KEYS) >= set(routing.STRUCTURE_KEYS) and graph.GLOBAL_TABLE in TOP_LEVEL_KEYS
    keys = [*TOP_LEVEL_KEYS, *NODE_KEYS, *settings.TRITON_KEYS, *routing.TORCHPIPE_ONLY]
    assert [k for k in keys if _row(k) not in text] == []
    for name, key, _ in STAGE_PARAMS:
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert _row(key) in section, (name, key)
    assert "<br>" not in text


#: Triton keys whose values are checked against another key
NEEDS = {"preferred_batch_size": {"max": 8}, "default_priority_level": {"priority_levels": 2}}


@pytest.mark.parametrize(("key", "param"), list(settings.TRITON_KEYS.items()))
def test_each_triton_key_example_is_a_node_key_the_loader_takes(key, param):
    value = tomllib.loads(example(key, param))[key]
    config = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8, **NEEDS.get(key, {}), key: value}
    graph.load_graph(config)


@pytest.mark.parametrize(("stage", "key", "param"), STAGE_PARAMS, ids=[f"{s}.{k}" for s, k, _ in STAGE_PARAMS])
def test_each_stage_parameter_example_is_a_value_of_its_type_and_range(stage, key, param):
    value = tomllib.loads(example(key, param))[key]
    assert param.coerce(key, value) == value


def test_node_key_examples_are_toml_lines():
    for key, described in {**TOP_LEVEL_KEYS, **NODE_KEYS}.items():
        assert tomllib.loads(described.example), key
