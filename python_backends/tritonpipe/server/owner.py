"""One owner for a ``tritonserver`` process: start, wait for readiness, heal, stop, read logs.

The server runs in a process group of its own and is killed with its parent process
(``PR_SET_PDEATHSIG``, armed from a thread that lives as long as the process); a
:class:`~tritonpipe.server.leftovers.Watchdog` then removes its stubs and files. It binds 127.0.0.1
unless told otherwise, its ports are checked before it starts and its readiness is taken only from
its own process, and its Python stub imports this environment's packages because this environment's
``bin/`` comes first on its ``PATH``. While it runs, :class:`~tritonpipe.server.heal.Supervisor`
replaces dead or hung stubs and restarts a crashed server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import ipaddress
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import Future
from pathlib import Path

from google.protobuf import text_format

from ..choices import MODEL_CONTROL, read_marker
from ..contract import READY_PATH
from ..errors import ConfigError, TritonpipeError
from ..repository.configs import from_text, server_flags
from .heal import HealPolicy, Supervisor, log, read_progress
from .install import TritonInstall, locate_triton
from .leftovers import Leftovers, Watchdog, new_python_env, python_env_folders
from .mps import MpsDaemon, find_control
from .procs import cpu_seconds, listens_on, port_holder, process_name, python_stubs

#: the header that opens Triton's model-control API, which the owner keeps to itself
CONTROL_HEADER = "tritonpipe-owner"
#: flags the owner sets from its own arguments; a second copy among the pass-through flags would conflict
OWNED_FLAGS = (
    "--model-repository", "--backend-directory", "--http-address", "--grpc-address", "--metrics-address",
    "--http-port", "--grpc-port", "--metrics-port", "--allow-http", "--exit-timeout-secs", "--log-verbose",
    "--model-control-mode", "--load-model",
)
#: the Python backend's setting that names its shared-memory regions: the owner picks a prefix of its own,
#: so that it can remove exactly its server's regions after a crash
SHM_PREFIX_SETTING = "shm-region-prefix-name"
#: a stopping Triton 2.51 keeps its HTTP front end open until every connection is closed, idle keep-alive
#: ones too, for up to the whole exit timeout, logging this each second
_HTTP_DRAIN_RE = re.compile(r"Timeout \d+: Found \d+ HTTP service connections")
#: once nothing has moved for this long (no request pending or finished, no CPU used), that wait is ended
IDLE_STOP_S = 3.0
#: a second stop request: SIGTERM to the server's process group, then SIGKILL this much later
HARD_STOP_GRACE_S = 3.0
_IN_USE_RE = re.compile(r"Socket '([^']*?):(\d+)' already in use")
_FALSE = ("false", "0", "no", "off")


class _Launcher:
    """Forks every server from one daemon thread, which lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits. A daemon thread is not joined at
    interpreter exit (a pool's worker would be), so an owner stopped by its atexit hook still finds
    its server running and stops it gracefully.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tritonpipe-launcher", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._jobs.put((done, args, kwargs))
        return done.result()

    def _run(self) -> None:
        while True:
            done, args, kwargs = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_LAUNCHER = _Launcher()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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


_PORT_LABELS = {"http": "HTTP", "grpc": "gRPC", "metrics": "metrics"}


def port_problem(name: str, host: str, port: int, error: int | None) -> str:
    """Why the ``name`` port (``http``, ``grpc``, ``metrics``) cannot be bound, and what to do about it."""
    label = f"the {_PORT_LABELS[name]} port {port} on {host}"
    advice = f"Stop that process, or choose another port with --{name}-port (0 picks a free one)"
    if error == errno.EADDRINUSE:
        holder = port_holder(port)
        return f"{label} is already in use{f' by pid {holder} ({process_name(holder)})' if holder else ''}. {advice}"
    if error == errno.EACCES:
        return f"{label} needs privileges (ports below 1024 do). Choose another with --{name}-port (0 picks a free one)"
    if error == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine. Choose one with --host"
    return f"{label} cannot be bound: {os.strerror(error or 0)}"


# resolved here, not in the forked child: between fork and exec the child should run as little as it can
_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl


def _discard_log(leftovers: Leftovers) -> None:
    if not leftovers.keep_log:
        Path(leftovers.log).unlink(missing_ok=True)


def _die_with_parent() -> None:
    # SIGKILL: a server draining for its owner that is gone would hold the ports for the exit timeout
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
            if flag.startswith("--backend-config") and SHM_PREFIX_SETTING in flag:
                raise ConfigError(f"{flag!r}: tritonpipe sets the Python backend's {SHM_PREFIX_SETTING} itself (it removes "
                                  "a crashed server's regions by it); remove it from the Triton flags")
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
            self.log_path, keep_log = Path(name), False
        else:
            self.log_path, keep_log = Path(log_file).resolve(), True
        self.shm_prefix = f"tritonpipe_{secrets.token_hex(6)}_"
        self.leftovers = Leftovers(self._workdir.name, self.shm_prefix, str(self.log_path), keep_log)
        # an owner dropped without close() (never started, say) takes its log along, as close() would
        weakref.finalize(self, _discard_log, self.leftovers)
        self.watchdog: Watchdog | None = None
        #: why the owner ended the server itself instead of waiting for it: "idle connections" or "asked again"
        self.forced_stop: str | None = None
        self._stop_requests = 0
        self._stopping = False
        self._closed = False
        #: where the log of the server's latest launch starts (the log is appended to on a restart)
        self.launched_at_byte = 0

    @property
    def keep_log(self) -> bool:
        """Keep the log after :meth:`close`: asked for, or something went wrong and a message named it."""
        return self.leftovers.keep_log

    @keep_log.setter
    def keep_log(self, keep: bool) -> None:
        self.leftovers.keep_log = keep
        self._remember()

    def _remember(self) -> None:
        """Tell the watchdog what it would have to remove now."""
        if self.watchdog is not None:
            self.watchdog.tell(python_envs=self.leftovers.python_envs, keep_log=self.leftovers.keep_log)

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
            f"--backend-config=python,{SHM_PREFIX_SETTING}={self.shm_prefix}",
            *control,
            *self._asked_flags(),
            *self.extra_args,
        ]

    def _asked_flags(self) -> list[str]:
        """The flags the models' configs need (the response cache, the rate limiter), less those the pass-through
        flags set themselves.  A config that does not parse is left to Triton to report."""
        configs = []
        for config in (c for folder in self.repositories for c in folder.glob("*/config.pbtxt")):
            with contextlib.suppress(OSError, text_format.ParseError):
                configs.append(from_text(config.read_text(errors="replace")))
        given = {flag.split("=", 1)[0] for flag in self.extra_args}
        return [flag for flag in server_flags(configs) if flag.split("=", 1)[0] not in given]

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
        """Start the server, wait until it and every model are ready, then watch it.

        A failed start stops what it started and removes the working files; the log it names stays.
        """
        if self.process is not None:
            raise ServerError("the server is already started")
        self._start_timeout = timeout
        atexit.register(self.close)
        try:
            self.watchdog = Watchdog(self.leftovers)
            if self._mps_control is not None and self.mps is None:
                self.mps = MpsDaemon(Path(self._workdir.name), self._mps_control).start()
            self._run_server(timeout)
        except BaseException:
            self.close()
            raise
        if self.heal_policy is not None:
            self.supervisor = Supervisor(self, self.heal_policy)
            self.supervisor.start()
        return self

    def restart(self) -> None:
        """Start the server again after it exited, with the same ports and log (appended)."""
        self._run_server(self._start_timeout)

    def _run_server(self, timeout: float, again_after_signal: bool = True) -> None:
        self.check_ports()
        envs_before, launched = python_env_folders(), time.time()
        self._launch()
        try:
            self.wait_ready(timeout)
        except ServerError:
            code = self.process.returncode
            if not (again_after_signal and code is not None and code < 0 and not (self._stopping or self.stop_requested)):
                raise
            # killed by a signal while it started (tritonserver 2.51's gRPC server aborts now and then as it
            # comes up): the same launch once more, after the first one's stubs and files are gone
            self._keep_python_env(envs_before, launched)
            self.clean_up_after_exit()
            log.warning("tritonserver died of %s before it was ready; starting it once more (its log: %s)",
                        _signal_name(-code), self.log_path)
            self._run_server(timeout, again_after_signal=False)
            return
        self._confirm_own_ports()
        self._keep_python_env(envs_before, launched)

    def _keep_python_env(self, before: set, launched: float) -> None:
        """Remember the Python backend's folder the launch made, so that closing removes it."""
        made = new_python_env(before, launched)
        if made is not None and made not in self.leftovers.python_envs:
            self.leftovers.python_envs.append(made)
            self._remember()

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.launched_at_byte = log.tell()
            # a session of its own: the terminal's Ctrl-C reaches the owner only, which stops the server in
            # its own time, and the server and its stubs can be signalled as one group
            self.process = _LAUNCHER.popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), preexec_fn=_die_with_parent, start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure_message(f"tritonserver exited with code {self.process.returncode}"))
            if self._stopping or self._stop_requests:
                raise ServerError("the server was stopped before it was ready")
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

    # --- ports -------------------------------------------------------------------------

    def endpoints(self) -> dict[str, int]:
        """The ports this server listens on, by name (``http``, ``grpc``, ``metrics``)."""
        off = {flag.split("=", 1)[0] for flag in self.extra_args if flag.split("=", 1)[-1].lower() in _FALSE}
        wanted = {"http": self.http and "--allow-http" not in off, "grpc": "--allow-grpc" not in off,
                  "metrics": "--allow-metrics" not in off}
        ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        return {name: port for name, port in ports.items() if wanted[name]}

    def check_ports(self) -> None:
        """ServerError naming the first port that cannot be bound, and what holds it.

        Each port is bound as tritonserver binds it (SO_REUSEADDR: a port in TIME_WAIT is free, a listened one is not).
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for name, port in self.endpoints().items():
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, port))
                except OSError as exc:
                    raise ServerError(f"cannot start tritonserver: {port_problem(name, self.host, port, exc.errno)}") from None

    def _confirm_own_ports(self) -> None:
        """The ready answer came from this server: its own process listens on every port.

        Another process on one of the ports answers too, and tritonserver, failing to bind it, exits
        only after its models have loaded.
        """
        deadline = time.monotonic() + 10
        while True:
            missing = [name for name, port in self.endpoints().items() if not listens_on(self.process.pid, port)]
            if not missing:
                return
            if self.process.poll() is not None:
                raise ServerError(self._failure_message(f"tritonserver exited with code {self.process.returncode}"))
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        name = missing[0]
        problem = port_problem(name, self.host, self.endpoints()[name], errno.EADDRINUSE)
        self.stop()
        self.keep_log = True
        raise ServerError(f"the ready answer did not come from this tritonserver: {problem} (full log: {self.log_path})")

    def _failure_message(self, headline: str) -> str:
        text = self._log_since(self.launched_at_byte)
        lines = text.splitlines()
        in_use = _IN_USE_RE.search(text)
        names = {port: name for name, port in self.endpoints().items()}
        if in_use and int(in_use[2]) in names:
            headline += f": {port_problem(names[int(in_use[2])], self.host, int(in_use[2]), errno.EADDRINUSE)}"
        # a bad flag is named on the first line, before the usage text that fills the tail
        markers = ("failed to load", "UNAVAILABLE", "unrecognized option", "Bad option", "already in use")
        failures = [line for line in lines if any(marker in line for marker in markers)]
        detail = "\n".join(failures[-10:]) or "\n".join(lines[-25:])
        self.keep_log = True  # the message names the file
        return f"{headline}. What the server said:\n{detail}\n(full log: {self.log_path})"

    def logs(self) -> str:
        return self._log_since(0)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request_stop(self) -> None:
        """Ask for a stop; safe to call from a signal handler (it only counts).

        The first request ends a :meth:`start` still waiting for readiness; a second one, while
        :meth:`stop` drains, makes it end the server hard.
        """
        self._stop_requests += 1

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    def stop(self) -> int | None:
        """Stop the server; returns its exit code.

        SIGINT first: Triton takes no new connections and drains the requests in flight for up to
        ``exit_timeout`` seconds. The owner then ends it with SIGKILL of its process group:

        - when its HTTP front end waits only for idle keep-alive connections, which it would do for
          the whole exit timeout (nothing pending, finished or using CPU for ``IDLE_STOP_S``);
        - after a second :meth:`request_stop` (SIGTERM first, SIGKILL ``HARD_STOP_GRACE_S`` later);
        - ``exit_timeout`` + 5 s after the SIGINT.

        Stubs that outlive the server, their shared-memory regions and its python_env folder are removed.
        """
        self._stopping = True
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.process is None:
            self._stop_mps()
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self._drain()
            except KeyboardInterrupt:
                # a second Ctrl-C where no handler counts it (a script's own): stop hard, then let it through
                self.forced_stop = "asked again"
                self._signal_group(signal.SIGKILL)
                self.process.wait()
                raise
        if self.process.returncode not in (0, -signal.SIGINT) and self.forced_stop is None:
            self.keep_log = True
        self.clean_up_after_exit()
        self._stop_mps()
        return self.process.returncode

    def _drain(self) -> None:
        deadline = time.monotonic() + self.exit_timeout + 5
        idle = _IdleWatch(self)
        hard_at = None
        while self.process.poll() is None:
            now = time.monotonic()
            if self._stop_requests >= 2 and hard_at is None:
                self.forced_stop, hard_at = "asked again", now + HARD_STOP_GRACE_S
                self._signal_group(signal.SIGTERM)
            if now >= deadline or (hard_at is not None and (now >= hard_at or self._stop_requests >= 3)):
                self._signal_group(signal.SIGKILL)
            elif hard_at is None and idle.only_idle_connections_left():
                self.forced_stop = "idle connections"
                self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.2)

    def kill(self) -> None:
        """End the server and its stubs at once (SIGKILL to its process group), as a stuck server needs."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        """The server and its stubs; the server is unreaped while this runs, so its group id is still its own."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def clean_up_after_exit(self) -> None:
        """After the server exited: its stubs that run on, their shared-memory regions, its python_env folder."""
        self.leftovers.reap()
        self._remember()

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
        if self._closed:
            return
        self.stop()  # interrupted, it runs again from the atexit hook
        if self._control is not None:
            self._control.close()
            self._control = None
        self._workdir.cleanup()
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)
        if self.watchdog is not None:
            self.watchdog.close()
        self._closed = True
        atexit.unregister(self.close)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()


