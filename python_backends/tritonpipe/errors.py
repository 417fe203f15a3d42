"""Error types shared by kernels, stages, the generator and the serving layer."""


class StageError(ValueError):
    """Bad input for one request: reported to that request's client as INVALID_ARG."""


class ConfigError(ValueError):
    """A configuration that cannot be served; raised before anything is written."""


def is_bad_input(exc: BaseException) -> bool:
    """Whether a stage's exception blames the request (INVALID_ARG) rather than the server (INTERNAL)."""
    return isinstance(exc, (StageError, ValueError, TypeError))
