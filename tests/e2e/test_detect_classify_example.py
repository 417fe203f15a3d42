"""The shipped detect -> crop -> classify example, served, against the same chain run in one process.

The reference letterboxes with torch, runs both ONNX files in ONNX Runtime, decodes the head
with torchvision (box_convert, batched_nms), crops with numpy and resizes with torch; it decodes
with torchvision's decode_jpeg, as the served DecodeTensor does on the CPU.
"""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torchvision.io import decode_jpeg
from torchvision.ops import batched_nms, box_convert

from tritonpipe.examples import DETECT_DIR, DETECTOR_SIDE, export_classifier, export_detector, sample_jpeg
from tritonpipe.pipeline.files import read_config_file
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

CONFIG = read_config_file(DETECT_DIR / "pipeline.toml")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detect-classify")
    shutil.copy(DETECT_DIR / "pipeline.toml", folder / "pipeline.toml")
    export_detector(folder / "detector.onnx")
    export_classifier(folder / "classifier.onnx")
    return folder


@pytest.fixture(scope="module")
def server(example):
    repo = generate_repository(load_graph(example / "pipeline.toml"), example / "repo").path
    with TritonServer([repo]) as running:
        yield running


def reference(example, jpeg):
    detect, crops, classify = CONFIG["detect"], CONFIG["crops"], CONFIG["classify"]
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))[None].float()
    height, width = image.shape[2:]
    scale = min(DETECTOR_SIDE / height, DETECTOR_SIDE / width)
    new_h, new_w = round(height * scale), round(width * scale)
    letterboxed = torch.full((1, 3, DETECTOR_SIDE, DETECTOR_SIDE), float(detect["pad_value"]))
    letterboxed[:, :, :new_h, :new_w] = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    head = ort.InferenceSession(str(example / "detector.onnx")).run(None, {"images": letterboxed.numpy()})[0]
    head = torch.from_numpy(head)[0]
    scores, classes = head[4:].max(dim=0)
    keep = scores >= detect["conf_thres"]
    boxes, scores, classes = box_convert(head[:4].T[keep], "cxcywh", "xyxy"), scores[keep], classes[keep]
    kept = batched_nms(boxes, scores, classes, 0.45)[: detect["max_det"]]
    boxes = boxes[kept] * torch.tensor([width / new_w, height / new_h, width / new_w, height / new_h])
    detections = torch.cat([boxes, scores[kept, None], classes[kept, None].float()], dim=1)
    mean = torch.tensor([float(v) for v in classify["mean"].split(",")]).view(1, 3, 1, 1)
    std = torch.tensor([float(v) for v in classify["std"].split(",")]).view(1, 3, 1, 1)
    cut = []
    for x1, y1, x2, y2 in detections[:, :4].tolist():
        left, top = min(max(0, int(np.floor(x1))), width - 1), min(max(0, int(np.floor(y1))), height - 1)
        right, bottom = max(min(width, int(np.ceil(x2))), left + 1), max(min(height, int(np.ceil(y2))), top + 1)
        size = (crops["resize_h"], crops["resize_w"])
        cut.append(F.interpolate(image[:, :, top:bottom, left:right], size=size, mode="bilinear", align_corners=False))
    if not cut:
        return detections.numpy(), np.zeros((0, 1000), np.float32)
    crops_in = ((torch.cat(cut) - mean) / std).numpy()
    logits = ort.InferenceSession(str(example / "classifier.onnx")).run(None, {"input": crops_in})[0]
    return detections.numpy(), logits


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("size", [(480, 640), (333, 500), (800, 600)])
def test_the_served_example_answers_as_the_chain_in_one_process(server, example, protocol, size):
    client_module, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    jpeg = sample_jpeg(*size, seed=size[0])
    client = client_module.InferenceServerClient(url)
    data = np.frombuffer(jpeg, np.uint8)[None]
    tensor = client_module.InferInput("INPUT", list(data.shape), "UINT8")
    tensor.set_data_from_numpy(data)
    result = client.infer("spot", [tensor], outputs=[client_module.InferRequestedOutput(n) for n in ("boxes", "logits")])
    boxes, logits = result.as_numpy("boxes")[0], result.as_numpy("logits")[0]
    want_boxes, want_logits = reference(example, jpeg)
    assert 0 < len(boxes) <= CONFIG["detect"]["max_det"]
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-3, rtol=0)
