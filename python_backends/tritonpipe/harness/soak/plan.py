"""What the soak sends: a deterministic mix of good images and bad inputs of each kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...errors import ConfigError
from ..corpus import load_corpus, synthetic_corpus

BAD_KINDS = ("truncated", "random", "png", "empty")
#: (height, width) of the built-in corpus: small, so the reference keeps up on a few cores
SOAK_SIZES = tuple((width * 3 // 4, width) for width in range(64, 168, 8))


def soak_images(folder: Path | None, seed: int = 0) -> list[bytes]:
    """The JPEGs in ``folder``, else 32 small synthetic ones."""
    corpus = load_corpus(folder) if folder else synthetic_corpus(32, seed=seed, sizes=SOAK_SIZES)
    return corpus.images


def bad_input(kind: str, index: int, corpus: list[bytes], seed: int = 0) -> bytes:
    """A deterministic bad input of ``kind`` for request ``index``."""
    source = corpus[index % len(corpus)]
    if kind == "truncated":
        return source[: max(1, len(source) // 2)]
    if kind == "random":
        rng = np.random.default_rng([seed, index])
        return rng.integers(0, 256, int(rng.integers(16, 4096)), dtype=np.uint8).tobytes()
    if kind == "png":
        picture = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR)
        return cv2.imencode(".png", picture if picture is not None else np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    if kind == "empty":
        return b""
    raise ConfigError(f"unknown bad input kind {kind!r}; expected one of {BAD_KINDS}")


@dataclass(frozen=True)
class Request:
    index: int
    kind: str  # "good" or one of BAD_KINDS
    payload: bytes


def plan_requests(count: int, bad_fraction: float, corpus: list[bytes], seed: int = 0, start: int = 0) -> list[Request]:
    """``count`` requests; exactly ``round(count * bad_fraction)`` of them bad, kinds in turn."""
    if not 0.0 <= bad_fraction <= 1.0:
        raise ConfigError(f"bad fraction must be in [0, 1], got {bad_fraction}")
    rng = np.random.default_rng(seed)
    bad_at = set(rng.choice(count, size=int(round(count * bad_fraction)), replace=False).tolist()) if count else set()
    requests, turn = [], 0
    for offset in range(count):
        index = start + offset
        if offset in bad_at:
            kind = BAD_KINDS[turn % len(BAD_KINDS)]
            turn += 1
            requests.append(Request(index, kind, bad_input(kind, index, corpus, seed)))
        else:
            requests.append(Request(index, "good", corpus[int(rng.integers(len(corpus)))]))
    return requests
