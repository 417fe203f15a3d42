"""YOLO head decoding against torchvision (box_convert, batched_nms) and a plain greedy NMS written out here."""

import pytest
import torch
from torchvision.ops import batched_nms, box_convert

from tritonpipe.kernels.detection import (
    PAD_CLASS,
    check_yolo_head,
    map_boxes_back,
    stack_detections,
    yolo_detections,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def head_from(detections, classes=3, anchors=16, seed=0, dtype=torch.float32):
    """A (1, 4 + classes, anchors) head whose first anchors hold ``detections``, rest background.

    ``detections``: (x1, y1, x2, y2, class, score) tuples.  Other classes of a detection's anchor
    score below it; background anchors score below 0.05 in every class.
    """
    generator = torch.Generator().manual_seed(seed)
    head = torch.zeros(4 + classes, anchors, dtype=torch.float64)
    corners = torch.rand(anchors, 2, generator=generator, dtype=torch.float64) * 200
    sizes = 5 + torch.rand(anchors, 2, generator=generator, dtype=torch.float64) * 40
    head[0:2] = (corners + sizes / 2).T
    head[2:4] = sizes.T
    head[4:] = torch.rand(classes, anchors, generator=generator, dtype=torch.float64) * 0.05
    for anchor, (x1, y1, x2, y2, cls, score) in enumerate(detections):
        head[:4, anchor] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=torch.float64)
        head[4:, anchor] = torch.rand(classes, generator=generator, dtype=torch.float64) * 0.9 * score
        head[4 + cls, anchor] = score
    return head.to(dtype)[None]


def torchvision_reference(head, conf_thres, iou_thres, max_det):
    """Per image: best class per anchor, threshold in float32, torchvision's class-aware NMS."""
    out = []
    for image in head.float():
        scores, classes = image[4:].max(dim=0)
        keep = scores >= torch.tensor(conf_thres, dtype=torch.float32)
        boxes = box_convert(image[:4, keep].T, in_fmt="cxcywh", out_fmt="xyxy")
        order = batched_nms(boxes, scores[keep], classes[keep], iou_threshold=iou_thres)[:max_det]
        out.append(torch.column_stack([boxes[order], scores[keep][order], classes[keep][order].float()]))
    return out


def _iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_reference(head, conf_thres, iou_thres, max_det):
    """Plain-Python NMS of one image: highest score first, drop same-class boxes of IoU above the threshold."""
    rows = head[0].double().T.tolist()
    candidates = []
    for cx, cy, w, h, *scores in rows:
        score = max(scores)
        if torch.tensor(score, dtype=torch.float32) >= torch.tensor(conf_thres, dtype=torch.float32):
            candidates.append(([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], score, scores.index(score)))
    candidates.sort(key=lambda c: -c[1])
    kept = []
    for box, score, cls in candidates:
        if all(k_cls != cls or _iou(box, k_box) <= iou_thres for k_box, _, k_cls in kept):
            kept.append((box, score, cls))
    return [[*box, score, float(cls)] for box, score, cls in kept[:max_det]]


def rows_of(detections):
    return detections.double().cpu().tolist()


def assert_rows(detections, want, atol):
    """``detections`` equal the rows ``want`` (a list of 6-number lists) within ``atol``."""
    want = torch.tensor(want, dtype=torch.float64).reshape(-1, 6)
    torch.testing.assert_close(detections.double().cpu(), want, rtol=0, atol=atol)


