"""The decoder one chunk ahead of the rest of the chain (prefetch_chunk): same answers, fewer waits."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tritonpipe.contract import ModelParams
from tritonpipe.errors import ConfigError
from tritonpipe.harness.corpus import synthetic_corpus
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository
from tritonpipe.stages import build_stage
from tritonpipe.stages.control import run_chain, run_chain_ahead

CHAIN = {"backend": "S[DecodeTensor,ResizeTensor,cvtColorTensor]", "resize_h": 40, "resize_w": 56, "color": "bgr", "max": 8}


def _requests(count: int) -> list[dict]:
    images = synthetic_corpus(4, seed=1, sizes=((48, 64), (30, 40))).images
    bad = b"\xff\xd8\xff" + bytes(20)
    payloads = [images[i % len(images)] for i in range(count)]
    payloads[3] = bad
    return [{"data": torch.frombuffer(bytearray(p), dtype=torch.uint8)[None]} for p in payloads]


def _run(device: str, ahead: bool, count: int = 11) -> list[dict]:
    root = build_stage(load_graph(CHAIN).entry.tree, device)
    items = _requests(count)
    with ThreadPoolExecutor(1) as pool:
        if ahead:
            run_chain_ahead(root.children, items, 4, pool)
        else:
            run_chain([root], items)
    return items


def _same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b):
        assert ("error" in x) == ("error" in y)
        if "error" in x:
            assert str(x["error"]) == str(y["error"])
        else:
            assert torch.equal(x["data"].cpu(), y["data"].cpu())


def test_on_the_cpu_it_is_the_plain_chain():
    _same(_run("cpu", True), _run("cpu", False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_every_answer_equals_the_plain_chain_and_a_bad_image_fails_alone():
    ahead, plain = _run("cuda", True, 23), _run("cuda", False, 23)
    _same(ahead, plain)
    assert "error" in ahead[3] and sum("error" in item for item in ahead) == 1


def test_the_key_reaches_gpu_models_only():
    gpu = build_repository(load_graph({**CHAIN, "prefetch_chunk": 16}), "gpu")[1]
    cpu = build_repository(load_graph({**CHAIN, "prefetch_chunk": 16}), "cpu")[1]
    params = {k: v.string_value for k, v in gpu["pipeline"].parameters.items()}
    assert ModelParams.decode(params).prefetch_chunk == 16
    assert ModelParams.decode({k: v.string_value for k, v in cpu["pipeline"].parameters.items()}).prefetch_chunk == 0


def test_a_bad_value_is_refused_before_anything_is_written():
    with pytest.raises(ConfigError, match="prefetch_chunk"):
        load_graph({**CHAIN, "prefetch_chunk": -1})
    with pytest.raises(ConfigError, match="prefetch_chunk"):
        ModelParams.decode({"tritonpipe.pipeline": "Identity", "tritonpipe.inputs": "{}", "tritonpipe.outputs": "{}",
                            "tritonpipe.prefetch_chunk": "x"})
