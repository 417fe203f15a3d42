"""A graph that fans out, served: detect -> crop every box -> classify each crop, on a real tritonserver.

The detector is a small grid detector exported to ONNX: its 64x64 input is cut into 4x4 cells
of 16x16 pixels, each cell is one anchor whose box is the cell and whose two class scores are the
cell's mean red and green (/255).  The 128x128 pictures are letterboxed to 64x64 (scale 1/2), so an
image's bright 32x32 cells are its detections, mapped back to its own pixels, and a test picks 0, 1
or many.  The reference runs the same ONNX files in ONNX Runtime, decodes with PIL, resizes with
torch, decodes the head with torchvision's NMS and crops with numpy.
"""

import concurrent.futures
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from torchvision.ops import batched_nms, box_convert
from tritonclient.utils import InferenceServerException

from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

SIDE, CELL, CROP = 64, 16, 32
#: the pictures: twice the detector input
PICTURE = 2 * SIDE
CONF = 0.5
MAX_ITEMS = 6


class GridDetector(torch.nn.Module):
    """[n,3,64,64] (0-255) -> a YOLO head [n, 4 + 2, 16]: cell boxes, then mean red and green per cell."""

    def __init__(self):
        super().__init__()
        centres = torch.arange(CELL // 2, SIDE, CELL, dtype=torch.float32)
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        boxes = torch.stack([cx.flatten(), cy.flatten(), torch.full((16,), CELL * 1.0), torch.full((16,), CELL * 1.0)])
        self.register_buffer("boxes", boxes[None])

    def forward(self, x):
        scores = F.avg_pool2d(x, CELL)[:, :2].flatten(2) / 255.0
        return torch.cat([self.boxes.expand(x.shape[0], -1, -1), scores], dim=1)


def export(model, path, shape, inputs, outputs):
    torch.onnx.export(model.eval(), (torch.rand(1, *shape) * 255,), str(path), input_names=[inputs], output_names=[outputs],
                      dynamic_axes={inputs: {0: "n"}, outputs: {0: "n"}}, opset_version=17, dynamo=False)
    return path


def graph_toml(name, too_many, deadline_ms=30000):
    """The pipeline; node names start with the pipeline's, so that two can share a server."""
    return f"""
name = "{name}"

[{name}_image]
backend = "S[DecodeTensor,cvtColorTensor]"
color = "rgb"
next = "{name}_detect"

[{name}_detect]
backend = "S[ResizePadTensor,SyncTensor[TensorrtTensor],Yolo11Post]"
max_h = {SIDE}
max_w = {SIDE}
model = "detector.onnx"
conf_thres = {CONF}
next = "{name}_crops"

[{name}_crops]
backend = "S[CropResizeTensor]"
resize_h = {CROP}
resize_w = {CROP}
map = "{name}_image[result:data],{name}_detect[result:box]"
next = "{name}_classify"

[{name}_classify]
backend = "SyncTensor[TensorrtTensor]"
model = "classifier.onnx"
for_each = true
max = 8
batching_timeout = 2
max_items = {MAX_ITEMS}
too_many = "{too_many}"
deadline_ms = {deadline_ms}
"""


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x / 255.0)), 1).flatten(1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fan-out")
    export(GridDetector(), root / "detector.onnx", (3, SIDE, SIDE), "images", "head")
    export(Classifier(), root / "classifier.onnx", (3, CROP, CROP), "crop", "logits")
    return root


@pytest.fixture(scope="module")
def server(models):
    repos = []
    # spot_late: 1 ms is less than any detection takes, so every request is late
    for name, too_many, deadline in (("spot", "fail", 30000), ("spot_truncate", "truncate", 30000), ("spot_late", "fail", 1)):
        (models / f"{name}.toml").write_text(graph_toml(name, too_many, deadline))
        repos.append(generate_repository(load_graph(models / f"{name}.toml"), models / "repos" / name).path)
    with TritonServer(repos) as running:
        yield running


def picture(cells):
    """A 128x128 JPEG, black but for ``cells``: (row, col, (r, g, b)) each fills one 32x32 cell."""
    image = np.zeros((PICTURE, PICTURE, 3), np.uint8)
    side = 2 * CELL
    for row, col, colour in cells:
        image[row * side:(row + 1) * side, col * side:(col + 1) * side] = colour
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=100, subsampling=0)
    return out.getvalue()


