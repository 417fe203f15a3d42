"""Stages of a detection chain with torchpipe's names: crop, border, letterbox, selection, device moves, YOLO decoding.

Thin classes over :mod:`tritonpipe.kernels.detection`.  A kernel's ``ValueError`` on a request's
input becomes that request's :class:`RequestError`; on a parameter it becomes a :class:`ConfigError`,
raised when the repository is generated, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, RequestError
from ..kernels import detection as kernels
from ..kernels.geometry import MAX_SIDE, fill_values
from ..spec import SpecError, TensorSpec
from .base import MapStage, Param, register
from .image import _expect, _hwc, _nchw, _tensor

_T = TypeVar("_T")
_SIDE = dict(low=1, high=MAX_SIDE)
_PAD = dict(low=0, high=MAX_SIDE)
_INVERSE = {"inverse_transform": TensorSpec("FP32", (1, 4), batched=True)}
#: boxes of one request: N rows of x1, y1, x2, y2 (and whatever follows, such as Yolo11Post's score and class)
_BOXES = TensorSpec("FP32", (1, -1, -1), batched=True)


def _param(stage: str, parse: Callable[..., _T], *args: Any) -> _T:
    """A kernel's parse of a parameter; its ValueError is the configuration's fault."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise ConfigError(f"{stage}: {exc}") from None


def _channels(spec: TensorSpec, dim: int) -> int | None:
    return spec.shape[dim] if spec.shape[dim] > 0 else None


def _check_fill(stage: str, values: tuple[float, ...], channels: int | None) -> None:
    if channels is not None:
        _param(stage, fill_values, "pad_val", values, channels)


class _KernelStage(MapStage):
    """A per-request stage whose kernel's ValueError is the request's fault."""

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        raise NotImplementedError

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        try:
            return self.run(data, item)
        except ValueError as exc:
            raise RequestError(f"{self.name}: {exc}") from None


# --- crop and border --------------------------------------------------------------------


@register("CropTensor")
class CropTensor(_KernelStage):
    """Crops the box ``x1, y1, x2, y2`` (pixels, x2 and y2 exclusive) out of a 1xCxHxW tensor.

    The box is the item's ``box`` key when it carries one (torchpipe's ``TASK_BOX_KEY``: a tensor
    or list of at least four numbers, extra ones such as score and class ignored), else the
    ``box`` parameter.  Fractional corners widen the crop to whole pixels; the box is clamped to
    the image, and one that is empty or inverted there fails its request alone, naming the box.
    """

    input_doc = "1xCxHxW tensor; box from the item's `box` key or the `box` parameter"
    output_doc = "1xCxhxw tensor, same dtype"

    wants_gpu = True
    params = {
        "box": Param(
            str, "", doc="x1,y1,x2,y2 in pixels, used when an item carries no `box` of its own; empty: none",
        ),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.box = self._fixed_box(params)

    @classmethod
    def _fixed_box(cls, params: dict[str, Any]) -> tuple[float, ...] | None:
        if not params["box"]:
            return None
        box = _param(cls.name, kernels.parse_numbers, "box", params["box"], 4)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ConfigError(f"{cls.name}: box {params['box']!r} is empty or inverted; it needs x1 < x2 and y1 < y2")
        return box

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name)
        box = item.get("box", self.box)
        if box is None:
            raise RequestError(f"{self.name} needs a box: the item's `box` key (x1, y1, x2, y2) or the `box` parameter")
        return kernels.crop(image, box).to(self.device, non_blocking=True)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        cls._fixed_box(params)
        return TensorSpec(spec.dtype, (1, spec.shape[1], -1, -1), batched=True)


