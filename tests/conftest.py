import cv2
import numpy as np
import pytest
import torch


def make_jpeg(height: int, width: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth random picture, JPEG-encoded by OpenCV."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def export_tiny(path, size=32):
    torch.manual_seed(0)
    model = TinyNet().eval()
    torch.onnx.export(
        model, (torch.randn(1, 3, size, size),), str(path), input_names=["x"], output_names=["scores"],
        dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}}, opset_version=17, dynamo=False,
    )
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """A small classifier: FP32 [n,3,32,32] -> FP32 [n,10]."""
    return export_tiny(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def jpeg_factory():
    return make_jpeg


class PairNet(torch.nn.Module):
    """Two inputs and two outputs: scores from an image and a 4-vector, and the vector shifted."""

    def __init__(self):
        super().__init__()
        self.image = TinyNet()
        self.vector = torch.nn.Linear(4, 10, bias=False)

    def forward(self, x, y):
        return self.image(x) + self.vector(y), y + 1.0


@pytest.fixture(scope="session")
def pair_onnx(tmp_path_factory):
    """FP32 x [n,3,32,32] and y [n,4] -> scores FP32 [n,10] and shifted FP32 [n,4]."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pair") / "pair.onnx"
    torch.onnx.export(
        PairNet().eval(), (torch.randn(1, 3, 32, 32), torch.randn(1, 4)), str(path),
        input_names=["x", "y"], output_names=["scores", "shifted"],
        dynamic_axes={name: {0: "n"} for name in ("x", "y", "scores", "shifted")}, opset_version=17, dynamo=False,
    )
    return path


_FAKE_MPS_CONTROL = """#!/bin/sh
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY stdin=$(cat)" >> "{record}"
{behaviour}
"""


@pytest.fixture
def fake_mps_control(tmp_path):
    """Makes a stand-in nvidia-cuda-mps-control in tmp_path: ``(program, record)``.

    The stand-in appends its arguments, the MPS variables it was given and its stdin to ``record``
    as one line per call, then runs ``behaviour`` (shell).
    """

    def make(behaviour: str = "exit 0"):
        record = tmp_path / "mps-calls.txt"
        program = tmp_path / "nvidia-cuda-mps-control"
        program.write_text(_FAKE_MPS_CONTROL.format(record=record, behaviour=behaviour))
        program.chmod(0o755)
        return program, record

    return make


@pytest.fixture(scope="session")
def crop_and_classify(tiny_onnx):
    """A graph that fans out: decode, crop the request's boxes (input ``box``) to 32x32, classify each crop.

    Called with keys of the per-item node (``max_items=3``, ...); the per-item model batches up to 8.
    """

    def config(**classify):
        return {
            "name": "spot",
            "image": {"backend": "S[DecodeTensor]", "next": "crops"},
            "crops": {"backend": "S[CropResizeTensor]", "resize_h": 32, "resize_w": 32, "next": "classify"},
            "classify": {"backend": "S[TensorrtTensor]", "model": str(tiny_onnx), "for_each": True, "max": 8, **classify},
        }

    return config
