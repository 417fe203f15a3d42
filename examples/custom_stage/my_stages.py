"""A custom stage: scale pixel values, usable in pipeline strings as `Brightness`.

A stage is a small class with `init(params)` and `forward(batch)`. `batch` is a list of
dicts, one per request: read `item["data"]`, write `item["result"]`.
"""

from tritonpipe import Param, Stage, TensorSpec, register


@register("Brightness")
class Brightness(Stage):
    """Multiplies pixel values by `factor` and clips them to [0, 255]."""

    params = {"factor": Param(float, 1.5, low=0.0, high=16.0, doc="gain")}
    wants_gpu = True  # runs on the instance's GPU when it has one
    input_doc = "1xCxHxW tensor"
    output_doc = "float32, same shape"

    def init(self, params):
        self.factor = params["factor"]

    def forward(self, batch):
        for item in batch:
            image = item["data"].to(self.device)
            item["result"] = (image.float() * self.factor).clamp(0, 255)

    @classmethod
    def infer(cls, params, spec):
        # tells the generator what this stage produces, so configs get the right type
        return TensorSpec("FP32", spec.shape, spec.batched)
