"""The shipped examples' models, built in this process."""

import warnings

import numpy as np
import onnxruntime as ort
import torch
from tools.export_example import main as export_example

from tritonpipe import load_graph
from tritonpipe.examples import DETECTOR_CLASSES, DETECTOR_SIDE, EXAMPLE_DIR, detector_module
from tritonpipe.repository.configs import from_text
from tritonpipe.repository.generate import generate_repository


def test_the_detector_follows_its_device_and_keeps_its_answers_when_traced():
    torch.manual_seed(1)
    images = torch.rand(2, 3, DETECTOR_SIDE, DETECTOR_SIDE) * 255
    detector = detector_module(0)
    with torch.no_grad():
        head = detector(images)
    assert head.shape[:2] == (2, 4 + DETECTOR_CLASSES)
    # the anchors move with the module: a copy on another device (here "meta", which holds no data) runs,
    # where anchors made on the CPU inside forward would meet the meta tensors and fail
    on_meta = detector_module(0).to("meta")
    assert on_meta(images.to("meta")).shape == head.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(detector, images[:1])
    with torch.no_grad():
        assert torch.equal(traced(images), head)
    # the same seed gives the same weights and so the same head
    with torch.no_grad():
        assert torch.equal(detector_module(0)(images), head)




def test_the_torchscript_classifier_answers_as_the_onnx_one_and_fused8_generates_with_it(tmp_path):
    assert export_example(["--output", str(tmp_path), "--torchscript", "--seed", "3"]) == 0
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10 and later call TorchScript deprecated
        got = torch.jit.load(str(tmp_path / "resnet18.ts"))(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "resnet18.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"input": x.numpy()})[0], atol=1e-4, rtol=0)

    # the GPU benchmarks' configuration, as committed, with that model (resolved against tmp_path)
    graph = load_graph(EXAMPLE_DIR / "fused8.toml", base_dir=tmp_path)
    repo = generate_repository(graph, tmp_path / "repo", device="cpu").path
    (config,) = [from_text(path.read_text()) for path in repo.glob("*/config.pbtxt")]  # fused: one model
    assert config.backend == "python" and config.max_batch_size == 64
    assert sum(group.count for group in config.instance_group) == 8
