"""Page-lock the Python backend's shared-memory pool, where the stub finds each request's inputs.

Triton copies a request's CPU inputs into a shared-memory region of the stub's, and the chain reads
them there through DLPack.  A GPU reads pageable host memory through a staging copy of the driver's;
page-locked memory it reads directly, without the host waiting (nvjpeg's batched decode takes the JPEG
bytes where they lie; in one process page-locked bitstreams decoded 1.06x as fast).  This module finds
the region's mappings in ``/proc/self/maps`` and registers each with CUDA once.

A page-locked input is read by the GPU after the call that queued the copy returns, so the request
must live until the GPU is done with it: the instance synchronises its stream before ``execute``
returns, which is why ``pin_inputs`` and ``overlap`` are refused together.

When the region grows, the stub maps it again at a new address and keeps the old mappings, so a
registered range never goes away under the driver; an input found outside every registered range
makes :meth:`PinnedPool.cover` look for the new mapping, at most once per batch.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

log = logging.getLogger("tritonpipe")

SHM_FOLDER = "/dev/shm/"
#: the stub's command line: the stub, the model's file, then the region's name
REGION_ARG = 2
#: mappings registered at most; each growth of the region adds one, the region's whole size
MAX_MAPPINGS = 16
#: looks in a row that found no new mapping for an input outside the registered ones, before looking stops
MAX_FRUITLESS = 8

#: register(address, size) -> None, or why it failed
Register = Callable[[int, int], "str | None"]


def region_name(cmdline: bytes) -> str | None:
    """The shared-memory region named on a Python-backend stub's command line (``/proc/self/cmdline``)."""
    args = cmdline.split(b"\0")
    if len(args) <= REGION_ARG or not args[0].endswith(b"triton_python_backend_stub"):
        return None
    name = args[REGION_ARG].decode(errors="replace").lstrip("/")
    return name or None


def region_mappings(maps: str, region: str) -> list[tuple[int, int]]:
    """(start, end) of every shared mapping of ``/dev/shm/<region>`` in a ``/proc/<pid>/maps`` text."""
    path = SHM_FOLDER + region.lstrip("/")
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == path and fields[1].endswith("s"):
            start, end = fields[0].split("-")
            found.append((int(start, 16), int(end, 16)))
    return found


def cuda_register(address: int, size: int) -> str | None:
    """Page-lock host memory for the GPUs (``cudaHostRegister``); None, or CUDA's error."""
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(address, size, 0)
    return None if int(status) == 0 else f"cudaHostRegister: {status}"


def cuda_unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def _read_maps() -> str:
    return Path("/proc/self/maps").read_text()


class PinnedPool:
    """The registered mappings of one region, and the check that a batch's inputs lie in them."""

    def __init__(self, region: str, register: Register = cuda_register, read_maps: Callable[[], str] = _read_maps):
        self.region, self._register, self._read_maps = region, register, read_maps
        self.starts: list[int] = []
        self.ranges: list[tuple[int, int]] = []
        #: why registering stopped; from then on nothing more is registered
        self.stopped: str | None = None
        self.fruitless = 0

    def covers(self, address: int) -> bool:
        at = bisect.bisect_right(self.starts, address) - 1
        return at >= 0 and address < self.ranges[at][1]

    def refresh(self) -> int:
        """Register the region's mappings not registered yet; how many were."""
        if self.stopped is not None:
            return 0
        added = 0
        try:
            maps = self._read_maps()
        except OSError as exc:
            self._stop(f"cannot read this process's mappings: {exc}")
            return 0
        for start, end in region_mappings(maps, self.region):
            if self.covers(start):
                continue
            if len(self.ranges) >= MAX_MAPPINGS:
                self._stop(f"the region has been mapped {MAX_MAPPINGS} times; later mappings stay pageable")
                break
            try:
                problem = self._register(start, end - start)
            except Exception as exc:  # noqa: BLE001 - no CUDA runtime, a driver that refuses: inputs stay pageable
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                self._stop(problem)
                break
            at = bisect.bisect_right(self.starts, start)
            self.starts.insert(at, start)
            self.ranges.insert(at, (start, end))
            added += 1
            log.info("page-locked the stub's shared memory at %#x, %d MiB", start, (end - start) >> 20)
        return added

    def cover(self, tensors: Iterable[torch.Tensor]) -> None:
        """Make sure the host tensors' memory is registered, where it lies in the region."""
        if self.stopped is not None:
            return
        for tensor in tensors:
            if tensor.device.type == "cpu" and tensor.numel() and not self.covers(tensor.data_ptr()):
                # once per batch: an input outside the region (a copy, a BLS tensor) stays as it is
                self.fruitless = 0 if self.refresh() else self.fruitless + 1
                if self.fruitless >= MAX_FRUITLESS:
                    self._stop(f"{MAX_FRUITLESS} batches in a row had inputs outside the region")
                return

    def release(self, unregister: Callable[[int], None] = cuda_unregister) -> None:
        for start, _ in self.ranges:
            try:
                unregister(start)
            except Exception as exc:  # noqa: BLE001 - the stub is ending; the driver frees it then anyway
                log.debug("could not unregister %#x: %s", start, exc)
        self.starts, self.ranges = [], []

    def _stop(self, why: str) -> None:
        self.stopped = why
        log.warning("pin_inputs: %s; inputs are read from pageable memory from now on", why)


def stub_pool(register: Register = cuda_register) -> PinnedPool | None:
    """The pool of this process's region, when it is a Python-backend stub; else None."""
    try:
        name = region_name(Path("/proc/self/cmdline").read_bytes())
    except OSError:
        name = None
    if name is None:
        log.warning("pin_inputs: this process is not a Python-backend stub; its inputs stay pageable")
        return None
    pool = PinnedPool(name, register)
    pool.refresh()
    return pool
