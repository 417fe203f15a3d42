"""Engines that execute a model file: TensorRT, ONNX Runtime and torch.

Every engine answers the same small interface (:class:`~tritonpipe.engines.base.Engine`),
so a ``TensorrtTensor`` node serves the same way whichever engine runs it.
"""
