"""One owner for a ``tritonserver`` process: start, wait for readiness, stop, read logs.

The server dies with its parent (``PR_SET_PDEATHSIG``), binds 127.0.0.1 unless told
otherwise, and its Python stub imports this environment's packages because this
environment's ``bin/`` comes first on its ``PATH``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ConfigError, TritonpipeError
from .install import TritonInstall, locate_triton

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerError(TritonpipeError):
    """The server did not come up, or a model failed to load."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A real ``tritonserver`` serving ``repository``.

    Args:
        repository: the model repository folder, or a list of them.
        host: address to bind; anything but loopback needs ``allow_remote=True``.
        http_port, grpc_port, metrics_port: 0 picks a free port.
        install: where Triton lives (default: :func:`locate_triton`).
        exit_timeout: seconds the server gets to drain in-flight requests on stop.
        extra_args: more ``tritonserver`` flags.
    """

    def __init__(
        self,
        repository: str | os.PathLike | list[str | os.PathLike],
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        allow_remote: bool = False,
        install: TritonInstall | None = None,
        exit_timeout: int = 30,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
    ):
        folders = repository if isinstance(repository, (list, tuple)) else [repository]
        self.repositories = [Path(folder).resolve() for folder in folders]
        for folder in self.repositories:
            if not folder.is_dir():
                raise ConfigError(f"model repository {str(folder)!r} is not a folder")
        self.repository = self.repositories[0]
        if host not in LOOPBACK and not allow_remote:
            raise ConfigError(
                f"refusing to listen on {host!r}: the server would be reachable from other machines. "
                "Pass --allow-remote (allow_remote=True) if that is what you want."
            )
        self.host = host
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
        self.http_port = http_port or free_port(probe_host)
        self.grpc_port = grpc_port or free_port(probe_host)
        self.metrics_port = metrics_port or free_port(probe_host)
        self.install = install or locate_triton()
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="tritonpipe-server-")
        self.log_path = Path(self._workdir.name) / "tritonserver.log"

    # --- addresses ---------------------------------------------------------------------

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    # --- life cycle --------------------------------------------------------------------

    def command(self) -> list[str]:
        workdir = Path(self._workdir.name)
        return [
            str(self.install.server),
            *(f"--model-repository={folder}" for folder in self.repositories),
            f"--backend-directory={self.install.backend_dir(workdir)}",
            f"--cache-directory={self.install.caches}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # the stub's interpreter takes its sys.prefix from the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = self.install.library_path(Path(self._workdir.name))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, timeout: float = 240.0) -> TritonServer:
        """Start the server and wait until it and every model are ready."""
        if self.process is not None:
            raise ServerError("the server is already started")
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure_message(f"tritonserver exited with code {self.process.returncode}"))
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(self._failure_message(f"tritonserver was not ready after {timeout:.0f} s"))

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def _failure_message(self, headline: str) -> str:
        lines = self.logs().splitlines()
        failures = [line for line in lines if "failed to load" in line or "UNAVAILABLE" in line]
        detail = "\n".join(failures[-10:]) or "\n".join(lines[-25:])
        return f"{headline}. What the server said:\n{detail}\n(full log: {self.log_path})"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGINT (Triton drains in-flight requests), then SIGKILL after ``exit_timeout`` + 5 s."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.exit_timeout + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()
