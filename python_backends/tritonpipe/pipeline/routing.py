"""One node's keys -> its stage tree and its Triton settings as written.

The node's pipeline string is parsed and every stage name looked up in the registry
(``Wrapper::backend`` keys fill bare wrappers).  Each other key goes to every stage of the
node that declares it; ``Stage::key`` goes to that stage only; a key of
:data:`~.settings.TRITON_KEYS` goes to the node's settings; any other key is refused, with
suggestions.  Stage values are coerced and range-checked and relative file names resolved
against the configuration's folder.  :func:`takes_key` answers, by the same routing, whether
a node would take a key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stages.base import Stage, check_params, did_you_mean, find_stage, registered_names
from .grammar import SHOWN_CHARS, PipelineSyntaxError, StageNode, parse_backend
from .resolved import ResolvedStage, Role
from .settings import TRITON_KEYS

#: node keys the loader reads itself
STRUCTURE_KEYS = ("backend", "next", "map")
#: torchpipe keys with no counterpart here -> what to do instead
TORCHPIPE_ONLY = {
    "filter": "Triton runs every step of an ensemble; a stage that refuses a request (C10Exception) ends it instead",
    "interpreter::backend": "Triton schedules the nodes itself (dynamic batching and ensembles); drop it",
    "pipelinev3::backend": "Triton schedules the nodes itself (dynamic batching and ensembles); drop it",
    "baselineschedule::backend": "Triton batches and runs instances itself: set instance_num, max and batching_timeout",
    "precision::output::fp32": "precision::fp32 keeps named layers in FP32",
    "precision::output::fp16": "precision::fp16 runs named layers in FP16",
}
#: keys whose torchpipe values may combine several settings with '&'
_NO_AMPERSAND = ("backend", "model", "max", "min", "instance_num")
_BACKEND_SUFFIX = "::backend"

#: a stage class, the parsed node it came from (for its inline parameters), and its children
_Skeleton = tuple[type[Stage], StageNode, list]
#: the stages of a node, each with its parsed node
_Stages = list[tuple[type[Stage], StageNode]]


def resolve_stages(where: str, raw: Mapping[str, Any], base: Path) -> tuple[ResolvedStage, dict[str, Any]]:
    """The stage tree of the node written as ``raw`` (``backend`` among its keys), and its Triton keys as written.

    ``where`` names the node in errors; relative file parameters are resolved against ``base``.
    """
    _refuse_torchpipe_only(where, raw)
    backend = raw["backend"]
    skeleton = _skeleton(parse_backend(backend), backend, _scoped_backends(raw), where)
    stages = [(cls, node) for cls, node, _ in _flatten(skeleton)]
    given: dict[int, dict[str, Any]] = {id(node): dict(node.params) for _, node in stages}
    triton: dict[str, Any] = {}
    # a stage's own value wins: written inline in the backend, then as Stage::key, then as a plain key
    for key, value in sorted(raw.items(), key=lambda pair: "::" not in pair[0]):
        if key in STRUCTURE_KEYS or key.lower().endswith(_BACKEND_SUFFIX):
            continue
        key, targets = _route(stages, key)
        for _, node in targets:
            given[id(node)].setdefault(key, value)
        if key in TRITON_KEYS:
            triton[key] = value
        elif not targets:
            known = sorted({p for cls, _ in stages for p in cls.params} | set(TRITON_KEYS))
            shown = backend if len(backend) <= SHOWN_CHARS else backend[:SHOWN_CHARS] + "..."
            raise ConfigError(f"{where}: no stage of {shown!r} takes parameter {key!r}{did_you_mean(key, known)}")

    def build(entry: _Skeleton) -> ResolvedStage:
        cls, node, children = entry
        try:
            params = check_params(cls, given[id(node)])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for key, param in cls.params.items():
            if param.file and params[key]:
                path = Path(params[key])
                params[key] = str(path if path.is_absolute() else (base / path).resolve())
        return ResolvedStage(cls, params, tuple(build(child) for child in children))

    return build(skeleton), triton


def takes_key(where: str, raw: Mapping[str, Any], key: str) -> bool:
    """Whether the node written as ``raw`` takes ``key``, routed as :func:`resolve_stages` routes it.

    A structural key is taken, ``Wrapper::backend`` when the wrapper is a stage of the node, a
    Triton key always, a stage parameter when a stage of the node (the named one, for
    ``Stage::key``) declares it; a refused torchpipe key never.  An unknown stage in the
    node's backend is the same error as when the node is loaded.
    """
    if key.lower() in TORCHPIPE_ONLY:
        return False
    if key in STRUCTURE_KEYS:
        return True
    backend = raw["backend"]
    stages = [(cls, node) for cls, node, _ in _flatten(_skeleton(parse_backend(backend), backend, _scoped_backends(raw), where))]
    if key.lower().endswith(_BACKEND_SUFFIX):
        scope = key[: -len(_BACKEND_SUFFIX)].lower()
        return any(cls.name.lower() == scope for cls, _ in stages)
    key, targets = _route(stages, key)
    return bool(targets) or key in TRITON_KEYS


def _route(stages: _Stages, key: str) -> tuple[str, _Stages]:
    """The key a stage reads and the stages of the node that take it: ``Stage::key`` names one stage by name."""
    scope, _, scoped_key = key.partition("::")
    if scoped_key and scope.lower() in {cls.name.lower() for cls, _ in stages}:
        return scoped_key, [(cls, node) for cls, node in stages if cls.name.lower() == scope.lower() and scoped_key in cls.params]
    return key, [(cls, node) for cls, node in stages if key in cls.params]


def _refuse_torchpipe_only(where: str, raw: Mapping[str, Any]) -> None:
    """torchpipe keys that mean nothing to Triton get told what to use instead, not "unknown key"."""
    for key, value in raw.items():
        instead = TORCHPIPE_ONLY.get(key.lower())
        if instead:
            raise ConfigError(f"{where}: {key!r} is torchpipe's and has no counterpart here: {instead}")
        if key in _NO_AMPERSAND and "&" in str(value):
            raise ConfigError(
                f"{where}: {key} = {value!r} combines settings with '&', which torchpipe uses to join models of "
                "fixed batch sizes; here a node serves one model: export it with a dynamic batch dimension "
                "and set min and max (e.g. min = 1, max = 8)"
            )


def _flatten(entry: _Skeleton) -> Iterator[_Skeleton]:
    yield entry
    for child in entry[2]:
        yield from _flatten(child)


def _scoped_backends(raw: Mapping[str, Any]) -> dict[str, str]:
    """torchpipe's ``SyncTensor::backend = "X"`` is the same as writing ``SyncTensor[X]``."""
    return {k[: -len(_BACKEND_SUFFIX)].lower(): v for k, v in raw.items() if k.lower().endswith(_BACKEND_SUFFIX)}


