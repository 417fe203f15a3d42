"""No text the package writes or shows names a command or a module path from before ``tritonpipe VERB``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tritonpipe import load_graph
from tritonpipe.deploy import k8s
from tritonpipe.repository.generate import SHIM, generate_repository

ROOT = Path(__file__).resolve().parents[2]
OLD_COMMANDS = ("generate", "serve", "client", "soak", "bundle", "bench", "export-example", "build-engine")
# a name followed by "-" is a temporary folder's prefix (tritonpipe-bench-, tritonpipe-server-), and
# tritonpipe-bundle.json is a bundle's manifest: neither is a command
OLD_COMMAND = re.compile(rf"(?<![\w.-])tritonpipe-({'|'.join(map(re.escape, OLD_COMMANDS))})(?![\w-]|\.json)")
OLD_MODULE = re.compile(r"(?<![\w.])tritonpipe\.(serving|bench|pipeline\.spec|repository\.keys)\b")
#: files that still name an old command: each must still do so, and leaves this list when fixed
STILL_OLD: set[str] = set()


def _old_names(text: str) -> list[str]:
    return [m.group(0) for m in (*OLD_COMMAND.finditer(text), *OLD_MODULE.finditer(text))]


def _sources() -> list[Path]:
    files = [*(ROOT / "python_backends" / "tritonpipe").rglob("*.py"), *(ROOT / "tools").rglob("*.py"),
             *(ROOT / "tools").glob("*.sh"), *(ROOT / "examples").rglob("*.toml"), *(ROOT / "examples").rglob("*.py"),
             *(ROOT / "docker").iterdir(), ROOT / "README.md", ROOT / "docs" / "CONFIG.md"]
    return sorted(path for path in files if path.is_file())


@pytest.mark.parametrize("text", [
    "tritonpipe-generate --k8s", "(tritonpipe-build-engine m.onnx", "made by tritonpipe-bundle.", "`tritonpipe-export-example`",
    "tritonpipe.serving.server", "from tritonpipe.bench import x", "tritonpipe.pipeline.spec", "tritonpipe.repository.keys",
])
def test_an_old_name_is_found(text):
    assert _old_names(text)


@pytest.mark.parametrize("text", [
    "tritonpipe generate --k8s", "tempfile.mkdtemp(prefix='tritonpipe-server-')", "prefix=\"tritonpipe-bench-\"",
    "tritonpipe-bundle.json", "tritonpipe-k8s.json", "tritonpipe.harness.bench", "tritonpipe_tools.bench", "tritonpipe.spec",
    "tritonpipe.server.owner",
])
def test_a_current_name_is_not(text):
    assert _old_names(text) == []


def test_no_source_names_an_old_command_or_module():
    found = {path.relative_to(ROOT).as_posix(): _old_names(path.read_text(errors="replace")) for path in _sources()}
    assert {path: names for path, names in found.items() if names and path not in STILL_OLD} == {}
    assert [path for path in STILL_OLD if not found.get(path)] == []


def test_generated_files_name_no_old_command_or_module(tmp_path):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}, name="tiny")
    repository = generate_repository(graph, tmp_path / "repo")
    folder = k8s.write_manifests(k8s.build_manifests(repository.configs, repository.path, repository.entry), tmp_path / "k8s")
    written = [path for root in (repository.path, folder) for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "kustomization.yaml" for path in written)
    assert {path.name: _old_names(path.read_text()) for path in written if _old_names(path.read_text())} == {}
    assert _old_names(SHIM) == [] and "tritonpipe.model.triton_model" in SHIM


@pytest.mark.parametrize("old", ["tritonpipe.serving", "tritonpipe.bench", "tritonpipe.pipeline.spec", "tritonpipe.repository.keys"])
def test_old_module_paths_are_gone(old):
    assert importlib.util.find_spec(old) is None


def test_tensor_spec_is_public():
    import tritonpipe
    from tritonpipe.spec import TensorSpec

    assert tritonpipe.TensorSpec is TensorSpec
