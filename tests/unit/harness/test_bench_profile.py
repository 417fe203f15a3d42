"""tritonpipe bench --profile: py-spy's raw stacks read into tables, and a real py-spy on a real process."""

import subprocess
import sys
import textwrap

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.harness.bench import profile, runner
from tritonpipe.harness.bench.profile import NATIVE, LevelProfiler, Profile, short_frame
from tritonpipe_tools import bench as cli

RAW = """\
execute (/x/python_backends/tritonpipe/model/triton_model.py:183);run (/x/python_backends/tritonpipe/model/runtime.py:128);call (/usr/lib/python3/dist-packages/nv/decode.py:363) 60
execute (/x/python_backends/tritonpipe/model/triton_model.py:192);_to_host (/x/python_backends/tritonpipe/model/runtime.py:83) 25
execute (/x/python_backends/tritonpipe/model/triton_model.py:183);run (/x/python_backends/tritonpipe/model/runtime.py:129) 5
 10
not a stack line
"""


def test_frames_are_kept_per_function_from_the_package_folder_on():
    assert short_frame("call (/usr/lib/python3/dist-packages/nv/decode.py:363)") == "call (nv/decode.py)"
    assert short_frame("run (/a/site-packages/torch/x.py:1)") == "run (torch/x.py)"
    assert short_frame("f (/repo/python_backends/tritonpipe/k.py:9)") == "f (tritonpipe/k.py)"
    assert short_frame("<module> (burn.py:8)") == "<module> (burn.py)"
    assert short_frame("") == NATIVE


def test_raw_stacks_become_shares_in_and_below_each_function_and_innermost():
    got = Profile("ensemble", 128)
    got.add_raw(RAW)
    assert got.samples == 100 and got.processes == 1
    execute = "execute (tritonpipe/model/triton_model.py)"
    run = "run (tritonpipe/model/runtime.py)"
    # two lines of one function count once per stack, not once per line
    assert got.inclusive[execute] == 90 and got.inclusive[run] == 65
    assert got.innermost == {"call (nv/decode.py)": 60, "_to_host (tritonpipe/model/runtime.py)": 25, run: 5, NATIVE: 10}
    text = got.markdown(top=3)
    assert text.startswith("### ensemble, concurrency 128") and "100 samples from 1 stub(s)" in text
    assert f"| 90.0% | `{execute}` | 60.0% | `call (nv/decode.py)` |" in text
    assert sum(line.startswith("|") for line in text.splitlines()) == 2 + 3  # the header, its rule, three rows


def test_a_level_without_samples_says_why():
    empty = Profile("baseline", 1)
    empty.problems.append("pid 7: Permission denied")
    assert "No samples: pid 7: Permission denied." in empty.markdown()


BURN = textwrap.dedent(
    """
    import sys, time
    def burn_in_a_known_function():
        total = 0
        for i in range(10**5):
            total += i
        return total
    print("ready", flush=True)
    end = time.time() + 30
    while time.time() < end:
        burn_in_a_known_function()
    """
)


@pytest.mark.skipif(profile.find_pyspy() is None, reason="py-spy is not installed")
def test_py_spy_samples_a_running_process_between_start_and_finish(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        profiler = LevelProfiler(profile.find_pyspy(), "ensemble", 4, tmp_path / "raw", delay=0.2, pids=[child.pid]).start()
        import time

        time.sleep(2.0)
        got = profiler.finish()
    finally:
        child.kill()
        child.wait()
    if not got.samples and any("ermission" in p or "ptrace" in p.lower() for p in got.problems):
        pytest.skip(f"py-spy may not read other processes here: {got.problems}")
    assert got.processes == 1 and got.samples > 200, got  # 500 Hz for about 1.8 s of a busy process
    # every sample lies below the script's module (a function the loop is in at most ties with it)
    assert got.inclusive["<module> (<string>)"] == got.samples == got.inclusive.most_common(1)[0][1]
    assert got.innermost.most_common(1)[0][0] == "burn_in_a_known_function (<string>)"
    assert (tmp_path / "raw" / f"ensemble_c4_{child.pid}.txt").is_file()


def test_a_level_that_ends_before_the_delay_starts_no_py_spy(tmp_path):
    profiler = LevelProfiler("/nonexistent/py-spy", "ensemble", 1, tmp_path / "raw", delay=30, pids=[1]).start()
    got = profiler.finish()
    assert got.samples == 0 and not (tmp_path / "raw").exists()
    assert "No samples: the level ended within 30 s, before sampling began." in got.markdown()


def test_profile_without_py_spy_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "find_pyspy", lambda: None)
    assert cli.main(["--profile", "--systems", "ensemble", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install py-spy" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--systems names none"):
        monkeypatch.setattr(runner, "find_pyspy", lambda: "/bin/true")
        runner.run_bench(runner.BenchOptions(profile=True, systems=("inprocess",), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
