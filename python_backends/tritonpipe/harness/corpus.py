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


#: the distinct-size corpus: pixels per image, aspect ratios, qualities and chroma subsamplings
PHOTO_PIXELS = (100_000, 3_000_000)
_ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3, 9 / 16)
_QUALITIES = (75, 80, 85, 90, 95)
_SUBSAMPLINGS = ("420", "422", "444")


def photo_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` distinct (height, width) pairs of 0.1 to 3 MP, in portrait and landscape, as a
    batch of user photos has: evenly spread in pixels (log scale), shuffled by ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    low, high = PHOTO_PIXELS
    sizes: list[tuple[int, int]] = []
    for index in range(count):
        pixels = low * (high / low) ** (index / max(1, count - 1))
        aspect = _ASPECTS[index % len(_ASPECTS)]
        width = int(round((pixels * aspect) ** 0.5))
        height = int(round(pixels / width))
        while (height, width) in sizes:  # distinct, whatever the rounding
            width += 1
        sizes.append((height, width))
    order = rng.permutation(count)
    return [sizes[i] for i in order]


def photo_corpus(count: int = 64, seed: int = 0) -> Corpus:
    """``count`` photo-like JPEGs of ``count`` distinct sizes (0.1 to 3 MP), qualities 75 to 95 and
    4:2:0, 4:2:2 and 4:4:4 chroma: what a batch of user photos looks like, where every image needs
    a resize of its own."""
    if count < 1:
        raise ConfigError(f"the corpus needs at least one image, got {count}")
    images = []
    for index, (height, width) in enumerate(photo_sizes(count, seed)):
        quality = _QUALITIES[index % len(_QUALITIES)]
        subsampling = _SUBSAMPLINGS[index % len(_SUBSAMPLINGS)]
        images.append(sample_jpeg(height, width, seed=seed * 100_003 + index, quality=quality, subsampling=subsampling))
    mb = sum(map(len, images)) / 1e6
    return Corpus(images, f"{count} photo-like JPEGs of {count} distinct sizes (0.1-3 MP, quality 75-95, "
                          f"4:2:0/4:2:2/4:4:4, seed {seed}), {mb:.1f} MB")


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
