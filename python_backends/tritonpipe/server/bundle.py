"""Relocatable offline bundle of the Triton server, its Python backend stubs and perf_analyzer.

The bundle is one ``.tar.xz`` holding a single top folder, ``tritonpipe-triton/``, laid out
the way :func:`tritonpipe.server.install.locate_triton` expects::

    tritonpipe-triton/
        tritonpipe-bundle.json                  what is inside (Python versions, libraries)
        bin/perf_analyzer                        optional
        pytriton/tritonserver/bin/tritonserver
        pytriton/tritonserver/backends/python/{libtriton_python.so,triton_python_backend_utils.py}
        pytriton/tritonserver/caches/local/libtritoncache_local.so
        pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub
        nvidia_pytriton.libs/                    only the shared libraries those files need

The binaries find ``nvidia_pytriton.libs/`` through their ``$ORIGIN`` RPATH, so the folder
can be unpacked anywhere. perf_analyzer has no RPATH and asks for plain sonames
(``libb64.so.0d``, ``libcudart.so.12``, ``libssl.so.3``, ``libcrypto.so.3``); the bundle adds
links with those names beside the hashed libraries, so it runs with
``LD_LIBRARY_PATH=<root>/nvidia_pytriton.libs``. Set that variable for perf_analyzer's
process only: exported for a whole shell, those links would shadow the host's own copies.

What the bundle does not carry: glibc (2.35 or newer, as the wheel requires), libstdc++,
libgcc_s and zlib, which every Debian/Ubuntu host has; ``libpythonX.Y.so.1.0``, which comes
with the Python that runs the models on the target host; and the CUDA driver.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..choices import BUNDLE_DIR, DEFAULT_PRESET
from ..errors import ConfigError
from .elf import read_elf
from .install import TritonInstall, locate_triton

MANIFEST = "tritonpipe-bundle.json"
MANIFEST_FORMAT = 1
SIZE_LIMIT_BYTES = 40 * 1000 * 1000  # what one bundle may weigh (decimal megabytes)

# Libraries every glibc-based Debian/Ubuntu host has (libc6, libstdc++6, libgcc-s1 and zlib1g
# are all "required" packages); anything else a bundled binary needs must be inside the bundle.
SYSTEM_LIBRARIES = frozenset(
    {
        "linux-vdso.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "libresolv.so.2",
        "libutil.so.1",
        "libstdc++.so.6",
        "libgcc_s.so.1",
        "libz.so.1",
    }
)
# The Python backend stub links libpythonX.Y; the host's Python provides it, never the bundle.
_HOST_PYTHON_LIB = re.compile(r"^libpython3\.\d+\.so(\.[0-9.]+)?$")
# auditwheel renames libfoo.so.1.2 to libfoo-<8 hex>.so.1.2; drop the hash to get the real name.
_WHEEL_HASH = re.compile(r"-[0-9a-f]{8}(?=\.)")
_PYTHON_VERSION = re.compile(r"^3\.\d{1,2}$")


class UnsafeArchiveError(ConfigError):
    """A tarball member would land outside the destination folder, or is not a plain file."""


@dataclass(frozen=True)
class BundleReport:
    path: Path
    size_bytes: int
    files: int  # members of the tarball: files and links, folders not counted
    pythons: tuple[str, ...]
    has_perf_analyzer: bool
    libraries: tuple[str, ...] = ()  # files taken from nvidia_pytriton.libs
    aliases: tuple[tuple[str, str], ...] = ()  # (plain soname, hashed file it links to)
    uncompressed_bytes: int = 0

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    @property
    def over_limit(self) -> bool:
        return self.size_bytes > SIZE_LIMIT_BYTES


def _real_name(hashed: str) -> str:
    """``libcudart-09529672.so.12.6.77`` -> ``libcudart.so.12.6.77``."""
    return _WHEEL_HASH.sub("", hashed, count=1)


def _is_system(name: str) -> bool:
    return name in SYSTEM_LIBRARIES or bool(_HOST_PYTHON_LIB.match(name))


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    members: list[tuple[Path, str]] = field(default_factory=list)  # (source file, path under the top folder)
    aliases: dict[str, str] = field(default_factory=dict)  # plain soname -> hashed file name
    libraries: list[str] = field(default_factory=list)


def _default_pythons() -> list[str]:
    current = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [current] if current == "3.12" else [current, "3.12"]


def _files_under(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def _plan(install: TritonInstall, pythons: list[str], include_perf_analyzer: bool) -> _Plan:
    plan = _Plan()
    server_root = install.server_root

    def add(source: Path, relative: str) -> None:
        plan.members.append((source, relative))

    add(install.server, "pytriton/tritonserver/bin/tritonserver")
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        source = install.python_backend / name
        if not source.is_file():
            raise ConfigError(f"the Triton install at {install.root} lacks {source}")
        add(source, f"pytriton/tritonserver/backends/python/{name}")
    if install.caches.is_dir():
        for source in _files_under(install.caches):
            add(source, "pytriton/tritonserver/" + source.relative_to(server_root).as_posix())
    for version in pythons:
        stub_dir = install.stub_for(version).parent  # ConfigError naming what exists when missing
        for source in _files_under(stub_dir):
            add(source, "pytriton/tritonserver/" + source.relative_to(server_root).as_posix())
    if include_perf_analyzer:
        perf = install.perf_analyzer()
        if perf is None:
            raise ConfigError(
                "perf_analyzer not found (beside this Python, on PATH, or in the Triton home); "
                "install tritonclient[all]==2.51.0 or leave it out (--no-perf-analyzer)"
            )
        add(perf.resolve(), "bin/perf_analyzer")

    # Index the wheel's libraries by file name and by their name without the auditwheel hash.
    if not install.libs.is_dir():
        raise ConfigError(f"the Triton install at {install.root} has no {install.libs.name}/ folder")
    by_file: dict[str, Path] = {}
    by_real: dict[str, list[str]] = {}
    for lib in sorted(install.libs.iterdir()):
        if lib.is_file() and not lib.is_symlink():
            by_file[lib.name] = lib
            by_real.setdefault(_real_name(lib.name), []).append(lib.name)

    def alias_target(wanted: str) -> str | None:
        for real, files in sorted(by_real.items()):
            if real == wanted or real.startswith(wanted + "."):
                return files[0]
        return None

    taken: set[str] = set()
    unresolved: list[str] = []
    queue = deque(source for source, _ in plan.members)
    seen: set[Path] = set()
    while queue:
        path = queue.popleft()
        if path in seen:
            continue
        seen.add(path)
        elf = read_elf(path)
        if elf is None:
            continue
        for wanted in elf.needed:
            target = wanted if wanted in by_file else None
            if target is None and not _is_system(wanted):
                target = alias_target(wanted)
                if target is not None:
                    plan.aliases[wanted] = target
            if target is None:
                if not _is_system(wanted):
                    unresolved.append(f"{path.name} needs {wanted}")
                continue
            if target not in taken:
                taken.add(target)
                queue.append(by_file[target])
    if unresolved:
        raise ConfigError(
            "cannot make a self-contained bundle: "
            + "; ".join(sorted(set(unresolved)))
            + f" (found neither in {install.libs} nor among the base system libraries)"
        )
    plan.libraries = sorted(taken)
    for name in plan.libraries:
        add(by_file[name], f"nvidia_pytriton.libs/{name}")
    return plan


# --------------------------------------------------------------------------- pack


class _CountingReader:
    """File wrapper that reports every read to a progress bar."""

    def __init__(self, raw: BinaryIO, bar) -> None:
        self._raw = raw
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data


def _pytriton_version(install: TritonInstall) -> str | None:
    manifest = install.root / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("nvidia_pytriton")
        except (OSError, ValueError):
            return None
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nvidia-pytriton")
    except PackageNotFoundError:
        return None


def _tarinfo(
    name: str, *, kind: bytes, mode: int, size: int = 0, mtime: float = 0, linkname: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = int(mtime)
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(
    output: str | os.PathLike,
    *,
    pythons: list[str] | None = None,
    include_perf_analyzer: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    preset: int | None = None,
    home: str | os.PathLike | None = None,
) -> BundleReport:
    """Write the bundle to ``output`` (a ``.tar.xz``) from the Triton install ``locate_triton(home)``.

    ``pythons`` lists the ``X.Y`` versions whose backend stubs go in (default: this Python's and
    3.12). ``preset`` is the xz level (default 9; add ``lzma.PRESET_EXTREME`` for a little more).
    The archive is written beside ``output`` under a temporary name and renamed when complete.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    if output.is_dir():
        raise IsADirectoryError(f"{output} is a folder; give the path of the .tar.xz file to write")
    versions = list(dict.fromkeys(pythons or _default_pythons()))
    for version in versions:
        if not _PYTHON_VERSION.match(version):
            raise ConfigError(f"{version!r} is not a Python version; write it as X.Y, e.g. 3.12")
    install = locate_triton(home)
    plan = _plan(install, versions, include_perf_analyzer)
    manifest = json.dumps(
        {
            "format": MANIFEST_FORMAT,
            "nvidia_pytriton": _pytriton_version(install),
            "pythons": versions,
            "perf_analyzer": include_perf_analyzer,
            "libraries": plan.libraries,
            "aliases": dict(sorted(plan.aliases.items())),
        },
        indent=2,
    ).encode() + b"\n"

    folders: set[str] = set()
    for _, relative in plan.members:
        parent = PurePosixPath(relative).parent
        while str(parent) != ".":
            folders.add(str(parent))
            parent = parent.parent
    total = sum(source.stat().st_size for source, _ in plan.members)
    stamp = max(source.stat().st_mtime for source, _ in plan.members)  # for folders and the manifest

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(handle)
    temp = Path(temp_name)
    level = DEFAULT_PRESET if preset is None else preset
    def entry(relative: str, kind: bytes, mode: int, **fields) -> tarfile.TarInfo:
        fields.setdefault("mtime", stamp)
        name = f"{BUNDLE_DIR}/{relative}" if relative else BUNDLE_DIR
        return _tarinfo(name, kind=kind, mode=mode, **fields)

    try:
        from tqdm import tqdm

        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=f"packing {output.name}", disable=not progress, file=sys.stderr
        )
        with bar, tarfile.open(temp, "w:xz", preset=level) as tar:
            for folder in ["", *sorted(folders)]:
                tar.addfile(entry(folder, tarfile.DIRTYPE, 0o755))
            tar.addfile(entry(MANIFEST, tarfile.REGTYPE, 0o644, size=len(manifest)), io.BytesIO(manifest))
            for source, relative in plan.members:
                stat = source.stat()
                mode = 0o755 if stat.st_mode & 0o111 else 0o644
                info = entry(relative, tarfile.REGTYPE, mode, size=stat.st_size, mtime=stat.st_mtime)
                with open(source, "rb") as raw:
                    tar.addfile(info, _CountingReader(raw, bar))
            for soname, target in sorted(plan.aliases.items()):
                tar.addfile(entry(f"nvidia_pytriton.libs/{soname}", tarfile.SYMTYPE, 0o777, linkname=target))
        os.chmod(temp, 0o644)
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return BundleReport(
        path=output,
        size_bytes=output.stat().st_size,
        files=len(plan.members) + len(plan.aliases) + 1,
        pythons=tuple(versions),
        has_perf_analyzer=include_perf_analyzer,
        libraries=tuple(plan.libraries),
        aliases=tuple(sorted(plan.aliases.items())),
        uncompressed_bytes=total + len(manifest),
    )


