"""Pure tensor kernels: functions from tensors to tensors, testable without Triton."""
