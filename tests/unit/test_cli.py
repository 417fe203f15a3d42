"""`tritonpipe VERB`: one command, whose help and usage errors come back without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tritonpipe_tools.main import VERBS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "tritonclient", "cv2", "onnx", "onnxruntime", "numpy", "google.protobuf")

# runs `tritonpipe ARGS` in a fresh interpreter, then reports the exit status and the heavy modules it imported
_PROBE = """
import sys
from tritonpipe_tools.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def tritonpipe(*args: str) -> tuple[int, str, str, list[str]]:
    """Exit status, stdout, stderr and the heavy modules imported by ``tritonpipe ARGS``."""
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    stderr, _, heavy = done.stderr.rpartition("HEAVY=")
    return done.returncode, done.stdout, stderr, [m for m in heavy.strip().split(",") if m]


def test_help_lists_every_verb_without_heavy_imports():
    code, out, _, heavy = tritonpipe("--help")
    assert code == 0 and heavy == []
    listed = [line.split()[0] for line in out.split("verbs:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert listed == list(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_dispatches_to_its_own_parser_and_its_help_imports_nothing_heavy(verb):
    code, out, _, heavy = tritonpipe(verb, "--help")
    assert code == 0 and heavy == []
    assert out.startswith(f"usage: tritonpipe {verb} ")


@pytest.mark.parametrize(("args", "message"), [
    (("generate",), "give either a configuration file or --backend"),
    (("generate", "--markdown"), "--markdown goes with --list-stages"),
    (("serve", "--hang-timeout", "-1"), "--hang-timeout must be 0 (off) or more seconds, got -1.0"),
    (("bench", "--systems", "ensemble,pil"), "choose from ensemble,baseline,dali-served,floor,inprocess,dali, got 'ensemble,pil'"),
    (("soak", "--bad-fraction", "2"), "expected a fraction in [0, 1], got '2'"),
    (("build-engine", "m.onnx", "--precision", "fp8"), "invalid choice: 'fp8'"),
    (("bundle", "unpack"), "the following arguments are required: ARCHIVE, DEST"),
    (("client", "nothere.jpg", "sample.jpg"), "no such file: nothere.jpg, sample.jpg"),
])
def test_argument_errors_name_the_value_and_import_nothing_heavy(args, message):
    code, _, err, heavy = tritonpipe(*args)
    assert (code, heavy) == (2, [])
    assert f"tritonpipe {args[0]}" in err and message in err


def test_an_unknown_verb_is_refused_with_the_close_one():
    code, _, err, heavy = tritonpipe("genrate", "x.toml")
    assert (code, heavy) == (2, [])
    assert "unknown verb 'genrate'; did you mean 'generate'?" in err


def test_no_verb_prints_the_usage_as_an_error():
    code, out, err, _ = tritonpipe()
    assert code == 2 and out == "" and "usage: tritonpipe VERB" in err


def test_a_verb_runs_its_command():
    code, out, _, _ = tritonpipe("generate", "--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8",
                                 "--set", "resize_w=8", "--name", "tiny", "--dry-run")
    assert code == 0
    assert '# tiny/config.pbtxt\nname: "tiny"' in out and '"tritonpipe.pipeline"' in out


def test_the_installed_command_is_the_only_one():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tritonpipe": "tritonpipe_tools.main:main"}


def test_the_choices_module_imports_nothing_heavy():
    done = subprocess.run([sys.executable, "-c", f"import sys, tritonpipe.choices; print(*(m for m in {HEAVY!r} if m in sys.modules))"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    assert done.stdout.strip() == ""


@pytest.mark.parametrize(("code", "said"), [
    ("import sys\nsys.exit(0)\n", "called sys.exit(0) on import"),
    ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt on import"),
])
def test_a_plugin_that_exits_on_import_fails_generate_with_one_line(tmp_path, capsys, code, said):
    from tritonpipe_tools.generate import main

    plugin = tmp_path / "leaving.py"
    plugin.write_text(code)
    output = tmp_path / "repo"
    argv = ["--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8", "--set", "resize_w=8", "--plugin", str(plugin),
            "-o", str(output)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not output.exists()
    assert captured.err == f"error: plugin file {str(plugin)!r} {said}" + captured.err.split(said, 1)[1]
    assert captured.err.count("\n") == 1


def test_an_empty_name_fails_generate(tmp_path, capsys):
    from tritonpipe_tools.generate import main

    assert main(["--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8", "--set", "resize_w=8", "--name", "",
                 "-o", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err.startswith("error: pipeline name is empty; give a name")
    assert not (tmp_path / "repo").exists()


def _configs(instances: int, device: str = "cpu"):
    from tritonpipe.pipeline.graph import load_graph
    from tritonpipe.repository.generate import build_repository

    config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, "instance_num": instances}
    return build_repository(load_graph(config, name="p"), device)[1]


def test_instances_past_the_hosts_memory_or_cores_are_warned_about():
    from tritonpipe.repository.capacity import capacity_warning

    # the host: 2 cores, 23 GB
    warning = capacity_warning(_configs(1024), available_mb=23 * 1024, cores=2, gpu=False)
    assert warning.startswith("WARNING: the repository starts 1024 Python instances (p: 1024); at about 700 MB each")
    assert "need about 700 GB and this host has 23 GB available" in warning
    assert "1024 on the CPU are more than 4 per core for this host's 2 cores" in warning
    assert "Lower instance_num (worker_num) to at most 8 instances in all" in warning and "\n" not in warning
    # GPU instances take no core of their own, but each is a stub in host memory: 40 do not fit 8 GB
    warning = capacity_warning(_configs(40, "gpu"), available_mb=8 * 1024, cores=2, gpu=True)
    assert "on the CPU" not in warning and "at most 11 instances in all" in warning
    # "auto" instances run on the GPU where there is one, else on the CPU
    assert capacity_warning(_configs(20, "auto"), available_mb=23 * 1024, cores=2, gpu=True) is None
    assert "20 on the CPU" in capacity_warning(_configs(20, "auto"), available_mb=23 * 1024, cores=2, gpu=False)
    assert capacity_warning(_configs(8), available_mb=23 * 1024, cores=2, gpu=False) is None
    assert capacity_warning(_configs(9), available_mb=23 * 1024, cores=2, gpu=False) is not None


def test_gpu_models_left_at_one_instance_and_one_request_get_a_note(tiny_onnx):
    from tritonpipe.pipeline.graph import load_graph
    from tritonpipe.repository.capacity import gpu_shape_note
    from tritonpipe.repository.generate import build_repository

    def note(device: str, gpu: bool, **keys):
        config = {"backend": "S[DecodeTensor,ResizeTensor]", "resize_h": 8, "resize_w": 8, **keys}
        return gpu_shape_note(build_repository(load_graph(config, name="p"), device)[1], gpu)

    said = note("gpu", gpu=False)
    assert said.startswith("note: p runs on the GPU as one instance taking one request at a time (torchpipe's defaults")
    assert "set instance_num = 8 and max = 64, the fastest" in said and "\n" not in said
    # "auto" lands on the GPU only where there is one; the CPU and a chosen shape get no note
    assert note("auto", gpu=True) == said and note("auto", gpu=False) is None and note("cpu", gpu=True) is None
    assert note("gpu", gpu=True, max=8) is None and note("gpu", gpu=True, instance_num=2) is None
    assert note("gpu", gpu=True, device_id="0,1") is None  # one instance on each of two GPUs
    # a chain cut at its model stage: both models named, the ensemble not
    split = gpu_shape_note(build_repository(load_graph(
        {"backend": "S[DecodeTensor,ResizeTensor,SyncTensor[TensorrtTensor]]", "resize_h": 32, "resize_w": 32,
         "model": str(tiny_onnx)},
        name="c"), "gpu")[1], gpu=True)
    assert split.startswith("note: c_model, c_pre run on the GPU")
    assert "set fuse = true, instance_num = 8 and max = 64" in split


def test_generate_prints_the_warning_and_still_writes(tmp_path, capsys):
    from tritonpipe_tools.generate import main

    output = tmp_path / "repo"
    assert main(["--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8", "--set", "resize_w=8",
                 "--set", "instance_num=1024", "--set", "max=1048576", "-o", str(output)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("WARNING: the repository starts 1024 Python instances") and err.count("\n") == 1
    assert (output / "pipeline" / "config.pbtxt").is_file()


def test_generate_notes_a_gpu_model_left_at_torchpipes_defaults(tmp_path, capsys):
    from tritonpipe_tools.generate import main

    base = ["--backend", "S[DecodeTensor,ResizeTensor]", "--set", "resize_h=8", "--set", "resize_w=8", "--device", "gpu"]
    assert main([*base, "-o", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: pipeline runs on the GPU as one instance") and err.count("\n") == 1
    assert (tmp_path / "one" / "pipeline" / "config.pbtxt").is_file()
    assert main([*base, "--set", "max=64", "--set", "instance_num=8", "-o", str(tmp_path / "eight")]) == 0
    assert capsys.readouterr().err == ""
