"""`tritonpipe VERB`: one command, whose help and usage errors come back without importing torch."""

from __future__ import annotations

import ast
import importlib
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
    (("bench", "--systems", "ensemble,pil"), "choose from ensemble,baseline,inprocess,dali, got 'ensemble,pil'"),
    (("soak", "--bad-fraction", "2"), "expected a fraction in [0, 1], got '2'"),
    (("build-engine", "m.onnx", "--precision", "fp8"), "invalid choice: 'fp8'"),
    (("bundle", "unpack"), "the following arguments are required: ARCHIVE, DEST"),
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


def test_the_installed_command_and_the_old_names_point_at_the_verbs():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tritonpipe"] == "tritonpipe_tools.main:main"
    for verb in VERBS:
        assert scripts[f"tritonpipe-{verb}"] == f"tritonpipe_tools.{verb.replace('-', '_')}:main"


def _literals_read_by_tools() -> list[tuple[str, str, str]]:
    """(tool module, constant, library module) of every ``NAME = literal(MODULE, NAME)`` in tools/."""
    found = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            call = node.value if isinstance(node, ast.Assign) else None
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "literal":
                found.append((path.stem, node.targets[0].id, call.args[0].value))
    return found


@pytest.mark.parametrize(("tool", "name", "library"), _literals_read_by_tools())
def test_constants_read_from_source_are_the_imported_ones(tool, name, library):
    tool_module = importlib.import_module(f"tritonpipe_tools.{tool}")
    assert getattr(tool_module, name) == getattr(importlib.import_module(library), name)


def test_a_missing_literal_is_named():
    from tritonpipe_tools._literals import literal

    with pytest.raises(LookupError, match="tritonpipe.server.install assigns no literal NO_SUCH"):
        literal("tritonpipe.server.install", "NO_SUCH")
