"""The stage listing: the registry for a terminal (wrapped, no Markdown) and for the README (Markdown)."""

from __future__ import annotations

import pytest

from tritonpipe.stages.catalog import stage_classes, stage_listing, stage_table_markdown


@pytest.mark.parametrize("width", [60, 100])
def test_the_listing_wraps_at_the_width_and_names_every_stage_and_parameter(width):
    text = stage_listing(width)
    lines = text.splitlines()
    assert "<br>" not in text and "|" not in text
    assert [line for line in lines if len(line) > width and " " in line.strip()] == []
    blocks = {block.splitlines()[0].split()[0]: block for block in text.split("\n\n")}
    for name, cls in stage_classes():
        assert name in blocks
        unwrapped = " ".join(blocks[name].split())
        for key, param in cls.params.items():
            assert f"{key}: {param.describe()}" in unwrapped, (name, key)


def test_the_listing_marks_gpu_stages_and_aliases():
    heading = {block.splitlines()[0].split()[0]: block.splitlines()[0] for block in stage_listing(100).split("\n\n")}
    assert heading["DecodeTensor"] == "DecodeTensor  [GPU]"
    assert heading["Sequential"] == "Sequential (alias S)"


def test_the_markdown_table_has_one_row_per_stage():
    rows = stage_table_markdown(include_plugins=False).splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [name for name, _ in stage_classes(include_plugins=False)]
