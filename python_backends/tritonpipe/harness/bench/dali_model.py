"""Triton + DALI as users run it: DALI's classifier preprocessing inside a Python-backend model.

The benchmark copies this file into its model repository as ``dali_served_pre/1/model.py`` and
ensembles it with the same model-stage model the tritonpipe pipeline and the PIL baseline use.
It deliberately uses no tritonpipe code.  Like Triton's own DALI backend, each instance runs one
DALI pipeline at prefetch depth 1 on each batch Triton gives it: mixed decode (the hardware JPEG
engines take ``hw_decoder_load`` of the images, nvjpeg's CUDA decoder the rest), a bilinear
resize without antialiasing, and float CHW out (0-255, RGB; the model stage normalises, as it
does for the baseline).

The batch goes to the model stage through host memory (``output_device`` "cpu", one copy per
batch): in Triton 2.51, GPU tensors handed from one Python-backend model to the next cost about
15 ms per request on each side on an H200 (measured with ``output_device`` "gpu"), far more than
the copy.

A batch DALI fails on (a damaged JPEG) is run again one request at a time, so that only the bad
request fails.
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack


class TritonPythonModel:
    def initialize(self, args):
        from nvidia.dali import fn, pipeline_def, types

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        height, width = int(params["height"]), int(params["width"])
        self.output_device = params.get("output_device", "cpu")
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(self.device)

        @pipeline_def(
            batch_size=max(int(config["max_batch_size"]), 1),
            num_threads=int(params["threads"]),
            device_id=self.device.index,
            prefetch_queue_depth=1,
        )
        def classifier_preprocessing():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(
                jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=float(params["hw_decoder_load"])
            )
            images = fn.resize(images, resize_x=width, resize_y=height, antialias=False)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW")

        self.build = classifier_preprocessing
        self.pipe = self.build()
        self.pipe.build()  # here, so that a DALI that cannot run fails the model's load

    def _run(self, arrays):
        """One Nx3xHxW float tensor, a copy of DALI's output (DALI reuses its buffers): in host memory, or
        on the GPU with ``output_device`` "gpu".

        A pipeline that raised is not used again: the next call builds a fresh one.
        """
        if self.pipe is None:
            self.pipe = self.build()
            self.pipe.build()
        try:
            self.pipe.feed_input("jpegs", arrays)
            (out,) = self.pipe.run()
        except Exception:
            self.pipe = None
            raise
        torch.cuda.synchronize(self.device)  # DALI's own stream is done with the batch
        batch = torch.as_tensor(out.as_tensor(), device=self.device)
        batch = batch.clone() if self.output_device == "gpu" else batch.to("cpu")
        torch.cuda.current_stream(self.device).synchronize()  # the copy is done before Triton reads it
        return batch

    def _respond(self, batch, count):
        rows = batch.split(1)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("OUTPUT", to_dlpack(row))])
                for row in rows[:count]]

    def execute(self, requests):
        arrays = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT")
            arrays.append(np.ascontiguousarray(torch.from_dlpack(tensor.to_dlpack()).cpu().numpy().reshape(-1)))
        try:
            return self._respond(self._run(arrays), len(arrays))
        except Exception:  # noqa: BLE001 - one bad image must not fail its batch: one request at a time
            pass
        responses = []
        for array in arrays:
            try:
                responses += self._respond(self._run([array]), 1)
            except Exception as exc:  # noqa: BLE001 - the bad request alone fails
                error = pb_utils.TritonError(f"{type(exc).__name__}: {str(exc)[:500]}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
