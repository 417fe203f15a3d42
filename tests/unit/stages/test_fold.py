"""Folding the colour order, the model's normalisation and its input dtype into the one-launch resize.

The fold only happens where the Triton kernel runs; on a machine without a GPU that is under Triton's
interpreter, in a child process (``TRITON_INTERPRET`` is read when Triton is imported).  The folded chain
must give the same answers as the same chain with ``fold_post = false``, request by request, bad ones
included.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.unit.model.test_runtime import runtime_for

from tritonpipe.stages.fold import fold_post_decode
from tritonpipe.stages.model import _joined

_FOLDED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {root!r})
    from tests.conftest import export_tiny, make_jpeg
    from tests.unit.model.test_runtime import runtime_for

    tmp = Path({tmp!r})
    model = export_tiny(tmp / "tiny.onnx")
    keys = dict(mean="123.675,116.28,103.53", std="58.395,57.12,57.375", warmup="off", max=8)
    keys["cvtColorTensor::color"] = {color!r}
    folded = runtime_for(tmp / "a", model, **keys)
    plain = runtime_for(tmp / "b", model, fold_post=False, **keys)
    resize, model_stage = folded.root.children[1], folded.root.children[-1].children[-1]
    report = dict(
        post=repr(resize.post), plain_post=repr(plain.root.children[1].post),
        model_mean=model_stage.mean is None, plain_mean=plain.root.children[-1].children[-1].mean is not None,
    )
    jpegs = [make_jpeg(h, w, seed=i) for i, (h, w) in enumerate([(48, 64), (33, 20), (90, 120), (32, 32)])]
    jpegs.insert(2, jpegs[0][:200])  # truncated: fails alone
    (name,) = folded.inputs
    results = []
    for runtime in (folded, plain):
        items = [{{runtime.inputs[name]: torch.frombuffer(bytearray(j), dtype=torch.uint8).reshape(1, -1)}} for j in jpegs]
        runtime.run(items)
        results.append([str(item["error"]) if "error" in item else runtime.output(item, "scores") for item in items])
    report["same"] = [
        (a == b) if isinstance(a, str) or isinstance(b, str) else bool(torch.equal(a, b)) for a, b in zip(*results)
    ]
    report["errors"] = [isinstance(a, str) for a in results[0]]
    json.dump(report, sys.stdout)
    """
)


def _run_interpreted(tmp_path, color):
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = _FOLDED.format(root=root, tmp=str(tmp_path), color=color)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_the_folded_chain_answers_as_the_plain_one_request_by_request(tmp_path, color):
    report = _run_interpreted(tmp_path, color)
    assert report["post"] == (
        f"PostFold(color='{color}', mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), dtype=torch.float32)"
    )
    assert report["plain_post"] == "None"
    assert report["model_mean"] and report["plain_mean"]  # the folded model stage left its normalisation to the resize
    assert report["errors"] == [False, False, True, False, False]
    assert all(report["same"]), report["same"]


def test_without_the_kernel_nothing_is_folded(tmp_path, tiny_onnx):
    runtime = runtime_for(tmp_path, tiny_onnx, mean="1,2,3", warmup="off")
    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert fold_post_decode(runtime.root) == []
    assert runtime.root.children[1].post is None
    assert runtime.root.children[-1].children[-1].mean is not None


def test_consecutive_rows_of_one_tensor_are_taken_without_a_copy():
    for batch in (torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2), torch.rand(4, 3, 2, 2)):
        rows = list(batch.split(1))
        for parts in (rows, rows[:3], rows[1:], list(batch.split(2))):
            joined = _joined(parts, batch.device)
            assert torch.equal(joined, torch.cat(parts)) and joined.data_ptr() == parts[0].data_ptr()
        for parts in (rows[::-1], [rows[0], rows[2]], [r.clone() for r in rows], [rows[0], rows[1].half()]):
            joined = _joined(parts, batch.device)
            assert joined.data_ptr() != batch.data_ptr() and torch.equal(joined, torch.cat([p.float() for p in parts]))
        assert _joined(rows[2:3], batch.device) is rows[2]  # one part is itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_folded_chain_answers_as_the_plain_one(tmp_path, jpeg_factory):
    """The torch engine in FP16 with CUDA graphs: the resize writes FP16, normalised, in the model's order."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.jit.trace(net, torch.randn(1, 3, 32, 32)).save(str(tmp_path / "net.ts"))
    keys = dict(mean="123.675,116.28,103.53", std="58.395,57.12,57.375", warmup="off", max=8, inputs="x:FP32:3x32x32")
    keys["cvtColorTensor::color"] = "bgr"
    device = torch.device("cuda", 0)
    folded = runtime_for(tmp_path / "a", tmp_path / "net.ts", device, **keys)
    plain = runtime_for(tmp_path / "b", tmp_path / "net.ts", device, fold_post=False, **keys)
    assert folded.root.children[1].post.dtype == torch.float16 and plain.root.children[1].post is None
    jpegs = [jpeg_factory(h, w, seed=i) for i, (h, w) in enumerate([(480, 640), (33, 20), (1080, 1920), (32, 32), (7, 900)])]
    jpegs.insert(1, jpegs[0][:300])
    (name,) = folded.inputs
    answers = []
    for runtime in (folded, plain):
        for size in (len(jpegs), 3, 1):  # graphs of several buckets, padded and not
            items = [{runtime.inputs[name]: torch.frombuffer(bytearray(j), dtype=torch.uint8).reshape(1, -1)} for j in jpegs[:size]]
            runtime.run(items)
            answers.append([str(i["error"]) if "error" in i else runtime.output(i, "output0").cpu() for i in items])
    for got, want in zip(answers[:3], answers[3:]):
        assert [isinstance(a, str) for a in got] == [isinstance(b, str) for b in want]
        for a, b in zip(got, want):
            assert a == b if isinstance(a, str) else torch.equal(a, b)
    assert isinstance(answers[0][1], str) and not isinstance(answers[0][0], str)
