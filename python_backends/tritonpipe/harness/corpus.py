"""The images every system is measured on, and perf_analyzer's ``--input-data`` file for them."""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..examples import sample_jpeg

#: (height, width) of the synthetic images: VGA, 720p and 1080p, cycled
SIZES = ((480, 640), (720, 1280), (1080, 1920))
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class Corpus:
    images: list[bytes]
    description: str

    @property
    def total_bytes(self) -> int:
        return sum(len(image) for image in self.images)


def synthetic_corpus(
    count: int = 48, seed: int = 0, quality: int = 90, sizes: tuple[tuple[int, int], ...] = SIZES
) -> Corpus:
    """``count`` deterministic photo-like JPEGs cycling through ``sizes`` ((height, width) pairs)."""
    if count < 1:
        raise ConfigError(f"the corpus needs at least one image, got {count}")
    if not sizes:
        raise ConfigError("the corpus needs at least one image size")
    images = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        images.append(sample_jpeg(height, width, seed=seed * 100_003 + index, quality=quality))
    mix = ", ".join(f"{n}x {w}x{h}" for (h, w), n in Counter(sizes[i % len(sizes)] for i in range(count)).items())
    mb = sum(map(len, images)) / 1e6
    return Corpus(images, f"{count} synthetic JPEGs (quality {quality}, seed {seed}: {mix}), {mb:.1f} MB")


def load_corpus(folder: str | Path) -> Corpus:
    """Every ``*.jpg`` / ``*.jpeg`` file in ``folder``, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"corpus folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in JPEG_SUFFIXES)
    if not files:
        raise ConfigError(f"corpus folder {str(folder)!r} holds no .jpg or .jpeg files")
    images = [p.read_bytes() for p in files]
    not_jpeg = [p.name for p, data in zip(files, images) if not data.startswith(b"\xff\xd8")]
    if not_jpeg:
        raise ConfigError(f"not JPEG files (no SOI marker): {', '.join(not_jpeg[:5])}")
    mb = sum(map(len, images)) / 1e6
    return Corpus(images, f"{len(images)} JPEGs from {folder.resolve()}, {mb:.1f} MB")


def input_data(images: list[bytes], input_name: str = "INPUT") -> dict:
    """perf_analyzer's JSON: one step per image, bytes as base64, shape without the batch axis."""
    return {
        "data": [
            {input_name: {"content": {"b64": base64.b64encode(image).decode("ascii")}, "shape": [len(image)]}}
            for image in images
        ]
    }


def write_input_data(images: list[bytes], path: str | Path, input_name: str = "INPUT") -> Path:
    path = Path(path)
    path.write_text(json.dumps(input_data(images, input_name)))
    return path


def read_input_data(path: str | Path, input_name: str = "INPUT") -> list[bytes]:
    """The images back from an ``--input-data`` file (checks each declared shape)."""
    images = []
    for step in json.loads(Path(path).read_text())["data"]:
        entry = step[input_name]
        image = base64.b64decode(entry["content"]["b64"])
        if entry["shape"] != [len(image)]:
            raise ValueError(f"shape {entry['shape']} does not match {len(image)} bytes")
        images.append(image)
    return images
