"""Per-stage metrics on Triton's /metrics after known traffic: counts checked exactly."""

import re
import time
import urllib.request

import cv2
import numpy as np
import pytest

from tritonpipe import load_graph
from tritonpipe.client.client import InferError, PipelineClient
from tritonpipe.model.metrics import BATCH_SECONDS, DURATION_US, GPU_STEP, IMAGES, REJECTS, STEP_PREFIX, STEPS
from tritonpipe.repository.generate import generate_repository
from tritonpipe.server.owner import TritonServer

pytestmark = pytest.mark.server

SAMPLE_RE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, keyed by name and labels."""
    samples = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        match = SAMPLE_RE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_when(url: str, ready, timeout: float = 15.0) -> dict[tuple[str, frozenset], float]:
    """The page once ``ready(samples)`` holds: instances hand their tallies over every FLUSH_SECONDS."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_stage_counts_and_rejects_by_reason(tmp_path, jpeg_factory):
    make_jpeg = jpeg_factory
    # max=1: one request per batch, so every count below is exact whatever the timing
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 16, "resize_w": 16, "max_pixels": 10_000},
                       name="metered")
    repo = generate_repository(graph, tmp_path / "repo").path
    good = [make_jpeg(48, 64, seed=i) for i in range(5)]
    truncated = [jpeg[: len(jpeg) // 2] for jpeg in good[:2]]
    too_large = [make_jpeg(100, 200, seed=9)] * 2  # 20,000 pixels against max_pixels=10,000
    gif = [b"GIF89a" + bytes(64)]
    expected_rejects = {"truncated": 2, "too_large": 2, "unsupported_format": 1}
    with TritonServer(repo) as server:
        client = PipelineClient(server.grpc_url, model="metered")
        for jpeg in good:
            reference = cv2.resize(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), (16, 16))
            np.testing.assert_array_equal(next(iter(client.infer(jpeg).values()))[0], reference)
        for bad in truncated + too_large + gif:
            with pytest.raises(InferError) as failure:
                client.infer(bad)
            assert failure.value.status == "INVALID_ARG"
        decode, resize = {"model": "metered", "stage": "DecodeMat"}, {"model": "metered", "stage": "ResizeMat"}
        sent = len(good) + sum(expected_rejects.values())
        steps = {step: {"model": "metered", "stage": STEP_PREFIX + step} for step in STEPS}
        # a flush hands the batch counts to Triton last: once a stage's count is whole, so is the rest of its series
        wanted = [(decode, sent), (resize, len(good)), *((labels, sent) for labels in steps.values())]
        samples = scrape_when(server.metrics_url,
                              lambda got: all(value(got, f"{BATCH_SECONDS}_count", **labels) >= n for labels, n in wanted))

    assert value(samples, IMAGES, **decode) == sent
    assert value(samples, IMAGES, **resize) == len(good)
    for reason, count in expected_rejects.items():
        assert value(samples, REJECTS, **decode, reason=reason) == count, reason
    assert not [key for key in samples if key[0] == REJECTS and ("stage", "ResizeMat") in key[1]]
    assert value(samples, f"{BATCH_SECONDS}_count", **decode) == sent
    assert value(samples, f"{BATCH_SECONDS}_count", **resize) == len(good)
    assert value(samples, f"{BATCH_SECONDS}_bucket", **decode, le="+Inf") == sent
    assert 0 < value(samples, f"{BATCH_SECONDS}_sum", **decode) * 1e6 <= value(samples, DURATION_US, **decode) * 1.001
    # execute's own steps around the stages: every request read and answered, one batch each (max=1)
    for step, labels in steps.items():
        assert value(samples, IMAGES, **labels) == sent, step
        assert value(samples, f"{BATCH_SECONDS}_count", **labels) == sent, step
        assert value(samples, DURATION_US, **labels) > 0, step
    assert not [key for key in samples if ("stage", STEP_PREFIX + GPU_STEP) in key[1]]  # no GPU here, no GPU time
