"""The preprocessing stage: JPEG bytes -> a normalised 3x224x224 tensor, with PIL and torchvision.

The server imports this file by itself for the function below, so it holds nothing else.
"""

import io

from PIL import Image
from torchvision import transforms

TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def preprocess(data: bytes):
    return TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
