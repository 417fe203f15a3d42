"""One manifest file as commented YAML: a header comment, then the object with comments placed
above the keys they explain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class Manifest:
    """One YAML file: a dict, a header comment and comments placed above given keys.

    Attributes:
        path: where the file goes, relative to the manifests folder.
        data: the object (or kustomization) the file holds.
        header: comment lines at the top of the file.
        notes: (prefix, lines): the lines go, as comments at the same indent, above the first line
            of the dumped YAML that starts with ``prefix`` once its indent is stripped; each note is
            placed at most once, and two notes with one prefix go above its first two matches.
    """

    path: str
    data: dict[str, Any]
    header: list[str] = field(default_factory=list)
    notes: list[tuple[str, list[str]]] = field(default_factory=list)

    def text(self) -> str:
        body = yaml.safe_dump(self.data, sort_keys=False, default_flow_style=False, width=4096)
        out = [f"# {line}".rstrip() for line in self.header]
        pending = list(self.notes)
        for line in body.splitlines():
            stripped = line.lstrip()
            for index, (prefix, comment) in enumerate(pending):
                if stripped.startswith(prefix):
                    indent = line[: len(line) - len(stripped)]
                    out += [f"{indent}# {c}".rstrip() for c in comment]
                    del pending[index]
                    break
            out.append(line)
        return "\n".join(out) + "\n"
