"""tritonpipe: torchpipe-style image pipelines served by Triton Inference Server.

- :func:`register` and :class:`Stage` let users add stages;
- :func:`load_graph` and :func:`generate_repository` turn configurations into model repositories;
- :class:`pipe` runs a configuration on a real server from Python.
"""

from .errors import ConfigError, StageError
from .pipeline.graph import load_graph
from .repository.generate import generate_repository
from .stages.base import MapStage, Param, Stage, register

__all__ = [
    "ConfigError",
    "MapStage",
    "Param",
    "Stage",
    "StageError",
    "generate_repository",
    "load_graph",
    "pipe",
    "register",
]


def __getattr__(name: str):
    # the serving layer imports tritonclient; load it only when asked for
    if name == "pipe":
        from .serving.pipe import pipe

        return pipe
    raise AttributeError(name)
