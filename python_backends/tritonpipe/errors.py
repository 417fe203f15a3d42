"""Error types shared by kernels, stages, the generator and the serving layer."""


class StageError(ValueError):
    """Bad input for one request: reported to that request's client as INVALID_ARG."""


class ConfigError(ValueError):
    """A configuration that cannot be served; raised before anything is written."""
