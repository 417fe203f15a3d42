"""Kernels of a detection chain: crop, border, letterbox, channel or row selection, affine warp, YOLO decoding.

Pure functions of torch tensors (any device) and OpenCV mats; bad arguments raise ``ValueError``
naming the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert

from .batch_resize import resize_batch
from .geometry import MAX_SIDE, check_hwc, check_nchw, check_side, fill_values, resize_bilinear_mat

BORDER_TYPES = ("constant", "replicate")


def parse_numbers(name: str, text: str, count: int | None = None) -> tuple[float, ...]:
    """``"1, 2.5,3"`` -> ``(1.0, 2.5, 3.0)``; finite numbers only, exactly ``count`` of them if given."""
    parts = [part for part in str(text).replace(" ", "").split(",") if part]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be comma-separated finite numbers, got {text!r}")
    if count is not None and len(values) != count:
        raise ValueError(f"{name} needs {count} numbers, got {len(values)} in {text!r}")
    return values


def _saturate(values: Sequence[float], dtype: torch.dtype) -> list[float]:
    """Fill values as OpenCV stores them in an integer image: rounded, then clamped to the type's range."""
    if dtype.is_floating_point or dtype == torch.bool:
        return list(values)
    info = torch.iinfo(dtype)
    return [min(max(float(round(v)), info.min), info.max) for v in values]


def _round_half_up(value: float) -> int:
    # torchpipe sizes the letterbox with C++ std::round, which rounds halves away from zero
    return math.floor(value + 0.5)


# --- crop -------------------------------------------------------------------------------


def _floats(value: object, bad_values: str, bad_type: str) -> list[float]:
    """The numbers of a tensor (any shape) or a list, as floats; ``bad_values`` / ``bad_type`` start the errors."""
    if isinstance(value, torch.Tensor):
        return value.detach().flatten().cpu().double().tolist()
    if isinstance(value, (list, tuple)):
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"{bad_values}, got {value!r}") from None
    raise ValueError(f"{bad_type}, got {type(value).__name__}")


def box_pixels(
    box: object, height: int, width: int, *, nearest: bool = False, name: str = "box"
) -> tuple[int, int, int, int]:
    """The pixel rectangle ``(x1, y1, x2, y2)`` (x2, y2 exclusive) that ``box`` covers in an HxW image.

    ``box`` holds at least four numbers, x1, y1, x2, y2 (more, such as a score and a class, are
    ignored).  Fractional corners widen the rectangle to whole pixels (x1, y1 down, x2, y2 up); the
    rectangle is then clamped to the image.  A box that holds no finite numbers raises
    ``ValueError`` naming it (``name``).  A box that is empty or inverted after clamping raises too,
    unless ``nearest``: detectors give boxes thinner than a pixel or past the image's edge, and with
    ``nearest`` such a box takes the one row or column of pixels nearest to it (an inverted box
    still raises).
    """
    values = _floats(box, "box must hold numbers x1, y1, x2, y2", "box must be a tensor or a list of x1, y1, x2, y2")
    if len(values) < 4:
        raise ValueError(f"{name} needs 4 numbers x1, y1, x2, y2, got {len(values)}: {values}")
    x1, y1, x2, y2 = values[:4]
    shown = f"{name} [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"{shown} holds a value that is not a finite number")
    if nearest:
        if x2 < x1 or y2 < y1:
            raise ValueError(f"{shown} (x1, y1, x2, y2) is inverted")
        left, top = min(max(0, math.floor(x1)), width - 1), min(max(0, math.floor(y1)), height - 1)
        return left, top, max(min(width, math.ceil(x2)), left + 1), max(min(height, math.ceil(y2)), top + 1)
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if right <= left or bottom <= top:
        raise ValueError(
            f"{shown} (x1, y1, x2, y2) is empty or inverted inside the {width}x{height} (WxH) image"
        )
    return left, top, right, bottom


