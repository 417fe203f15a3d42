"""--k8s DIR --force replaces only a manifests folder tritonpipe wrote: the same rules as -o."""

import hashlib
import json
from pathlib import Path

import pytest

from tritonpipe import load_graph
from tritonpipe.deploy import k8s
from tritonpipe.errors import ConfigError
from tritonpipe.repository.generate import generate_repository

BACKEND = ["--backend", "S[DecodeMat,ResizeMat]", "--set", "resize_h=8", "--set", "resize_w=8"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    graph = load_graph({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8})
    repo = generate_repository(graph, tmp_path_factory.mktemp("k8s-overwrite") / "repo")
    return k8s.build_manifests(repo.configs, repo.path, repo.entry)


def _project(folder: Path) -> dict[Path, str]:
    """A user's folder with a few files; returns what they hold."""
    files = {folder / "main.py": "print('mine')", folder / ".ssh" / "id_ed25519": "key", folder / "docs" / "a.md": "a"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def _intact(files: dict[Path, str]) -> bool:
    return all(path.is_file() and path.read_text() == text for path, text in files.items())


def test_the_marker_lists_every_manifest_with_its_sha256(manifests, tmp_path):
    folder = k8s.write_manifests(manifests, tmp_path / "k8s")
    marker = json.loads((folder / k8s.MARKER).read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {k8s.MARKER}
    assert set(marker["files"]) == on_disk == {m.path for m in manifests.files}
    for name, digest in marker["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_kubectl_kustomize_ignores_the_marker(manifests, tmp_path, kustomize):
    folder = k8s.write_manifests(manifests, tmp_path / "k8s")
    assert "Deployment" in {o["kind"] for o in kustomize(folder / "overlays" / "cpu")}


def test_a_folder_tritonpipe_wrote_is_replaced(manifests, tmp_path):
    folder = k8s.write_manifests(manifests, tmp_path / "k8s")
    (folder / "overlays" / "gpu" / "patch.yaml").unlink()  # a generated file the user removed
    (folder / "overlays" / "extra").mkdir()  # an empty folder counts for nothing
    assert k8s.write_manifests(manifests, tmp_path / "k8s", overwrite=True) == folder
    assert (folder / "overlays" / "gpu" / "patch.yaml").is_file() and not (folder / "overlays" / "extra").exists()


def test_a_file_added_to_a_folder_tritonpipe_wrote_is_named_and_kept(manifests, tmp_path):
    folder = k8s.write_manifests(manifests, tmp_path / "k8s")
    (folder / "overlays" / "prod").mkdir()
    (folder / "overlays" / "prod" / "kustomization.yaml").write_text("resources: [../../base]\n")
    (folder / "README.md").write_text("ours")
    with pytest.raises(ConfigError, match=r"README\.md, overlays/prod/ \(not written by tritonpipe\).*move those out"):
        k8s.check_target(folder, overwrite=True)
    with pytest.raises(ConfigError, match="overlays/prod/"):
        k8s.write_manifests(manifests, folder, overwrite=True)
    assert (folder / "README.md").read_text() == "ours"
    assert (folder / "overlays" / "prod" / "kustomization.yaml").read_text() == "resources: [../../base]\n"


def test_an_edited_manifest_is_named_as_changed_and_kept(manifests, tmp_path):
    folder = k8s.write_manifests(manifests, tmp_path / "k8s")
    patch = folder / "overlays" / "cpu" / "patch.yaml"
    patch.write_text(patch.read_text() + "# replicas tuned by hand\n")
    with pytest.raises(ConfigError, match=r"overlays/cpu/patch\.yaml \(changed since tritonpipe wrote them\)"):
        k8s.write_manifests(manifests, folder, overwrite=True)
    assert patch.read_text().endswith("# replicas tuned by hand\n")


def test_a_user_folder_is_refused_and_kept(manifests, tmp_path):
    files = _project(tmp_path / "project")
    with pytest.raises(ConfigError, match=rf"not a manifests folder tritonpipe generated.*{k8s.MARKER}"):
        k8s.write_manifests(manifests, tmp_path / "project", overwrite=True)
    assert _intact(files)


def test_a_repository_marker_does_not_make_a_manifests_folder(manifests, tmp_path):
    files = _project(tmp_path / "project")
    (tmp_path / "project" / "tritonpipe.json").write_text('{"entry": "x", "files": {}}')
    with pytest.raises(ConfigError, match=k8s.MARKER):
        k8s.check_target(tmp_path / "project", overwrite=True)
    assert _intact(files)


@pytest.mark.parametrize("which", ["here", "parent"])
def test_the_current_folder_and_its_parents_are_refused(manifests, tmp_path, monkeypatch, which):
    work = tmp_path / "a" / "b"
    files = _project(work)
    monkeypatch.chdir(work)
    target = "." if which == "here" else ".."
    (work if which == "here" else work.parent).joinpath(k8s.MARKER).write_text('{"files": {}}')  # even with a marker
    with pytest.raises(ConfigError, match="current folder or one of its parents"):
        k8s.write_manifests(manifests, target, overwrite=True)
    assert _intact(files)


def test_the_home_folder_is_refused(manifests, tmp_path, monkeypatch):
    home = tmp_path / "home"
    files = _project(home)
    (home / k8s.MARKER).write_text('{"files": {}}')  # even with a marker
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the home folder"):
        k8s.write_manifests(manifests, home, overwrite=True)
    assert _intact(files)


def test_a_symbolic_link_is_refused_and_its_target_kept(manifests, tmp_path):
    real = tmp_path / "real"
    files = _project(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(ConfigError, match="symbolic link"):
        k8s.write_manifests(manifests, link, overwrite=True)
    assert _intact(files) and link.is_symlink()


def test_a_symbolic_link_to_a_folder_tritonpipe_wrote_is_refused_too(manifests, tmp_path):
    real = k8s.write_manifests(manifests, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(ConfigError, match="symbolic link"):
        k8s.check_target(link, overwrite=True)
    assert link.is_symlink() and (real / k8s.MARKER).is_file()


# --- the command line -------------------------------------------------------------------------


def _generate(argv: list[str]) -> int:
    from tritonpipe_tools.generate import main

    return main(argv)


def test_cli_k8s_in_the_project_folder_with_force_deletes_nothing(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = _project(project)
    monkeypatch.chdir(project)
    code = _generate([*BACKEND, "-o", "repo", "--k8s", ".", "--force"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "current folder or one of its parents" in err
    assert _intact(files) and not (project / "repo").exists()
    assert sorted(p.name for p in project.iterdir()) == [".ssh", "docs", "main.py"]


def test_cli_k8s_over_a_user_folder_with_force_writes_no_repository(tmp_path, monkeypatch, capsys):
    files = _project(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    code = _generate([*BACKEND, "-o", "repo", "--k8s", "mine", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "not a manifests folder tritonpipe generated" in err and len(err.strip().splitlines()) == 1
    assert _intact(files) and not (tmp_path / "repo").exists()


def test_cli_force_twice_replaces_both_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _generate([*BACKEND, "-o", "repo", "--k8s", "k8s", "--force"]) == 0
    capsys.readouterr()
    (tmp_path / "k8s" / "NOTES.md").write_text("mine")
    assert _generate([*BACKEND, "-o", "repo", "--k8s", "k8s", "--force"]) == 2
    assert "NOTES.md" in capsys.readouterr().err and (tmp_path / "k8s" / "NOTES.md").read_text() == "mine"
