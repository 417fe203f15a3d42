"""Where the Triton server, its Python backend and perf_analyzer live on this host.

Two layouts are understood, and they are the same tree:

- the ``nvidia-pytriton`` wheel in site-packages: ``pytriton/tritonserver/...`` beside
  ``nvidia_pytriton.libs/``;
- an offline bundle made by ``tritonpipe bundle``, unpacked anywhere: the same two folders
  under one root, plus ``bin/perf_analyzer``.

Set ``TRITONPIPE_TRITON_HOME`` (or pass ``home``) to use a bundle instead of the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..choices import HOME_ENV
from ..errors import ConfigError

# perf_analyzer and the server look these up by their plain soname; the wheel ships them
# under hashed names, so a small folder of links gives them the names they ask for.
_SONAME_LINKS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


@dataclass(frozen=True)
class TritonInstall:
    root: Path  # the folder holding pytriton/ and nvidia_pytriton.libs/

    @property
    def server_root(self) -> Path:
        return self.root / "pytriton" / "tritonserver"

    @property
    def server(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.server_root / "backends" / "python"

    @property
    def stubs(self) -> Path:
        return self.server_root / "python_backend_stubs"

    @property
    def caches(self) -> Path:
        return self.server_root / "caches"

    @property
    def libs(self) -> Path:
        return self.root / "nvidia_pytriton.libs"

    def stub_for(self, version: str) -> Path:
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir()) if self.stubs.is_dir() else []
            raise ConfigError(
                f"no Python backend stub for Python {version} under {self.stubs} (have: {', '.join(have) or 'none'}); "
                "use a Python version listed there"
            )
        return stub

    def perf_analyzer(self) -> Path | None:
        bundled = self.root / "bin" / "perf_analyzer"
        if bundled.is_file():
            return bundled
        beside_python = Path(sys.executable).parent / "perf_analyzer"
        if beside_python.is_file():
            return beside_python
        found = shutil.which("perf_analyzer")
        return Path(found) if found else None

    def soname_dir(self, workdir: Path) -> Path:
        """A folder of plain-soname links to the wheel's hashed libraries."""
        target = workdir / "lib"
        target.mkdir(parents=True, exist_ok=True)
        for soname, prefix in _SONAME_LINKS.items():
            matches = sorted(self.libs.glob(prefix + "*")) if self.libs.is_dir() else []
            link = target / soname
            if matches and not link.exists():
                link.symlink_to(matches[0])
        return target

    def backend_dir(self, workdir: Path, python_version: str | None = None) -> Path:
        """A ``--backend-directory`` whose ``python/`` holds the stub for ``python_version``."""
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        python_dir = workdir / "backends" / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for name, source in (
            ("libtriton_python.so", self.python_backend / "libtriton_python.so"),
            ("triton_python_backend_utils.py", self.python_backend / "triton_python_backend_utils.py"),
            ("triton_python_backend_stub", self.stub_for(version)),
        ):
            link = python_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(source)
        return workdir / "backends"

    def library_path(self, workdir: Path) -> str:
        import sysconfig

        parts = [str(self.soname_dir(workdir)), str(self.libs)]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            parts.append(libdir)  # the stub loads libpython3.X.so through the normal loader path
        if os.environ.get("LD_LIBRARY_PATH"):
            parts.append(os.environ["LD_LIBRARY_PATH"])
        return os.pathsep.join(parts)


def locate_triton(home: str | os.PathLike | None = None) -> TritonInstall:
    """Find the Triton install: ``home``, else ``$TRITONPIPE_TRITON_HOME``, else the pytriton wheel."""
    home = home or os.environ.get(HOME_ENV)
    if home:
        install = TritonInstall(Path(home).resolve())
        if not install.server.is_file():
            raise ConfigError(
                f"{install.root} holds no Triton server (expected {install.server}); "
                "point it at a folder unpacked from a tritonpipe bundle tarball"
            )
        return install
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no Triton server found: install its wheel without its numpy<2 pin "
            f"(pip install --no-deps nvidia-pytriton==0.7.0, as tools/install.sh does) or set {HOME_ENV} "
            "to an unpacked tritonpipe bundle tarball"
        )
    root = Path(next(iter(spec.submodule_search_locations))).parent
    install = TritonInstall(root)
    if not install.server.is_file():
        raise ConfigError(f"the pytriton package at {root} has no tritonserver binary ({install.server})")
    return install
