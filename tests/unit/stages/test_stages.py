"""Each stage against an independent reference: OpenCV, PIL, or torch directly."""

import io
import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tritonpipe.errors import ConfigError, RequestError
from tritonpipe.pipeline.grammar import parse_backend
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages import build_stage
from tritonpipe.stages.control import run_chain, run_isolated


def run(backend: str, data, **params):
    """Build a node's resolved tree on the CPU and run one item through it."""
    tree = load_graph({"backend": backend, **params}).entry.tree
    stage = build_stage(tree, "cpu")
    item = {"data": data}
    run_chain([stage], [item])
    if "error" in item:
        raise item["error"]
    return item


def jpeg_tensor(jpeg: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


def test_decode_mat_equals_opencv(jpeg_factory):
    jpeg = jpeg_factory(70, 90, seed=1)
    got = run("DecodeMat", jpeg_tensor(jpeg))
    want = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(got["data"].numpy(), want)
    assert got["color"] == "bgr"


@pytest.mark.parametrize("color, data_format", [("rgb", "nchw"), ("bgr", "nchw"), ("rgb", "hwc")])
def test_decode_tensor_equals_pil(jpeg_factory, color, data_format):
    jpeg = jpeg_factory(64, 48, seed=2)
    got = run("DecodeTensor", jpeg_tensor(jpeg), color=color, data_format=data_format)["data"]
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    want = rgb if color == "rgb" else rgb[:, :, ::-1]
    if data_format == "nchw":
        assert got.shape == (1, 3, 64, 48)
        got = got[0].permute(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), want)


def test_cvt_color_mat_equals_opencv(jpeg_factory):
    jpeg = jpeg_factory(40, 50, seed=3)
    got = run("S[DecodeMat,cvtColorMat]", jpeg_tensor(jpeg), color="rgb")["data"]
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(got.numpy(), want)


def test_cvt_color_tensor_swaps_channels(jpeg_factory):
    jpeg = jpeg_factory(40, 50, seed=3)
    got = run("S[DecodeTensor(color=rgb),cvtColorTensor(color=bgr)]", jpeg_tensor(jpeg))["data"]
    want = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)  # BGR
    np.testing.assert_array_equal(got[0].permute(1, 2, 0).numpy(), want)


def test_cvt_color_needs_a_known_source():
    with pytest.raises(RequestError, match="colour order"):
        run("cvtColorTensor", torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("size", [(224, 224), (17, 301), (1, 1), (500, 40)])
def test_resize_tensor_equals_opencv_float_bilinear(jpeg_factory, size):
    jpeg = jpeg_factory(120, 160, seed=4)
    got = run("S[DecodeTensor,ResizeTensor]", jpeg_tensor(jpeg), resize_h=size[0], resize_w=size[1])["data"]
    assert got.dtype == torch.float32 and got.shape == (1, 3, *size)
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float32)
    want = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if want.ndim == 2:
        want = want[:, :, None]
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, atol=2e-3)


def test_resize_mat_equals_opencv(jpeg_factory):
    jpeg = jpeg_factory(120, 160, seed=5)
    got = run("S[DecodeMat,ResizeMat]", jpeg_tensor(jpeg), resize_h=50, resize_w=70)["data"]
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(got.numpy(), cv2.resize(bgr, (70, 50), interpolation=cv2.INTER_LINEAR))


def test_pillow_resize_stages_equal_pil(jpeg_factory):
    jpeg = jpeg_factory(97, 131, seed=6)
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    want = np.asarray(Image.fromarray(rgb).resize((45, 60), Image.BILINEAR))
    tensor = run("S[DecodeTensor,PillowResizeTensor]", jpeg_tensor(jpeg), resize_h=60, resize_w=45)["data"]
    np.testing.assert_array_equal(tensor[0].permute(1, 2, 0).numpy(), want)
    mat = run("S[DecodeMat,cvtColorMat,PillowResizeMat]", jpeg_tensor(jpeg), color="rgb", resize_h=60, resize_w=45)["data"]
    np.testing.assert_array_equal(mat.numpy(), want)


def test_mat_tensor_round_trip():
    mat = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    item = run("S[Mat2Tensor,Tensor2Mat]", mat)
    np.testing.assert_array_equal(item["data"].numpy(), mat.numpy())
    tensor = run("Mat2Tensor", mat)["data"]
    np.testing.assert_array_equal(tensor.numpy(), mat.numpy().transpose(2, 0, 1)[None])


