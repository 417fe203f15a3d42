"""tritonpipe's errors: one base class and one subclass per side that is to blame.

- :class:`ConfigError`: the configuration (or a command-line argument) cannot be served; raised
  before anything is written.
- :class:`RequestError`: one request's input is bad; that
  request fails with INVALID_ARG and nothing else is affected.
- :class:`InternalError`: tritonpipe, a model or an engine failed; the request fails with INTERNAL.

Every command-line tool catches :class:`TritonpipeError` and prints its message on one line.
"""


class TritonpipeError(Exception):
    """Base of every error tritonpipe raises on purpose."""


class ConfigError(TritonpipeError):
    """A configuration that cannot be served; raised before anything is written."""


class RequestError(TritonpipeError):
    """Bad input for one request: reported to that request's client as INVALID_ARG.

    ``reason`` names the kind of fault for counting (``not_jpeg``, ``truncated``, ``too_large``, ...);
    it is the ``reason`` label of the ``tritonpipe_stage_rejects`` metric.
    """

    def __init__(self, message: str = "", reason: str = "bad_input"):
        super().__init__(message)
        self.reason = reason


class InternalError(TritonpipeError):
    """A failure on the serving side (a model, an engine, tritonpipe itself): INTERNAL to the client."""


def is_bad_input(exc: BaseException) -> bool:
    """Whether an exception blames the request (INVALID_ARG) rather than the server (INTERNAL).

    Only :class:`RequestError` does: a ``ValueError`` from deep inside torch or a model says
    nothing about the client's input.
    """
    return isinstance(exc, RequestError)
