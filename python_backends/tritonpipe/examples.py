"""The shipped examples' models and sample JPEG, made locally.

- ``resnet18``: a ResNet-18 ONNX classifier (and, asked for, the same as TorchScript);
- ``detect_classify``: a detector (torchvision's FCOS head on a MobileNetV3 FPN, answering a
  YOLO-style head that ``Yolo11Post`` decodes) and the same classifier for its crops.

Weights come from a fixed seed, not a download, so the examples are reproducible offline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "resnet18"
DETECT_DIR = EXAMPLE_DIR.parent / "detect_classify"
#: the detector's input side and classes
DETECTOR_SIDE = 320
DETECTOR_CLASSES = 8


def _classifier(seed: int):
    """torchvision's ResNet-18 with random weights from ``seed``, in eval mode: the examples' classifier."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).eval()


def export_classifier(path: str | Path, seed: int = 0, opset: int = 17) -> Path:
    """Export torchvision's ResNet-18 (random weights from ``seed``) to ONNX, batch axis dynamic."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _classifier(seed)
    example = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    return path


def export_classifier_torchscript(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`export_classifier`'s ResNet-18 (the same weights for the same ``seed``) as TorchScript, for the
    torch engine."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _classifier(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10 and later call TorchScript deprecated
        torch.jit.script(model).save(str(path))
    return path


def detector_module(seed: int = 0, side: int = DETECTOR_SIDE, classes: int = DETECTOR_CLASSES):
    """torchvision's FCOS head on a MobileNetV3-small FPN (random weights from ``seed``), as a YOLO-style head.

    Takes FP32 ``[n, 3, side, side]`` RGB in 0-255 and answers ``[n, 4 + classes, anchors]``: per
    anchor (every cell of every feature level) the box ``cx, cy, w, h`` in input pixels, then one
    score per class, ``sqrt(sigmoid(class logit) * sigmoid(centre-ness))`` as FCOS scores them.
    """
    import torch
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.models.detection.fcos import FCOSHead

    class YoloStyleFCOS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6)
            self.head = FCOSHead(self.backbone.out_channels, num_anchors=1, num_classes=classes)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
            # FCOS: one anchor per cell of every feature level, as large as the level's stride.  Made once
            # here as buffers, so that a traced or exported copy runs on whichever device it is moved to
            with torch.no_grad():
                levels = self.backbone.eval()(torch.zeros(1, 3, side, side)).values()
            centres, sizes = [], []
            for feature in levels:
                height, width = feature.shape[-2:]
                stride = side / height
                ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
                centres.append(torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * stride + stride / 2)
                sizes.append(torch.full((height * width, 1), stride))
            self.register_buffer("centre", torch.cat(centres))
            self.register_buffer("size", torch.cat(sizes))

        def forward(self, images):
            features = list(self.backbone((images - self.mean) / self.std).values())
            out = self.head(features)
            ltrb = out["bbox_regression"] * self.size  # distances to the sides, in units of the anchor's size
            x1y1, x2y2 = self.centre - ltrb[..., :2], self.centre + ltrb[..., 2:]
            boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], dim=-1)
            scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
            return torch.cat([boxes, scores], dim=-1).transpose(1, 2)

    return YoloStyleFCOS().eval()


def export_detector(path: str | Path, seed: int = 0, opset: int = 17) -> Path:
    """Export :func:`detector_module` to ONNX, batch axis dynamic (input ``images``, output ``head``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, DETECTOR_SIDE, DETECTOR_SIDE) * 255
    with warnings.catch_warnings():
        # the tracer notes Python conditions on shapes, which are fixed here but for the batch
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            detector_module(seed), (example,), str(path), input_names=["images"], output_names=["head"],
            dynamic_axes={"images": {0: "batch"}, "head": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    return path


def sample_jpeg(height: int = 480, width: int = 640, seed: int = 0, quality: int = 90, subsampling: str = "420") -> bytes:
    """A deterministic synthetic photo-like JPEG: gradients, shapes and noise.

    ``subsampling`` is the chroma subsampling: ``"444"``, ``"422"`` or ``"420"`` (OpenCV's default).
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    largest = max(2, min(height, width) // 4)  # circle radii; tiny images get tiny circles
    for _ in range(12):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, center, int(rng.integers(min(10, largest - 1), largest)), color, -1)
    image += rng.normal(0, 6, image.shape)
    factors = {"444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
               "420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420}
    if subsampling not in factors:
        raise ValueError(f"subsampling must be one of {', '.join(factors)}, got {subsampling!r}")
    flags = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factors[subsampling]]
    ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), flags)
    if not ok:
        raise RuntimeError("OpenCV could not encode the sample JPEG")
    return encoded.tobytes()
