"""The server owner on a real tritonserver: crash requests, busy ports, signals, stops, and what is left behind.

The repository is one small hand-written Python model, so that a server starts in seconds: ``echo`` returns
its UINT8 input, and first computes for ``n`` seconds when the input is ``[1, n]`` with ``n`` over 2.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tritonpipe.server.heal import HealPolicy
from tritonpipe.server.leftovers import SHM_DIR, python_env_folders
from tritonpipe.server.owner import ServerError, TritonServer
from tritonpipe.server.procs import command_line, is_running, port_holder, python_stubs

pytestmark = pytest.mark.server

ECHO_CONFIG = """backend: "python"
max_batch_size: 0
input [{ name: "INPUT" data_type: TYPE_UINT8 dims: [-1, -1] }]
output [{ name: "OUTPUT" data_type: TYPE_UINT8 dims: [-1, -1] }]
"""
ECHO_MODEL = '''import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT")
            seconds = tensor.shape()[-1] if tensor.shape()[-1] > 2 else 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # computes, as a stage does
                sum(range(1000))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT", tensor.to_dlpack())]))
        return responses
'''
#: Triton 2.51's HTTP front end aborts (SIGABRT) on a dimension this large
HUGE_SHAPE = b'{"inputs":[{"name":"INPUT","shape":[1,9223372036854775807],"datatype":"UINT8","data":[1]}]}'
#: and overflows its stack (SIGSEGV) on data nested this deep
DEEP_DATA = b'{"inputs":[{"name":"INPUT","shape":[1,1],"datatype":"UINT8","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"


def infer_body(values: list[int]) -> bytes:
    return f'{{"inputs":[{{"name":"INPUT","shape":[1,{len(values)}],"datatype":"UINT8","data":{values}}}]}}'.encode()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("echo")
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def post(url: str, body: bytes, connection: http.client.HTTPConnection | None = None) -> tuple[int | str, bytes]:
    """POST an infer request to ``echo``; a dropped connection is returned by its exception's name."""
    host, port = url.rsplit(":", 1)
    connection = connection or http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/v2/models/echo/infer", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        return type(exc).__name__, b""


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def regions(prefix: str) -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{prefix}*")}


def stub_regions(server_pid: int) -> set[str]:
    return {command_line(stub.pid)[2] for stub in python_stubs(server_pid)}


# --- crash requests --------------------------------------------------------------------------


def test_crash_requests_are_absorbed_per_window_of_time_and_leave_no_stub_region_or_folder(repo, caplog):
    policy = HealPolicy(max_restarts=1, restart_window_s=3, backoff_s=0.2, hang_timeout_s=None)
    with caplog.at_level("INFO", logger="tritonpipe.server"), TritonServer(repo, heal=policy) as server:
        assert post(server.http_url, infer_body([1, 2]))[0] == 200
        for crash in (HUGE_SHAPE, DEEP_DATA):
            # one crash allowed per 3 s: crashes further apart are absorbed, however many
            time.sleep(policy.restart_window_s)
            first, stubs, envs = server.process.pid, python_stubs(server.process.pid), list(server.leftovers.python_envs)
            assert stubs and envs and regions(server.shm_prefix) == stub_regions(first)
            assert post(server.http_url, crash)[0] == "RemoteDisconnected"
            wait_until(lambda: server.process.pid != first and server.leftovers.python_envs, 60, "restarted")
            assert server.supervisor.restarts == (1 if crash is HUGE_SHAPE else 2)
            # what the crashed server left is gone: its stubs, their regions, its python_env folder
            assert not any(is_running(stub.pid) for stub in stubs) and not any(os.path.exists(env) for env in envs)
            assert regions(server.shm_prefix) == stub_regions(server.process.pid)
            status, answer = post(server.http_url, infer_body([7, 8]))
            assert status == 200 and b'"data":[7,8]' in answer
        # two crashes within the window: a crash loop, which the supervisor gives up on, in one line
        server.supervisor.policy.restart_window_s = 600
        stubs = python_stubs(server.process.pid)
        assert post(server.http_url, HUGE_SHAPE)[0] == "RemoteDisconnected"
        wait_until(lambda: not server.supervisor.is_running(), 30, "the supervisor gives up")
        assert not any(is_running(stub.pid) for stub in stubs) and regions(server.shm_prefix) == set()
    gave_up = [r for r in caplog.records if "crash-looping" in r.getMessage()]
    assert len(gave_up) == 1 and gave_up[0].exc_info is None and str(server.log_path) in gave_up[0].getMessage()
    assert not Path(server.leftovers.workdir).exists() and not any(os.path.exists(e) for e in server.leftovers.python_envs)
    server.log_path.unlink()  # kept: the crashes were logged with its path


