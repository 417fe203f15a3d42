"""pin_inputs: the stub's shared-memory region found in the real /proc/self/maps and registered once per mapping."""

import ctypes
import logging
import mmap
import os
import uuid

import pytest
import torch

from tritonpipe.contract import ModelParams
from tritonpipe.model import pinned as P
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository

from .test_runtime import chain, runtime_for

PAGE = mmap.PAGESIZE


class Region:
    """A /dev/shm file mapped shared, as the stub maps its region; grown by mapping it again, as the stub does."""

    def __init__(self, size):
        self.name = f"tritonpipe_test_{uuid.uuid4().hex}"
        self.fd = os.open(P.SHM_FOLDER + self.name, os.O_CREAT | os.O_RDWR, 0o600)
        self.maps = []
        self.grow(size)

    def grow(self, size):
        os.ftruncate(self.fd, size)
        self.maps.append(mmap.mmap(self.fd, size, mmap.MAP_SHARED))
        return self.maps[-1]

    def tensor(self, at=-1, offset=0, length=PAGE):
        data = torch.frombuffer(self.maps[at], dtype=torch.uint8)
        return data[offset:offset + length]

    def close(self):
        for m in self.maps:
            m.close()
        os.close(self.fd)
        os.unlink(P.SHM_FOLDER + self.name)


def address(buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


@pytest.fixture
def region():
    if not os.path.isdir(P.SHM_FOLDER):
        pytest.skip("no /dev/shm here")
    r = Region(4 * PAGE)
    yield r
    r.close()


class Recorder:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, start, size):
        self.calls.append((start, size))
        return "cudaHostRegister: cudaErrorInvalidValue" if len(self.calls) == self.fail_at else None


def counting_maps():
    reads = []

    def read():
        reads.append(1)
        return P._read_maps()

    return read, reads


def test_the_region_name_comes_from_the_stubs_command_line_only():
    stub = b"/opt/t/backends/python/triton_python_backend_stub\0/repo/m/1/model.py\0tritonpipe_ab_c1\0" \
           b"1048576\0" b"1048576\0" b"4242\0"
    assert P.region_name(stub) == "tritonpipe_ab_c1"
    assert P.region_name(b"/usr/bin/python3\0-m\0pytest\0") is None
    assert P.region_name(b"/x/triton_python_backend_stub\0") is None


def test_the_regions_mappings_are_read_from_the_real_maps_and_nothing_else(region):
    found = P.region_mappings(P._read_maps(), region.name)
    assert found == [(address(region.maps[0]), address(region.maps[0]) + 4 * PAGE)]
    region.grow(8 * PAGE)
    assert len(P.region_mappings(P._read_maps(), region.name)) == 2
    assert P.region_mappings(P._read_maps(), region.name + "x") == []
    # a private mapping of the same path is not the stub's region
    fake = f"7f0000000000-7f0000001000 rw-p 00000000 00:1b 7 {P.SHM_FOLDER}{region.name}\n"
    assert P.region_mappings(fake, region.name) == []


def test_inputs_in_the_region_are_registered_once_and_a_grown_region_once_more(region):
    register, (read, reads) = Recorder(), counting_maps()
    pool = P.PinnedPool(region.name, register, read)
    assert pool.refresh() == 1 and register.calls == [(address(region.maps[0]), 4 * PAGE)]
    for _ in range(3):  # the same mapping: neither the maps nor the driver are asked again
        pool.cover([region.tensor(offset=PAGE, length=100), torch.zeros(3)[:0]])
    assert len(reads) == 1 and len(register.calls) == 1
    region.grow(16 * PAGE)
    pool.cover([region.tensor(at=-1, offset=9 * PAGE)])
    assert register.calls[1] == (address(region.maps[1]), 16 * PAGE) and len(register.calls) == 2
    assert pool.covers(address(region.maps[0])) and pool.covers(address(region.maps[1]) + 16 * PAGE - 1)
    # the first byte past either mapping that neither holds (mmap may place the second right before the first)
    spans = [(address(region.maps[0]), address(region.maps[0]) + 4 * PAGE), (address(region.maps[1]), address(region.maps[1]) + 16 * PAGE)]
    edges = [end for _, end in spans] + [start - 1 for start, _ in spans]
    outside = next(edge for edge in edges if not any(start <= edge < end for start, end in spans))
    assert not pool.covers(outside)