@register("CropResizeTensor")
class CropResizeTensor(_KernelStage):
    """Crops every box of the item's ``box`` key out of a 1xCxHxW tensor, each resized to ``resize_h``x``resize_w``.

    The boxes are N rows of ``x1, y1, x2, y2`` in pixels (extra columns such as Yolo11Post's score
    and class are ignored), N from 0 up; a graph routes them in with ``map``, e.g.
    ``map = "image[result:data],detect[result:box]"``.  Each crop takes the pixels CropTensor
    takes, then ResizeTensor's bilinear resize; all crops of a request are resized together (one
    kernel launch on a GPU).  The output, float32 1xNxCx``resize_h``x``resize_w``, is what a node
    with ``for_each`` runs its model on, one crop at a time; ``boxes`` (1xNxk) passes the boxes on,
    row for row with the crops, so that answers carry them.  No box gives N = 0, not an error; a
    box thinner than a pixel or past the image's edge (detectors give both) takes the nearest row
    or column of pixels; an inverted or non-finite box fails its request, naming the box.
    """

    input_doc = "1xCxHxW tensor; boxes (N x 4 or more, or 1 x N x 4 or more) from the item's `box` key"
    output_doc = "float32 1xNxCx`resize_h`x`resize_w`; `boxes` float32 1xNxk, the boxes as given"

    wants_gpu = True
    params = {
        "resize_h": Param(int, **_SIDE, doc="height of each crop"),
        "resize_w": Param(int, **_SIDE, doc="width of each crop"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.height, self.width = params["resize_h"], params["resize_w"]

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name).to(self.device, non_blocking=True)
        if "box" not in item:
            raise RequestError(f"{self.name} needs the boxes in the item's `box` key; route them with map, e.g. detect[result:box]")
        crops = kernels.crop_resize(image, item["box"], self.height, self.width).unsqueeze(0)
        boxes = item["box"]
        if not isinstance(boxes, torch.Tensor):
            rows = kernels.box_rows(boxes)
            boxes = torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(0, 4)
        item["boxes"] = (boxes if boxes.dim() == 3 else boxes.unsqueeze(0)).float()
        return crops

    @classmethod
    def extra_inputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        return {"box": _BOXES}

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        return {"boxes": _BOXES}

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        return TensorSpec("FP32", (1, -1, spec.shape[1], params["resize_h"], params["resize_w"]), batched=True)


@register("CopyMakeBorderTensor")
class CopyMakeBorderTensor(_KernelStage):
    """Pads a 1xCxHxW tensor by ``top``/``bottom``/``left``/``right`` pixels, as OpenCV's copyMakeBorder.

    ``border_type=constant`` fills with ``pad_val`` (saturated into an integer dtype, as OpenCV
    does); ``replicate`` repeats the edge pixels.  The dtype is kept.  torchpipe reads the four
    sizes from each request; here they are parameters, the same for every request.
    """

    input_doc = "1xCxHxW tensor"
    output_doc = "1xCx(H+top+bottom)x(W+left+right) tensor, same dtype"

    wants_gpu = True
    params = {
        "top": Param(int, 0, **_PAD, doc="rows added above"),
        "bottom": Param(int, 0, **_PAD, doc="rows added below"),
        "left": Param(int, 0, **_PAD, doc="columns added on the left"),
        "right": Param(int, 0, **_PAD, doc="columns added on the right"),
        "border_type": Param(str, "constant", choices=kernels.BORDER_TYPES, doc="OpenCV's BORDER_CONSTANT or BORDER_REPLICATE"),
        "pad_val": Param(str, "0", doc="with border_type=constant: one number, or one per channel: 114,114,114"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.sides = tuple(params[key] for key in ("top", "bottom", "left", "right"))
        self.border_type = params["border_type"]
        self.pad_val = _param(self.name, kernels.parse_numbers, "pad_val", params["pad_val"])

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name).to(self.device, non_blocking=True)
        return kernels.copy_make_border(image, *self.sides, border_type=self.border_type, value=self.pad_val)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        pad_val = _param(cls.name, kernels.parse_numbers, "pad_val", params["pad_val"])
        _check_fill(cls.name, pad_val, _channels(spec, 1))
        _, channels, height, width = spec.shape
        out_h = height + params["top"] + params["bottom"] if height > 0 else -1
        out_w = width + params["left"] + params["right"] if width > 0 else -1
        return TensorSpec(spec.dtype, (1, channels, out_h, out_w), batched=True)


# --- resize into a fixed frame ---------------------------------------------------------


class _FitPadMat(_KernelStage):
    centre: bool
    input_doc = "HxWxC uint8 mat"
    output_doc = "uint8 `resize_h`x`resize_w`xC mat; `inverse_transform` float32 1x4"

    def init(self, params: dict[str, Any]) -> None:
        self.height, self.width = params["resize_h"], params["resize_w"]
        self.pad_val = _param(self.name, kernels.parse_numbers, "pad_val", params["pad_val"])

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        image = _hwc(data, self.name, torch.uint8).cpu()
        out, inverse = kernels.fit_pad_mat(image, self.height, self.width, self.pad_val, centre=self.centre)
        item["inverse_transform"] = inverse
        return out

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=3, batched=False, dtype="UINT8")
        pad_val = _param(cls.name, kernels.parse_numbers, "pad_val", params["pad_val"])
        _check_fill(cls.name, pad_val, _channels(spec, 2))
        return TensorSpec("UINT8", (params["resize_h"], params["resize_w"], spec.shape[2]))

    @classmethod
    def extra_outputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        return dict(_INVERSE)


def _fit_params(pad_default: str) -> dict[str, Param]:
    return {
        "resize_h": Param(int, **_SIDE, doc="output height"),
        "resize_w": Param(int, **_SIDE, doc="output width"),
        "pad_val": Param(str, pad_default, doc="one number, or one per channel: 114,114,114"),
    }


@register("LetterBoxMat")
class LetterBoxMat(_FitPadMat):
    """YOLO's letterbox on the CPU: fits an HxWxC uint8 mat into ``resize_h``x``resize_w``, centred.

    The mat is scaled by ``min(resize_h / H, resize_w / W)`` (OpenCV INTER_LINEAR, sizes rounded
    half up as torchpipe does) and padded equally on both sides with ``pad_val`` (the odd pixel
    goes to the bottom or right).  ``inverse_transform`` = ``[sx, sy, tx, ty]`` maps a point of
    the output back to the input: ``x_in = sx * x_out + tx``, ``y_in = sy * y_out + ty``.
    torchpipe writes ``scale`` and ``offset`` instead; its ``pad_val`` defaults to 0, this one to
    YOLO's 114.
    """

    centre = True
    params = _fit_params("114")


@register("TopLeftResizeMat")
class TopLeftResizeMat(_FitPadMat):
    """Fits an HxWxC uint8 mat into ``resize_h``x``resize_w`` keeping its aspect, at the top left.

    The CPU mirror of ``ResizePadTensor``: scaled by ``min(resize_h / H, resize_w / W)`` (OpenCV
    INTER_LINEAR), padded on the right and bottom with ``pad_val``, and ``inverse_transform`` =
    ``[sx, sy, 0, 0]`` maps output points back: ``x_in = sx * x_out``, ``y_in = sy * y_out``.
    """

    centre = False
    params = _fit_params("0")


# --- selection --------------------------------------------------------------------------


@register("IndexSelectTensor")
class IndexSelectTensor(_KernelStage):
    """``torch.index_select(data, dim, index)``: picks, reorders or repeats slices along ``dim``.

    ``dim=1, index=2,1,0`` reverses the channels of a 1xCxHxW tensor (RGB <-> BGR, and the item's
    ``color`` follows); ``dim=2`` picks rows.  Any other selection of channels drops ``color``.
    The batch dimension of a 1xCxHxW tensor is not selectable.  (torchpipe's stage of this name
    instead looks rows of a stored weight tensor up by the request's indices.)
    """

    input_doc = "tensor"
    output_doc = "same rank and dtype, len(`index`) slices along `dim`"

    wants_gpu = True
    params = {
        "dim": Param(int, 1, low=-8, high=7, doc="the dimension to select along (1: channels of 1xCxHxW)"),
        "index": Param(str, doc="comma-separated indices along dim, e.g. 2,1,0"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.dim = params["dim"]
        self.index = _param(self.name, kernels.parse_index, params["index"])

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        tensor = _tensor(data, self.name).to(self.device, non_blocking=True)
        out = kernels.index_select(tensor, self.dim, self.index)
        if tensor.dim() == 4 and self.dim % 4 == 1 and "color" in item:
            reversal = self.index == (2, 1, 0) and tensor.shape[1] == 3
            swapped = {"rgb": "bgr", "bgr": "rgb"}.get(item["color"])
            if reversal and swapped:
                item["color"] = swapped
            else:
                del item["color"]
        return out

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        index = _param(cls.name, kernels.parse_index, params["index"])
        rank, dim = len(spec.shape), params["dim"]
        if not -rank <= dim < rank:
            raise SpecError(f"{cls.name}: dim {dim} is out of range for {spec.describe()}")
        dim %= rank
        if spec.batched and dim == 0:
            raise SpecError(f"{cls.name}: dim {params['dim']} selects along the batch dimension of {spec.describe()}")
        size = spec.shape[dim]
        if size > 0 and max(index) >= size:
            raise SpecError(f"{cls.name}: index {params['index']!r} passes the size {size} of dim {dim} of {spec.describe()}")
        shape = list(spec.shape)
        shape[dim] = len(index)
        return TensorSpec(spec.dtype, tuple(shape), batched=spec.batched)


# --- device moves -----------------------------------------------------------------------


def _move(stage: str, data: Any, device: torch.device) -> Any:
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, list) and all(isinstance(part, torch.Tensor) for part in data):
        return [part.to(device) for part in data]
    raise RequestError(f"{stage} needs a tensor or a list of tensors, got {type(data).__name__}")


@register("CpuTensor")
class CpuTensor(MapStage):
    """Moves a tensor (or a list of tensors) to the host; a tensor already there passes unchanged."""

    input_doc = "tensor or list of tensors"
    output_doc = "the same on the CPU"

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return _move(self.name, data, torch.device("cpu"))


@register("GpuTensor")
class GpuTensor(MapStage):
    """Moves a tensor (or a list of tensors) to the instance's device: its GPU, or the CPU where it has none."""

    input_doc = "tensor or list of tensors"
    output_doc = "the same on the instance's device"

    wants_gpu = True

    def apply(self, data: Any, item: dict[str, Any]) -> Any:
        return _move(self.name, data, self.device)


# --- affine warp ------------------------------------------------------------------------


@register("WarpAffineTensor")
class WarpAffineTensor(_KernelStage):
    """Affine warp of a 1xCxHxW tensor to float32 1xCx``target_h``x``target_w`` (face or plate alignment).

    ``affine_matrix`` is OpenCV's 2x3 ``M`` row by row, mapping input pixels to output pixels;
    sampling is bilinear and the border constant ``pad_val``, as ``cv2.warpAffine`` with
    INTER_LINEAR and BORDER_CONSTANT (OpenCV rounds sampling positions to 1/32 pixel; this stage
    does not, so values differ by at most 1/32 of the largest step between neighbouring pixels).
    """

    input_doc = "1xCxHxW tensor"
    output_doc = "float32 1xCx`target_h`x`target_w`"

    wants_gpu = True
    params = {
        "affine_matrix": Param(str, doc="the 2x3 matrix a,b,c,d,e,f: x' = a*x + b*y + c, y' = d*x + e*y + f"),
        "target_h": Param(int, **_SIDE, doc="output height"),
        "target_w": Param(int, **_SIDE, doc="output width"),
        "pad_val": Param(str, "0", doc="border value: one number, or one per channel"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.matrix = _param(self.name, kernels.parse_affine_matrix, params["affine_matrix"])
        self.height, self.width = params["target_h"], params["target_w"]
        self.pad_val = _param(self.name, kernels.parse_numbers, "pad_val", params["pad_val"])

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        image = _nchw(data, self.name).to(self.device, non_blocking=True)
        return kernels.warp_affine(image, self.matrix, self.height, self.width, self.pad_val)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        _expect(cls.name, spec, rank=4, batched=True)
        _param(cls.name, kernels.parse_affine_matrix, params["affine_matrix"])
        pad_val = _param(cls.name, kernels.parse_numbers, "pad_val", params["pad_val"])
        _check_fill(cls.name, pad_val, _channels(spec, 1))
        return TensorSpec("FP32", (1, spec.shape[1], params["target_h"], params["target_w"]), batched=True)


# --- YOLO head decoding -----------------------------------------------------------------

_FLOAT_TYPES = ("FP16", "FP32", "FP64")


@register("Yolo11Post")
class Yolo11Post(_KernelStage):
    """Decodes a YOLO v8/11 (anchor-free) detection head into boxes, scores and classes per image.

    Input: the head output of one request, float (rows, 4 + classes, anchors): per anchor cx, cy,
    w, h in the network input's pixels, then one score per class (no objectness).  Each anchor
    takes its best class; ``conf_thres`` keeps those scoring at least it; NMS per class then
    drops a box whose IoU with a higher-scoring box of its class exceeds ``iou_thres``; the
    ``max_det`` highest scores are kept.  Runs where the head is, CPU or GPU.

    Output: float32 1xNx6 per image, rows ``[x1, y1, x2, y2, score, class]`` by decreasing score
    (class the index as a float); N = 0 when nothing passes, never an error.  A request of
    several rows gets rowsxNx6, N its largest count, shorter lists padded with ``[0, 0, 0, 0, 0,
    -1]`` (class -1).  When the item carries ``inverse_transform`` (``[sx, sy, tx, ty]``, as
    LetterBoxMat writes it) the corners are mapped back through it to the source image;
    otherwise they stay in the network input's pixels.  torchpipe's stage of this name has the
    three fixed at 0.25, 0.45 and 300, maps back with the request's ``offset`` and ``scale``, and
    returns its boxes grouped by class (its ``max_det`` cut follows that order).
    """

    input_doc = "float 1x(4+classes)xanchors YOLO head (cx, cy, w, h, class scores)"
    output_doc = "float32 1xNx6: x1, y1, x2, y2, score, class per row; N >= 0"

    wants_gpu = True
    params = {
        "conf_thres": Param(float, 0.25, low=0.0, high=1.0, doc="a box is kept when its best class score is at least this"),
        "iou_thres": Param(
            float, 0.45, low=0.0, high=1.0,
            doc="NMS: a box is dropped when its IoU with a higher-scoring box of its class exceeds this",
        ),
        "max_det": Param(int, 300, low=1, high=1 << 20, doc="at most this many boxes per image, the highest scores"),
    }

    def init(self, params: dict[str, Any]) -> None:
        self.conf_thres, self.iou_thres, self.max_det = params["conf_thres"], params["iou_thres"], params["max_det"]

    @classmethod
    def optional_inputs(cls, params: dict[str, Any]) -> dict[str, TensorSpec]:
        return dict(_INVERSE)  # a letterbox earlier in the node maps the boxes back to the source image

    def run(self, data: Any, item: dict[str, Any]) -> Any:
        head = kernels.check_yolo_head(data)
        detections = kernels.yolo_detections(head, self.conf_thres, self.iou_thres, self.max_det)
        inverse = item.get("inverse_transform")
        if inverse is not None:
            per_image = [inverse] * len(detections)
            if isinstance(inverse, torch.Tensor) and inverse.numel() != 4:
                if inverse.numel() != 4 * len(detections):
                    raise ValueError(
                        f"inverse_transform of shape {tuple(inverse.shape)} is not 4 numbers per image "
                        f"of the head's {len(detections)}"
                    )
                per_image = list(inverse.reshape(-1, 4))
            detections = [kernels.map_boxes_back(d, t) for d, t in zip(detections, per_image)]
        return kernels.stack_detections(detections)

    @classmethod
    def infer(cls, params: dict[str, Any], spec: TensorSpec) -> TensorSpec:
        if len(spec.shape) != 3 or not spec.batched or spec.dtype not in _FLOAT_TYPES:
            raise SpecError(f"{cls.name} needs a float 1x(4+classes)xanchors YOLO head output, but receives {spec.describe()}")
        if 0 < spec.shape[1] < 5:
            raise SpecError(
                f"{cls.name} needs at least 5 rows (cx, cy, w, h and a class score) in dim 1, but receives {spec.describe()}"
            )
        return TensorSpec("FP32", (1, -1, len(kernels.DETECTION_COLUMNS)), batched=True)
