"""--force replaces only what tritonpipe wrote: no project, symlink target or parent folder is lost."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from tritonpipe.choices import read_marker
from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import MARKER, generate_repository

GRAPH = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}


def _generate(output, overwrite=True):
    return generate_repository(load_graph(GRAPH), output, overwrite=overwrite)


def test_a_generated_repository_is_replaced_and_its_marker_names_the_entry(tmp_path):
    first = _generate(tmp_path / "repo", overwrite=False).path
    config = first / "pipeline" / "config.pbtxt"
    assert "8" in config.read_text() and "24" not in config.read_text()
    again = generate_repository(load_graph({**GRAPH, "resize_h": 24}), tmp_path / "repo", overwrite=True).path
    assert again == first and "24" in config.read_text()
    assert read_marker(again)["entry"] == "pipeline"


def test_the_marker_lists_every_file_written_with_its_sha256(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MARKER}
    files = read_marker(path)["files"]
    assert set(files) == on_disk and "pipeline/1/model.py" in files
    assert all(files[name] == hashlib.sha256((path / name).read_bytes()).hexdigest() for name in files)


def test_a_file_added_to_a_generated_repository_is_named_and_kept(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    (path / "stale").write_text("from the last run")
    (path / "NOTES.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"NOTES\.md, stale \(not written by tritonpipe\).*move those out"):
        _generate(path)
    assert (path / "NOTES.md").read_text() == "my notes" and (path / "stale").read_text() == "from the last run"


def test_a_hand_written_model_folder_is_named_and_kept(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    mine = path / "mine" / "1"
    mine.mkdir(parents=True)
    (mine / "model.py").write_text("# by hand")
    (path / "mine" / "config.pbtxt").write_text('name: "mine"')
    with pytest.raises(ConfigError, match=r"holds mine/ \(not written by tritonpipe\)"):
        _generate(path)
    assert (mine / "model.py").read_text() == "# by hand" and (path / "mine" / "config.pbtxt").exists()


def test_a_file_added_inside_a_generated_model_folder_is_named(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    (path / "pipeline" / "1" / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match=r"pipeline/1/labels\.txt \(not written by tritonpipe\)"):
        _generate(path)
    assert (path / "pipeline" / "1" / "labels.txt").read_text() == "cat\ndog\n"


def test_an_edited_file_is_named_as_changed_and_kept(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    config = path / "pipeline" / "config.pbtxt"
    config.write_text(config.read_text() + "# tuned by hand\n")
    with pytest.raises(ConfigError, match=r"pipeline/config\.pbtxt \(changed since tritonpipe wrote them\)"):
        _generate(path)
    assert config.read_text().endswith("# tuned by hand\n")


def test_a_spoofed_old_style_marker_does_not_make_a_folder_replaceable(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / MARKER).write_text('{"entry": "x"}')
    (folder / "thesis.tex").write_text("\\begin{document}")
    with pytest.raises(ConfigError, match=r"without the list of files.*thesis\.tex.*delete the folder by hand"):
        _generate(folder)
    assert (folder / "thesis.tex").read_text() == "\\begin{document}"


def test_a_spoofed_marker_with_a_wrong_hash_is_refused(tmp_path):
    folder = tmp_path / "repo"
    (folder / "pipeline" / "1").mkdir(parents=True)
    (folder / "pipeline" / "config.pbtxt").write_text('name: "pipeline"  # edited')
    files = {"pipeline/config.pbtxt": hashlib.sha256(b'name: "pipeline"').hexdigest()}
    (folder / MARKER).write_text(json.dumps({"entry": "pipeline", "models": ["pipeline"], "files": files}))
    with pytest.raises(ConfigError, match=r"pipeline/config\.pbtxt \(changed since"):
        _generate(folder)
    assert (folder / "pipeline" / "config.pbtxt").read_text() == 'name: "pipeline"  # edited'


def test_a_marker_from_an_earlier_release_asks_to_delete_by_hand(tmp_path):
    folder = tmp_path / "repo"
    path = _generate(folder, overwrite=False).path
    marker = read_marker(path)
    del marker["files"]
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=r"earlier release.*delete the folder by hand, or choose another folder"):
        _generate(path)
    assert (path / "pipeline" / "config.pbtxt").exists()


def test_bytecode_and_empty_folders_do_not_stop_a_replacement(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    cache = path / "pipeline" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-312.pyc").write_bytes(b"\x00bytecode")
    (path / "pipeline" / "2").mkdir()
    again = _generate(path).path
    assert not cache.exists() and not (again / "pipeline" / "2").exists()


def test_anything_but_bytecode_in_pycache_is_named(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    cache = path / "pipeline" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"pipeline/1/__pycache__/ \(not written"):
        _generate(path)
    assert (cache / "notes.txt").read_text() == "mine"


def test_a_symbolic_link_inside_is_named_and_its_target_kept(tmp_path):
    outside = tmp_path / "data.bin"
    outside.write_text("data")
    path = _generate(tmp_path / "repo", overwrite=False).path
    shim = path / "pipeline" / "1" / "model.py"
    shim.unlink()
    shim.symlink_to(outside)  # where a generated file was
    (path / "data").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"data \(not written by tritonpipe\).*pipeline/1/model\.py \(changed"):
        _generate(path)
    assert outside.read_text() == "data" and shim.is_symlink()


def test_many_unknown_entries_are_counted_after_the_first_few(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    for index in range(8):
        (path / f"extra{index}.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"extra0\.txt, extra1\.txt, extra2\.txt, extra3\.txt, extra4\.txt and 3 more"):
        _generate(path)
    assert len(list(path.glob("extra*.txt"))) == 8


def test_a_project_folder_is_never_replaced(tmp_path):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "main.py").write_text("print('mine')")
    with pytest.raises(ConfigError, match=f"not a repository tritonpipe generated.*{MARKER}"):
        _generate(project)
    assert (project / "main.py").read_text() == "print('mine')" and (project / ".git").is_dir()


def test_a_symbolic_link_is_not_followed(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        _generate(link)
    assert (target / "keep.txt").read_text() == "keep" and link.is_symlink()


@pytest.mark.parametrize("which", ["here", "parent"])
def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch, which):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    target = work if which == "here" else work.parent
    (target / MARKER).write_text('{"entry": "pipeline", "models": []}')  # even with a marker
    with pytest.raises(ConfigError, match="current folder or one of its parents"):
        _generate(target)
    assert (work / "notes.txt").read_text() == "mine"


def test_the_home_folder_is_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    (home / MARKER).write_text('{"entry": "pipeline", "models": [], "files": {}}')  # even with a marker
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the home folder"):
        _generate(home)
    assert (home / ".ssh" / "id_ed25519").read_text() == "key"


def test_without_force_a_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "x").write_text("x")
    with pytest.raises(ConfigError, match="--force"):
        _generate(tmp_path / "repo", overwrite=False)


def test_folders_are_readable_by_a_server_running_as_another_user(tmp_path):
    path = _generate(tmp_path / "repo", overwrite=False).path
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        assert os.stat(folder).st_mode & 0o755 == 0o755, folder


def test_a_configuration_names_plugins_beside_it_only(tmp_path):
    outside = tmp_path / "evil.py"
    outside.write_text("raise SystemExit('imported')\n")
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "pipeline.toml"
    config.write_text('plugins = ["../evil.py"]\nbackend = "DecodeMat"\n')
    with pytest.raises(ConfigError, match="outside the configuration's folder.*--plugin"):
        load_graph(config)