def test_an_input_outside_the_region_costs_one_look_per_batch_and_is_left_alone(region):
    register, (read, reads) = Recorder(), counting_maps()
    pool = P.PinnedPool(region.name, register, read)
    pool.refresh()
    outside = [torch.arange(10, dtype=torch.uint8), torch.ones(5, dtype=torch.uint8)]
    pool.cover(outside)
    assert len(reads) == 2 and len(register.calls) == 1  # one look for the whole batch, nothing new registered
    region.grow(8 * PAGE)
    pool.cover([region.tensor()])  # a look that finds a new mapping starts the count again
    assert len(register.calls) == 2 and pool.fruitless == 0
    for _ in range(P.MAX_FRUITLESS):
        pool.cover(outside)
    assert "8 batches in a row had inputs outside the region" in pool.stopped
    looks = len(reads)
    pool.cover(outside)
    assert len(reads) == looks  # and then it stops looking


def test_a_refused_registration_stops_pinning_with_one_warning_and_the_inputs_stay_usable(region, caplog):
    register = Recorder(fail_at=1)
    pool = P.PinnedPool(region.name, register)
    with caplog.at_level(logging.WARNING, logger="tritonpipe"):
        pool.refresh()
        region.grow(8 * PAGE)
        pool.cover([region.tensor()])
    assert pool.stopped == "cudaHostRegister: cudaErrorInvalidValue" and len(register.calls) == 1
    assert [r.message for r in caplog.records if "pin_inputs" in r.message] == [
        "pin_inputs: cudaHostRegister: cudaErrorInvalidValue; inputs are read from pageable memory from now on"]
    assert int(region.tensor().sum()) == 0


def test_mappings_past_the_limit_stay_pageable(region, monkeypatch):
    monkeypatch.setattr(P, "MAX_MAPPINGS", 2)
    register = Recorder()
    pool = P.PinnedPool(region.name, register)
    for pages in (5, 6, 7):
        region.grow(pages * PAGE)
    pool.refresh()
    assert len(register.calls) == 2 and "mapped 2 times" in pool.stopped


def test_released_ranges_are_unregistered(region):
    pool = P.PinnedPool(region.name, Recorder())
    pool.refresh()
    gone = []
    pool.release(gone.append)
    assert gone == [address(region.maps[0])] and not pool.covers(address(region.maps[0]))


def test_outside_a_stub_there_is_no_pool():
    assert P.stub_pool(register=Recorder()) is None


def test_pin_inputs_reaches_gpu_models_only(tmp_path, tiny_onnx):
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx, pin_inputs=True), name="cls"), "gpu")
    assert configs["cls"].parameters["tritonpipe.pin_inputs"].string_value == "yes"
    assert runtime_for(tmp_path / "on", tiny_onnx, warmup="off", pin_inputs=True).pin_inputs is True
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx, pin_inputs=True), name="cls"), "cpu")
    assert "tritonpipe.pin_inputs" not in configs["cls"].parameters
    _, configs, _ = build_repository(load_graph(chain(tiny_onnx), name="cls"), "gpu")
    assert "tritonpipe.pin_inputs" not in configs["cls"].parameters  # off unless asked
    assert ModelParams.decode(ModelParams("DecodeTensor", {}, {}, pin_inputs=True).encode()).pin_inputs is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_registered_shared_mapping_is_page_locked_for_the_gpu(region):
    pool = P.PinnedPool(region.name)
    assert pool.refresh() == 1, pool.stopped
    data = region.tensor(length=4 * PAGE)
    data[:] = torch.arange(4 * PAGE, dtype=torch.int64).remainder(251).to(torch.uint8)
    assert data.is_pinned()
    on_gpu = data.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), data)
    pool.release()
    assert not data.is_pinned()


def test_pin_inputs_with_overlap_is_refused_before_anything_is_written(tmp_path, tiny_onnx):
    from tritonpipe.errors import ConfigError
    from tritonpipe.repository.generate import generate_repository

    with pytest.raises(ConfigError, match="pin_inputs and overlap cannot be used together"):
        generate_repository(load_graph(chain(tiny_onnx, pin_inputs=True, overlap=True)), tmp_path / "repo", device="gpu")
    assert not (tmp_path / "repo").exists()


def test_a_register_call_that_raises_stops_pinning_and_nothing_else(region):
    def no_cuda(start, size):
        raise RuntimeError("Found no NVIDIA driver on your system")

    pool = P.PinnedPool(region.name, no_cuda)
    assert pool.refresh() == 0 and pool.stopped == "RuntimeError: Found no NVIDIA driver on your system"
    pool.cover([region.tensor()])  # and the batch goes on
