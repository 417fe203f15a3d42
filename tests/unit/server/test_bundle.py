"""Offline bundle: pack for this Python, unpack, check its libraries and run what is inside."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tritonpipe.errors import ConfigError
from tritonpipe.server import bundle as B
from tritonpipe.server.install import TritonInstall, locate_triton
from tritonpipe.server.owner import TritonServer

THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
FAST_PRESET = 1  # ~20 s instead of ~2 min at the default level, and still under the size limit


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> B.BundleReport:
    out = tmp_path_factory.mktemp("bundle") / "triton.tar.xz"
    return B.pack(out, pythons=[THIS_PYTHON], progress=False, preset=FAST_PRESET)


@pytest.fixture(scope="module")
def root(packed, tmp_path_factory) -> Path:
    return B.unpack(packed.path, tmp_path_factory.mktemp("unpacked"))


def _libs_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["LD_LIBRARY_PATH"] = str(root / "nvidia_pytriton.libs")
    return env


# --------------------------------------------------------------------------- pack / unpack


def test_pack_report_and_size(packed):
    assert packed.path.is_file()
    assert packed.size_bytes == packed.path.stat().st_size
    assert packed.size_bytes <= B.SIZE_LIMIT_BYTES, f"bundle is {packed.size_mb:.1f} MB"
    assert packed.pythons == (THIS_PYTHON,)
    assert packed.has_perf_analyzer
    assert any(name.startswith("libtritonserver-") for name in packed.libraries)
    assert not any(name.startswith("libpython") for name in packed.libraries)
    assert {"libb64.so.0d", "libcudart.so.12"} <= {alias for alias, _ in packed.aliases}
    assert not list(packed.path.parent.glob("*.part"))  # the temporary file was renamed away


def test_archive_has_one_top_folder(packed):
    with tarfile.open(packed.path) as tar:
        names = tar.getnames()
    assert {name.split("/", 1)[0] for name in names} == {B.BUNDLE_DIR}
    assert f"{B.BUNDLE_DIR}/bin/perf_analyzer" in names
    assert f"{B.BUNDLE_DIR}/pytriton/tritonserver/bin/tritonserver" in names
    stubs = {n.split("/")[4] for n in names if "/python_backend_stubs/" in n and n.count("/") >= 5}
    assert stubs == {THIS_PYTHON}


def test_unpacked_root_is_a_triton_home(root):
    install = locate_triton(home=root)
    assert install.root == root
    assert install.stub_for(THIS_PYTHON).is_file()
    assert install.perf_analyzer() == root / "bin" / "perf_analyzer"
    assert os.access(install.server, os.X_OK)


def test_verify_finds_no_problems(root):
    assert B.verify(root) == []


def test_verify_reports_a_missing_library(packed, tmp_path):
    broken = B.unpack(packed.path, tmp_path)
    victim = next((broken / "nvidia_pytriton.libs").glob("libnuma-*"))
    victim.unlink()
    problems = B.verify(broken)
    assert any(f"needs {victim.name}" in problem for problem in problems), problems


def test_pack_refuses_to_overwrite(tmp_path):
    out = tmp_path / "triton.tar.xz"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        B.pack(out, pythons=[THIS_PYTHON], progress=False)
    assert out.read_bytes() == b"keep me"


def test_pack_names_available_stubs_for_a_missing_python(tmp_path):
    out = tmp_path / "triton.tar.xz"
    with pytest.raises(ConfigError, match=r"3\.7.*have:.*3\.12"):
        B.pack(out, pythons=["3.7"], progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unpack_refuses_an_existing_root(packed, root):
    with pytest.raises(FileExistsError):
        B.unpack(packed.path, root.parent)


# --------------------------------------------------------------------------- unsafe tarballs


def _tarball(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for info in members:
            data = b"x" * info.size
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "members",
    [
        [_file(f"{B.BUNDLE_DIR}/{B.MANIFEST}"), _file("../evil")],
        [_file(f"{B.BUNDLE_DIR}/{B.MANIFEST}"), _file(f"{B.BUNDLE_DIR}/../../evil")],
        [_file(f"{B.BUNDLE_DIR}/{B.MANIFEST}"), _file("/tmp/evil")],
        [_file(f"{B.BUNDLE_DIR}/{B.MANIFEST}"), _link(f"{B.BUNDLE_DIR}/evil", "../../etc/passwd")],
        [_file(f"{B.BUNDLE_DIR}/{B.MANIFEST}"), _link(f"{B.BUNDLE_DIR}/evil", "/etc/passwd")],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "link-out", "absolute-link"],
)
def test_unpack_rejects_unsafe_members(tmp_path, members):
    archive = _tarball(tmp_path / "evil.tar.xz", members)
    dest = tmp_path / "dest"
    with pytest.raises(B.UnsafeArchiveError):
        B.unpack(archive, dest)
    assert not (tmp_path / "evil").exists()
    assert not (dest / B.BUNDLE_DIR).exists()


def test_unpack_rejects_a_foreign_tarball(tmp_path):
    archive = _tarball(tmp_path / "other.tar.xz", [_file("something/else")])
    with pytest.raises(ConfigError, match="not a tritonpipe bundle"):
        B.unpack(archive, tmp_path / "dest")


# --------------------------------------------------------------------------- running what is inside


def test_bundled_perf_analyzer_runs(root):
    done = subprocess.run(
        [str(root / "bin" / "perf_analyzer"), "--version"],
        capture_output=True, text=True, env=_libs_env(root), timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Perf Analyzer Version" in done.stdout + done.stderr


def test_bundled_tritonserver_prints_usage(root):
    done = subprocess.run(
        [str(TritonInstall(root).server), "--help"],
        capture_output=True, text=True, env=_libs_env(root), timeout=60,
    )
    output = done.stdout + done.stderr
    assert "error while loading shared libraries" not in output
    # tritonserver 2.51 prints its usage and exits with 1 for --help.
    assert done.returncode in (0, 1), output
    assert "Usage: tritonserver" in output


@pytest.mark.server
def test_bundled_server_starts_on_an_empty_repository(root, tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    server = TritonServer(repo, install=TritonInstall(root))
    try:
        server.start(timeout=60)  # raises with the server's log if it exits or is not ready in time
        assert server.is_alive(), server.logs()[-3000:]
    finally:
        server.close()
