"""Stages that save tensors to disk or load them from it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InternalError, RequestError
from ..spec import TORCH_TO_TRITON, TensorSpec
from .base import MapStage, Param, register

#: trees of the system's own: SaveTensor writes nowhere under them
_SYSTEM_TREES = tuple(
    Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")
)
#: folders whose direct subfolders belong to the system or its services (/var/lib, /var/tmp, /run/user)
_SYSTEM_PARENTS = (Path("/var"), Path("/run"))
_MIB = 1 << 20


def _is_system_folder(path: Path) -> bool:
    """The root, a folder directly in it (/tmp, /opt, /mnt, /home...), the home folder, or a folder of the system."""
    return (
        len(path.parts) <= 2
        or path == Path.home().resolve()
        or path.parent in _SYSTEM_PARENTS
        or any(path == root or root in path.parents for root in _SYSTEM_TREES)
    )


def _check_save_dir(text: str) -> Path:
    """The resolved ``save_dir``; ConfigError for a missing folder or one the system or other programs share."""
    path = Path(text).expanduser().resolve()
    if _is_system_folder(path):
        raise ConfigError(
            f"SaveTensor: save_dir {str(path)!r} is a system folder; give a folder of its own, made for the tensors "
            "(such as /tmp/my-tensors or ~/tensors)"
        )
    if not path.is_dir():
        raise ConfigError(f"SaveTensor: save_dir {str(path)!r} does not exist; create it first")
    return path


@register("SaveTensor")
class SaveTensor(MapStage):
    """Writes each input to a new uniquely named ``.pt`` file in ``save_dir``; passes it on unchanged.

    File names are generated here, never taken from a request, so files land only inside ``save_dir``.
    What it writes is capped per file and in total (the ``.pt`` files already in ``save_dir`` count);
    a request over a cap fails alone and nothing is written for it.
    """

    input_doc = "tensor"
    output_doc = "the input, unchanged; `saved_path` set"

    params = {
        "save_dir": Param(str, doc="an existing folder of its own (not /, the home folder or a system folder)"),
        "max_file_mb": Param(float, 64.0, low=0.0, high=1 << 20, doc="largest tensor written, in MiB"),
        "max_total_mb": Param(
            float, 1024.0, low=0.0, high=1 << 30, doc="MiB of .pt files save_dir may hold, per instance"
        ),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.save_dir = _check_save_dir(params["save_dir"])
        self.max_file = int(params["max_file_mb"] * _MIB)
        self.max_total = int(params["max_total_mb"] * _MIB)
        self.written = sum(f.stat().st_size for f in self.save_dir.glob("*.pt") if f.is_file())

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        if not isinstance(data, torch.Tensor):
            raise RequestError(f"SaveTensor needs a tensor, got {type(data).__name__}")
        size = data.nelement() * data.element_size()
        if size > self.max_file:
            raise RequestError(f"SaveTensor: the tensor is {size} bytes; max_file_mb allows {self.max_file}")
        if self.written + size > self.max_total:
            raise InternalError(
                f"SaveTensor: {self.save_dir} holds {self.written} bytes of .pt files; writing {size} more would pass "
                f"max_total_mb ({self.max_total} bytes)"
            )
        path = self.save_dir / f"{uuid.uuid4().hex}.pt"
        torch.save(data.detach().cpu(), path)
        self.written += path.stat().st_size
        item["saved_path"] = str(path)
        return data

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _check_save_dir(params["save_dir"])  # refused before anything is generated
        return spec


def _load_tensor(path: Path) -> torch.Tensor:
    """The one tensor stored in ``path``; ConfigError for anything else."""
    if not path.is_file():
        raise ConfigError(f"LoadTensor: tensor_name {str(path)!r} is not a file")
    # weights_only refuses arbitrary pickled objects, so a crafted file cannot run code
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused pickles and broken files alike
        raise ConfigError(
            f"LoadTensor: cannot load {str(path)!r} as a torch.save file of plain tensors ({type(exc).__name__}); "
            "files holding other objects are refused, so that loading one cannot run code"
        ) from None
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"LoadTensor: {str(path)!r} holds a {type(value).__name__}, not a tensor")
    return value


@register("LoadTensor")
class LoadTensor(MapStage):
    """Answers every request with the tensor stored in ``tensor_name`` (loaded once, tensors only)."""

    input_doc = "ignored"
    output_doc = "the stored tensor"

    params = {"tensor_name": Param(str, doc="path of a .pt file holding one tensor", file=True)}

    def init(self, params: dict[str, Any]) -> None:
        self.value = _load_tensor(Path(params["tensor_name"])).to(self.device)

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return self.value

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        value = _load_tensor(Path(params["tensor_name"]))
        return TensorSpec(TORCH_TO_TRITON[value.dtype], tuple(value.shape), batched=value.dim() == 4)
