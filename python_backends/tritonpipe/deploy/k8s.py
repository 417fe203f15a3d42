"""Kubernetes manifests for a generated repository: what ``tritonpipe generate --k8s DIR`` calls.

:func:`build_manifests` (``layout.py``) lays out a kustomize base, repository components and
device overlays as commented YAML; :func:`check_target` refuses a folder before anything is
written, :func:`write_manifests` writes them, :func:`summary` is what the command line prints.

The rest of ``deploy/``: ``image.py`` (what the image serves), ``estimates.py`` (startup time,
``/dev/shm`` and memory), ``manifests.py`` (the objects), ``components.py`` (where pods read the
repository), ``render.py`` (YAML with comments).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError
from ..repository.generate import swap_into_place
from ..repository.ownership import FILES, check_replaceable, written_files
from .layout import Manifests, build_manifests

__all__ = ["MARKER", "Manifests", "build_manifests", "check_target", "summary", "write_manifests"]

#: written into every manifests folder: every file written with its sha256 (what ``--force`` may
#: replace); kustomize reads only the files a kustomization names, so it does not see it
MARKER = "tritonpipe-k8s.json"


def check_target(folder: str | os.PathLike, repository: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Refuse a manifests folder that cannot be written, before anything is written.

    ``overwrite`` (``--force``) replaces an empty folder or a manifests folder tritonpipe wrote and
    nobody changed since, never a symbolic link, the root, the home folder, or the current folder or
    one of its parents (the same rules as the repository's ``-o``).
    """
    check_replaceable(folder, overwrite, marker=MARKER, what="manifests folder")
    folder = Path(folder).resolve()
    if repository is not None:
        repository = Path(repository).resolve()
        if folder == repository or repository in folder.parents or folder in repository.parents:
            raise ConfigError(f"the manifests folder {folder} and the repository {repository} must not contain each other")
    return folder


def write_manifests(manifests: Manifests, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every file to ``folder`` atomically (a staging folder moved into place), with its marker."""
    folder = check_target(folder, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for manifest in manifests.files:
            target = staging / manifest.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(manifest.text())
        marker = {"entry": manifests.entry, FILES: written_files(staging, MARKER)}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        swap_into_place(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"cannot write the manifests to {folder}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def summary(manifests: Manifests) -> Iterable[str]:
    """What the CLI prints after writing."""
    yield f"  /dev/shm {manifests.shm.quantity}; startup estimate " + ", ".join(
        f"{k} {v.seconds:.0f} s" for k, v in manifests.startup.items()
    )
    yield "  apply with: kubectl apply -k <folder>/overlays/cpu (or overlays/gpu, overlays/mig)"
