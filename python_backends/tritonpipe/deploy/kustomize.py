"""Render a kustomization offline: the subset of kustomize that ``tritonpipe generate --k8s`` writes.

Supported: ``resources`` (files and folders), ``components`` (``kind: Component``), ``patches``
given by ``path`` (strategic-merge patches whose target is the patch's own kind and name),
``images`` and ``namespace``.  Strategic merge follows Kubernetes' rules for what the generated
patches touch: maps merge, ``null`` deletes a key, lists of containers, init containers, volumes,
volume mounts and env merge by ``name``, and every other list is replaced.  Anything else in a
kustomization is refused rather than silently ignored, so the rendered objects are what
``kubectl apply -k`` would send.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

#: list fields whose items merge by their ``name`` (Kubernetes' patchMergeKey for them)
MERGE_BY_NAME = {"containers", "initContainers", "volumes", "volumeMounts", "env"}
_KNOWN = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace"}


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            elif name in out:
                out[name] = strategic_merge(out[name], value, name)
            else:
                out[name] = copy.deepcopy(value)
        return out
    if key in MERGE_BY_NAME and isinstance(base, list) and isinstance(patch, list):
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            index = next((i for i, have in enumerate(out) if have.get("name") == item.get("name")), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = strategic_merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _kustomization(folder: Path, kind: str) -> dict[str, Any]:
    docs = _load(folder / "kustomization.yaml")
    if len(docs) != 1 or docs[0].get("kind", "Kustomization") != kind:
        raise ConfigError(f"{folder}/kustomization.yaml is not one {kind}")
    unknown = set(docs[0]) - _KNOWN
    if unknown:
        raise ConfigError(f"{folder}/kustomization.yaml uses {', '.join(sorted(unknown))}, which this renderer does not support")
    return docs[0]


def _apply(folder: Path, spec: dict[str, Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += build(path) if path.is_dir() else _load(path)
    for entry in spec.get("components", []):
        component = folder / entry
        objects = _apply(component, _kustomization(component, "Component"), objects)
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ConfigError(f"{folder}: only patches given by path are supported, got {patch_entry}")
        for patch in _load(folder / patch_entry["path"]):
            target = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == target]
            if len(matches) != 1:
                raise ConfigError(f"{folder}: patch for {target[0]}/{target[1]} matches {len(matches)} objects")
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    for image in spec.get("images", []):
        for obj in objects:
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def build(folder: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize folder`` renders, for the supported subset."""
    folder = Path(folder)
    return _apply(folder, _kustomization(folder, "Kustomization"), [])