# --- ports -----------------------------------------------------------------------------------


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tritonpipe_tools.main", "serve", *args]


@pytest.mark.parametrize("busy", ["http", "grpc", "metrics"])
def test_a_busy_port_is_refused_before_ready_naming_the_port_and_its_holder(repo, busy):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {name: "0" for name in ("http", "grpc", "metrics")} | {busy: str(port)}
        flags = [item for name, value in ports.items() for item in (f"--{name}-port", value)]
        done = subprocess.run(serve_command(str(repo), *flags), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr  # nothing started
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in done.stderr
    assert f"--{busy}-port" in done.stderr and len(done.stderr.strip().splitlines()) == 1


class _ReadyEverywhere(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_readiness_is_taken_only_from_the_servers_own_process(repo, monkeypatch):
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadyEverywhere)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    # as if the port had been taken between the owner's check and tritonserver's bind
    monkeypatch.setattr(TritonServer, "check_ports", lambda self: None)
    server = TritonServer(repo, http_port=port)
    try:
        with pytest.raises(ServerError) as info:
            server.start(timeout=120)
    finally:
        impostor.shutdown()
        impostor.server_close()
    message = str(info.value)
    assert f"the HTTP port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in message
    assert f"(full log: {server.log_path})" in message and not server.is_alive()
    server.log_path.unlink()


def _aborting_launches(monkeypatch, count: int) -> list[list[str]]:
    """The owner's first ``count`` launches abort at once (SIGABRT, as tritonserver's gRPC server now and then
    does as it comes up); the launches' commands, as the owner gave them, go into the list returned."""
    from tritonpipe.server import owner

    launched, real = [], owner._LAUNCHER.popen

    def popen(command, **kwargs):
        launched.append(command)
        if len(launched) <= count:
            command = ["sh", "-c", "echo 'starting, then aborting'; kill -ABRT $$"]
        return real(command, **kwargs)

    monkeypatch.setattr(owner._LAUNCHER, "popen", popen)
    return launched


def test_a_server_killed_by_a_signal_before_ready_is_started_once_more(repo, monkeypatch, caplog, tmp_path):
    launched = _aborting_launches(monkeypatch, 1)
    with caplog.at_level("WARNING", logger="tritonpipe.server"), \
            TritonServer(repo, log_file=tmp_path / "server.log", heal=False) as server:
        status, answer = post(server.http_url, infer_body([5, 6]))
        assert status == 200 and b'"data":[5,6]' in answer
    assert len(launched) == 2 and launched[0] == launched[1]
    said = [r.getMessage() for r in caplog.records if "before it was ready" in r.getMessage()]
    assert len(said) == 1 and "SIGABRT" in said[0] and str(tmp_path / "server.log") in said[0]
    assert "starting, then aborting" in (tmp_path / "server.log").read_text()


def test_a_second_signal_before_ready_fails_the_start_with_the_log(repo, monkeypatch, tmp_path):
    launched = _aborting_launches(monkeypatch, 2)
    server = TritonServer(repo, log_file=tmp_path / "server.log", heal=False)
    with pytest.raises(ServerError) as info:
        server.start(timeout=60)
    assert len(launched) == 2 and "exited with code -6" in str(info.value)
    assert "starting, then aborting" in str(info.value) and not server.is_alive()


# --- signals and stops of tritonpipe serve ------------------------------------------------------


class Serve:
    """``tritonpipe serve`` in a process of its own, its output collected line by line."""

    def __init__(self, *args: str, ignore_sigint: bool = False):
        def prepare():
            if ignore_sigint:  # as for a background job of a script ("serve ... &")
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.began = time.time()
        self.process = subprocess.Popen(serve_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=prepare)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=lambda s=stream, into=lines: into.extend(iter(s.readline, "")), daemon=True).start()

    def wait_ready(self) -> None:
        wait_until(lambda: "ready\n" in self.out or self.process.poll() is not None, 180, "serve said ready")
        assert "ready\n" in self.out, "".join(self.out + self.err)
        self.http_url = self.shown("HTTP")
        self.server_pid = port_holder(int(self.http_url.rsplit(":", 1)[1]))
        args = command_line(self.server_pid)
        self.workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--backend-directory=")).rsplit("/", 1)[0]
        self.shm_prefix = next(a.rsplit("=", 1)[1] for a in args if "shm-region-prefix-name" in a)
        self.stubs = python_stubs(self.server_pid)
        made = [p for p in python_env_folders() if os.stat(p).st_ctime >= self.began - 1]
        self.python_env = made[0] if len(made) == 1 else None  # another server started at the same time: unknown

    def shown(self, name: str) -> str:
        return next(line.split()[-1] for line in self.out if line.strip().startswith(name))

    def assert_nothing_left(self, timeout: float = 30) -> None:
        """The server, its stubs, ports, regions, python_env folder, working folder and log are all gone."""
        pids = [self.server_pid, *(stub.pid for stub in self.stubs)]
        wait_until(lambda: not any(is_running(pid) for pid in pids), timeout, "the server and its stubs are gone")
        wait_until(lambda: not Path(self.workdir).exists(), timeout, "the working folder is removed")
        assert not regions(self.shm_prefix) and not Path(self.shown("log")).exists()
        assert self.python_env is None or not os.path.exists(self.python_env)
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", int(self.http_url.rsplit(":", 1)[1])))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()


