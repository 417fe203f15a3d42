"""The shipped examples' models, built in this process."""

import warnings

import torch

from tritonpipe.examples import DETECTOR_CLASSES, DETECTOR_SIDE, detector_module


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

