"""The preprocessing a Triton user would write by hand: PIL decode, RGB, resize, float CHW.

The benchmark copies this file into its model repository as ``baseline_pre/1/model.py``.
It deliberately uses no tritonpipe code: one image at a time, on the CPU, with PIL.
Tensors cross the backend through DLPack, as in tritonpipe's own model, so the two
differ in the preprocessing only (and this works whatever numpy the stub was built with).
"""

import io
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from PIL import Image
from torch.utils.dlpack import to_dlpack


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.size = (int(params["width"]["string_value"]), int(params["height"]["string_value"]))

    def _preprocess(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "INPUT")
        data = torch.from_dlpack(tensor.to_dlpack()).numpy().tobytes()
        image = Image.open(io.BytesIO(data)).convert("RGB").resize(self.size, Image.BILINEAR)
        chw = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None])
        return pb_utils.Tensor.from_dlpack("OUTPUT", to_dlpack(torch.from_numpy(chw)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=[self._preprocess(request)]))
            except Exception as exc:  # noqa: BLE001 - a bad image fails its own request only
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
