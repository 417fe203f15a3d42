"""--force replaces only what tritonpipe wrote: no project, symlink target or parent folder is lost."""

import os

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.repository.generate import MARKER, generate_repository, read_marker

GRAPH = {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8}


def _generate(output, overwrite=True):
    return generate_repository(load_graph(GRAPH), output, overwrite=overwrite)


def test_a_generated_repository_is_replaced_and_its_marker_names_the_entry(tmp_path):
    first = _generate(tmp_path / "repo", overwrite=False).path
    (first / "stale").write_text("from the last run")
    again = _generate(tmp_path / "repo").path
    assert not (again / "stale").exists() and read_marker(again)["entry"] == "pipeline"


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
