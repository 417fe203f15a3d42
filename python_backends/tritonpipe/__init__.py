"""tritonpipe: torchpipe-style image pipelines served by Triton Inference Server.

- :func:`register` and :class:`Stage` let users add stages;
- :func:`load_graph` and :func:`generate_repository` turn configurations into model repositories;
- :class:`pipe` runs a configuration on a real server from Python.
"""

from . import _moved
from .errors import ConfigError, StageError
from .spec import TensorSpec
from .stages.base import MapStage, Param, Stage, register

_moved.install()

__all__ = [
    "ConfigError",
    "MapStage",
    "Param",
    "Stage",
    "StageError",
    "TensorSpec",
    "generate_repository",
    "load_graph",
    "pipe",
    "register",
]


def __getattr__(name: str):
    # these import tritonclient; served models import this package and must not need it
    if name == "pipe":
        from .client.pipe import pipe

        return pipe
    if name == "load_graph":
        from .pipeline.graph import load_graph

        return load_graph
    if name == "generate_repository":
        from .repository.generate import generate_repository

        return generate_repository
    raise AttributeError(f"module 'tritonpipe' has no attribute {name!r}")
