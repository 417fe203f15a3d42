"""The pipeline language: torchpipe backend strings parsed into a small typed tree.

Grammar (whitespace is ignored everywhere)::

    stage   := NAME [ "(" param ("," param)* ")" ] [ "[" stage ("," stage)* "]" ]
    param   := KEY "=" VALUE          VALUE is bare text up to "," or ")", or quoted
    NAME    := letters, digits, "_"    KEY may also contain "::"

``S[A,B]`` and ``Sequential[A,B]`` chain stages; ``SyncTensor[TensorrtTensor]`` wraps one.
:func:`parse_backend` checks syntax only; names are checked against the registry when the
tree is resolved (``tritonpipe.pipeline.routing``), with the same caret-style messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

#: a backend string longer than this is shown as the part around the mistake
SHOWN_CHARS = 80


class PipelineSyntaxError(ConfigError):
    """A mistake in a backend string, shown with a caret under its position."""

    def __init__(self, message: str, text: str, position: int):
        self.text = text
        self.position = position
        self.reason = message
        shown, caret = _excerpt(text, position)
        super().__init__(f"{message}\n  {shown}\n  {' ' * caret}^")


def _excerpt(text: str, position: int) -> tuple[str, int]:
    """The part of ``text`` around ``position`` (all of it when short), and the position within that part."""
    if len(text) <= SHOWN_CHARS:
        return text, position
    start = max(0, min(position - SHOWN_CHARS // 2, len(text) - SHOWN_CHARS))
    end = start + SHOWN_CHARS
    head = "..." if start else ""
    tail = "..." if end < len(text) else ""
    tail += f"   (column {position + 1}; the string has {len(text)} characters)"
    return head + text[start:end] + tail, len(head) + position - start


@dataclass
class StageNode:
    """One stage as written: its name, inline parameters and bracketed children."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    children: list[StageNode] = field(default_factory=list)
    position: int = 0
    #: positions of each inline parameter's key, for error messages
    param_positions: dict[str, int] = field(default_factory=dict)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


#: deeper nesting than any real pipeline; it keeps hostile strings from exhausting Python's stack
MAX_DEPTH = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, message: str, position: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, self.pos if position is None else position)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, opened_at: int | None = None) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end of the string"
            if opened_at is not None:
                raise self.error(
                    f"unbalanced bracket: {self.text[opened_at]!r} opened at column {opened_at + 1} "
                    f"is never closed; expected {char!r}, found {found}"
                )
            raise self.error(f"expected {char!r}, found {found}")
        self.pos += 1

    def word(self, what: str, allow_scope: bool = False) -> tuple[str, int]:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text):
            if self.text[self.pos] in _NAME_CHARS:
                self.pos += 1
            elif allow_scope and self.text.startswith("::", self.pos):
                self.pos += 2
            else:
                break
        if start == self.pos:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end of the string"
            raise self.error(f"expected {what}, found {found}")
        return self.text[start : self.pos], start

    def value(self) -> str:
        self.skip_space()
        if self.peek() in ("'", '"'):
            quote, start = self.text[self.pos], self.pos
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.error(f"unterminated quote {quote}", start)
            self.pos = end + 1
            return self.text[start + 1 : end]
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",)([]":
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise self.error("expected a value after '='")
        return raw

    def stage(self, depth: int = 1) -> StageNode:
        name, position = self.word("a stage name")
        if depth > MAX_DEPTH:
            raise self.error(f"stages are nested more than {MAX_DEPTH} deep", position)
        node = StageNode(name=name, position=position)
        if self.peek() == "(":
            opened = self.pos
            self.pos += 1
            while True:
                key, key_pos = self.word("a parameter name", allow_scope=True)
                if key in node.params:
                    raise self.error(f"parameter {key!r} is given twice", key_pos)
                self.expect("=")
                node.params[key] = self.value()
                node.param_positions[key] = key_pos
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect(")", opened)
                break
        if self.peek() == "[":
            opened = self.pos
            self.pos += 1
            node.children.append(self.stage(depth + 1))
            while self.peek() == ",":
                self.pos += 1
                node.children.append(self.stage(depth + 1))
            self.expect("]", opened)
        return node


def parse_backend(text: str) -> StageNode:
    """Parse a backend string such as ``S[DecodeTensor,ResizeTensor(resize_h=224)]``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"a backend string is needed, got {text!r}")
    parser = _Parser(text)
    node = parser.stage()
    rest = parser.peek()
    if rest:
        if rest == "]":
            raise parser.error("unbalanced bracket: ']' has no matching '['")
        if rest == ")":
            raise parser.error("unbalanced bracket: ')' has no matching '('")
        raise parser.error(f"unexpected {rest!r} after a complete stage; join stages with S[A,B]")
    return node


def render(node: StageNode) -> str:
    """The canonical string of a tree; ``parse_backend(render(t))`` gives ``t`` back."""
    text = node.name
    if node.params:
        text += "(" + ",".join(f"{k}={_quote(v)}" for k, v in node.params.items()) + ")"
    if node.children:
        text += "[" + ",".join(render(c) for c in node.children) + "]"
    return text


def _quote(value: object) -> str:
    text = str(value)
    if any(c in text for c in ",()[]'\"") or text != text.strip() or not text:
        if '"' not in text:
            return '"' + text + '"'
        if "'" not in text:
            return "'" + text + "'"
        # the grammar has no escapes: a value with both quotes can only be written bare
        if text == text.strip() and text[0] not in "'\"" and not any(c in text for c in ",()[]"):
            return text
        raise ConfigError(f"value {text!r} holds both quote characters and cannot be written in a pipeline string")
    return text
