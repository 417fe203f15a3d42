"""Constants of library modules, read from their source for argument parsers.

Importing ``tritonpipe.repository.configs`` for its ``DEVICES`` imports torch and tritonclient, seconds
before a command could print its help. The values are plain literals, so they are read from the module's
source without running it, as setuptools reads ``attr:`` metadata; tests check them against the imports.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any


def literal(module: str, name: str) -> Any:
    """The literal value a module of the tritonpipe package assigns to ``name`` at its top level."""
    for node in _top_level(module):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{module} assigns no literal {name}")


@functools.cache
def _top_level(module: str) -> list[ast.Assign | ast.AnnAssign]:
    relative = Path(*module.split(".")[1:])
    path = _package_dir() / relative.with_suffix(".py")
    if not path.is_file():
        path = _package_dir() / relative / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None]


def _package_dir() -> Path:
    import tritonpipe  # light: its package imports nothing heavy until asked

    return Path(tritonpipe.__file__).parent
