"""What a server leaves behind, its watchdog, the port messages, and serve's own and Triton's flags."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tritonpipe.server import leftovers as leftovers_module
from tritonpipe.server.leftovers import Leftovers, Watchdog, new_python_env
from tritonpipe.server.owner import TritonServer, port_problem
from tritonpipe.server.procs import is_running
from tritonpipe_tools.serve import parse_args


@pytest.fixture
def left(tmp_path, monkeypatch):
    """Leftovers of a server that never ran: a working folder, a log, two regions and a python_env folder."""
    monkeypatch.setattr(leftovers_module, "SHM_DIR", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    workdir = tmp_path / "tritonpipe-server-x"
    (workdir / "backends").mkdir(parents=True)
    log = tmp_path / "server.log"
    log.write_text("log")
    env = tmp_path / "python_env_abc"
    env.mkdir()
    for name in ("tpunit_ours_1", "tpunit_ours_2", "tpunit_theirs_1"):
        (tmp_path / "shm" / name).write_bytes(b"\0")
    return Leftovers(str(workdir), "tpunit_ours_", str(log), python_envs=[str(env)])


def _start_stub(workdir: str) -> subprocess.Popen:
    """A process whose program lies in the working folder, as a stub's does."""
    program = os.path.join(workdir, "backends", "stub")
    if not os.path.exists(program):
        os.symlink(shutil.which("sleep"), program)
    return subprocess.Popen([program, "60"])


def _start_naming(tmp_path, *args: str) -> subprocess.Popen:
    """A process with ``args`` from argv[2] on (a stub's region is its argv[2])."""
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    return subprocess.Popen([sys.executable, str(script), *args])


def test_reap_kills_only_processes_run_from_the_working_folder_or_naming_a_region_of_ours(left, tmp_path):
    stub = _start_stub(left.workdir)
    by_region = _start_naming(tmp_path, "tpunit_ours_region")
    other = _start_naming(tmp_path, "tpunit_theirs_region", left.workdir)
    try:
        left.reap()
        stub.wait(10)
        by_region.wait(10)
        assert is_running(other.pid)
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in (tmp_path / "shm").iterdir()) == ["tpunit_theirs_1"]
    assert not (tmp_path / "python_env_abc").exists() and left.python_envs == []


def test_reap_reads_the_processes_again_until_none_of_ours_is_left(left, monkeypatch):
    """A stub the first reading misses (started meanwhile, or its command line not readable then) is killed too."""
    stub = _start_stub(left.workdir)
    real, missed = leftovers_module.command_line, []

    def first_reading_misses_it(pid):
        if pid == stub.pid and not missed:
            missed.append(pid)
            return []
        return real(pid)

    monkeypatch.setattr(leftovers_module, "command_line", first_reading_misses_it)
    try:
        left.reap()
        assert missed == [stub.pid]
        stub.wait(10)
    finally:
        stub.kill()
        stub.wait()


def test_the_log_is_removed_with_the_working_folder_unless_it_is_kept(left):
    left.keep_log = True
    left.remove_files()
    assert not os.path.exists(left.workdir) and os.path.exists(left.log)
    left.keep_log = False
    left.remove_files()
    assert not os.path.exists(left.log)


def test_the_watchdog_cleans_up_when_its_owner_goes_without_a_goodbye(left, tmp_path):
    stub = _start_stub(left.workdir)
    watchdog = Watchdog(Leftovers(left.workdir, left.shm_prefix, left.log))
    watchdog.tell(python_envs=left.python_envs, keep_log=False)
    os.close(watchdog._pipe)  # what the kernel does when the owner dies
    assert watchdog.process.wait(30) == 0
    stub.wait(10)
    assert not os.path.exists(left.workdir) and not os.path.exists(left.log)
    assert not (tmp_path / "python_env_abc").exists()


def test_a_watchdog_told_goodbye_leaves_everything_alone(left):
    watchdog = Watchdog(left)
    watchdog.close()
    assert watchdog.process.returncode == 0 and os.path.exists(left.workdir) and os.path.exists(left.log)


def test_a_python_env_folder_is_claimed_only_when_one_server_made_one(tmp_path, monkeypatch):
    monkeypatch.setattr(leftovers_module, "PYTHON_ENV_DIR", tmp_path)
    (tmp_path / "python_env_old").mkdir()
    before, since = leftovers_module.python_env_folders(), time.time()
    assert new_python_env(before, since) is None
    (tmp_path / "python_env_new").mkdir()
    assert new_python_env(before, since) == str(tmp_path / "python_env_new")
    (tmp_path / "python_env_another").mkdir()  # a second server started at the same time
    assert new_python_env(before, since) is None


def test_a_busy_port_is_refused_before_anything_starts_naming_its_holder(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = TritonServer(tmp_path, metrics_port=port)
        try:
            with pytest.raises(Exception, match=rf"the metrics port {port} on 127.0.0.1 is already in use by pid {os.getpid()}"):
                server.start(timeout=30)
            assert server.process is None
        finally:
            server.close()


@pytest.mark.parametrize(("error", "says"), [
    (errno.EACCES, "the HTTP port 80 on 127.0.0.1 needs privileges"),
    (errno.EADDRNOTAVAIL, "127.0.0.1 is not an address of this machine"),
])
def test_other_bind_failures_say_what_to_do(error, says):
    assert port_problem("http", "127.0.0.1", 80, error).startswith(says)


def test_a_pass_through_shm_prefix_is_refused(tmp_path):
    with pytest.raises(Exception, match="shm-region-prefix-name itself"):
        TritonServer(tmp_path, extra_args=("--backend-config=python,shm-region-prefix-name=x",))


def test_the_server_gets_a_region_prefix_of_its_own(tmp_path):
    first, second = TritonServer(tmp_path), TritonServer(tmp_path)
    second.close()
    try:
        assert f"--backend-config=python,shm-region-prefix-name={first.shm_prefix}" in first.command()
    finally:
        first.close()  # after command(), which copies the Python backend into the working folder close removes
    assert first.shm_prefix != second.shm_prefix


@pytest.mark.parametrize("argv", [
    ["repo", "--grpc-port", "39001", "--", "--strict-readiness=true", "--id=x"],
    ["--grpc-port", "39001", "repo", "--", "--strict-readiness=true", "--id=x"],
    ["repo", "--", "--strict-readiness=true", "--id=x", "--grpc-port", "39001"],
])
def test_triton_flags_go_after_dashes_wherever_serves_own_options_are(argv):
    args = parse_args(argv)
    assert args.repository == "repo"
    if argv[-1] == "39001":  # after "--", everything is tritonserver's
        assert args.grpc_port == 8001 and args.triton_args == argv[2:]
    else:
        assert args.grpc_port == 39001 and args.triton_args == ["--strict-readiness=true", "--id=x"]