@pytest.mark.parametrize("height, width", [(100, 200), (300, 150), (64, 64)])
def test_resize_pad_output_padding_and_inverse(height, width):
    image = torch.rand(1, 3, height, width) * 255
    item = run("ResizePadTensor", image, max_h=128, max_w=96, pad_value="1,2,3")
    out, inverse = item["data"], item["inverse_transform"]
    assert out.shape == (1, 3, 128, 96) and inverse.shape == (1, 4)
    scale = min(128 / height, 96 / width)
    new_h, new_w = round(height * scale), round(width * scale)
    want = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :, :new_h, :new_w], want)
    for channel, value in enumerate((1.0, 2.0, 3.0)):
        assert torch.all(out[0, channel, new_h:, :] == value) and torch.all(out[0, channel, :, new_w:] == value)
    sx, sy, tx, ty = inverse[0].tolist()
    # corners and the centre of the resized content map back onto the original image
    for x_out, y_out, x_in, y_in in [(0, 0, 0, 0), (new_w, new_h, width, height), (new_w / 2, new_h / 2, width / 2, height / 2)]:
        assert sx * x_out + tx == pytest.approx(x_in, abs=1e-3) and sy * y_out + ty == pytest.approx(y_in, abs=1e-3)


def test_resize_pad_rejects_bad_pad_value():
    with pytest.raises(ValueError, match="pad_value"):
        run("ResizePadTensor", torch.zeros(1, 3, 4, 4), max_h=8, max_w=8, pad_value="1,2")


def test_wrong_rank_is_a_stage_error():
    with pytest.raises(RequestError, match="1xCxHxW"):
        run("ResizeTensor", torch.zeros(3, 4, 4), resize_h=2, resize_w=2)
    with pytest.raises(RequestError, match="uint8"):
        run("DecodeMat", torch.zeros(10, dtype=torch.float32))


def test_fail_stage_and_batch_isolation(jpeg_factory):
    stage = build_stage(load_graph({"backend": "S[DecodeMat,Identity]"}).entry.tree, "cpu")
    good = jpeg_tensor(jpeg_factory(20, 20))
    items = [{"data": good}, {"data": good[:30]}, {"data": good}]
    run_chain([stage], items)
    assert "error" not in items[0] and "error" not in items[2] and isinstance(items[1]["error"], RequestError)
    with pytest.raises(RequestError, match="C10Exception"):
        run("C10Exception", good)


def test_a_batch_that_fails_whole_is_logged_once_before_its_requests_are_retried_alone(caplog):
    """A batch-level error is otherwise invisible (each request then passes or fails on its own): it is said once
    per stage and kind of error, so that a stage failing every batch, and serving a request at a time, shows."""

    class BatchesFail:
        name, mutates_inputs = "BatchesFail", False

        def forward(self, batch):
            if len(batch) > 1:
                raise RuntimeError("no batches here")
            batch[0]["result"] = batch[0]["data"] + 1

    with caplog.at_level(logging.WARNING, logger="tritonpipe"):
        for _ in range(2):
            items = [{"data": torch.zeros(1)}, {"data": torch.ones(1)}]
            run_isolated(BatchesFail(), items)
            assert [item["result"].item() for item in items] == [1.0, 2.0]
    said = [r.getMessage() for r in caplog.records if "retried one at a time" in r.getMessage()]
    assert len(said) == 1 and "BatchesFail failed a batch of 2 (RuntimeError: no batches here)" in said[0]


def test_save_and_load_tensor(tmp_path):
    value = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    item = run("SaveTensor", value, save_dir=str(tmp_path))
    saved = list(tmp_path.glob("*.pt"))
    assert len(saved) == 1 and item["saved_path"] == str(saved[0])
    loaded = run("LoadTensor", torch.zeros(1), tensor_name=str(saved[0]))["data"]
    torch.testing.assert_close(loaded, value)
    with pytest.raises(ConfigError, match="does not exist"):
        run("SaveTensor", value, save_dir=str(tmp_path / "missing"))


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_tensor_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot load"):
        run("LoadTensor", torch.zeros(1), tensor_name=str(path))


def test_parsed_tree_builds_stages():
    stage = build_stage(parse_backend("S[Identity,SyncTensor]"), "cpu")
    item = {"data": torch.ones(2)}
    run_chain([stage], [item])
    torch.testing.assert_close(item["data"], torch.ones(2))


def test_tensor2vector_splits_along_the_batch():
    tensor = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    vector = run("Tensor2Vector", tensor)["data"]
    assert isinstance(vector, list) and len(vector) == 2
    for index, part in enumerate(vector):
        np.testing.assert_array_equal(part.numpy(), tensor.numpy()[index])
    with pytest.raises(RequestError, match="NxCxHxW"):
        run("Tensor2Vector", torch.zeros(3, 4))


