"""What Triton and a Python-backend stub cost on their own: the pipeline's signature, no work.

The benchmark copies this file into its model repository as ``python_floor/1/model.py``, with the
entry model's inputs and outputs and the instances and batching of the model that takes the
requests first.  It reads each request's inputs as tritonpipe's own model does (DLPack into torch)
and answers zeros of the declared outputs, so its latency is the part of the pipeline's that no
stage can remove.  It uses no tritonpipe code.

``tools/batching_probe.py`` serves it with a stand-in for work: the config parameters ``fixed_ms`` and
``per_request_ms`` make each batch take ``fixed_ms + per_request_ms x its requests`` before it answers,
asleep, so that Triton's batcher can be watched on its own with a pipeline's costs.  ``engine_ms`` and
``engine_per_request_ms`` add a part that the instances take one at a time, as a GPU's JPEG engines take decode
calls: each batch sleeps that long first while it holds an exclusive lock on the file ``engine_lock``.
"""

import fcntl
import json
import time

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

DTYPES = {
    "TYPE_BOOL": torch.bool, "TYPE_UINT8": torch.uint8, "TYPE_INT8": torch.int8, "TYPE_INT16": torch.int16,
    "TYPE_INT32": torch.int32, "TYPE_INT64": torch.int64, "TYPE_FP16": torch.float16, "TYPE_FP32": torch.float32,
    "TYPE_FP64": torch.float64, "TYPE_BF16": torch.bfloat16,
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [spec["name"] for spec in config["input"]]
        batched = [1] if int(config.get("max_batch_size", 0)) > 0 else []
        # one request's answer: a dimension of any size answers with 1
        self.outputs = [
            (spec["name"], torch.zeros(batched + [max(1, int(d)) for d in spec["dims"]], dtype=DTYPES[spec["data_type"]]))
            for spec in config["output"]
        ]
        parameters = config.get("parameters", {})
        self.fixed_ms, self.per_request_ms, self.engine_ms, self.engine_per_request_ms = (
            float(parameters.get(key, {}).get("string_value", 0) or 0)
            for key in ("fixed_ms", "per_request_ms", "engine_ms", "engine_per_request_ms"))
        lock = parameters.get("engine_lock", {}).get("string_value", "")
        self.engine = open(lock, "a") if lock and (self.engine_ms or self.engine_per_request_ms) else None  # noqa: SIM115

    def execute(self, requests):
        if self.engine is not None:
            fcntl.flock(self.engine, fcntl.LOCK_EX)
            try:
                time.sleep((self.engine_ms + self.engine_per_request_ms * len(requests)) / 1000)
            finally:
                fcntl.flock(self.engine, fcntl.LOCK_UN)
        if self.fixed_ms or self.per_request_ms:
            time.sleep((self.fixed_ms + self.per_request_ms * len(requests)) / 1000)
        responses = []
        for request in requests:
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    torch.from_dlpack(tensor.to_dlpack())
            tensors = [pb_utils.Tensor.from_dlpack(name, to_dlpack(zeros)) for name, zeros in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        if self.engine is not None:
            self.engine.close()
