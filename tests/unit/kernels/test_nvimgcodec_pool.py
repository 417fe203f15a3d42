"""How a batch is shared out among nvImageCodec decoders, checked with stand-in decoders on the CPU.

The real decoders are exercised on a GPU by test_nvimgcodec.py; here the dealing, the threads,
the order of the results and the recovery from a release that drops failed images are checked
against plain Python expectations.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tritonpipe.kernels import nvimgcodec as N


def test_deal_gives_every_index_once_and_balances_bytes():
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 10_000, 64)]
    for shares in (1, 2, 3, 4, 7):
        groups = N.deal(sizes, shares)
        assert len(groups) == shares
        assert sorted(i for group in groups for i in group) == list(range(64))
        assert all(group == sorted(group) for group in groups)
        totals = [sum(sizes[i] for i in group) for group in groups]
        # greedy largest-first: no group exceeds the lightest by more than the largest item
        assert max(totals) - min(totals) <= max(sizes)


def test_deal_with_fewer_items_than_shares():
    assert N.deal([5, 3], 4) == [[0], [1]]
    assert N.deal([], 3) == []
    with pytest.raises(ValueError, match="shares must be at least 1"):
        N.deal([1], 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hw_load": 1.5}, "hw_load must be in"),
        ({"threads": 0}, "threads must be in"),
        ({"threads": N.MAX_THREADS + 1}, "threads must be in"),
        ({"cpu_threads": -1}, "cpu_threads must be 0"),
    ],
)
def test_settings_refuse_values_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        N.Settings(**kwargs)


def test_the_huffman_threshold_reaches_the_cuda_decoder_alone():
    assert N.Settings().options() == ":fancy_upsampling=0"
    assert N.Settings(huffman_threshold=0, fancy_upsampling=True).options() == (
        ":fancy_upsampling=1 nvjpeg_cuda_decoder:hybrid_huffman_threshold=0")
    with pytest.raises(ValueError, match="huffman_threshold must be 0 or more"):
        N.Settings(huffman_threshold=-1)


class _Decoder:
    """Decodes an array to ("image", first byte), slowly, and notes the threads it ran on.

    Arrays whose first byte is 0 fail: left out of the list (``drops``) or given as None.
    """

    def __init__(self, drops: bool = False):
        self.drops = drops
        self.threads: set[str] = set()
        self.busy = 0

    def _one(self, array):
        return None if array[0] == 0 else ("image", int(array[0]))

    def decode(self, code_streams, params=None, cuda_stream=0):
        assert params == "params" and cuda_stream == 7
        self.threads.add(threading.current_thread().name)
        if not isinstance(code_streams, list):
            return self._one(code_streams)
        self.busy += 1
        time.sleep(0.02)
        self.busy -= 1
        images = [self._one(array) for array in code_streams]
        return [image for image in images if image is not None] if self.drops else images


def _arrays(first_bytes):
    return [np.full(10 + 5 * i, value, dtype=np.uint8) for i, value in enumerate(first_bytes)]


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("drops", [False, True])
def test_results_come_back_in_input_order_with_failures_in_place(threads, drops):
    decoders = [_Decoder(drops) for _ in range(threads)]
    pool = N.Pool(decoders, "params", lambda array: array)
    values = [3, 9, 0, 4, 1, 0, 8, 2, 6, 5, 7, 11]
    results = pool.decode(_arrays(values), 7)
    assert results == [None if v == 0 else ("image", v) for v in values]
    assert all(d.threads for d in decoders)  # every decoder got a share


def test_shares_are_decoded_at_once_on_separate_threads():
    # each share waits for the other two inside its decoder: only shares decoded at once get through
    barrier = threading.Barrier(3)

    class Meeting(_Decoder):
        def decode(self, code_streams, params=None, cuda_stream=0):
            barrier.wait(timeout=30)
            return super().decode(code_streams, params, cuda_stream)

    decoders = [Meeting() for _ in range(3)]
    pool = N.Pool(decoders, "params", lambda array: array)
    assert pool.decode(_arrays(range(1, 10)), 7) == [("image", v) for v in range(1, 10)]
    assert len(set().union(*(d.threads for d in decoders))) == 3


def test_a_decoder_that_raises_raises_after_every_share_is_done():
    class Raising(_Decoder):
        def decode(self, code_streams, params=None, cuda_stream=0):
            super().decode(code_streams, params, cuda_stream)
            raise RuntimeError("decoder broke")

    slow = _Decoder()
    pool = N.Pool([Raising(), slow], "params", lambda array: array)
    with pytest.raises(RuntimeError, match="decoder broke"):
        pool.decode(_arrays([1, 2, 3, 4]), 7)
    assert slow.busy == 0  # the other share had finished before the error left the pool


def test_split_by_bytes_keeps_the_side_within_its_share():
    from tritonpipe.kernels.jpeg import split_by_bytes

    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.integers(100, 5000, 40)]
    for share in (0.0, 0.1, 0.25, 0.5, 1.0):
        rest, side = split_by_bytes(sizes, share)
        assert sorted(rest + side) == list(range(40)) and not set(rest) & set(side)
        taken = sum(sizes[i] for i in side)
        assert taken <= share * sum(sizes)
        # nothing left over would still fit: the side is as full as largest-first filling makes it
        assert all(taken + sizes[i] > share * sum(sizes) for i in rest) or share == 0.0
    assert split_by_bytes(sizes, 1.0) == ([], list(range(40)))
    for share in (0.1, 0.25, 0.5):  # smallest first: the side holds the smallest images that fit the share
        rest, side = split_by_bytes(sizes, share, smallest_first=True)
        assert sorted(rest + side) == list(range(40)) and side
        assert sum(sizes[i] for i in side) <= share * sum(sizes)
        assert max(sizes[i] for i in side) <= min(sizes[i] for i in rest)
        assert min(sizes[i] for i in rest) + sum(sizes[i] for i in side) > share * sum(sizes)
    with pytest.raises(ValueError, match="share must be in"):
        split_by_bytes(sizes, 1.5)


def test_the_cuda_decoder_share_and_the_rest_come_back_for_every_index(monkeypatch):
    """The split around the GPU calls, with stand-ins for them: each index once, with its own image."""
    import types

    import torch

    from tritonpipe.kernels import jpeg as J

    sizes = [900, 100, 500, 300, 700, 200]
    datas = [torch.full((size,), i, dtype=torch.uint8) for i, size in enumerate(sizes)]
    infos = [None] * len(datas)
    side_calls = []

    def side_images(batch, device, stream, settings):
        side_calls.append((settings.hw_load, settings.threads))
        return [("side", int(data[0])) for data in batch]

    monkeypatch.setattr(J, "_nvimgcodec_images", side_images)
    monkeypatch.setattr(J, "_as_tensors", lambda images, infos: list(images))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=7))
    rest = lambda indices: [("rest", int(datas[i][0])) for i in indices]
    settings = N.Settings(hw_load=0.8, threads=4)

    side_of = J._cuda_decoder_side(datas, infos, torch.device("cpu"), settings)
    decoded = dict(J._with_side_share(list(range(6)), datas, 0.4, side_of, rest))
    assert sorted(decoded) == list(range(6)) and all(decoded[i][1] == i for i in range(6))
    side = sorted(i for i, (who, _) in decoded.items() if who == "side")
    assert side == J.split_by_bytes(sizes, 0.4)[1] and side_calls == [(0.0, 1)]  # the CUDA decoder alone, one decoder

    side_calls.clear()
    assert J._with_side_share([2, 5], datas, 0.0, side_of, rest) == [(2, ("rest", 2)), (5, ("rest", 5))]
    assert side_calls == []
