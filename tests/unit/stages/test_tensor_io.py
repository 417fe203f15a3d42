"""SaveTensor's caps and refused folders, LoadTensor's bad files, plugins that fail, deep nesting."""

import pickle

import pytest
import torch

from tritonpipe.errors import ConfigError, InternalError, RequestError
from tritonpipe.pipeline.grammar import parse_backend
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import build_repository
from tritonpipe.stages import build_stage, load_plugin


def generate(backend: str, **keys):
    return build_repository(load_graph({"backend": backend, **keys}, name="m"), "cpu")


@pytest.mark.parametrize(
    "folder", ["/", "/etc", "/usr/lib", "~", "/tmp", "/var", "/var/lib", "/var/tmp", "/run", "/opt", "/srv", "/mnt", "/home"]
)
def test_save_tensor_refuses_system_folders_at_generation(folder):
    with pytest.raises(ConfigError, match="is a system folder; give a folder of its own, made for the tensors"):
        generate("SaveTensor", save_dir=folder)


def test_save_tensor_follows_links_to_system_folders_and_takes_a_folder_of_its_own(tmp_path):
    (tmp_path / "to_var").symlink_to("/var")
    with pytest.raises(ConfigError, match="'/var' is a system folder"):
        generate("SaveTensor", save_dir=str(tmp_path / "to_var"))
    own = tmp_path / "tensors"  # under /tmp, a folder of its own
    own.mkdir()
    generate("SaveTensor", save_dir=str(own))


def test_save_tensor_caps_each_file_and_the_folder(tmp_path):
    (tmp_path / "old.pt").write_bytes(bytes(3000))  # already there: counts against the total
    # 4 KiB per file, 10 KiB in all
    stage = build_stage(parse_backend(f"SaveTensor(save_dir={tmp_path},max_file_mb=0.00390625,max_total_mb=0.009765625)"), "cpu")
    items = [{"data": torch.zeros(1025, dtype=torch.float32)}]  # 4100 bytes: over the per-file cap
    items += [{"data": torch.zeros(1000, dtype=torch.float32)} for _ in range(3)]  # 4000 bytes each
    stage.forward(items)
    assert isinstance(items[0]["error"], RequestError) and "max_file_mb allows 4096" in str(items[0]["error"])
    assert "saved_path" in items[1] and "error" not in items[1]
    assert isinstance(items[2]["error"], InternalError) and "max_total_mb" in str(items[2]["error"])
    assert isinstance(items[3]["error"], InternalError)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "old.pt") == [items[1]["saved_path"].split("/")[-1]]


class Evil:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "dict"])
def test_load_tensor_with_a_bad_file_is_one_config_error_at_generation(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"not a tensor file")
    elif content == "pickle":
        path.write_bytes(pickle.dumps(Evil()))
    else:
        torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="LoadTensor: ") as info:
        generate("LoadTensor", tensor_name=str(path))
    assert "\n" not in str(info.value)


def test_a_plugin_raising_at_import_is_a_config_error_naming_it(tmp_path):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import tritonpipe\nraise RuntimeError('no licence key')\n")
    with pytest.raises(ConfigError) as info:
        load_plugin(plugin)
    assert str(info.value) == f"plugin file {str(plugin)!r} raised on import: RuntimeError: no licence key"
    syntax = tmp_path / "syntax_plugin.py"
    syntax.write_text("def broken(:\n")
    with pytest.raises(ConfigError, match=r"syntax_plugin.py' raised on import: SyntaxError: .*line 1"):
        load_plugin(syntax)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys\nsys.exit(0)\n", "called sys.exit(0) on import; a plugin file must only define and register"),
        ("raise SystemExit('bye')\n", "called sys.exit('bye') on import"),
        ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt on import (a Ctrl-C, or the file raises it)"),
        ("raise GeneratorExit('odd')\n", "raised on import: GeneratorExit: odd"),
        ("raise ValueError('first\\nsecond')\n", "raised on import: ValueError: first"),
    ],
)
def test_a_plugin_that_exits_or_interrupts_at_import_is_a_one_line_config_error(tmp_path, code, message):
    plugin = tmp_path / "leaving_plugin.py"
    plugin.write_text(code)
    with pytest.raises(ConfigError) as info:
        load_plugin(plugin)
    assert str(info.value).startswith(f"plugin file {str(plugin)!r} ") and "\n" not in str(info.value)
    assert message in str(info.value)


def test_deep_nesting_is_a_config_error():
    with pytest.raises(ConfigError, match="stages are nested more than 64 deep"):
        parse_backend("S[" * 1000 + "Identity" + "]" * 1000)
    assert parse_backend("S[" * 63 + "Identity" + "]" * 63).name == "S"
