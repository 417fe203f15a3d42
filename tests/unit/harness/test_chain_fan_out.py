"""The in-process chain of a graph that fans out answers as the orchestrator does (reference: ONNX Runtime, torch)."""

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import decode_jpeg

from tritonpipe.errors import RequestError
from tritonpipe.harness.chain import Chain
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository


def spot(tiny_onnx, **classify):
    return {
        "name": "spot",
        "image": {"backend": "S[DecodeTensor]", "next": "crops"},
        "crops": {"backend": "S[CropResizeTensor]", "resize_h": 32, "resize_w": 32, "next": "classify"},
        "classify": {"backend": "S[TensorrtTensor]", "model": str(tiny_onnx), "for_each": True, "max": 4, **classify},
    }


@pytest.fixture(scope="module")
def jpeg():
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


def expected(tiny_onnx, jpeg, boxes):
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))[None].float()
    crops = [F.interpolate(image[:, :, y1:y2, x1:x2], size=(32, 32), mode="bilinear", align_corners=False)
             for x1, y1, x2, y2 in boxes]
    if not crops:
        return np.zeros((0, 10), np.float32)
    return ort.InferenceSession(str(tiny_onnx)).run(None, {"x": torch.cat(crops).numpy()})[0]


def test_the_chain_fans_out_as_the_server_does(tiny_onnx, jpeg, tmp_path):
    repo = generate_repository(load_graph(spot(tiny_onnx, max_items=3)), tmp_path / "repo", device="cpu")
    chain = Chain.of_repository(repo, torch.device("cpu"))
    assert chain.outputs == ["scores", "boxes"] and chain.inputs == ["INPUT", "box"]
    box_sets = [[[0, 0, 16, 16], [8, 4, 40, 30]], [], [[1, 1, 5, 5]] * 4]
    requests = [{"INPUT": torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)[None],
                 "box": torch.tensor([boxes], dtype=torch.float32).reshape(1, len(boxes), 4)} for boxes in box_sets]
    answers = chain.run(requests)
    np.testing.assert_allclose(answers[0]["scores"][0].numpy(), expected(tiny_onnx, jpeg, box_sets[0]), atol=1e-4, rtol=0)
    assert answers[0]["boxes"].shape == (1, 2, 4)
    assert answers[1]["scores"].shape == (1, 0, 10) and answers[1]["boxes"].shape == (1, 0, 4)
    assert isinstance(answers[2], RequestError) and "4 items" in str(answers[2]) and "max_items=3" in str(answers[2])