# --------------------------------------------------------------------------- unpack


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"refusing to unpack: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"refusing to unpack: member {name!r} climbs out of the destination ('..')")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeArchiveError(f"refusing to unpack: member {name!r} is a device, fifo or other special file")
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute():
            raise UnsafeArchiveError(
                f"refusing to unpack: link {name!r} points at the absolute path {member.linkname!r}"
            )
        # Symlinks resolve against their own folder, hard links against the archive root.
        base = list(path.parent.parts) if member.issym() else []
        depth = list(base)
        for part in link.parts:
            if part == "..":
                if not depth:
                    raise UnsafeArchiveError(
                        f"refusing to unpack: link {name!r} -> {member.linkname!r} points outside the destination"
                    )
                depth.pop()
            elif part != ".":
                depth.append(part)


def unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a bundle into ``dest`` and return its root, ready for ``locate_triton(home=root)``.

    Every member is checked first (no absolute paths, no ``..``, no links leaving ``dest``,
    no special files); Pythons that have it also apply tarfile's ``data`` filter. The files go
    to a temporary folder inside ``dest`` and move into place only when all of them are out.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"no such bundle: {archive}")
    root = dest / BUNDLE_DIR
    if root.exists() or root.is_symlink():
        raise FileExistsError(f"{root} already exists; remove it or unpack somewhere else")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
            if tops != {BUNDLE_DIR} or not any(m.name == f"{BUNDLE_DIR}/{MANIFEST}" for m in members):
                raise ConfigError(
                    f"{archive} is not a tritonpipe bundle (expected everything under {BUNDLE_DIR}/ "
                    f"and a {MANIFEST}; found {', '.join(sorted(tops)) or 'nothing'})"
                )
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tritonpipe-unpack-", dir=dest))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Pythons without extraction filters; members were checked above
                    tar.extractall(staging, members=members)
                os.replace(staging / BUNDLE_DIR, root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as error:
        if isinstance(error, getattr(tarfile, "FilterError", ())):
            raise UnsafeArchiveError(f"refusing to unpack {archive}: {error}") from error
        reason = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        raise ConfigError(f"{archive} is not a readable .tar.xz bundle ({reason})") from error
    return root.resolve()


# --------------------------------------------------------------------------- verify


def _ldd(path: Path, library_path: str) -> tuple[int, str]:
    env = dict(os.environ, LD_LIBRARY_PATH=library_path, LC_ALL="C")
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env, timeout=60)
    return done.returncode, done.stdout + done.stderr


