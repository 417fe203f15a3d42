"""What tritonpipe wrote into a folder, and whether ``--force`` may replace that folder.

Every folder tritonpipe writes (a model repository, a folder of Kubernetes manifests) holds a
marker file whose ``files`` mapping lists each file it wrote, as a relative POSIX path and the
sha256 of its content.  ``--force`` replaces a non-empty folder only when everything in it is one
of those files, unchanged; anything else is named and the folder is left alone.  Two things are
not counted: empty folders (an ensemble's version folder is one) and the bytecode Python writes
into ``__pycache__`` folders beside a model's ``model.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError

#: the key of a marker that maps each file tritonpipe wrote to the sha256 of its content
FILES = "files"
#: how many entries a refusal names before it counts the rest
SHOWN = 5
_CHUNK = 1 << 20


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_bytecode(path: Path) -> bool:
    """A ``.pyc`` file Python wrote into a ``__pycache__`` folder (the server does, beside model.py)."""
    return path.parent.name == "__pycache__" and path.suffix == ".pyc" and path.is_file() and not path.is_symlink()


def written_files(root: str | os.PathLike, marker: str) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every regular file under ``root`` but ``marker``.

    Called on a finished staging folder just before its marker is written, so the hashes are of
    what is on disk.
    """
    root = Path(root)
    found: dict[str, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if relative != marker and path.is_file() and not path.is_symlink():
                found[relative] = sha256(path)
    return dict(sorted(found.items()))


def read_json_marker(folder: str | os.PathLike, marker: str) -> dict | None:
    """The JSON object in ``folder/marker``, or None where there is none (or it is a link)."""
    path = Path(folder) / marker
    if path.is_symlink():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _file_list(content: dict) -> dict[str, str] | None:
    files = content.get(FILES)
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return files


def _names(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def _foreign(root: Path, files: dict[str, str], marker: str) -> tuple[list[str], list[str]]:
    """What under ``root`` tritonpipe did not write (unknown) and what it wrote but differs now (changed).

    Links are never followed.  A folder under which the marker lists nothing is named once, as
    ``name/``, when it holds anything at all.
    """
    unknown: list[str] = []
    changed: list[str] = []
    prefixes = {parent.as_posix() for key in files for parent in Path(key).parents}

    def holds_anything(folder: Path) -> bool:
        for path in _entries(folder):
            if not path.is_dir() or path.is_symlink():
                if not _is_bytecode(path):
                    return True
            elif holds_anything(path):
                return True
        return False

    def visit(folder: Path) -> None:
        for path in _entries(folder):
            relative = path.relative_to(root).as_posix()
            if path.is_dir() and not path.is_symlink():
                if relative in prefixes:
                    visit(path)
                elif holds_anything(path):
                    unknown.append(relative + "/")
            elif relative == marker or _is_bytecode(path):
                continue
            elif relative not in files:
                unknown.append(relative)
            elif path.is_symlink() or not path.is_file() or sha256(path) != files[relative]:
                changed.append(relative)

    try:
        visit(root)
    except OSError as exc:
        raise ConfigError(f"cannot check what {root} holds before replacing it: {exc}") from None
    return unknown, changed


def _entries(folder: Path) -> Iterable[Path]:
    return sorted(folder.iterdir())


def _protected(folder: Path) -> bool:
    """The root, the home folder or one of its parents, the current folder or one of its parents."""
    home, here = Path.home().resolve(), Path.cwd().resolve()
    return folder in {Path(folder.anchor), home, *home.parents, here, *here.parents}


def check_replaceable(folder: str | os.PathLike, overwrite: bool, *, marker: str, what: str) -> None:
    """Refuse ``folder`` unless it may be filled (missing or empty) or replaced (``overwrite``).

    Replaced means: not a symbolic link, not the root, the home folder, the current folder or one of
    their parents, and holding only what ``marker`` lists as written by tritonpipe, unchanged.
    ``what`` names the kind of folder in messages ("repository", "manifests folder").
    """
    folder = Path(folder).absolute()
    if folder.is_symlink():  # before anything resolves it
        raise ConfigError(f"{folder} is a symbolic link; give the folder it points to, or another path")
    if not folder.exists():
        existing = next((p for p in folder.parents if p.exists() or p.is_symlink()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"cannot write to {folder}: {existing} is not a folder")
        return
    if not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{folder} is not empty; pass overwrite (--force) to replace it")
    resolved = folder.resolve()
    if _protected(resolved):
        raise ConfigError(
            f"refusing to replace {resolved}: it is the root, the home folder, or the current folder or one of its parents"
        )
    content = read_json_marker(resolved, marker)
    if content is None:
        raise ConfigError(
            f"{resolved} is not empty and is not a {what} tritonpipe generated (it has no {marker}); "
            "--force replaces only those: choose an empty or a new folder"
        )
    files = _file_list(content)
    if files is None:
        models = content.get("models") if isinstance(content.get("models"), list) else []
        named = {marker, *(m for m in models if isinstance(m, str))}
        extra = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in _entries(resolved) if p.name not in named]
        hint = f"; it holds {_names(extra)}, which its marker does not name as models" if extra else ""
        raise ConfigError(
            f"{resolved} has a {marker} without the list of files tritonpipe wrote (an earlier release wrote it, "
            f"or not tritonpipe at all), so --force cannot tell its files from yours{hint}: keep what you need "
            "from it and delete the folder by hand, or choose another folder"
        )
    unknown, changed = _foreign(resolved, files, marker)
    if unknown or changed:
        found = []
        if unknown:
            found.append(f"{_names(unknown)} (not written by tritonpipe)")
        if changed:
            found.append(f"{_names(changed)} (changed since tritonpipe wrote them)")
        raise ConfigError(
            f"refusing to replace {resolved}: it holds {'; and '.join(found)}; --force replaces only what "
            "tritonpipe wrote, unchanged: move those out of the folder, or choose another folder"
        )
