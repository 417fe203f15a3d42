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


def test_the_chain_fans_out_as_the_server_does(crop_and_classify, tiny_onnx, jpeg, tmp_path):
    repo = generate_repository(load_graph(crop_and_classify(max_items=3)), tmp_path / "repo", device="cpu")
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


class ThreeBoxes(torch.nn.Module):
    """[n,3,32,32] -> a YOLO head [n, 4 + 1, 4]: four fixed boxes, the first three scoring 0.9."""

    def __init__(self):
        super().__init__()
        boxes = torch.tensor([[8.0, 24, 8, 24], [8, 8, 24, 24], [16, 16, 16, 16], [16, 16, 16, 16]])  # cx, cy, w, h
        self.register_buffer("head", torch.cat([boxes, torch.tensor([[0.9, 0.9, 0.9, 0.0]])])[None])

    def forward(self, x):
        return self.head.expand(x.shape[0], -1, -1) + 0.0 * x.mean()


def test_the_benchmark_counts_the_items_per_image(crop_and_classify, tiny_onnx, jpeg, tmp_path):
    from tritonpipe.harness.bench.runner import _items_per_image
    from tritonpipe.harness.corpus import Corpus

    torch.onnx.export(ThreeBoxes(), (torch.rand(1, 3, 32, 32),), str(tmp_path / "det.onnx"), input_names=["x"],
                      output_names=["head"], dynamic_axes={"x": {0: "n"}, "head": {0: "n"}}, opset_version=17, dynamo=False)
    config = crop_and_classify()
    config["image"]["next"] = "detect"
    config["detect"] = {"backend": "S[ResizeTensor,SyncTensor[TensorrtTensor],Yolo11Post]", "resize_h": 32, "resize_w": 32,
                        "model": str(tmp_path / "det.onnx"), "next": "crops"}
    config["crops"]["map"] = "image[result:data],detect[result:box]"
    repo = generate_repository(load_graph(config), tmp_path / "repo", device="cpu")
    corpus = Corpus(images=[jpeg, jpeg], description="two")
    assert _items_per_image(repo, corpus, "cpu").startswith("3.00 on average (3 to 3)")
    broken = Corpus(images=[b"not a jpeg"], description="bad")
    assert _items_per_image(repo, broken, "cpu") == "none: every corpus image failed in the in-process chain"
