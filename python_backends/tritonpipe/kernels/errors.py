"""The one error the kernels raise for input they cannot take."""

from __future__ import annotations


class DecodeError(ValueError):
    """Encoded bytes that cannot be decoded: empty, truncated, corrupt, too large, or another format.

    ``reason`` names the kind of fault (``not_jpeg``, ``truncated``, ``too_large``, ...); the stages
    turn it into the request's error, and it becomes the ``reason`` label of the rejects metric.
    """

    def __init__(self, message: str = "", reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason
