"""The server owner: ports, addresses, logs that survive a failure, and a parent that outlives its threads."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.server import owner
from tritonpipe.server.heal import parse_progress
from tritonpipe.server.owner import ServerError, TritonServer


class KernelLikeSocket:
    """Binding port 0 gets the lowest port not bound right now, as a kernel may hand a just-closed port out again."""

    bound: set[int] = set()

    def __init__(self, *args):
        self.port = None

    def bind(self, address):
        self.port = min(set(range(40000, 40010)) - self.bound)
        self.bound.add(self.port)

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def close(self):
        self.bound.discard(self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_the_three_chosen_ports_differ_even_when_the_kernel_reuses_closed_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(owner.socket, "socket", KernelLikeSocket)
    server = TritonServer(tmp_path, heal=False)
    server.close()
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3


def test_given_ports_keep_their_values_and_must_differ(tmp_path):
    server = TritonServer(tmp_path, http_port=18000, grpc_port=0, metrics_port=18002)
    server.close()
    assert (server.http_port, server.metrics_port) == (18000, 18002) and server.grpc_port not in (18000, 18002, 0)
    with pytest.raises(ConfigError, match="must differ"):
        TritonServer(tmp_path, http_port=18000, grpc_port=18000)


def _flags(server):
    """The server's flags, then the server closed: its command copies the Python backend into a working folder,
    which close removes (a command asked for after close would leave that copy behind)."""
    try:
        return dict(arg.split("=", 1) for arg in server.command()[1:])
    finally:
        server.close()


@pytest.mark.parametrize(
    "host, web, grpc, url",
    [
        ("localhost", "127.0.0.1", "127.0.0.1", "127.0.0.1:"),
        ("::1", "ipv6:::1", "[::1]", "[::1]:"),
        ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1:"),
    ],
)
def test_hosts_are_resolved_and_ipv6_addresses_bracketed(tmp_path, host, web, grpc, url):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    TritonServer(tmp_path).close()
    server = TritonServer(tmp_path, host=host)
    flags = _flags(server)
    assert flags["--http-address"] == flags["--metrics-address"] == web and flags["--grpc-address"] == grpc
    assert server.grpc_url == f"{url}{server.grpc_port}" and server.metrics_url.startswith(f"http://{url}")


def test_remote_hosts_still_need_allow_remote(tmp_path):
    with pytest.raises(ConfigError, match="allow-remote"):
        TritonServer(tmp_path, host="0.0.0.0")
    server = TritonServer(tmp_path, host="0.0.0.0", allow_remote=True)
    server.close()
    assert server.grpc_url.startswith("127.0.0.1:")


def test_no_http_closes_the_http_port_and_pass_through_flags_cannot_override_the_owner(tmp_path):
    server = TritonServer(tmp_path, http=False, extra_args=("--http-thread-count=2",))
    flags = _flags(server)
    assert flags["--allow-http"] == "false" and "--http-address" not in flags and flags["--http-thread-count"] == "2"
    with pytest.raises(ConfigError, match="--grpc-port"):
        TritonServer(tmp_path, extra_args=("--grpc-port=9",))


def test_healing_runs_the_server_in_explicit_mode_with_the_control_api_kept_to_the_owner(tmp_path):
    server = TritonServer(tmp_path)
    flags = _flags(server)
    ((header, token),) = server.control_headers.items()
    assert flags["--model-control-mode"] == "explicit" and flags["--load-model"] == "*"
    assert header == f"triton-grpc-protocol-{owner.CONTROL_HEADER}"
    assert flags["--http-restricted-api"] == flags["--grpc-restricted-protocol"] == f"model-repository:{owner.CONTROL_HEADER}={token}"
    assert "--model-control-mode" not in _flags(TritonServer(tmp_path, heal=False))


def test_a_failed_start_shows_the_log_and_keeps_the_file_it_names(tmp_path):
    server = TritonServer(tmp_path, extra_args=("--no-such-flag=1",))
    with pytest.raises(ServerError) as info:
        server.start(timeout=60)
    server.close()
    message = str(info.value)
    assert "exited with code 1" in message and "no-such-flag" in message
    assert f"(full log: {server.log_path})" in message and "no-such-flag" in server.log_path.read_text()
    server.log_path.unlink()


def test_a_clean_run_removes_its_log_unless_one_was_asked_for(tmp_path):
    server = TritonServer(tmp_path).start(timeout=60)
    server.close()
    assert not server.log_path.exists()
    kept = tmp_path / "logs" / "server.log"
    kept.parent.mkdir()
    TritonServer(tmp_path / "logs", log_file=kept).start(timeout=60).close()
    assert "Started GRPCInferenceService" in kept.read_text()


def test_the_server_outlives_the_thread_that_started_it(tmp_path):
    servers = []
    worker = threading.Thread(target=lambda: servers.append(TritonServer(tmp_path).start(timeout=60)))
    worker.start()
    worker.join()
    (server,) = servers
    try:
        time.sleep(2)  # PR_SET_PDEATHSIG would have sent SIGTERM when the worker ended
        assert server.is_alive() and server._get(owner.READY_PATH) == 200
    finally:
        server.close()


def _wait_for_one_restart(server, first: int) -> None:
    """Until a new tritonserver than ``first`` answers ready (a minute at most); it must be the first restart."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (server.process.pid != first and server._get(owner.READY_PATH) == 200):
        time.sleep(0.2)
    assert server.process.pid != first and server._get(owner.READY_PATH) == 200
    assert server.supervisor.restarts == 1 and server.keep_log


def test_a_crashed_server_is_restarted_on_the_same_ports(tmp_path):
    with TritonServer(tmp_path) as server:
        assert server.control().get_model_repository_index(headers=server.control_headers, as_json=True) == {}
        with pytest.raises(Exception, match="restricted"):
            server.control().get_model_repository_index()
        first = server.process.pid
        os.kill(first, signal.SIGABRT)
        _wait_for_one_restart(server, first)
    log = server.log_path.read_text()
    assert log.count("Started GRPCInferenceService") == 2
    server.log_path.unlink()


def test_a_server_stopped_from_outside_is_not_restarted(tmp_path):
    with TritonServer(tmp_path) as server:
        first = server.process
        first.send_signal(signal.SIGINT)  # as an operator or an orchestrator stops it
        assert first.wait(60) == 0
        time.sleep(3 * server.supervisor.policy.poll_s + server.supervisor.policy.backoff_s)
        assert server.process is first and server.supervisor.restarts == 0


def test_progress_is_read_per_model_from_tritons_metrics():
    text = "\n".join([
        '# HELP nv_inference_request_success Number of successful inference requests',
        'nv_inference_request_success{model="a",version="1"} 7',
        'nv_inference_request_failure{model="a",reason="BACKEND",version="1"} 2',
        'nv_inference_request_failure{model="a",reason="REJECTED",version="1"} 1',
        'nv_inference_pending_request_count{model="a",version="1"} 3',
        'nv_inference_request_success{model="b",version="1"} 0',
        'nv_inference_count{model="a",version="1"} 99',
    ])
    assert parse_progress(text) == {"a": (3.0, 10.0), "b": (0.0, 0.0)}


def _one_answer(body: bytes, declared: int) -> str:
    """The URL of a one-shot HTTP server that answers with ``body`` under a Content-Length of ``declared``
    and then closes the connection, as a stopping Triton may in the middle of its metrics page."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % declared + body)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"


def test_a_metrics_page_cut_off_as_the_server_stops_reads_as_unknown_not_as_an_error():
    from tritonpipe.server.heal import read_progress

    page = b'nv_inference_pending_request_count{model="a",version="1"} 3\nnv_inference_request_success{model="a",version="1"} 7\n'
    assert read_progress(_one_answer(page, len(page)), timeout=5) == {"a": (3.0, 7.0)}
    # a stopping server once closed the connection 6,990 bytes short: stop() raised IncompleteRead from its drain
    assert read_progress(_one_answer(page[:40], len(page) + 6990), timeout=5) is None
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    assert read_progress(f"http://127.0.0.1:{port}/metrics", timeout=5) is None  # nobody listening


@pytest.mark.parametrize("host", ["localhost", "::1"])
def test_a_server_on_a_named_or_ipv6_host_answers_on_every_port(tmp_path, host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with TritonServer(tmp_path, host=host) as server:
        assert server._get(owner.READY_PATH) == 200 and server.control().is_server_ready()
        with owner.urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            assert response.status == 200


def test_a_draining_server_gets_one_line_from_the_supervisor_and_another_failure_one_traceback(caplog):
    from tritonclient.utils import InferenceServerException

    from tritonpipe.server.heal import HealPolicy, Supervisor

    class Draining:
        """A server whose process runs on while its control API answers what Triton says when draining."""

        class process:  # noqa: N801 - stands where a Popen is read
            pid = os.getpid()

            @staticmethod
            def poll():
                return None

        control_headers = None

        def __init__(self):
            self.calls = 0
            self.error = InferenceServerException("Server not ready", status="StatusCode.UNAVAILABLE")

        def control(self):
            return self

        def get_model_repository_index(self, headers=None, as_json=True, client_timeout=None):
            self.calls += 1
            raise self.error

    server = Draining()
    supervisor = Supervisor(server, HealPolicy(poll_s=0.01, hang_timeout_s=None))
    with caplog.at_level("INFO", logger="tritonpipe.server"):
        supervisor.start()
        while server.calls < 5:
            time.sleep(0.01)
        server.error = InferenceServerException("boom", status="StatusCode.INTERNAL")
        calls = server.calls
        while server.calls < calls + 5:
            time.sleep(0.01)
        supervisor.stop()
    waiting = [r for r in caplog.records if "not ready" in r.getMessage()]
    failed = [r for r in caplog.records if r.getMessage().startswith("supervisor check failed")]
    assert len(waiting) == 1 and waiting[0].levelname == "INFO" and waiting[0].exc_info is None
    # the same error again and again is not a traceback every half second
    assert len(failed) == 1 and failed[0].levelname == "ERROR" and failed[0].exc_info


class _Reloading:
    """A server whose reload of a model says ready; its process exits during the reload where ``dies``."""

    control_headers = None
    log_path = "triton.log"
    keep_log = False

    def __init__(self, dies: bool):
        self.dies, self.code = dies, None
        outer = self

        class Process:
            pid = os.getpid()

            @staticmethod
            def poll():
                return outer.code

            @staticmethod
            def wait(timeout=None):
                if outer.code is None:
                    raise subprocess.TimeoutExpired("tritonserver", timeout)
                return outer.code

        self.process = Process()

    def control(self):
        return self

    def load_model(self, model, headers=None):
        if self.dies:
            self.code = -6  # SIGABRT, as Triton 2.51 now and then does when a stub is killed under load

    def is_model_ready(self, model, client_timeout=None):
        return True

    def is_server_ready(self, client_timeout=None):
        return True


@pytest.mark.parametrize("dies", [True, False])
def test_a_heal_during_which_the_server_goes_down_is_left_to_the_servers_restart(dies, monkeypatch):
    from tritonpipe.server import heal as heal_module
    from tritonpipe.server.procs import Stub

    old, new = Stub(101, "mat", "mat_0_0"), Stub(202, "mat", "mat_0_0")
    monkeypatch.setattr(heal_module, "GOING_DOWN_S", 0.01)
    # a server that goes down has no stubs left; one that reloaded has the new one
    monkeypatch.setattr(heal_module, "python_stubs", lambda pid: [] if dies else [new])
    server = _Reloading(dies)
    supervisor = heal_module.Supervisor(server, heal_module.HealPolicy(poll_s=0.01, hang_timeout_s=None))
    supervisor._stubs = {"mat": [old]}
    supervisor._heal("mat", old, "exited")
    if dies:
        assert supervisor.heals == [] and supervisor.failed_models == set()
    else:
        (heal,) = supervisor.heals
        assert heal.ok and heal.new_pids == [202] and supervisor._stubs["mat"] == [new]



def test_the_log_watch_finds_a_fatal_signal_of_the_latest_launch_only_and_once_its_line_is_whole(tmp_path):
    from tritonpipe.server.heal import LogWatch

    log = tmp_path / "triton.log"
    log.write_bytes(b"Signal (6) received.\n")  # an earlier launch's crash, before the offset
    watch = LogWatch(log, log.stat().st_size)
    assert watch.fatal_signal() is None
    with open(log, "ab") as out:
        out.write(b"Signal (2) received.\nI1205 server.cc:305] \"Waiting for in-flight requests to complete.\"\nSign")
    assert watch.fatal_signal() is None  # SIGINT drains; a line cut off is read once it ends
    with open(log, "ab") as out:
        out.write(b"al (11) received.\n 0# 0x000055E687BB452D in tritonserver\n")
    assert watch.fatal_signal() == signal.SIGSEGV
    assert watch.fatal_signal() is None
    assert LogWatch(tmp_path / "missing.log", 0).fatal_signal() is None


class _Crashing:
    """A server whose log says it received SIGABRT and whose process runs on."""

    control_headers = None

    def __init__(self, log_path, answers: bool = False):
        self.log_path, self.launched_at_byte = log_path, 0
        self.kills, self.checks, self.answers = [], 0, answers

        class Process:
            pid = os.getpid()

            @staticmethod
            def poll():
                return None

        self.process = Process()

    def control(self):
        return self

    def get_model_repository_index(self, headers=None, as_json=True, client_timeout=None):
        self.checks += 1
        return {}

    def is_server_ready(self, client_timeout=None):
        if not self.answers:
            raise RuntimeError("deadline exceeded")  # what a server stuck in its crash handler gives
        return True

    def kill(self):
        self.kills.append(time.monotonic())


@pytest.mark.parametrize("answers", [False, True])
def test_a_server_that_printed_a_fatal_signal_and_runs_on_unanswering_is_killed_after_the_grace(tmp_path, monkeypatch, answers):
    from tritonpipe.server import heal as heal_module

    monkeypatch.setattr(heal_module, "CRASH_GRACE_S", 0.3)
    monkeypatch.setattr(heal_module, "python_stubs", lambda pid: [])
    log = tmp_path / "triton.log"
    log.write_bytes(b"I1205 grpc_server.cc:2558] \"Started GRPCInferenceService\"\n")
    server = _Crashing(log, answers)
    supervisor = heal_module.Supervisor(server, heal_module.HealPolicy(poll_s=0.01, hang_timeout_s=None))
    supervisor.start()
    try:
        while server.checks < 3:
            time.sleep(0.01)
        assert server.kills == []  # a healthy log: its models are checked
        with open(log, "ab") as out:
            out.write(b"Signal (6) received.\n 0# 0x000055E687BB452D in tritonserver\n")
        seen = time.monotonic()
        checks = server.checks
        while not server.kills and time.monotonic() < seen + (10 if not answers else 1):
            time.sleep(0.01)
        during = server.checks - checks
        time.sleep(0.1)
    finally:
        supervisor.stop()
    if answers:  # the line was not the server's own: it is left alone, and its models are checked again
        assert server.kills == [] and server.checks > checks
    else:
        assert server.kills and server.kills[0] - seen >= 0.3
        assert during <= 1  # nothing is asked of a server going down (but the check that was under way)


def test_a_server_stuck_after_a_fatal_signal_is_killed_and_restarted(tmp_path, monkeypatch):
    from tritonpipe.server import heal as heal_module

    monkeypatch.setattr(heal_module, "CRASH_GRACE_S", 1.0)
    with TritonServer(tmp_path) as server:
        first = server.process.pid
        # what Triton prints before its crash handler hangs; then it is stopped, as such a server serves nothing
        with open(server.log_path, "ab") as out:
            out.write(b"Signal (6) received.\n")
        os.kill(first, signal.SIGSTOP)
        _wait_for_one_restart(server, first)
    server.log_path.unlink()


def test_a_check_that_keeps_failing_alike_is_summed_up_once_a_while_and_a_new_error_gets_its_traceback(caplog, monkeypatch):
    from tritonpipe.server import heal as heal_module

    supervisor = heal_module.Supervisor(_Crashing(None), heal_module.HealPolicy(hang_timeout_s=None))
    monkeypatch.setattr(heal_module, "REPEAT_LOG_S", 3600.0)
    with caplog.at_level("INFO", logger="tritonpipe.server"):
        for error in [RuntimeError("refused")] * 3 + [RuntimeError("timed out")]:
            try:
                raise error
            except RuntimeError as exc:
                supervisor._check_failed(exc)
        monkeypatch.setattr(heal_module, "REPEAT_LOG_S", 0.0)
        for _ in range(2):
            try:
                raise RuntimeError("timed out")
            except RuntimeError as exc:
                supervisor._check_failed(exc)
    lines = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert [traced for _, traced in lines] == [True, True, False, False]
    assert lines[2][0].startswith("supervisor check: the same failure 1 more time(s)") and "RuntimeError: timed out" in lines[2][0]


def test_an_earlier_loads_stubs_are_ended_once_due_and_only_while_they_still_serve_the_model(monkeypatch):
    from tritonpipe.server import heal as heal_module
    from tritonpipe.server.procs import Stub

    old_a, old_b, new = Stub(101, "mat", "mat_0_0"), Stub(102, "mat", "mat_0_1"), Stub(202, "mat", "mat_0_0")
    # 102 has exited and its pid now serves another model: it must be left alone
    running = [old_a, Stub(102, "cls_model", "cls_model_0_0"), new]
    monkeypatch.setattr(heal_module, "python_stubs", lambda pid: list(running))
    killed = []
    monkeypatch.setattr(heal_module, "_kill", killed.append)
    supervisor = heal_module.Supervisor(_Reloading(dies=False), heal_module.HealPolicy(retire_after_s=60))
    supervisor._retired = [(time.monotonic() + 60, "mat", [old_a, old_b])]
    supervisor._end_retired()
    assert killed == [] and len(supervisor._retired) == 1  # not due yet
    supervisor._retired = [(time.monotonic() - 1, "mat", [old_a, old_b])]
    supervisor._end_retired()
    assert killed == [101] and supervisor._retired == []


def test_children_lists_each_child_once_when_a_thread_ends_mid_walk(tmp_path, monkeypatch):
    from pathlib import Path

    from tritonpipe.server import procs

    proc = tmp_path / "proc"
    (proc / "10" / "task" / "10").mkdir(parents=True)
    (proc / "10" / "task" / "10" / "children").write_text("21 22")
    (proc / "10" / "task" / "99").mkdir()  # a thread that ended after the others were read: no children file
    for child, parent in ((21, 10), (22, 10), (23, 99)):
        (proc / str(child)).mkdir()
        (proc / str(child) / "stat").write_text(f"{child} (stub) S {parent} 0 0")
    monkeypatch.setattr(procs, "Path", lambda path: proc / Path(path).relative_to("/proc"))
    assert procs.children(10) == [21, 22]