class _IdleWatch:
    """Whether a stopping server waits only for idle HTTP connections.

    Triton 2.51's HTTP front end, once stopping, waits until every connection is closed, idle keep-alive
    ones included, for up to the whole exit timeout, and logs each second that it does. Idle means here:
    no model has requests pending or finished one, and neither the server nor a stub used CPU, for
    ``IDLE_STOP_S``. A request still in flight shows in one of these (an ensemble finishes steps, a stage
    computes), unless it only sleeps or waits on something outside.
    """

    def __init__(self, server: TritonServer):
        self.server = server
        self.offset = server.log_path.stat().st_size if server.log_path.exists() else 0
        self.waiting_for_http = False
        self.last: tuple | None = None
        self.quiet_since = time.monotonic()
        self.next_look = 0.0

    def only_idle_connections_left(self) -> bool:
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + 0.5
            self._look(now)
        return self.waiting_for_http and now - self.quiet_since >= IDLE_STOP_S

    def _look(self, now: float) -> None:
        if not self.waiting_for_http:
            self.waiting_for_http = bool(_HTTP_DRAIN_RE.search(self.server._log_since(self.offset)))
        sample = self._sample()
        # CPU time moves in 10 ms ticks; a few ticks per look are the owner's own metrics reads
        moved = sample is None or self.last is None or sample[:2] != self.last[:2] or sample[2] - self.last[2] > 0.03
        if moved:
            self.quiet_since = now
        self.last = sample

    def _sample(self) -> tuple[float, float, float] | None:
        """(requests pending, requests finished, CPU seconds of the server and its stubs); None if unknown."""
        progress = read_progress(self.server.metrics_url, timeout=1)
        if progress is None:
            return None
        pid = self.server.process.pid
        cpu = cpu_seconds(pid) + sum(cpu_seconds(stub.pid) for stub in python_stubs(pid))
        return sum(p for p, _ in progress.values()), sum(f for _, f in progress.values()), cpu
