"""Colour-order kernels."""

from __future__ import annotations

import torch

COLORS = ("rgb", "bgr")


def convert_color(image: torch.Tensor, source: str, target: str, channel_dim: int) -> torch.Tensor:
    """Reorder the three colour channels from ``source`` to ``target`` (``rgb`` or ``bgr``)."""
    for name, value in (("source", source), ("target", target)):
        if value not in COLORS:
            raise ValueError(f"{name} colour must be one of {COLORS}, got {value!r}")
    if image.shape[channel_dim] != 3:
        raise ValueError(f"colour conversion needs 3 channels on dim {channel_dim}, got shape {tuple(image.shape)}")
    if source == target:
        return image
    # rgb <-> bgr is the same swap both ways
    return image.flip(channel_dim)  # flip copies, so the result is already contiguous
