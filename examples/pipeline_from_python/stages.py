"""The two stages of the example, as the list that ``tritonpipe.pipe`` and ``tritonpipe.load_graph`` take."""

import torch
import torchvision
from preprocess import preprocess


def classifier(seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet-18 with random weights from ``seed``: reproducible offline."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).eval()


def pipeline_stages(
    workers: int = 4, cores_per_worker: int = 4, model_cores: int = 4, oversubscribe: bool = False, max_batch: int = 8
) -> list:
    """Preprocessing and inference, ``workers`` instances each; ``model_cores=0`` leaves the model's cores unset
    (a model on a GPU needs few)."""
    shared = {"worker_num": workers, "oversubscribe": oversubscribe}
    inference = {**shared, "inputs": "input:FP32:3x224x224", "max": max_batch}
    if model_cores:
        inference["cores_per_worker"] = model_cores
    return [
        ("preprocess", preprocess, {**shared, "cores_per_worker": cores_per_worker}),
        ("inference", classifier(), inference),
    ]
