"""The stage table: every registered stage with its parameters, input and output.

Two renderings of the same registry: Markdown for the README (``stage_table_markdown``) and plain
wrapped text for a terminal (``stage_listing``).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator

from .base import Param, Stage, lookup, registered_names


def stage_classes(include_plugins: bool = True) -> Iterator[tuple[str, type[Stage]]]:
    """``(name, class)`` of every registered stage, by name; without plugins, only tritonpipe's own."""
    for name in registered_names():
        cls = lookup(name)
        if include_plugins or cls.__module__.startswith("tritonpipe."):
            yield name, cls


def summary(cls: type[Stage]) -> str:
    """The first line of the stage's docstring."""
    return (cls.__doc__ or "").strip().split("\n", 1)[0]


def param_line(key: str, param: Param, mark: str = "`") -> str:
    return f"{mark}{key}{mark}: {param.describe()}" + (f" — {param.doc}" if param.doc else "")


def stage_table_markdown(include_plugins: bool = True) -> str:
    """A markdown table of the registered stages, for the README and ``--list-stages --markdown``.

    ``include_plugins=False`` lists only the stages that ship with tritonpipe.
    """
    rows = [
        "| stage | parameters (default, range) | input (`data`) | output (`result`) | GPU | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in stage_classes(include_plugins):
        params = "<br>".join(param_line(key, param) for key, param in cls.params.items()) or "—"
        alias = cls.aliases
        title = f"`{name}`" + (f" (alias {', '.join(f'`{a}`' for a in alias)})" if alias else "")
        gpu = "yes" if cls.wants_gpu else "—"
        rows.append(f"| {title} | {params} | {cls.input_doc} | {cls.output_doc} | {gpu} | {summary(cls)} |")
    return "\n".join(rows)


def stage_listing(width: int = 80, include_plugins: bool = True) -> str:
    """The registered stages as plain text wrapped to ``width`` columns, for a terminal.

    Each stage is a heading line (name, aliases, GPU) followed by indented lines: what it does, what it
    reads and writes, and one entry per parameter with its type, default and range.
    """
    width = max(width, 40)  # narrower than this, wrapping words one per line helps nobody
    blocks = []
    for name, cls in stage_classes(include_plugins):
        heading = name + (f" (alias {', '.join(cls.aliases)})" if cls.aliases else "") + ("  [GPU]" if cls.wants_gpu else "")
        lines = [heading]
        lines += _wrap(summary(cls), width, "  ")
        lines += _wrap(f"input: {cls.input_doc}", width, "  ")
        lines += _wrap(f"output: {cls.output_doc}", width, "  ")
        for key, param in cls.params.items():
            lines += _wrap(param_line(key, param, mark=""), width, "    ", "        ")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _wrap(text: str, width: int, indent: str, subsequent: str | None = None) -> list[str]:
    plain = re.sub(r"``([^`]*)``", r"`\1`", text)  # reST code marks, as Markdown's
    return textwrap.wrap(plain, width, initial_indent=indent, subsequent_indent=subsequent or indent + "  ",
                         break_on_hyphens=False)
