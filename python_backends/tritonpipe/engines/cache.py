"""The plan cache: build a TensorRT engine once, save it, and rebuild only when its inputs change.

Next to ``model.plan`` lies ``model.plan.json``, a sidecar holding the fingerprint the plan was
built for (ONNX content hash, GPU name and compute capability, TensorRT version, build settings)
and the engine's input/output description and profiles, so that the generator can describe a plan
without TensorRT.  The decision to rebuild is a pure function of the sidecar and the wanted
fingerprint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..spec import TensorSpec
from .base import TensorIO
from .profiles import Profile

log = logging.getLogger(__name__)
SIDECAR_VERSION = 1


def sidecar_path(plan: str | Path) -> Path:
    return Path(f"{plan}.json")


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(
    model_digest: str, gpu_name: str, compute_capability: str, tensorrt_version: str, build: dict[str, Any]
) -> dict[str, Any]:
    """What a plan depends on; ``build`` holds precision, layer precisions, profiles and calibration."""
    return {
        "model_sha256": model_digest,
        "gpu": gpu_name,
        "compute_capability": compute_capability,
        "tensorrt": tensorrt_version,
        "build": json.loads(json.dumps(build, sort_keys=True)),  # tuples -> lists, as read back
    }


def read_sidecar(plan: str | Path) -> dict[str, Any] | None:
    """The sidecar's content, or None when it is missing or unreadable."""
    try:
        data = json.loads(sidecar_path(plan).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == SIDECAR_VERSION else None


def rebuild_reason(plan: str | Path, wanted: dict[str, Any], sidecar: dict[str, Any] | None) -> str | None:
    """Why the plan must be (re)built, or None when it can be reused."""
    if not Path(plan).is_file():
        return f"there is no plan at {plan}"
    if sidecar is None or not isinstance(sidecar.get("fingerprint"), dict):
        return f"{sidecar_path(plan).name} is missing or unreadable"
    have = sidecar["fingerprint"]
    for key, value in wanted.items():
        if have.get(key) != value:
            old = have.get(key)
            if key == "model_sha256":
                return "the model file changed"
            return f"{key} changed ({json.dumps(old)} -> {json.dumps(value)})"
    return None


def io_to_json(ios: list[TensorIO]) -> list[dict[str, Any]]:
    return [{"name": io.name, "dtype": io.spec.dtype, "shape": list(io.spec.shape)} for io in ios]


def io_from_json(data: list[dict[str, Any]]) -> list[TensorIO]:
    return [TensorIO(d["name"], TensorSpec(d["dtype"], tuple(d["shape"]), batched=True)) for d in data]


def sidecar_content(
    wanted: dict[str, Any], inputs: list[TensorIO], outputs: list[TensorIO], profiles: list[Profile]
) -> dict[str, Any]:
    return {
        "version": SIDECAR_VERSION,
        "fingerprint": wanted,
        "inputs": io_to_json(inputs),
        "outputs": io_to_json(outputs),
        "profiles": [p.to_json() for p in profiles],
    }


def describe_from_sidecar(plan: str | Path) -> tuple[list[TensorIO], list[TensorIO], list[Profile]] | None:
    data = read_sidecar(plan)
    if data is None:
        return None
    try:
        return io_from_json(data["inputs"]), io_from_json(data["outputs"]), [Profile.from_json(p) for p in data["profiles"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{sidecar_path(plan)} is malformed ({exc}); rebuild the plan") from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_plan(plan: str | Path, data: bytes, sidecar: dict[str, Any]) -> None:
    """Save plan and sidecar; the old sidecar goes first so a crash never pairs it with a new plan."""
    plan = Path(plan)
    with contextlib.suppress(FileNotFoundError):
        sidecar_path(plan).unlink()
    _atomic_write(plan, data)
    _atomic_write(sidecar_path(plan), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def _locked(plan: Path) -> Iterator[None]:
    # several model instances may start at once: one builds, the others wait and reuse
    plan.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{plan}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_build(
    plan: str | Path, wanted: dict[str, Any], build: Callable[[], tuple[bytes, dict[str, Any]]]
) -> bytes:
    """The plan's bytes: reused when its sidecar matches ``wanted``, else ``build()`` and saved.

    ``build`` returns the serialized engine and the sidecar content to store with it.
    """
    plan = Path(plan)
    with _locked(plan):
        reason = rebuild_reason(plan, wanted, read_sidecar(plan))
        if reason is None:
            log.info("reusing the TensorRT plan %s", plan)
            return plan.read_bytes()
        log.warning("building the TensorRT plan %s because %s", plan, reason)
        data, sidecar = build()
        write_plan(plan, data, sidecar)
        return data