# --- known boxes ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_above_the_threshold_is_an_empty_result(device):
    head = head_from([(10, 10, 50, 50, 1, 0.2)]).to(device)
    (got,) = yolo_detections(head, conf_thres=0.25)
    assert got.shape == (0, 6) and got.dtype == torch.float32 and got.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_one_box_comes_out_as_corners_score_and_class(device):
    head = head_from([(40, 35, 60, 45, 2, 0.9)]).to(device)
    (got,) = yolo_detections(head)
    assert got.device.type == device
    assert_rows(got, [[40, 35, 60, 45, 0.9, 2]], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_overlaps_are_suppressed_within_a_class_only(device):
    head = head_from(
        [
            (0, 0, 100, 100, 0, 0.9),  # kept: the best
            (5, 5, 100, 100, 0, 0.8),  # IoU 0.9025 with the first, same class: dropped
            (5, 5, 100, 100, 1, 0.7),  # the same box in another class: kept
            (200, 200, 240, 240, 0, 0.6),  # same class, far away: kept
            (0, 0, 100, 50, 0, 0.5),  # IoU 0.5 with the first: dropped at 0.45
        ]
    ).to(device)
    (got,) = yolo_detections(head, conf_thres=0.25, iou_thres=0.45)
    want = [[0, 0, 100, 100, 0.9, 0], [5, 5, 100, 100, 0.7, 1], [200, 200, 240, 240, 0.6, 0]]
    assert_rows(got, want, atol=1e-4)
    # an IoU equal to the threshold is not above it: the half box stays at iou_thres=0.5
    (got,) = yolo_detections(head, conf_thres=0.25, iou_thres=0.5)
    assert [row[4] for row in rows_of(got)] == pytest.approx([0.9, 0.7, 0.6, 0.5])


@pytest.mark.parametrize("device", DEVICES)
def test_max_det_keeps_the_highest_scores(device):
    boxes = [(i * 30, 0, i * 30 + 20, 20, i % 3, 0.3 + 0.05 * ((i * 7) % 10)) for i in range(10)]
    head = head_from(boxes, anchors=20).to(device)
    (everything,) = yolo_detections(head, max_det=300)
    (top,) = yolo_detections(head, max_det=4)
    assert everything.shape == (10, 6)
    scores = sorted((b[5] for b in boxes), reverse=True)
    assert [row[4] for row in rows_of(top)] == pytest.approx(scores[:4])
    torch.testing.assert_close(top, everything[:4])


def test_a_score_exactly_at_the_threshold_is_kept():
    head = head_from([(0, 0, 10, 10, 0, 0.25), (20, 0, 30, 10, 1, 0.2499), (40, 0, 50, 10, 2, 0.3)])
    (got,) = yolo_detections(head, conf_thres=0.25)
    assert [row[5] for row in rows_of(got)] == [2, 0]  # 0.3 then 0.25; 0.2499 is below
    # 0.3 is not a float32: the head's float32 0.3 equals the threshold as float32, and is kept
    (got,) = yolo_detections(head, conf_thres=0.3)
    assert [row[5] for row in rows_of(got)] == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_different_images(device):
    heads = [
        head_from([(0, 0, 10, 10, 0, 0.9)], seed=1),
        head_from([], seed=2),
        head_from([(0, 0, 50, 50, 1, 0.8), (2, 2, 50, 50, 1, 0.7), (60, 60, 90, 90, 2, 0.6)], seed=3),
    ]
    head = torch.cat(heads).to(device)
    got = yolo_detections(head)
    assert [d.shape[0] for d in got] == [1, 0, 2]
    for image, detections in zip(heads, got):
        (alone,) = yolo_detections(image.to(device))
        torch.testing.assert_close(detections, alone)
        (want,) = torchvision_reference(image, 0.25, 0.45, 300)
        torch.testing.assert_close(detections.cpu(), want)


# --- dense heads against the references -------------------------------------------------


def dense_head(images, classes, anchors, seed):
    """Clusters of jittered boxes with mixed classes and scores: plenty of overlap both ways."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(images, 1, anchors // 8, 2, generator=generator) * 600
    centres = centres.expand(images, 8, anchors // 8, 2).reshape(images, anchors, 2)
    xy = centres + torch.randn(images, anchors, 2, generator=generator) * 6
    wh = 20 + torch.rand(images, anchors, 2, generator=generator) * 60
    scores = torch.rand(images, anchors, classes, generator=generator) ** 3
    return torch.cat([xy, wh, scores], dim=2).transpose(1, 2).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("conf_thres", "iou_thres", "max_det"), [(0.25, 0.45, 300), (0.1, 0.7, 50), (0.5, 0.3, 1000)])
def test_dense_heads_equal_torchvision_and_a_plain_greedy_nms(device, conf_thres, iou_thres, max_det):
    head = dense_head(images=2, classes=4, anchors=1600, seed=7)
    got = yolo_detections(head.to(device), conf_thres, iou_thres, max_det)
    want = torchvision_reference(head, conf_thres, iou_thres, max_det)
    for image, detections, reference in zip(head, got, want):
        assert detections.device.type == device and detections.shape[0] > 0
        torch.testing.assert_close(detections.cpu(), reference, rtol=0, atol=1e-4)
        greedy = greedy_reference(image[None], conf_thres, iou_thres, max_det)
        assert_rows(detections, greedy, atol=1e-3)


def test_a_half_precision_head_decodes_as_its_float32_copy():
    head = dense_head(images=1, classes=3, anchors=400, seed=8).half()
    (got,) = yolo_detections(head)
    (want,) = torchvision_reference(head.float(), 0.25, 0.45, 300)
    torch.testing.assert_close(got, want)


# --- inverse transform and stacking -----------------------------------------------------


def test_map_boxes_back_maps_the_corners_only():
    detections = torch.tensor([[10.0, 20.0, 30.0, 40.0, 0.9, 3.0]])
    got = map_boxes_back(detections, torch.tensor([[2.0, 0.5, -4.0, 1.0]]))
    assert got.tolist() == [[16.0, 11.0, 56.0, 21.0, pytest.approx(0.9), 3.0]]
    assert map_boxes_back(torch.zeros(0, 6), [1, 1, 0, 0]).shape == (0, 6)
    with pytest.raises(ValueError, match="four finite numbers"):
        map_boxes_back(detections, [1, 2, 3])


def test_stack_detections_pads_shorter_images_with_class_minus_one():
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5, 7.0]])
    got = stack_detections([one, torch.zeros(0, 6), torch.cat([one, one])])
    assert got.shape == (3, 2, 6)
    assert got[0, 1].tolist() == [0, 0, 0, 0, 0, PAD_CLASS] and (got[1, :, 5] == PAD_CLASS).all()
    assert stack_detections([torch.zeros(0, 6)]).shape == (1, 0, 6)


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (torch.zeros(84, 100), r"rank 2, shape \(84, 100\)"),
        (torch.zeros(1, 1, 84, 100), r"rank 4, shape \(1, 1, 84, 100\)"),
        (torch.zeros(1, 4, 100), r"at least 5 rows.*shape \(1, 4, 100\)"),
        (torch.zeros(0, 84, 100), r"shape \(0, 84, 100\) holds no image"),
        (torch.zeros(1, 84, 100, dtype=torch.int32), r"floating-point values; got int32 of shape \(1, 84, 100\)"),
        ([[0.0] * 5], "got list"),
    ],
)
def test_a_bad_head_is_a_value_error_naming_its_shape(head, message):
    with pytest.raises(ValueError, match=message):
        check_yolo_head(head)
    with pytest.raises(ValueError, match=message):
        yolo_detections(head)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"conf_thres": 1.5}, "conf_thres and iou_thres"), ({"iou_thres": -0.1}, "conf_thres and iou_thres"),
     ({"max_det": 0}, "max_det"), ({"max_det": 2.5}, "max_det")],
)
def test_bad_thresholds_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        yolo_detections(torch.zeros(1, 6, 10), **kwargs)
