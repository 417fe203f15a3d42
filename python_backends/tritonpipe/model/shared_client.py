"""An instance's side of the shared process (``shared_process``): one process per device runs a part of the
chain for all of a model's instances there.

Every GPU instance is a process of its own, with a JPEG decoder and a CUDA context of its own: 8 instances under
load make 8 decode calls side by side on batches of 10-20 images each, and the GPU switches between 8 contexts.
One decoder taking batches of that size in turn got 1.12-1.22x their rate out of the JPEG engines (in one process,
on an H100), and larger merged batches more.  With ``shared_process`` the instances of a model on one device send
their requests' inputs to one *shared process*, which merges the batches of all of them, runs its part of the
chain on two merged batches in flight, and writes each instance's results where that instance reads them:

- ``head``: the steps before the model (decode, resize, ...: :meth:`ModelRuntime.halves`); each instance runs
  the model itself on what comes back;
- ``chain``: the whole chain, the model too (one at a time), so that one CUDA context does all the device's work;
  the instances pass requests and answers.

How one batch goes:

- the instance copies its requests' input tensors into a shared-memory segment of its own (in
  ``/dev/shm``) and sends where each lies over a Unix socket;
- the shared process reads them there, runs its part on the merged batch, copies each request's results
  into an output region of that instance's (GPU memory that the instance maps once, through CUDA IPC; a
  shared-memory segment on the CPU), waits for the GPU and answers with where each result lies, or with
  each failed request's error;
- a request's bad input fails that request alone, as in the instance's own chain.

The first instance to load starts the shared process (``python -m tritonpipe.shared_process``, taking turns
on a lock file with the others) and waits for it to warm up.  An instance whose shared process has gone
(killed, crashed, or not answering) runs its whole chain itself, starts another shared process and goes
on on its own until that one answers.  The shared process ends with the server that started it, or once no
instance has been connected for :data:`IDLE_SECONDS`.  A segment's name is unlinked as soon as both
sides have it open, so that nothing is left in ``/dev/shm`` when either side is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InternalError, RequestError, is_bad_input
from ..procfs import command_line, is_running
from ..stages.base import ERROR

log = logging.getLogger("tritonpipe")

#: the stage name an instance's metrics give the time it waits for the shared process
SHARED_STAGE = "SharedProcess"
#: names of the shared process's socket (abstract: no file), its lock file and the segments
PREFIX = "tritonpipe-shared-"
SHM_FOLDER = "/dev/shm/"
#: seconds an instance waits at load for a shared process to warm up and answer
START_SECONDS = 300.0
#: seconds an instance waits for one batch's answer before it runs that batch itself
ANSWER_SECONDS = 60.0
#: seconds between an instance's attempts to reach a shared process once it has lost one
RETRY_SECONDS = 5.0
#: seconds a shared process stays up with no instance connected
IDLE_SECONDS = 60.0
#: where each group of results starts in an output region: a multiple of this many bytes
ALIGN = 256
#: a new input segment or output region is this many times the size that was too small
GROWTH = 2


def process_key(config_text: str, version_dir: str, device: str, server_pid: int, workers: int | None = None) -> str:
    """What tells one shared process from another: the model's config and files, the device, the server (and the
    batches it keeps in flight, where they are not its default)."""
    text = json.dumps([config_text, version_dir, device, server_pid] + ([workers] if workers is not None else []))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def authkey_path(key: str) -> Path:
    """The file of the secret that the instances and their shared process prove to each other when they connect
    (the socket, in the abstract namespace, is open to every local user); readable by the server's user only."""
    return Path(tempfile.gettempdir()) / f"{PREFIX}{key}.auth"


def address(key: str) -> str:
    """The shared process's socket: in Linux's abstract namespace, so that a killed process leaves no file."""
    return "\0" + PREFIX + key


def aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class Segment:
    """A shared-memory file in ``/dev/shm``, mapped here, with a flat uint8 tensor over it.

    ``size`` given: a new file of that size; else the existing file ``name``.  Whoever opens a
    segment second unlinks its name (:meth:`unlink`); the memory stays until both sides unmap it.
    """

    def __init__(self, name: str, size: int | None = None):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
        fd = os.open(SHM_FOLDER + name, flags, 0o600)
        try:
            if size is not None:
                os.ftruncate(fd, size)
            self.size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)

    @classmethod
    def new(cls, size: int) -> Segment:
        return cls(f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}", max(size, ALIGN))

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_FOLDER + self.name)

    def close(self) -> None:
        self.array = self.tensor = None
        with contextlib.suppress(BufferError):  # a view still in use keeps the mapping until it goes
            self._map.close()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InternalError(f"the shared process named an unknown dtype {name!r}")
    return dtype


