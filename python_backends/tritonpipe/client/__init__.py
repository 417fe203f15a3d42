"""What calls a served pipeline: the tritonclient caller and torchpipe's ``pipe``."""

from .client import PROTOCOLS, InferError, PipelineClient, summarize

__all__ = ["PROTOCOLS", "InferError", "PipelineClient", "pipe", "summarize"]


def __getattr__(name: str):
    if name == "pipe":
        from .pipe import pipe

        return pipe
    raise AttributeError(f"module 'tritonpipe.client' has no attribute {name!r}")
