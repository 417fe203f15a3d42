"""Names of the config parameters through which the generator talks to the generic model.

Kept apart so that the model side imports them without pulling in tritonclient.
"""

PARAM_PIPELINE = "tritonpipe.pipeline"
PARAM_INPUTS = "tritonpipe.inputs"
PARAM_OUTPUTS = "tritonpipe.outputs"
PARAM_PLUGINS = "tritonpipe.plugins"
PARAM_WARMUP = "tritonpipe.warmup"
PARAM_HOST_OUTPUTS = "tritonpipe.host_outputs"
