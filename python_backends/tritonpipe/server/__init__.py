"""What owns a tritonserver process and the files it runs from."""

from .install import TritonInstall, locate_triton
from .owner import ServerError, TritonServer

__all__ = ["ServerError", "TritonInstall", "TritonServer", "locate_triton"]
