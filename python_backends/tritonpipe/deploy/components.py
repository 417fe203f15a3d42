"""Where pods read the repository from: one kustomize Component per source.

``repository-pvc`` (a ReadWriteMany claim filled once), ``repository-s3`` and ``repository-gcs``
(tritonserver reads the bucket itself) and, only while the whole repository fits one,
``repository-configmap`` (copied into an emptyDir at start).  An overlay picks one on its
``components`` line.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

from .estimates import MIB
from .image import IMAGE, MODELS_MOUNT
from .manifests import deployment_patch, kustomization, labels
from .render import Manifest

#: a ConfigMap holds at most 1 MiB; leave room for its metadata
CONFIGMAP_LIMIT = 900 << 10


def repository_files(root: Path) -> list[tuple[str, bytes]]:
    """Every file of the repository (no ``__pycache__``) as (relative path, content), sorted by path."""
    return sorted(
        (p.relative_to(root).as_posix(), p.read_bytes())
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def configmap_key(relative: str, taken: set[str]) -> str:
    """A ConfigMap key for the file at ``relative``, unique among ``taken`` (which it joins)."""
    key = re.sub(r"[^-._a-zA-Z0-9]", "_", relative.replace("/", "__"))
    base, index = key, 1
    while key in taken:
        key, index = f"{base}.{index}", index + 1
    taken.add(key)
    return key


def repository_components(name: str, entry: str, repository: Path) -> tuple[list[Manifest], list[str]]:
    """The files of every repository component, and a line for each component left out and why."""
    files = repository_files(repository)
    size = sum(len(data) for _, data in files)
    mount = {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}
    out: list[Manifest] = []
    header = "components/repository-{}/{}"

    # PVC: a shared volume many pods read; fill it once (README, "Scaling out")
    claim = f"{name}-models"
    storage = max(1, math.ceil(2 * size / (1 << 30)))
    out.append(Manifest(header.format("pvc", "kustomization.yaml"), kustomization(
        "Component", resources=["pvc.yaml"], patches=[{"path": "patch.yaml"}]),
        ["The repository on a PersistentVolumeClaim, mounted read-only at " + MODELS_MOUNT + ".",
         "Copy the generated repository into it once (README, 'Scaling out'); every replica reads the same files."]))
    out.append(Manifest(header.format("pvc", "pvc.yaml"), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "labels": labels(name)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{storage}Gi"}}},
    }, [f"The repository is {size / MIB:.1f} MiB; the claim asks for twice that, at least 1 GiB.",
        "ReadWriteMany lets pods on different nodes mount it (NFS, EFS, Filestore, CephFS...):",
        "add spec.storageClassName for a class that offers it where the default class does not."]))
    out.append(Manifest(header.format("pvc", "patch.yaml"), deployment_patch(
        name, {"volumeMounts": [mount]},
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}])))

    # object storage: tritonserver reads s3:// and gs:// itself; no volume
    for scheme, component in (("s3", "s3"), ("gs", "gcs")):
        url = f"{scheme}://CHANGE-ME-bucket/{entry}"
        if scheme == "s3":
            container: dict[str, Any] = {
                "env": [{"name": "MODEL_REPOSITORY", "value": url}],
                "envFrom": [{"secretRef": {"name": f"{name}-s3", "optional": True}}],
            }
            pod: dict[str, Any] = {}
            notes = [("- name: MODEL_REPOSITORY", [
                "s3://bucket/prefix, or s3://host:port/bucket/prefix for MinIO and other S3-compatible stores.",
                f"Credentials: a Secret {name}-s3 with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and",
                "AWS_DEFAULT_REGION, or none where the node or service account already grants access."])]
        else:
            container = {
                "env": [
                    {"name": "MODEL_REPOSITORY", "value": url},
                    {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/run/secrets/gcs/key.json"},
                ],
                "volumeMounts": [{"name": "gcs-credentials", "mountPath": "/var/run/secrets/gcs", "readOnly": True}],
            }
            pod = {"volumes": [{"name": "gcs-credentials", "secret": {"secretName": f"{name}-gcs", "optional": True}}]}
            notes = [("- name: MODEL_REPOSITORY", [
                "gs://bucket/prefix.  Credentials: a Secret " + f"{name}-gcs with a service-account key as key.json,",
                "or Workload Identity (then drop GOOGLE_APPLICATION_CREDENTIALS and the volume)."])]
        out.append(Manifest(header.format(component, "kustomization.yaml"), kustomization(
            "Component", patches=[{"path": "patch.yaml"}]),
            [f"The repository in object storage: tritonserver --model-repository={scheme}://... reads it itself.",
             f"Upload the generated folder so that {scheme}://<bucket>/<prefix>/{entry}/config.pbtxt exists."]))
        out.append(Manifest(header.format(component, "patch.yaml"), deployment_patch(name, container, **pod), [], notes))

    # ConfigMap: only while the whole repository fits one
    skipped: list[str] = []
    if size <= CONFIGMAP_LIMIT:
        taken: set[str] = set()
        data, binary, items = {}, {}, []
        for relative, content in files:
            key = configmap_key(relative, taken)
            try:
                data[key] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(content).decode("ascii")
            items.append({"key": key, "path": relative})
        configmap: dict[str, Any] = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-repository", "labels": labels(name)}, "data": data,
        }
        if binary:
            configmap["binaryData"] = binary
        copy = {
            "name": "copy-repository",
            "image": IMAGE,
            "command": ["sh", "-c", f"cp -RL /repository-files/* {MODELS_MOUNT}/"],
            "securityContext": {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "repository-files", "mountPath": "/repository-files", "readOnly": True},
                {"name": "models", "mountPath": MODELS_MOUNT},
            ],
        }
        out.append(Manifest(header.format("configmap", "kustomization.yaml"), kustomization(
            "Component", resources=["configmap.yaml"], patches=[{"path": "patch.yaml"}]),
            [f"The whole repository ({size / 1024:.0f} KiB) in a ConfigMap, copied into an emptyDir at start.",
             "A ConfigMap volume lists hidden ..data entries Triton would take for models; the copy leaves them out."]))
        out.append(Manifest(header.format("configmap", "configmap.yaml"), configmap,
                            ["Generated from the repository's files; regenerate instead of editing."]))
        out.append(Manifest(header.format("configmap", "patch.yaml"), deployment_patch(
            name, {"volumeMounts": [mount]},
            initContainers=[copy],
            volumes=[
                {"name": "repository-files", "configMap": {"name": f"{name}-repository", "items": items}},
                {"name": "models", "emptyDir": {"sizeLimit": f"{max(1, math.ceil(2 * size / MIB))}Mi"}},
            ])))
    else:
        skipped.append(
            f"no repository-configmap component: the repository is {size / MIB:.1f} MiB, more than a ConfigMap holds"
        )
    return out, skipped