def test_fancy_upsampling_with_torchvision_is_refused_before_anything_is_written(tmp_path):
    from tritonpipe.repository.generate import generate_repository

    with pytest.raises(ConfigError, match="fancy_upsampling needs decoder=nvimgcodec"):
        graph = load_graph({"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, "fancy_upsampling": True})
        generate_repository(graph, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("key, value, decoder", [("decode_chunk", 8, "auto"), ("decode_depth", 3, "torchvision")])
def test_dali_keys_without_the_dali_decoder_are_refused_before_anything_is_written(tmp_path, key, value, decoder):
    from tritonpipe.repository.generate import build_repository, generate_repository

    config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, key: value, "decoder": decoder}
    with pytest.raises(ConfigError, match=f"{key} tunes decoder=dali"):
        generate_repository(load_graph(config), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    _, configs, _ = build_repository(load_graph({**config, "decoder": "dali"}), device="gpu")
    assert configs


def test_decode_depth_also_tunes_the_nvjpeg_decoder_and_decode_chunk_does_not(tmp_path):
    from tritonpipe.repository.generate import build_repository

    config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, "decoder": "nvjpeg"}
    _, configs, _ = build_repository(load_graph({**config, "decode_depth": 1}), device="gpu")
    assert configs
    # auto picks nvjpeg where the GPU has JPEG engines: the key is taken with it too
    _, configs, _ = build_repository(load_graph({**config, "decoder": "auto", "decode_depth": 2}), device="gpu")
    assert configs
    with pytest.raises(ConfigError, match="decode_chunk tunes decoder=dali, which this stage does not use"):
        build_repository(load_graph({**config, "decode_chunk": 8}), device="gpu")


def test_the_dali_decoder_without_dali_says_what_to_install():
    from tritonpipe.kernels import dali_decode

    if dali_decode.available():
        pytest.skip("DALI is installed here")
    tree = load_graph({"backend": "DecodeTensor", "decoder": "dali"}).entry.tree
    with pytest.raises(ConfigError, match="needs NVIDIA DALI: pip install nvidia-dali"):
        build_stage(tree, "cpu")


@pytest.mark.parametrize("extra, refused", [({}, True), ({"decoder": "nvimgcodec"}, False),
                                            ({"cuda_decoder_share": 0.3}, False), ({"decoder": "dali"}, False)])
def test_a_huffman_threshold_without_the_cuda_decoder_is_refused_before_anything_is_written(tmp_path, extra, refused):
    from tritonpipe.repository.generate import build_repository, generate_repository

    config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, "hybrid_huffman_threshold": 0, **extra}
    if refused:
        with pytest.raises(ConfigError, match="hybrid_huffman_threshold tunes the CUDA decoder of nvImageCodec or DALI"):
            generate_repository(load_graph(config), tmp_path / "repo")
        assert not (tmp_path / "repo").exists()
    else:
        _, configs, _ = build_repository(load_graph(config), device="gpu")
        assert configs  # the plan is made; the decoder itself needs nvImageCodec and a GPU at load



class _Sleepy:
    """A map stage whose items take a while, each noting the thread it ran on; an item of 0 fails."""

    @staticmethod
    def make(concurrent: bool):
        import threading
        import time

        from tritonpipe.stages.base import MapStage

        class Sleepy(MapStage):
            name = "Sleepy"

            def apply(self, data, item):
                time.sleep(0.05)
                item["thread"] = threading.get_ident()
                if data == 0:
                    raise ValueError("zero")
                return data * 2

        Sleepy.concurrent = concurrent
        return Sleepy()


@pytest.mark.parametrize("concurrent", [True, False])
def test_a_concurrent_map_stage_spreads_a_batch_over_the_cpu_instances_threads(monkeypatch, concurrent):
    import threading

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    stage = _Sleepy.make(concurrent)
    batch = [{"data": value} for value in (1, 0, 3, 4, 5, 6)]
    stage.forward(batch)
    assert [item.get("result") for item in batch] == [2, None, 6, 8, 10, 12]
    assert isinstance(batch[1]["error"], ValueError) and all("error" not in item for i, item in enumerate(batch) if i != 1)
    threads = {item["thread"] for item in batch}
    assert len(threads) == 2 if concurrent else threads == {threading.get_ident()}


@pytest.mark.parametrize("backend", ["DecodeMat", "DecodeTensor"])
def test_a_cpu_decoder_on_several_threads_decodes_each_image_as_pillow_does_and_a_bad_one_fails_alone(
    monkeypatch, jpeg_factory, backend
):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    jpegs = [jpeg_factory(40 + 8 * i, 30 + 4 * i, seed=i) for i in range(7)]
    jpegs[4] = jpegs[4][: len(jpegs[4]) // 2]  # cut off: fails alone
    stage = build_stage(parse_backend(backend), "cpu")
    batch = [{"data": torch.frombuffer(bytearray(j), dtype=torch.uint8)} for j in jpegs]
    stage.forward(batch)
    for i, (jpeg, item) in enumerate(zip(jpegs, batch)):
        if i == 4:
            assert isinstance(item["error"], RequestError) and "result" not in item
            continue
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        got = item["result"].numpy()
        want = rgb[:, :, ::-1] if backend == "DecodeMat" else rgb.transpose(2, 0, 1)[None]
        assert "error" not in item and np.array_equal(got, want), i


@pytest.mark.parametrize("extra, message", [
    ({"cpu_decoder_share": 0.2, "cuda_decoder_share": 0.2}, "cpu_decoder_share and cuda_decoder_share both take a share"),
    ({"cpu_decoder_threads": 4}, "cpu_decoder_threads sets the threads of cpu_decoder_share"),
    ({"cpu_decoder_balance": True, "cuda_decoder_share": 0.2}, "cpu_decoder_balance and cuda_decoder_share both take"),
])
def test_a_host_share_that_cannot_work_is_refused_before_anything_is_written(tmp_path, extra, message):
    from tritonpipe.repository.generate import generate_repository

    config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, **extra}
    with pytest.raises(ConfigError, match=message):
        generate_repository(load_graph(config), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_a_host_share_reaches_the_decoder(monkeypatch):
    from tritonpipe.kernels import jpeg

    seen = {}
    monkeypatch.setattr(jpeg, "decode_jpeg_tensor", lambda datas, **kw: seen.update(kw) or [jpeg.DecodeError("x", reason="corrupt")])
    tree = load_graph({"backend": "DecodeTensor", "cpu_decoder_share": 0.25, "cpu_decoder_threads": 3}).entry.tree
    stage = build_stage(tree, "cpu")
    stage.forward([{"data": torch.tensor([0xFF, 0xD8], dtype=torch.uint8)}])
    assert (seen["cpu_decoder_share"], seen["cpu_decoder_threads"]) == (0.25, 3)
    assert seen["balance"] is None


def test_a_balanced_host_share_starts_where_asked_on_a_gpu_and_is_off_on_the_cpu(monkeypatch):
    """cpu_decoder_balance takes its threads; on a CUDA device the balance starts at cpu_decoder_share (or the
    default start), and a CPU instance, which decodes everything on the host anyway, has none."""
    from tritonpipe.kernels import jpeg, nvjpeg

    monkeypatch.setattr(nvjpeg, "problem", lambda device, lanes=1: "no engines here")
    for extra, start in (({"cpu_decoder_share": 0.2}, 0.2), ({}, jpeg.BALANCE_START)):
        tree = load_graph({"backend": "DecodeTensor", "cpu_decoder_balance": True, "cpu_decoder_threads": 3, **extra}).entry.tree
        assert build_stage(tree, "cpu").balance is None
        gpu_stage = build_stage(tree, "cuda:0")
        assert gpu_stage.balance.share == start and gpu_stage.cpu_decoder_threads == 3


def test_the_balanced_share_is_logged_when_it_has_moved_and_not_more_often(monkeypatch, caplog):
    from tritonpipe.kernels import jpeg, nvjpeg
    from tritonpipe.stages import image

    monkeypatch.setattr(nvjpeg, "problem", lambda device, lanes=1: "no engines here")
    stage = build_stage(load_graph({"backend": "DecodeTensor", "cpu_decoder_balance": True}).entry.tree, "cuda:0")
    moves = iter([0.06, 0.2, 0.3])

    def decode(datas, **kw):
        kw["balance"].share = next(moves)
        return [jpeg.DecodeError("x", reason="corrupt")]

    monkeypatch.setattr(jpeg, "decode_jpeg_tensor", decode)
    caplog.set_level("INFO", logger="tritonpipe")
    said = lambda: [r.getMessage() for r in caplog.records if "cpu_decoder_balance moved" in r.getMessage()]  # noqa: E731
    batch = lambda: [{"data": torch.tensor([0xFF, 0xD8], dtype=torch.uint8)}]  # noqa: E731
    stage.forward(batch())  # 0.05 -> 0.06: too small a move to say
    stage.forward(batch())  # -> 0.2: said
    assert said() == ["DecodeTensor on cuda:0: cpu_decoder_balance moved the host's share to 0.20 of the bytes"]
    stage.forward(batch())  # -> 0.3: a move, but within SHARE_LOG_SECONDS of the last line
    assert len(said()) == 1
    monkeypatch.setattr(image, "SHARE_LOG_SECONDS", 0.0)
    moves = iter([0.4])
    stage.forward(batch())
    assert said()[-1].endswith("moved the host's share to 0.40 of the bytes")