def _skeleton(node: StageNode, text: str, scoped: dict[str, str], where: str, used: set[str] | None = None) -> _Skeleton:
    """Look every stage up and attach ``X::backend`` children, without changing the parsed tree."""
    top = used is None
    used = set() if top else used
    cls = find_stage(node.name)
    if cls is None:
        reason = f"unknown stage {node.name!r}{did_you_mean(node.name, registered_names())}"
        raise PipelineSyntaxError(reason, text, node.position)
    for key, position in node.param_positions.items():
        if key not in cls.params:
            reason = f"stage {cls.name} takes no parameter {key!r}{did_you_mean(key, list(cls.params))}"
            raise PipelineSyntaxError(reason, text, position)
    children = [_skeleton(child, text, scoped, where, used) for child in node.children]
    filled = scoped.get(node.name.lower()) if not node.children else None
    if filled is not None:
        used.add(node.name.lower())
        children = [_skeleton(parse_backend(filled), filled, scoped, where, used)]
    if cls.role == Role.SEQUENCE and not children:
        raise ConfigError(f"{where}: {cls.name} chains other stages; write {cls.name}[A,B]")
    if cls.role not in (Role.WRAPPER, Role.SEQUENCE) and children:
        raise ConfigError(f"{where}: {cls.name} is not a wrapper and cannot take [...]")
    if top and set(scoped) - used:
        unused = sorted(k + _BACKEND_SUFFIX for k in set(scoped) - used)
        raise ConfigError(f"{where}: {', '.join(unused)} names no stage of the backend")
    return cls, node, children
