"""tritonpipe: torchpipe-style image pipelines served by Triton Inference Server.

- :func:`register` and :class:`Stage` let users add stages;
- :func:`load_graph` and :func:`generate_repository` turn configurations into model repositories;
- :class:`pipe` runs a configuration on a real server from Python.
"""

from .errors import ConfigError, RequestError

# Imported on first use: the stages pull in torch and the rest tritonclient, and neither is needed
# to read a command's arguments or to import a light submodule; served models must not need tritonclient.
_LAZY = {
    "MapStage": "stages.base",
    "Param": "stages.base",
    "Stage": "stages.base",
    "register": "stages.base",
    "TensorSpec": "spec",
    "load_graph": "pipeline.graph",
    "generate_repository": "repository.generate",
    "pipe": "client.pipe",
}

__all__ = ["ConfigError", "RequestError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tritonpipe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