def reference(models, jpeg):
    """Boxes (N, 6) and the classifier's logits per crop (N, 5), by ONNX Runtime, PIL, torchvision and numpy."""
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1)[None].astype(np.float32)
    letterboxed = F.interpolate(torch.from_numpy(rgb), size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    head = torch.from_numpy(ort.InferenceSession(str(models / "detector.onnx")).run(None, {"images": letterboxed.numpy()})[0])[0]
    scores, classes = head[4:].max(dim=0)
    keep = scores >= CONF
    boxes = box_convert(head[:4].T[keep], "cxcywh", "xyxy") * (PICTURE / SIDE)  # back to the picture's pixels
    kept = batched_nms(boxes, scores[keep], classes[keep], 0.45)
    detections = torch.cat([boxes[kept], scores[keep][kept, None], classes[keep][kept, None].float()], dim=1)
    crops = []
    for x1, y1, x2, y2 in detections[:, :4].round().int().tolist():
        crop = torch.from_numpy(rgb[:, :, y1:y2, x1:x2])
        crops.append(F.interpolate(crop, size=(CROP, CROP), mode="bilinear", align_corners=False))
    if not crops:
        return detections.numpy(), np.zeros((0, 5), np.float32)
    classifier = ort.InferenceSession(str(models / "classifier.onnx"))
    logits = classifier.run(None, {"crop": torch.cat(crops).numpy()})[0]
    return detections.numpy(), logits


MANY = [(0, 0, (250, 0, 0)), (1, 2, (0, 230, 0)), (3, 3, (210, 0, 0)), (2, 1, (190, 20, 0)), (3, 0, (0, 170, 10))]


def ask(client_module, url, model, jpeg):
    client = client_module.InferenceServerClient(url)
    data = np.frombuffer(jpeg, np.uint8)[None]
    tensor = client_module.InferInput("INPUT", list(data.shape), "UINT8")
    tensor.set_data_from_numpy(data)
    outputs = [client_module.InferRequestedOutput(name) for name in ("boxes", "logits")]
    result = client.infer(model, [tensor], outputs=outputs)
    return result.as_numpy("boxes")[0], result.as_numpy("logits")[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("cells", [[], MANY[:1], MANY], ids=["no box", "one box", "many boxes"])
def test_every_crop_is_classified_and_comes_back_with_its_box(server, models, protocol, cells):
    client_module, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    jpeg = picture(cells)
    boxes, logits = ask(client_module, url, "spot", jpeg)
    want_boxes, want_logits = reference(models, jpeg)
    assert boxes.shape == (len(cells), 6) and logits.shape == (len(cells), 5)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)


def test_requests_at_once_each_get_their_own_crops_back(server, models):
    jpegs = [picture(MANY[: k % 6]) for k in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda jpeg: ask(grpcclient, server.grpc_url, "spot", jpeg), jpegs))
    for jpeg, (boxes, logits) in zip(jpegs, answers):
        want_boxes, want_logits = reference(models, jpeg)
        np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)


def test_more_items_than_max_items_fail_alone_or_are_truncated(server, models):
    crowded = picture(MANY + [(0, 3, (0, 150, 0)), (1, 0, (130, 0, 0))])  # 7 boxes
    with pytest.raises(InferenceServerException, match=f"7 items .* exceed max_items={MAX_ITEMS}"):
        ask(grpcclient, server.grpc_url, "spot", crowded)
    boxes, logits = ask(grpcclient, server.grpc_url, "spot_truncate", crowded)
    want_boxes, want_logits = reference(models, crowded)
    assert len(want_boxes) == 7 and boxes.shape == (MAX_ITEMS, 6)  # the first boxes, each with its crop's answer
    np.testing.assert_allclose(boxes, want_boxes[:MAX_ITEMS], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, want_logits[:MAX_ITEMS], atol=1e-4, rtol=0)


def test_a_bad_image_fails_alone_among_good_ones(server, models):
    good = picture(MANY[:2])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, grpcclient, server.grpc_url, "spot", jpeg) for jpeg in (good, b"not a jpeg", good, good)]
    with pytest.raises(InferenceServerException, match=r"StatusCode.INVALID_ARGUMENT.*not a JPEG image"):
        futures[1].result()
    want_boxes, want_logits = reference(models, good)
    for future in (futures[0], futures[2], futures[3]):
        boxes, logits = future.result()
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)


def test_pipe_gives_the_per_item_answers_as_the_result_and_the_boxes_by_name(server, models):
    import tritonpipe as tp

    jpeg = picture(MANY[:3])
    with tp.pipe(url=server.grpc_url, model="spot") as spot:
        item = {"data": jpeg}
        spot(item)
    want_boxes, want_logits = reference(models, jpeg)
    np.testing.assert_allclose(item["result"][0].numpy(), want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(item["boxes"][0].numpy(), want_boxes, atol=1e-4, rtol=0)


def test_a_request_past_its_deadline_fails_alone_and_the_server_goes_on(server, models):
    jpeg = picture(MANY[:3])
    late = r"StatusCode.INTERNAL.*deadline_ms=1 passed (before 'spot_late_per_request' answered|with \d+ of 3 items answered)"
    with pytest.raises(InferenceServerException, match=late):
        ask(grpcclient, server.grpc_url, "spot_late", jpeg)
    boxes, logits = ask(grpcclient, server.grpc_url, "spot", jpeg)
    np.testing.assert_allclose(logits, reference(models, jpeg)[1], atol=1e-4, rtol=0)
