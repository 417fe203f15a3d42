"""Folding the work after a GPU resize into its one launch, when a model's stage tree is built.

In ``S[DecodeTensor,ResizeTensor,cvtColorTensor,SyncTensor[TensorrtTensor]]`` on a GPU, the resize writes
float32 images, the colour stage flips each one, and the model stage concatenates the batch, subtracts the
mean, divides by the std and casts to the engine's FP16: five passes over the batch and a launch per image.
The one-launch resize (:mod:`tritonpipe.kernels.batch_resize`) can do all of it on its way, with the same
float32 arithmetic, and writes the batch as one tensor that the model stage takes without a copy.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..kernels import batch_resize
from .base import Stage
from .control import Sequential, SyncTensor
from .image import CvtColorTensor, PostFold, ResizeTensor
from .model import TensorrtTensor

#: containers whose children a batch passes through one after another, and nothing else
_CHAINS = (Sequential, SyncTensor)


def _flow(stage: Stage) -> Iterator[Stage]:
    """The stages a batch passes through, in order; a container that does more than chain its children
    counts as one stage."""
    if type(stage) in _CHAINS:
        for child in stage.children:
            yield from _flow(child)
    else:
        yield stage


def fold_post_decode(root: Stage) -> list[str]:
    """Give each ``ResizeTensor`` that runs its one-launch kernel the colour order of a ``cvtColorTensor`` right
    after it, and the normalisation and input dtype of a model stage right after that (or right after the
    resize).  The colour stage then finds its images in order already and passes them on; the model stage
    leaves its mean and std to the resize.  Returns what was folded, one line per resize."""
    flow = list(_flow(root))
    folded = []
    for index, stage in enumerate(flow):
        if not isinstance(stage, ResizeTensor) or not stage.fold_post or not batch_resize.kernel_available(stage.device):
            continue
        rest = flow[index + 1 :]
        color = None
        if rest and isinstance(rest[0], CvtColorTensor):
            color, rest = rest[0].color, rest[1:]
        handed = rest[0].hand_over_input() if rest and isinstance(rest[0], TensorrtTensor) else None
        post = PostFold(color, *handed) if handed is not None else PostFold(color)
        if post == PostFold():
            continue  # nothing to take over
        stage.post = post
        folded.append(f"{stage.name} on {stage.device} does {post.describe()} in its one launch")
    return folded
