"""The shipped example: a ResNet-18-shaped ONNX classifier and a sample JPEG, made locally.

Weights come from a fixed seed, not a download, so the example is reproducible offline.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "resnet18"


def export_classifier(path: str | Path, seed: int = 0, opset: int = 17) -> Path:
    """Export torchvision's ResNet-18 (random weights from ``seed``) to ONNX, batch axis dynamic."""
    import torch
    import torchvision

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=1000).eval()
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