def crop(image: torch.Tensor, box: object) -> torch.Tensor:
    """The part of a 1xCxHxW tensor inside ``box`` (see :func:`box_pixels`), as a new tensor."""
    check_nchw(image, "crop")
    left, top, right, bottom = box_pixels(box, image.shape[2], image.shape[3])
    return image[:, :, top:bottom, left:right].contiguous()


def box_rows(boxes: object) -> list[list[float]]:
    """The boxes of one image as rows of at least four numbers: a (N, k) or (1, N, k) tensor, or a list of rows.

    N may be 0.  Columns after the fourth (a score, a class) are kept for the caller to ignore.
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() == 3 and boxes.shape[0] == 1:
            boxes = boxes[0]
        if boxes.dim() != 2 or (boxes.shape[0] and boxes.shape[1] < 4):
            raise ValueError(f"boxes must be N rows of x1, y1, x2, y2 (N x 4 or more, or 1 x N x 4), got shape {list(boxes.shape)}")
        return boxes.detach().cpu().double().tolist()
    if isinstance(boxes, (list, tuple)) and all(isinstance(row, (list, tuple)) for row in boxes):
        return [list(row) for row in boxes]
    raise ValueError(f"boxes must be a N x 4 tensor or a list of x1, y1, x2, y2 rows, got {type(boxes).__name__}")


def crop_resize(image: torch.Tensor, boxes: object, out_h: int, out_w: int) -> torch.Tensor:
    """Every box of ``boxes`` cropped out of a 1xCxHxW tensor and resized to float32 ``out_h`` x ``out_w``.

    The same pixels as :func:`crop` then a bilinear resize (half-pixel centres, as ResizeTensor),
    for all boxes at once: the crops are views, and on a GPU the resize is one kernel launch.
    Returns (N, C, out_h, out_w); N = 0 gives an empty tensor.  A box thinner than a pixel or past
    the image's edge takes the nearest row or column of pixels; an inverted or non-finite box
    raises ``ValueError`` naming it and its index.
    """
    check_nchw(image, "crop_resize")
    check_side("out_h", out_h)
    check_side("out_w", out_w)
    height, width = image.shape[2], image.shape[3]
    views = []
    for index, row in enumerate(box_rows(boxes)):
        left, top, right, bottom = box_pixels(row, height, width, nearest=True, name=f"box {index}:")
        views.append(image[0, :, top:bottom, left:right])
    if not views:
        return torch.empty((0, image.shape[1], out_h, out_w), dtype=torch.float32, device=image.device)
    return resize_batch(views, out_h, out_w)


# --- border -----------------------------------------------------------------------------


def copy_make_border(
    image: torch.Tensor,
    top: int,
    bottom: int,
    left: int,
    right: int,
    border_type: str = "constant",
    value: Sequence[float] = (0.0,),
) -> torch.Tensor:
    """Pad a 1xCxHxW tensor as OpenCV's ``copyMakeBorder`` does, keeping its dtype.

    ``constant`` fills with ``value`` (one number, or one per channel; saturated into an integer
    dtype as OpenCV does); ``replicate`` repeats the edge pixels.
    """
    check_nchw(image, "copy_make_border")
    for name, side in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        if isinstance(side, bool) or not isinstance(side, int) or not 0 <= side <= MAX_SIDE:
            raise ValueError(f"{name} must be an integer in [0, {MAX_SIDE}], got {side!r}")
    if border_type not in BORDER_TYPES:
        raise ValueError(f"border_type must be one of {', '.join(BORDER_TYPES)}, got {border_type!r}")
    _, channels, height, width = image.shape
    out_h = check_side("output height", height + top + bottom)
    out_w = check_side("output width", width + left + right)
    if border_type == "replicate":
        rows = torch.arange(-top, height + bottom, device=image.device).clamp_(0, height - 1)
        cols = torch.arange(-left, width + right, device=image.device).clamp_(0, width - 1)
        return image.index_select(2, rows).index_select(3, cols)
    fill = _saturate(fill_values("pad_val", value, channels), image.dtype)
    out = torch.tensor(fill, dtype=image.dtype, device=image.device).view(1, channels, 1, 1)
    out = out.expand(1, channels, out_h, out_w).clone()
    out[:, :, top : top + height, left : left + width] = image
    return out


# --- resize into a fixed frame ---------------------------------------------------------


def fit_pad_mat(
    image: torch.Tensor, out_h: int, out_w: int, pad: Sequence[float], *, centre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit an HxWxC uint8 mat into ``out_h`` x ``out_w`` keeping its aspect ratio, and pad the rest.

    The mat is resized by OpenCV (INTER_LINEAR) by ``min(out_h / H, out_w / W)``; ``centre`` puts it
    in the middle (a YOLO letterbox: the odd pixel of padding goes to the bottom or right), otherwise
    at the top left.  Returns the uint8 ``out_h`` x ``out_w`` x C mat and the inverse transform
    ``[sx, sy, tx, ty]`` (float32, 1x4): ``x_in = sx * x_out + tx``, ``y_in = sy * y_out + ty`` in
    continuous pixel-edge coordinates, as ``geometry.resize_pad`` gives it.
    """
    check_hwc(image, "fit_pad_mat")
    if image.dtype != torch.uint8:
        raise ValueError(f"fit_pad_mat needs a uint8 mat, got {str(image.dtype).replace('torch.', '')}")
    check_side("resize_h", out_h)
    check_side("resize_w", out_w)
    height, width, channels = image.shape
    scale = min(out_h / height, out_w / width)
    new_h = min(out_h, max(1, _round_half_up(height * scale)))
    new_w = min(out_w, max(1, _round_half_up(width * scale)))
    top, left = ((out_h - new_h) // 2, (out_w - new_w) // 2) if centre else (0, 0)
    fill = _saturate(fill_values("pad_val", pad, channels), torch.uint8)
    out = torch.tensor(fill, dtype=torch.uint8).view(1, 1, channels).expand(out_h, out_w, channels).clone()
    out[top : top + new_h, left : left + new_w] = resize_bilinear_mat(image.cpu(), new_h, new_w)
    sx, sy = width / new_w, height / new_h
    inverse = torch.tensor([[sx, sy, -left * sx, -top * sy]], dtype=torch.float32)
    return out, inverse


# --- selection --------------------------------------------------------------------------


def parse_index(text: str) -> tuple[int, ...]:
    """``"2,1,0"`` -> ``(2, 1, 0)``: one or more non-negative integers."""
    parts = [part for part in str(text).replace(" ", "").split(",") if part]
    try:
        index = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"index must be comma-separated non-negative integers, got {text!r}") from None
    if not index or min(index) < 0:
        raise ValueError(f"index must be comma-separated non-negative integers, got {text!r}")
    return index


