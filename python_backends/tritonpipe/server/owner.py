"""One owner for a ``tritonserver`` process: start, wait for readiness, heal, stop, read logs.

The server dies with its parent process (``PR_SET_PDEATHSIG``, armed from a thread that lives as
long as the process), binds 127.0.0.1 unless told otherwise, and its Python stub imports this
environment's packages because this environment's ``bin/`` comes first on its ``PATH``. While it
runs, :class:`~tritonpipe.server.heal.Supervisor` replaces dead or hung stubs and restarts a
crashed server.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError, TritonpipeError
from ..repository.generate import read_marker
from .heal import HealPolicy, Supervisor
from .install import TritonInstall, locate_triton
from .mps import MpsDaemon, find_control

READY_PATH = "/v2/health/ready"
#: the header that opens Triton's model-control API, which the owner keeps to itself
CONTROL_HEADER = "tritonpipe-owner"
#: flags the owner sets from its own arguments; a second copy among the pass-through flags would conflict
OWNED_FLAGS = (
    "--model-repository", "--backend-directory", "--http-address", "--grpc-address", "--metrics-address",
    "--http-port", "--grpc-port", "--metrics-port", "--allow-http", "--exit-timeout-secs", "--log-verbose",
    "--model-control-mode", "--load-model",
)
#: who may load and unload models through Triton's model-repository API
MODEL_CONTROL = ("owner", "explicit")
#: the local response cache, turned on when a model asks for it (``response_cache: { enable: true }``)
RESPONSE_CACHE_CONFIG = "--cache-config=local,size=268435456"
_CACHE_ENABLED_RE = re.compile(r"response_cache\s*\{\s*enable\s*:\s*true\b")
# PR_SET_PDEATHSIG fires when the *thread* that forked exits, so every server is forked from this
# one thread, which lives as long as the process
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tritonpipe-launcher")


class ServerError(TritonpipeError):
    """The server did not come up, or a model failed to load."""


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports on ``host``: all sockets stay bound until all are chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def resolve_host(host: str) -> str:
    """A numeric address for ``host``: Triton's HTTP server does not resolve names (``localhost`` bound 255.255.255.255)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    found.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, as clients try it first
    return found[0][4][0]


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A real ``tritonserver`` serving ``repository``.

    Args:
        repository: the model repository folder, or a list of them.
        host: address or name to bind; anything but loopback needs ``allow_remote=True``.
        http_port, grpc_port, metrics_port: 0 picks a free port.
        http: serve HTTP; ``False`` serves gRPC (and metrics) only.
        install: where Triton lives (default: :func:`locate_triton`).
        exit_timeout: seconds the server gets to drain in-flight requests on stop.
        heal: replace dead or hung stubs and restart a crashed server (``True``: the default
            :class:`HealPolicy`); ``False`` leaves the server in Triton's default model control.
        model_control: ``"owner"`` keeps the model-repository API to the owner (clients' load and
            unload are refused); ``"explicit"`` leaves it open to every client that reaches the
            ports, for loading and unloading models by hand, and turns healing off (a model unloaded
            by hand would look like dead stubs to it).
        log_file: where the server's log goes; the default is a temporary file, deleted on
            :meth:`close` unless something went wrong (then its path was reported and it stays).
        extra_args: more ``tritonserver`` flags.
        mps: run the server's CUDA processes under a CUDA MPS daemon of its own, so that its GPU
            instances (each a process) share the GPU at once instead of in turns (see :mod:`.mps`).
    """

    def __init__(
        self,
        repository: str | os.PathLike | list[str | os.PathLike],
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        http: bool = True,
        allow_remote: bool = False,
        install: TritonInstall | None = None,
        exit_timeout: int = 30,
        log_verbose: int = 0,
        heal: HealPolicy | bool = True,
        log_file: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] = (),
        model_control: str = "owner",
        mps: bool = False,
    ):
        folders = repository if isinstance(repository, (list, tuple)) else [repository]
        self.repositories = [Path(folder).resolve() for folder in folders]
        for folder in self.repositories:
            if not folder.is_dir():
                raise ConfigError(f"model repository {str(folder)!r} is not a folder")
        self.repository = self.repositories[0]
        self.host = resolve_host(host)
        if not ipaddress.ip_address(self.host).is_loopback and not allow_remote:
            raise ConfigError(
                f"refusing to listen on {host!r}: the server would be reachable from other machines. "
                "Pass --allow-remote (allow_remote=True) if that is what you want."
            )
        wanted = [http_port, grpc_port, metrics_port]
        given = [port for port in wanted if port]
        if len(set(given)) < len(given):
            raise ConfigError(f"the HTTP, gRPC and metrics ports must differ, got {wanted} (0 picks a free one)")
        chosen = iter(free_ports(self.client_host, wanted.count(0)))
        self.http_port, self.grpc_port, self.metrics_port = (port or next(chosen) for port in wanted)
        for flag in extra_args:
            if flag.split("=", 1)[0] in OWNED_FLAGS:
                raise ConfigError(f"{flag!r}: tritonpipe sets {flag.split('=', 1)[0]} itself; remove it from the Triton flags")
        if model_control not in MODEL_CONTROL:
            raise ConfigError(f"model_control must be one of {', '.join(MODEL_CONTROL)}, got {model_control!r}")
        self.model_control = model_control
        self.http = http
        self.install = install or locate_triton()
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.heal_policy = None if model_control == "explicit" else HealPolicy() if heal is True else heal or None
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.supervisor: Supervisor | None = None
        self._control_token = secrets.token_hex(16)
        # Triton expects a restricted gRPC protocol's header under this prefix
        self.control_headers = {f"triton-grpc-protocol-{CONTROL_HEADER}": self._control_token}
        self._control = None
        self._start_timeout = 240.0
        self._mps_control = find_control() if mps else None  # a missing tool is refused before anything starts
        self.mps: MpsDaemon | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="tritonpipe-server-")
        if log_file is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path, self.keep_log = Path(name), False
        else:
            self.log_path, self.keep_log = Path(log_file).resolve(), True

    # --- addresses ---------------------------------------------------------------------

    @property
    def entry(self) -> str | None:
        """The model clients call, from the marker tritonpipe wrote into the repository; None without one.

        Clients cannot list the models themselves: the owner keeps the model-repository API to itself.
        """
        marker = read_marker(self.repository)
        return marker["entry"] if marker else None

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the server: loopback when bound to every address."""
        if ipaddress.ip_address(self.host).is_unspecified:
            return "::1" if ":" in self.host else "127.0.0.1"
        return self.host

    @property
    def http_url(self) -> str:
        return join_host_port(self.client_host, self.http_port)

    @property
    def grpc_url(self) -> str:
        return join_host_port(self.client_host, self.grpc_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{join_host_port(self.client_host, self.metrics_port)}/metrics"

    def control(self):
        """A gRPC client for health and model control (gRPC is always served; HTTP may be off)."""
        if self._control is None:
            import tritonclient.grpc as grpcclient

            self._control = grpcclient.InferenceServerClient(self.grpc_url)
        return self._control

    # --- life cycle --------------------------------------------------------------------

    def command(self) -> list[str]:
        workdir = Path(self._workdir.name)
        ipv6 = ":" in self.host
        # the HTTP and metrics servers (libevhtp) take IPv6 as "ipv6:ADDR"; gRPC takes "[ADDR]"
        web_host = f"ipv6:{self.host}" if ipv6 else self.host
        http = [f"--http-address={web_host}", f"--http-port={self.http_port}"] if self.http else ["--allow-http=false"]
        control = []
        if self.heal_policy is not None or self.model_control == "explicit":
            control = ["--model-control-mode=explicit", "--load-model=*"]
        if self.heal_policy is not None:
            restriction = f"model-repository:{CONTROL_HEADER}={self._control_token}"
            control += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        cache = [RESPONSE_CACHE_CONFIG] if self._wants_cache() else []
        return [
            str(self.install.server),
            *(f"--model-repository={folder}" for folder in self.repositories),
            f"--backend-directory={self.install.backend_dir(workdir)}",
            f"--cache-directory={self.install.caches}",
            *http,
            f"--grpc-address={f'[{self.host}]' if ipv6 else self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={web_host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
            *control,
            *cache,
            *self.extra_args,
        ]

    def _wants_cache(self) -> bool:
        """A model enables the response cache, and the pass-through flags do not configure one."""
        if any(flag.startswith("--cache-config") for flag in self.extra_args):
            return False
        return any(
            _CACHE_ENABLED_RE.search(config.read_text(errors="replace"))
            for folder in self.repositories
            for config in folder.glob("*/config.pbtxt")
        )

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # the stub's interpreter takes its sys.prefix from the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = self.install.library_path(Path(self._workdir.name))
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.mps is not None:
            env.update(self.mps.environment())
        return env

    def start(self, timeout: float = 240.0) -> TritonServer:
        """Start the server, wait until it and every model are ready, then watch it."""
        if self.process is not None:
            raise ServerError("the server is already started")
        self._start_timeout = timeout
        if self._mps_control is not None and self.mps is None:
            self.mps = MpsDaemon(Path(self._workdir.name), self._mps_control).start()
        self._launch()
        self.wait_ready(timeout)
        if self.heal_policy is not None:
            self.supervisor = Supervisor(self, self.heal_policy)
            self.supervisor.start()
        return self

    def restart(self) -> None:
        """Start the server again after it exited, with the same ports and log (appended)."""
        self._launch()
        self.wait_ready(self._start_timeout)

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = _LAUNCHER.submit(
                subprocess.Popen, self.command(), stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), preexec_fn=_die_with_parent,
            ).result()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure_message(f"tritonserver exited with code {self.process.returncode}"))
            if self._is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(self._failure_message(f"tritonserver was not ready after {timeout:.0f} s"))

    def _is_ready(self) -> bool:
        if self.http:
            return self._get(READY_PATH) == 200
        try:
            return self.control().is_server_ready()
        except Exception:  # noqa: BLE001 - tritonclient's error for "not up yet"
            return False

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
        # a bad flag is named on the first line, before the usage text that fills the tail
        markers = ("failed to load", "UNAVAILABLE", "unrecognized option", "Bad option")
        failures = [line for line in lines if any(marker in line for marker in markers)]
        detail = "\n".join(failures[-10:]) or "\n".join(lines[-25:])
        self.keep_log = True  # the message names the file
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
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.process is None:
            self._stop_mps()
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.exit_timeout + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.returncode not in (0, -signal.SIGINT):
            self.keep_log = True
        self._stop_mps()
        return self.process.returncode

    def _stop_mps(self) -> None:
        """After the server's processes are gone: the daemon's MPS server has no client left."""
        if self.mps is not None:
            mps, self.mps = self.mps, None
            mps.stop()

    @property
    def heals(self) -> int:
        """Stubs replaced so far (each also logged as a ``heal model=...`` line)."""
        return sum(h.ok for h in self.supervisor.heals) if self.supervisor else 0

    def close(self) -> None:
        """Stop, remove the working files, and remove the log unless something went wrong."""
        self.stop()
        if self._control is not None:
            self._control.close()
            self._control = None
        self._workdir.cleanup()
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()