def view(region: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` over the bytes of ``region`` (flat uint8) from ``offset``."""
    flat = region[offset:offset + math.prod(shape) * dtype.itemsize]
    return (flat if dtype == torch.uint8 else flat.view(dtype)).view(shape)


def error_record(exc: BaseException) -> tuple:
    """A request's error as it crosses the socket: whether the input is to blame, the message, the reason."""
    if is_bad_input(exc):
        return ("error", True, str(exc), getattr(exc, "reason", "bad_input"))
    return ("error", False, f"{type(exc).__name__}: {exc}", "")


def error_from(record: tuple) -> BaseException:
    _, bad_input, message, reason = record
    return RequestError(message, reason=reason or "bad_input") if bad_input else InternalError(message)


def is_shared_process(pid: int) -> bool:
    """Whether process ``pid`` runs a shared process (a pid in a lock file may have been reused since)."""
    return is_running(pid) and "tritonpipe.shared_process" in command_line(pid)


def python_executable() -> str:
    """The interpreter of this environment (inside Triton's stub, ``sys.executable`` is the stub)."""
    candidate = Path(sys.prefix) / "bin" / "python3"
    return str(candidate) if candidate.exists() else shutil.which("python3") or "python3"


class SharedClient:
    """An instance's side of the shared process: sends a batch's inputs, maps the results.

    Args:
        config_text: the model's config in Triton's JSON form (what the stub was given).
        version_dir: the model's version folder.
        device: where the instance runs; the shared process runs on the same device.
        inputs: the item keys of the model's inputs.
        server_pid: the process the shared process ends with (the server, the stub's parent).
        start_seconds: how long to wait at load for a shared process to answer.
        answer_seconds: how long to wait for one batch's answer before running it here.
    """

    def __init__(self, config_text: str, version_dir: Path, device: torch.device, inputs: list[str],
                 server_pid: int, start_seconds: float = START_SECONDS, answer_seconds: float = ANSWER_SECONDS,
                 workers: int | None = None):
        self.config_text = config_text
        self.workers = workers  # merged batches in flight in the process (its default where None)
        self.version_dir = str(version_dir)
        self.device = torch.device(device)
        self.inputs = inputs
        self.server_pid = server_pid
        self.answer_seconds = answer_seconds
        self.key = process_key(config_text, self.version_dir, str(self.device), server_pid, workers)
        self.conn: Connection | None = None
        self.segment: Segment | None = None
        self.region: torch.Tensor | None = None
        self._region_segment: Segment | None = None
        self._retry_at = 0.0
        self._warned_inputs = False
        self._linked = False  # the segment's name is still in /dev/shm
        self._connect(start_seconds)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    # -- reaching the shared process

    def _connect(self, wait: float) -> bool:
        """Reach the shared process, starting one where there is none; wait up to ``wait`` s for it to answer."""
        deadline = time.monotonic() + wait
        if self._try_connect():
            return True
        pid = self._start()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self._try_connect():
                return True
            if pid is not None and not is_running(pid):
                log.warning("the shared process (pid %d) ended before it answered (its log lines say why); the "
                            "instance runs its whole chain", pid)
                break
        self._retry_at = time.monotonic() + RETRY_SECONDS
        return False

    def _try_connect(self) -> bool:
        try:
            conn = Client(address(self.key), family="AF_UNIX", authkey=authkey_path(self.key).read_bytes())
        except (OSError, EOFError, AuthenticationError):
            return False
        segment = Segment.new(1 << 20)
        try:
            conn.send(("hello", segment.name, os.getpid()))
            if not conn.poll(ANSWER_SECONDS) or conn.recv()[0] != "ready":
                raise EOFError("no answer")
        except (OSError, EOFError) as exc:
            log.warning("the shared process did not answer its greeting (%s); the instance runs its whole chain", exc)
            conn.close()
            segment.unlink()
            segment.close()
            return False
        segment.unlink()  # both sides have it open
        self._drop()
        self.conn, self.segment = conn, segment
        log.info("the instance's batches go to the shared process (%s)", self.key)
        return True

    def _start(self) -> int | None:
        """Start the shared process unless another instance has started one that still runs; its pid."""
        lock_path = Path(tempfile.gettempdir()) / f"{PREFIX}{self.key}.lock"
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.seek(0)
            text = lock.read().strip()
            if text.isdigit() and is_shared_process(int(text)):
                return int(text)
            config_path = Path(tempfile.gettempdir()) / f"{PREFIX}{self.key}.json"
            config_path.write_text(self.config_text)  # the shared process reads it, then removes it
            if not authkey_path(self.key).exists():
                fd = os.open(authkey_path(self.key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as secret:
                    secret.write(secrets.token_bytes(32))
            command = [
                python_executable(), "-m", "tritonpipe.shared_process", "--key", self.key, "--config", str(config_path),
                "--version-dir", self.version_dir, "--device", str(self.device), "--server-pid", str(self.server_pid),
            ] + (["--workers", str(self.workers)] if self.workers is not None else [])
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            lock.seek(0)
            lock.truncate()
            lock.write(str(process.pid))
            lock.flush()
            log.info("started the shared process (pid %d) for %s", process.pid, self.key)
            return process.pid

    def _drop(self) -> None:
        if self._linked:  # a grown segment that no answer came for
            self.segment.unlink()
            self._linked = False
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        for segment in (self.segment, self._region_segment):
            if segment is not None:
                segment.close()
        self.conn = self.segment = self._region_segment = self.region = None

    def _lost(self, why: str) -> None:
        log.warning("the shared process is gone (%s); the instance runs its whole chain until another answers", why)
        self._drop()
        self._retry_at = time.monotonic() + RETRY_SECONDS
        with contextlib.suppress(OSError):
            self._start()

    def close(self) -> None:
        self._drop()

    # -- one batch

    def run(self, items: list[dict[str, Any]]) -> bool:
        """Have the shared process run its part on ``items``; False where the caller must run the whole chain."""
        if self.conn is None:
            if time.monotonic() < self._retry_at:
                return False
            if not self._try_connect():
                self._retry_at = time.monotonic() + RETRY_SECONDS
                return False
        sent = [(index, item) for index, item in enumerate(items) if ERROR not in item]
        if not sent:
            return True
        try:
            layout = self._write(sent)
        except (TypeError, ValueError, RuntimeError) as exc:
            if not self._warned_inputs:
                self._warned_inputs = True
                log.warning("a batch's inputs cannot go to the shared process (%s); the instance runs such batches itself", exc)
            return False
        try:
            self.conn.send(("run", self.segment.name, layout))
            if not self.conn.poll(self.answer_seconds):
                self._lost(f"no answer in {self.answer_seconds:g} s")
                return False
            answer = self.conn.recv()
        except (OSError, EOFError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            return False
        if answer[0] != "done":
            log.warning("the shared process could not run a batch (%s); the instance runs it", answer[1])
            return False
        if answer[1] is not None:
            self._map_region(answer[1])
        self._read(items, answer)
        return True

    def copied_out(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``outputs`` with those that lie in the output region copied out of it: the next batch overwrites the
        region, and Triton cannot hand GPU memory mapped from another process on to another model."""
        if self.region is None:
            return outputs
        return {name: tensor.clone() if self.holds(tensor) else tensor for name, tensor in outputs.items()}

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lies in the output region."""
        if self.region is None or tensor.device != self.region.device:
            return False
        start = self.region.data_ptr()
        return start <= tensor.data_ptr() < start + self.region.numel()

    def _write(self, sent: list[tuple[int, dict[str, Any]]]) -> list:
        """Copy the inputs of the sent items into the segment (grown if need be); where each lies."""
        tensors = []
        for _, item in sent:
            for key in self.inputs:
                value = item.get(key)
                if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                    raise TypeError(f"input {key!r} is not a tensor in host memory")
                tensors.append(value)
        needed = sum(aligned(t.numel() * t.element_size()) for t in tensors)
        if needed > self.segment.size:
            grown = Segment.new(max(needed, GROWTH * self.segment.size))
            self.segment.close()
            self.segment = grown  # the shared process opens it on the next batch; unlinked once it has answered
            self._linked = True
        layout, offset = [], 0
        values = iter(tensors)
        for index, _ in sent:
            placed = []
            for key in self.inputs:
                tensor = next(values)
                flat = tensor.contiguous().numpy().reshape(-1).view(np.uint8)
                self.segment.array[offset:offset + flat.size] = flat
                placed.append((key, dtype_name(tensor.dtype), tuple(tensor.shape), offset))
                offset += aligned(flat.size)
            layout.append((index, placed))
        return layout

    def _map_region(self, region: Any) -> None:
        if isinstance(region, torch.Tensor):  # GPU memory, mapped by torch's CUDA IPC when it was unpickled
            self.region = region
            return
        _, name = region
        if self._region_segment is not None:
            self._region_segment.close()
        self._region_segment = Segment(name)
        self._region_segment.unlink()
        self.region = self._region_segment.tensor

    def _read(self, items: list[dict[str, Any]], answer: tuple) -> None:
        """Each item's results from the answer (see ``tritonpipe.shared_process.service``), the tensors as views of the region."""
        if self._linked:  # a grown segment: the shared process has it open now
            self.segment.unlink()
            self._linked = False
        _, _, errors, runs, values = answer
        for index, record in errors:
            items[index][ERROR] = error_from(record)
        for key, dtype, shape, offset, indexes in runs:
            rows = view(self.region, offset, dtype_of(dtype), (len(indexes), *shape)).unbind(0)
            for index, row in zip(indexes, rows):
                items[index][key] = row
        for key, kind, value, indexes in values:
            for index in indexes:
                items[index][key] = torch.from_numpy(value) if kind == "host" else value