@pytest.fixture
def serve(repo):
    started = []

    def start(*flags: str, **kwargs) -> Serve:
        started.append(Serve(str(repo), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *flags, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def test_sigint_stops_a_background_serve_promptly_past_idle_keep_alive_clients_and_drains_a_request(serve):
    # flags after "--" with serve's own options before them; the server id shows in the log's option table
    running = serve("--exit-timeout", "120", "--", "--id=lifecycle-e2e", ignore_sigint=True)
    running.wait_ready()
    assert "lifecycle-e2e" in Path(running.shown("log")).read_text()
    host, port = running.http_url.rsplit(":", 1)
    idle = http.client.HTTPConnection(host, int(port), timeout=120)
    assert post(running.http_url, infer_body([5, 6]), idle)[0] == 200  # then it stays open, idle
    busy = http.client.HTTPConnection(host, int(port), timeout=120)
    answers = []
    request = threading.Thread(target=lambda: answers.append(post(running.http_url, infer_body([9] * 6), busy)))
    request.start()
    time.sleep(1)  # the 6-second request is in flight
    signalled = time.monotonic()
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(180) == 0, "".join(running.err)
    stopped_after = time.monotonic() - signalled
    request.join(60)
    assert answers and answers[0][0] == 200 and b'"data":[9,9,9,9,9,9]' in answers[0][1]
    # the idle connection did not hold the stop for the 120 s exit timeout
    assert stopped_after < 60, f"stopping took {stopped_after:.1f} s"
    running.assert_nothing_left()


def test_a_second_signal_stops_the_server_at_once_and_the_owner_outlives_it(serve):
    running = serve("--exit-timeout", "120")
    running.wait_ready()
    cut_off = []
    threading.Thread(target=lambda: cut_off.append(post(running.http_url, infer_body([1] * 300))), daemon=True).start()
    time.sleep(1)  # a 300-second request is in flight, which the first signal would wait for
    running.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert running.process.poll() is None and is_running(running.server_pid)
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(60) == 0
    assert not is_running(running.server_pid), "the owner left before its server"
    assert "stopped at once on a second signal" in "".join(running.err)
    running.assert_nothing_left()


def test_sigkill_of_the_owner_takes_the_server_its_stubs_and_its_files_with_it(serve):
    running = serve()
    running.wait_ready()
    running.process.kill()
    running.process.wait()
    running.assert_nothing_left()


def test_a_started_server_is_stopped_and_cleaned_at_interpreter_exit(repo):
    script = f"""
import sys
from tritonpipe.server.owner import TritonServer
server = TritonServer({str(repo)!r}).start(timeout=120)
print(server.process.pid, server.leftovers.workdir, server.shm_prefix, server.log_path, flush=True)
"""  # no close(): the owner's atexit hook stops it
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    pid, workdir, prefix, log = done.stdout.split()
    assert not is_running(int(pid)) and not Path(workdir).exists() and not regions(prefix) and not Path(log).exists()
