"""Stages: the units a pipeline string is made of.

Built-in stages live in the modules of this package; users add their own with
``tritonpipe.register`` in a plugin file (``--plugin path.py``) or through the
``tritonpipe.stages`` entry-point group.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

_BUILTIN_MODULES = ("image", "detection", "control", "tensor_io", "model", "function")
_loaded = False
_plugin_files: dict[Path, object] = {}
#: the user files being imported right now, innermost last
_importing: list[Path] = []


def load_builtin_stages() -> None:
    """Import the built-in stage modules and installed entry-point plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    for entry in entry_points(group="tritonpipe.stages"):
        entry.load()


def importing_file() -> Path | None:
    """The user file whose import is running now, if any (a file must not build pipelines when imported)."""
    return _importing[-1] if _importing else None


def load_plugin(path: str | Path):
    """Import a user's file (custom stages, functions) once, so that its ``@register`` calls take effect.

    Returns the module.
    """
    from .base import ConfigError

    load_builtin_stages()
    path = Path(path).resolve()
    if path in _plugin_files:
        return _plugin_files[path]
    if not path.is_file():
        raise ConfigError(f"plugin file {str(path)!r} does not exist")
    module_name = f"tritonpipe_plugin_{path.stem}_{abs(hash(str(path))) & 0xFFFFFF:x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugin file {str(path)!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _importing.append(path)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        del sys.modules[module_name]
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever user code does at import is a bad configuration
        del sys.modules[module_name]
        raise ConfigError(f"plugin file {str(path)!r} {_what_it_did(exc)}") from None
    finally:
        _importing.pop()
    _plugin_files[path] = module
    return module


def _what_it_did(exc: BaseException) -> str:
    """One line on how a plugin's import ended: an exit or a Ctrl-C would end the whole program instead."""
    if isinstance(exc, SystemExit):
        return (f"called sys.exit({exc.code!r}) on import; a plugin file must only define and register stages "
                "and functions: remove the exit")
    if isinstance(exc, KeyboardInterrupt):
        return "raised KeyboardInterrupt on import (a Ctrl-C, or the file raises it); remove the raise and run again"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"raised on import: {type(exc).__name__}: {first_line}".rstrip(": ")


def build_stage(node, device, base_dir: Path | None = None):
    """Instantiate a resolved stage tree on ``device``.

    Relative file parameters are resolved against ``base_dir`` (a model's version folder).
    """
    import torch

    from .base import check_params, lookup

    cls = lookup(node.name)
    stage = cls()
    stage.device = torch.device(device)
    stage.children = [build_stage(child, device, base_dir) for child in node.children]
    params = check_params(cls, node.params)
    if base_dir is not None:
        for key, param in cls.params.items():
            if param.file and params[key] and not Path(params[key]).is_absolute():
                params[key] = str(Path(base_dir) / params[key])
    stage.init(params)
    return stage