def index_select(data: torch.Tensor, dim: int, index: Sequence[int]) -> torch.Tensor:
    """``torch.index_select`` with its arguments checked: ``dim`` within the rank, each index within its size."""
    if not -data.dim() <= dim < data.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(data.shape)}")
    size = data.shape[dim]
    bad = [i for i in index if not 0 <= i < size]
    if bad or not index:
        raise ValueError(
            f"index {list(index)} must lie in [0, {size - 1}] along dim {dim} of shape {tuple(data.shape)}"
        )
    return data.index_select(dim, torch.tensor(index, dtype=torch.long, device=data.device))


# --- affine warp ------------------------------------------------------------------------


def parse_affine_matrix(text: str) -> tuple[float, ...]:
    """``"a,b,c,d,e,f"`` -> the invertible 2x3 matrix ``[[a, b, c], [d, e, f]]``, row by row."""
    matrix = parse_numbers("affine_matrix", text, 6)
    a, b, _, d, e, _ = matrix
    if abs(a * e - b * d) < 1e-12:
        raise ValueError(f"affine_matrix {text!r} is singular (a*e - b*d = 0); it maps the image onto a line")
    return matrix


def warp_affine(
    image: torch.Tensor, matrix: Sequence[float], out_h: int, out_w: int, border_value: Sequence[float] = (0.0,)
) -> torch.Tensor:
    """OpenCV's ``warpAffine`` (INTER_LINEAR, BORDER_CONSTANT) of a 1xCxHxW tensor, as float32 1xCxout_hxout_w.

    ``matrix`` maps input pixel coordinates to output ones, as OpenCV's ``M`` without
    WARP_INVERSE_MAP.  OpenCV quantises the sampling position to 1/32 pixel, this kernel does not:
    the two differ by at most 1/32 of the largest step between neighbouring pixels.
    """
    check_nchw(image, "warp_affine")
    check_side("target_h", out_h)
    check_side("target_w", out_w)
    if len(matrix) != 6:
        raise ValueError(f"affine_matrix needs 6 numbers (2x3, row by row), got {list(matrix)}")
    a, b, c, d, e, f = (float(v) for v in matrix)
    det = a * e - b * d
    if abs(det) < 1e-12:
        raise ValueError(f"affine_matrix must be an invertible 2x3 matrix, got {list(matrix)}")
    _, channels, height, width = image.shape
    fill = torch.tensor(fill_values("pad_val", border_value, channels), dtype=torch.float32, device=image.device)
    # the inverse map: output pixel -> input pixel, both with integer pixel centres as in OpenCV
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64, device=image.device),
        torch.arange(out_w, dtype=torch.float64, device=image.device),
        indexing="ij",
    )
    src_x = ia * xs + ib * ys + ic
    src_y = id_ * xs + ie * ys + if_
    # grid_sample with align_corners=False puts pixel i's centre at (2i + 1) / size - 1
    grid = torch.stack(((2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1), dim=-1)
    shifted = image.float() - fill.view(1, channels, 1, 1)
    # zero padding of (image - fill), plus fill, is a constant border of ``fill`` under bilinear weights
    out = F.grid_sample(shifted, grid.float().unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill.view(1, channels, 1, 1)


# --- YOLO head decoding -----------------------------------------------------------------

#: columns of one detection row: the box corners, its score and its class index
DETECTION_COLUMNS = ("x1", "y1", "x2", "y2", "score", "class")
#: the class index of the rows that pad a shorter image's detections in :func:`stack_detections`
PAD_CLASS = -1.0


def check_yolo_head(head: object) -> torch.Tensor:
    """``head`` if it is a float (batch, 4 + classes, anchors) tensor; ``ValueError`` naming its shape otherwise."""
    layout = "(batch, 4 + classes, anchors): rows cx, cy, w, h, then one score per class"
    if not isinstance(head, torch.Tensor):
        raise ValueError(f"a YOLO head output must be a tensor of shape {layout}, got {type(head).__name__}")
    shape = tuple(head.shape)
    if head.dim() != 3:
        raise ValueError(f"a YOLO head output must have shape {layout}; got rank {head.dim()}, shape {shape}")
    if head.shape[0] == 0:
        raise ValueError(f"a YOLO head output of shape {shape} holds no image; {layout}")
    if head.shape[1] < 5:
        raise ValueError(
            f"a YOLO head output needs at least 5 rows (4 box rows and a class score) in {layout}; got shape {shape}"
        )
    if not head.dtype.is_floating_point:
        dtype = str(head.dtype).replace("torch.", "")
        raise ValueError(f"a YOLO head output must hold floating-point values; got {dtype} of shape {shape}")
    return head


def yolo_detections(
    head: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 300
) -> list[torch.Tensor]:
    """Decode an anchor-free YOLO (v8/11) head output into each image's kept boxes.

    ``head`` is (batch, 4 + classes, anchors): per anchor a box centre, width and height
    (cx, cy, w, h, in the network input's pixels) and one score per class, without objectness.
    Per anchor the best class is taken; anchors whose score is at or above ``conf_thres``
    (compared in float32) are kept; then non-maximum suppression per class removes a box whose
    IoU with a higher-scoring box of the same class is above ``iou_thres``; the ``max_det``
    highest scores remain.

    Returns one float32 (N, 6) tensor per image, on the head's device, N >= 0: rows
    ``[x1, y1, x2, y2, score, class]`` by decreasing score, class the class index as a float.
    """
    check_yolo_head(head)
    if not 0.0 <= conf_thres <= 1.0 or not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"conf_thres and iou_thres must lie in [0, 1], got {conf_thres} and {iou_thres}")
    if isinstance(max_det, bool) or not isinstance(max_det, int) or max_det < 1:
        raise ValueError(f"max_det must be a positive integer, got {max_det!r}")
    anchors = head.detach().float().transpose(1, 2)  # (batch, anchors, 4 + classes)
    threshold = torch.tensor(conf_thres, dtype=torch.float32, device=head.device)
    detections = []
    for rows in anchors:
        scores, classes = rows[:, 4:].max(dim=1)
        keep = scores >= threshold
        boxes = box_convert(rows[keep, :4], "cxcywh", "xyxy")
        scores, classes = scores[keep], classes[keep]
        # batched_nms returns the kept indices by decreasing score
        kept = batched_nms(boxes, scores, classes, iou_thres)[:max_det]
        detections.append(torch.cat([boxes[kept], scores[kept, None], classes[kept, None].float()], dim=1))
    return detections


def map_boxes_back(detections: torch.Tensor, inverse: object) -> torch.Tensor:
    """Detection rows with their corners mapped by ``inverse`` = ``[sx, sy, tx, ty]``: ``x' = sx * x + tx``.

    ``inverse`` is a resize's inverse transform (LetterBoxMat's ``inverse_transform``): four
    numbers, as a tensor of any shape or a list.  Scores and classes are kept; a new tensor is
    returned.
    """
    must = "inverse_transform must be four numbers sx, sy, tx, ty"
    values = _floats(inverse, must, must)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"inverse_transform must be four finite numbers sx, sy, tx, ty, got {values}")
    sx, sy, tx, ty = values
    scale = torch.tensor([sx, sy, sx, sy], dtype=detections.dtype, device=detections.device)
    shift = torch.tensor([tx, ty, tx, ty], dtype=detections.dtype, device=detections.device)
    return torch.cat([detections[:, :4] * scale + shift, detections[:, 4:]], dim=1)


def stack_detections(detections: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (N_i, 6) detections as one (images, max N_i, 6) tensor.

    An image with fewer rows than the most is padded with rows ``[0, 0, 0, 0, 0, -1]`` (class
    :data:`PAD_CLASS`), which no detection has.
    """
    if not detections:
        raise ValueError("stack_detections needs at least one image's detections")
    most = max(d.shape[0] for d in detections)
    first = detections[0]
    out = torch.zeros(len(detections), most, len(DETECTION_COLUMNS), dtype=first.dtype, device=first.device)
    out[:, :, 5] = PAD_CLASS
    for i, d in enumerate(detections):
        out[i, : d.shape[0]] = d
    return out


__all__ = [
    "BORDER_TYPES",
    "DETECTION_COLUMNS",
    "PAD_CLASS",
    "box_pixels",
    "box_rows",
    "crop_resize",
    "check_yolo_head",
    "copy_make_border",
    "crop",
    "fit_pad_mat",
    "index_select",
    "map_boxes_back",
    "parse_affine_matrix",
    "parse_index",
    "parse_numbers",
    "stack_detections",
    "warp_affine",
    "yolo_detections",
]
