"""The list form of a pipeline: ``[(name, stage, config), ...]`` of Python objects -> node tables.

Each entry becomes a node whose ``next`` is the entry after it.  ``stage`` is one of:

- a pipeline string (``"S[DecodeMat,ResizeMat]"``);
- a plain function defined at the top level of a file: the ``Function`` stage serves it from a
  copy of that file, so the server imports it by name (lambdas and closures have no name there);
- a ``torch.nn.Module``: exported with ``torch.export`` from the example input that its config
  describes (``inputs = "input:FP32:3x224x224"``, per request) and run by the torch engine.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ..engines.torch_engine import parse_io
from ..errors import ConfigError
from ..spec import TRITON_TO_TORCH
from .names import check_name

#: rows of the example batch a module is exported with; 1 would fix the batch dimension to 1
_EXAMPLE_ROWS = 2


def node_tables(entries: list | tuple, folder: Path) -> dict[str, dict[str, Any]]:
    """The graph configuration of a pipeline list; modules are exported into ``folder``."""
    if not entries:
        raise ConfigError("a pipeline list needs at least one (name, stage, config) entry")
    tables: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        if not (isinstance(entry, (tuple, list)) and len(entry) in (2, 3)):
            raise ConfigError(f"entry {index} of the pipeline list must be (name, stage, config), got {entry!r:.80}")
        name, stage, config = (*entry, {})[:3]
        where = f"entry {name!r}"
        check_name("entry name", name)  # it names a node, and the file a module is exported to
        if name in tables:
            raise ConfigError(f"{where} appears twice in the pipeline list; give each entry its own name")
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: its config must be a dict of keys (worker_num, cores_per_worker, ...), got {config!r:.80}")
        taken = sorted({"backend", "next"} & set(config))
        if taken:
            raise ConfigError(f"{where}: the list sets {', '.join(taken)} itself; drop it from the entry's config")
        if isinstance(stage, str):
            table = {"backend": stage}
        elif isinstance(stage, torch.nn.Module):
            table = _module_table(where, name, stage, config, folder)
        else:
            table = _function_table(where, stage, first=index == 0)
        tables[name] = {**table, **config}
    names = list(tables)
    for current, following in zip(names, names[1:]):
        tables[current]["next"] = following
    return tables


def _function_table(where: str, function: Any, first: bool) -> dict[str, Any]:
    """A ``Function`` node, after refusing what the server could not import by name."""
    if not inspect.isfunction(function):
        raise ConfigError(
            f"{where}: the stage {function!r:.60} is not a pipeline string, a function or a torch.nn.Module; "
            "wrap it in a function defined with def at the top level of a file"
        )
    label = function.__qualname__
    if function.__name__ == "<lambda>":
        raise ConfigError(
            f"{where}: a lambda cannot be served: the server imports the function by its name from its file; "
            "define it with def at the top level of a file"
        )
    if function.__closure__ or "<locals>" in label:
        raise ConfigError(
            f"{where}: {label} is defined inside another function (a closure), so the server cannot import it "
            "by name; define it at the top level of its file and read what it needs from module-level names"
        )
    source = inspect.getsourcefile(function)
    if source is None or not Path(source).is_file():
        raise ConfigError(
            f"{where}: {label} is defined in no file ({function.__code__.co_filename}), and the server imports it "
            "from a copy of its file; define it in a .py file"
        )
    # only the request carries bytes: every later entry is fed the tensor of the one before it
    return {"backend": "Function", "function_file": str(Path(source).resolve()), "function": function.__name__,
            "input": "bytes" if first else "tensor"}


def _module_table(where: str, name: str, module: torch.nn.Module, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A torch-engine model node running ``module`` exported to ``folder``."""
    text = config.get("inputs")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"{where}: a torch.nn.Module is exported from an example input; describe it per request, e.g. "
            "inputs = \"input:FP32:3x224x224\""
        )
    ios = parse_io(f"{where}: inputs", text)
    free = [io.name for io in ios if any(d < 0 for d in io.spec.shape[1:])]
    if free:
        raise ConfigError(f"{where}: inputs {', '.join(free)} have free dims (-1); the example input needs them all fixed")
    device = next(module.parameters(), torch.zeros(())).device
    examples = tuple(
        torch.zeros((_EXAMPLE_ROWS, *io.spec.shape[1:]), dtype=TRITON_TO_TORCH[io.spec.dtype], device=device) for io in ios
    )
    training = module.training
    module.eval()
    try:
        program = torch.export.export(module, examples, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in ios))
    except Exception as exc:  # noqa: BLE001 - any export failure is this entry's configuration problem
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"{where}: torch.export cannot export the module from inputs {text!r}: {type(exc).__name__}: {first_line}"
        ) from None
    finally:
        module.train(training)
    path = folder / f"{name}.pt2"
    torch.export.save(program, str(path))
    return {"backend": "SyncTensor[TensorrtTensor]", "model": str(path), "engine": "torch"}