def verify(root: str | os.PathLike) -> list[str]:
    """Problems that would stop the bundle at ``root`` from running on a bare host; empty when fine.

    Runs ``ldd`` (with ``LD_LIBRARY_PATH=<root>/nvidia_pytriton.libs``) on every ELF file in
    the bundle and flags libraries that are missing, that need a newer glibc than this host
    has, or that resolve to files outside the bundle other than base system libraries.
    ``libpythonX.Y.so.1.0`` of the backend stubs is left to the host's Python and not flagged.
    Note that ``ldd`` may run the loader on the files: use it on bundles you made or trust.
    """
    root = Path(root)
    problems: list[str] = []
    try:
        install = locate_triton(home=root)
    except ConfigError as error:
        return [str(error)]
    root = install.root
    manifest: dict = {}
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as error:
            problems.append(f"{MANIFEST} is not valid JSON: {error}")
    else:
        problems.append(f"no {MANIFEST} in {root}: not made by tritonpipe bundle")
    for version in manifest.get("pythons", []):
        try:
            install.stub_for(version)
        except ConfigError as error:
            problems.append(str(error))
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest and running not in manifest.get("pythons", []):
        problems.append(f"the bundle has Python backend stubs for Python {', '.join(manifest.get('pythons', [])) or 'none'}, "
                        f"but tritonpipe serve runs models with this Python, {running}: pack with --python {running}")
    if manifest.get("perf_analyzer") and not (root / "bin" / "perf_analyzer").is_file():
        problems.append("the manifest lists perf_analyzer but bin/perf_analyzer is missing")
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        if not (install.python_backend / name).is_file():
            problems.append(f"missing {install.python_backend / name}")
    if shutil.which("ldd") is None:
        return problems + ["ldd not found on this host; shared libraries were not checked"]

    library_path = str(install.libs)
    real_root = root.resolve()
    needs_memo: dict[Path, frozenset[str]] = {}

    def bundle_needs(path: Path) -> frozenset[str]:
        """Sonames wanted by ``path`` and by the bundled libraries it pulls in, transitively.

        Libraries found outside the bundle (the host's libpython, say) are not followed: what
        they need is the host's business.
        """
        todo, names, visited = [path], set(), set()
        while todo:
            current = todo.pop()
            if current in visited:
                continue
            visited.add(current)
            if current in needs_memo:
                names |= needs_memo[current]
                continue
            elf = read_elf(current)
            for name in elf.needed if elf else ():
                names.add(name)
                candidate = install.libs / name
                if candidate.exists() and real_root in candidate.resolve().parents:
                    todo.append(candidate.resolve())
        needs_memo[path] = frozenset(names)
        return needs_memo[path]

    def inside(where: str) -> bool:
        return real_root in Path(where).resolve().parents

    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_symlink():
            target = path.resolve()
            if not target.exists():
                problems.append(f"{relative}: broken link to {os.readlink(path)}")
            elif real_root not in target.parents:
                problems.append(f"{relative}: links outside the bundle, to {target}")
            continue
        if not path.is_file() or read_elf(path) is None:
            continue
        ours = bundle_needs(path.resolve())
        code, text = _ldd(path, library_path)
        if code != 0 and "not a dynamic executable" in text:
            continue
        found_problem = False
        for line in text.splitlines():
            line = line.strip()
            if "version `" in line and "not found" in line:
                required_by = re.search(r"\(required by (.+)\)\s*$", line)
                if required_by is None or inside(required_by.group(1)):
                    problems.append(f"{relative}: {line}")
                    found_problem = True
                continue
            if "=>" not in line:
                continue
            name, _, where = (part.strip() for part in line.partition("=>"))
            if name not in ours or _HOST_PYTHON_LIB.match(name):
                continue  # wanted only by a host library, or the host Python's own libpython
            if where.startswith("not found"):
                problems.append(f"{relative}: needs {name}, found neither in the bundle nor on this host")
                found_problem = True
                continue
            resolved = where.split(" (", 1)[0].strip()
            if resolved and not inside(resolved) and name not in SYSTEM_LIBRARIES:
                problems.append(
                    f"{relative}: {name} comes from {resolved}, outside the bundle; a bare host may lack it"
                )
                found_problem = True
        if code != 0 and not found_problem:
            problems.append(f"{relative}: ldd failed ({code}): {text.strip()[:200]}")
    return problems
