"""The resolved stage tree: what a pipeline string means once every name and value is checked.

The parser's :class:`~tritonpipe.pipeline.grammar.StageNode` holds text as written. After
resolution each node holds its stage class and its coerced, complete parameters, and nothing
changes it afterwards: steps that need another version (the generator pointing file
parameters at their copies) build a new tree with :meth:`ResolvedStage.with_params`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..stages.base import Role, Stage
from .grammar import StageNode, render


@dataclass(frozen=True)
class ResolvedStage:
    cls: type[Stage]
    params: Mapping[str, Any] = field(default_factory=dict)
    children: tuple[ResolvedStage, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "children", tuple(self.children))

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def role(self) -> str:
        """The stage class's declared role, equal to a :class:`Role` member for the built-in roles."""
        return self.cls.role

    def walk(self) -> Iterator[ResolvedStage]:
        yield self
        for child in self.children:
            yield from child.walk()

    def contains(self, role: Role) -> bool:
        return any(node.role == role for node in self.walk())

    def find(self, role: Role) -> ResolvedStage | None:
        return next((node for node in self.walk() if node.role == role), None)

    def with_params(self, **changes: Any) -> ResolvedStage:
        return replace(self, params={**self.params, **changes})

    def with_children(self, children: tuple[ResolvedStage, ...]) -> ResolvedStage:
        return replace(self, children=children)

    def to_node(self) -> StageNode:
        """The tree as the parser would give it back from :meth:`render`."""
        return StageNode(name=self.name, params=dict(self.params), children=[c.to_node() for c in self.children])

    def render(self) -> str:
        """The canonical pipeline string, with every parameter written out."""
        return render(self.to_node())
