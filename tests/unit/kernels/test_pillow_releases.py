"""Bit-exact parity of ``pillow_resize`` with every Pillow release line it claims, side by side.

Each release in ``WHEELS`` is installed once, without dependencies, into
``.cache/pillow-releases/<version>`` (git-ignored) by ``pip install --target``, and run in a
subprocess of its own, with that folder first on ``PYTHONPATH``.  The subprocess resizes the
same ``CASES`` (RGB and L images of every size pair) with ``Image.resize(..., BILINEAR)`` and
writes the results to ``<refs>/pillow-<version>.npz``; the tests compare them with the kernel
run with ``pillow_version=release_line(<version>)``.  A reference file is reused while the
fingerprint of the cases it stores still matches, so a warm run needs no network.  Without the
package index (and no reference file), the release is skipped with the reason.

``<refs>`` is ``.cache/pillow-releases/refs``, or ``$TRITONPIPE_PILLOW_REFS`` when set.  The
GPU host has no package index (and Pillow 9.5 has no wheel for its Python), so make the
references here and carry them there::

    # here (CPU, PyPI reachable): fills .cache/pillow-releases/refs
    .venv/bin/python -m pytest -q tests/unit/kernels/test_pillow_releases.py
    # there, with that folder copied along:
    TRITONPIPE_PILLOW_REFS=.cache/pillow-releases/refs \\
        python -m pytest -q -m gpu tests/unit/kernels/test_pillow_releases.py

The input pixels come from a fixed integer hash rather than numpy's generators, so every
machine builds the same cases.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonpipe.errors import ConfigError
from tritonpipe.kernels.pillow_resize import NEWEST, RELEASES, pillow_resize, release_line
from tritonpipe.pipeline.graph import load_graph
from tritonpipe.stages.base import check_params, lookup

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache" / "pillow-releases"
REFS = Path(os.environ.get("TRITONPIPE_PILLOW_REFS") or CACHE / "refs")
CUDA = torch.cuda.is_available()

# One wheel per behaviour the kernel distinguishes, and the newest of each major line.
WHEELS = ("9.5.0", "10.4.0", "11.3.0", "12.0.0", "12.1.1", "12.2.0", "12.3.0", "13.0.0")



# --------------------------------------------------------------------------- cases


def _hash_stream(seed: int, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 (splitmix64): plain integer arithmetic, the same on every numpy."""
    x = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Draws:
    def __init__(self, seed: int):
        self.values = (_hash_stream(seed, 1 << 16) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        self.at = 0

    def uniform(self, lo: float, hi: float) -> float:
        self.at += 1
        return lo + (hi - lo) * float(self.values[self.at])

    def log_int(self, lo: int, hi: int) -> int:
        return int(math.exp(self.uniform(math.log(lo), math.log(hi + 1)))) if hi > lo else lo


# Each kind forces what the brief asks to be covered; "tall" hits Pillow 12.2's rule.
KINDS = ("free", "in_1xN", "in_Nx1", "in_1x1", "out_1xN", "out_Nx1", "out_1x1", "keep_w", "keep_h", "tall", "tall", "free")

# Both sides of each rule's boundary.
EDGE_CASES = [
    (200, 2, 199, 1), (201, 2, 199, 1), (201, 2, 200, 3), (301, 3, 10, 1), (300, 3, 10, 1),  # 12.2: in_h > 100 * in_w
    (101, 1, 100, 1), (101, 1, 7, 2), (1000, 4, 999, 3), (1000, 9, 3, 8),
    (120, 100, 80, 80), (120, 100, 79, 80), (100, 50, 99, 80), (200, 30, 198, 29),  # 13: shrink_h > 2 * shrink_w
    (200, 200, 50, 120), (200, 200, 50, 130), (301, 17, 33, 16), (64, 300, 8, 299),
]


def make_cases(n: int = 520, seed: int = 13) -> np.ndarray:
    """``[n + len(EDGE_CASES), 4]`` int64 (in_h, in_w, out_h, out_w), per-axis scales in [1/50, 50]."""
    draw = _Draws(seed)
    cases = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        sides = []
        for _ in range(2):
            scale = math.exp(draw.uniform(math.log(1 / 50), math.log(50)))
            in_side = draw.log_int(1, max(1, min(200, int(300 / scale))))
            sides.append((in_side, min(300, max(1, round(in_side * scale)))))
        (in_h, out_h), (in_w, out_w) = sides
        if kind == "tall":
            in_w = draw.log_int(1, 8)
            in_h = 100 * in_w + int(draw.uniform(-40, 400))
            out_h, out_w = draw.log_int(1, in_h - 1), draw.log_int(1, 3 * in_w)
        elif kind in ("in_1xN", "in_1x1"):
            in_h = 1
        if kind in ("in_Nx1", "in_1x1"):
            in_w = 1
        if kind in ("out_1xN", "out_1x1"):
            out_h = 1
        if kind in ("out_Nx1", "out_1x1"):
            out_w = 1
        if kind == "keep_w":
            out_w = in_w
        if kind == "keep_h":
            out_h = in_h
        cases.append((in_h, in_w, out_h, out_w))
    return np.array(cases + EDGE_CASES, dtype=np.int64)


CASES = make_cases()
# Per case: an RGB image then an L image, both flattened (HWC).
IN_SIZES = CASES[:, 0] * CASES[:, 1] * 4
OUT_SIZES = CASES[:, 2] * CASES[:, 3] * 4
PIXELS = (_hash_stream(2026, int(IN_SIZES.sum())) >> np.uint64(56)).astype(np.uint8)
DIGEST = hashlib.sha256(CASES.tobytes() + PIXELS.tobytes()).hexdigest()

# Runs under the release's own Pillow; only numpy and PIL are imported there.
_REFERENCE_SCRIPT = """
import sys
import numpy as np
import PIL
from PIL import Image

src = np.load(sys.argv[1])
pixels, outputs, at = src["pixels"], [], 0
for in_h, in_w, out_h, out_w in src["cases"].tolist():
    n = in_h * in_w
    rgb = pixels[at : at + 3 * n].reshape(in_h, in_w, 3)
    gray = pixels[at + 3 * n : at + 4 * n].reshape(in_h, in_w)
    at += 4 * n
    for image in (Image.fromarray(rgb), Image.fromarray(gray)):
        assert image.mode in ("RGB", "L"), image.mode
        outputs.append(np.asarray(image.resize((out_w, out_h), Image.BILINEAR)).reshape(-1))
np.savez(sys.argv[2], version=PIL.__version__, digest=src["digest"], outputs=np.concatenate(outputs))
"""


# --------------------------------------------------------------------------- references


def _reference_path(wheel: str) -> Path:
    return REFS / f"pillow-{wheel}.npz"


def _load_reference(wheel: str):
    path = _reference_path(wheel)
    if not path.exists():
        return None
    with np.load(path) as ref:
        if str(ref["digest"]) != DIGEST:
            return None
        return str(ref["version"]), ref["outputs"]


def _install(wheels: list[str]) -> dict[str, str]:
    """Install the missing wheels side by side, in parallel; returns {wheel: why it failed}."""
    jobs = {}
    for wheel in wheels:
        if (CACHE / wheel / "PIL" / "__init__.py").exists():
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{wheel}-", dir=CACHE))
        command = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--only-binary=:all:", "--timeout", "15", "--retries", "1", "--target", str(staging), f"pillow=={wheel}",
        ]
        jobs[wheel] = (staging, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failed = {}
    for wheel, (staging, job) in jobs.items():
        output = job.communicate()[0]
        if job.returncode == 0:
            # Renamed only once complete, so an interrupted install is never reused.
            staging.rename(CACHE / wheel)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            last = output.strip().splitlines()[-1] if output.strip() else f"exit status {job.returncode}"
            failed[wheel] = f"cannot install pillow=={wheel}; is the package index reachable? ({last})"
    return failed


def _compute(wheels: list[str], workdir: Path) -> dict[str, str]:
    """Write the missing reference files; returns {wheel: why it could not}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    REFS.mkdir(parents=True, exist_ok=True)
    failed = _install(wheels)
    inputs = workdir / "inputs.npz"
    np.savez(inputs, cases=CASES, pixels=PIXELS, digest=DIGEST)
    jobs = {}
    for wheel in wheels:
        if wheel in failed:
            continue
        env = {**os.environ, "PYTHONPATH": str(CACHE / wheel)}
        staged = workdir / f"pillow-{wheel}.npz"
        job = subprocess.Popen(
            [sys.executable, "-c", _REFERENCE_SCRIPT, str(inputs), str(staged)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        jobs[wheel] = (staged, job)
    for wheel, (staged, job) in jobs.items():
        output = job.communicate()[0]
        if job.returncode != 0:
            failed[wheel] = f"the Pillow {wheel} reference run failed:\n{output}"
        else:
            shutil.move(staged, _reference_path(wheel))
    return failed


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """{wheel: (PIL.__version__ that ran, flat outputs) or the reason there is none}."""
    missing = [wheel for wheel in WHEELS if _load_reference(wheel) is None]
    failed = _compute(missing, tmp_path_factory.mktemp("pillow-refs")) if missing else {}
    return {wheel: failed.get(wheel) or _load_reference(wheel) for wheel in WHEELS}


def _reference(references, wheel: str):
    ref = references[wheel]
    if isinstance(ref, str):
        pytest.skip(ref)
    version, outputs = ref
    assert version == wheel, f"{_reference_path(wheel)} was made by Pillow {version}, not {wheel}"
    return outputs


# --------------------------------------------------------------------------- kernel side


def kernel_outputs(pillow_version: str, device: str) -> np.ndarray:
    """The kernel's results for every case, flattened like the reference files."""
    pixels = torch.from_numpy(PIXELS).to(device)
    outputs, at = [], 0
    for in_h, in_w, out_h, out_w in CASES.tolist():
        n = in_h * in_w
        # RGB and L planes go through one call: the kernel filters channels independently.
        rgb = pixels[at : at + 3 * n].view(in_h, in_w, 3).permute(2, 0, 1)
        gray = pixels[at + 3 * n : at + 4 * n].view(1, in_h, in_w)
        at += 4 * n
        out = pillow_resize(torch.cat([rgb, gray]), out_h, out_w, pillow_version=pillow_version)
        outputs += [out[:3].permute(1, 2, 0).reshape(-1), out[3].reshape(-1)]
    return torch.cat(outputs).cpu().numpy()


def check_release(references, rows, wheel: str, device: str) -> None:
    expected = _reference(references, wheel)
    line = release_line(wheel)
    ours = kernel_outputs(line, device)
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    starts = np.concatenate([[0], np.cumsum(OUT_SIZES)[:-1]])
    per_case = np.maximum.reduceat(diff, starts)
    exact = int(np.count_nonzero(per_case == 0))
    rows.append((wheel, line, device, f"{exact}/{len(CASES)}", str(int(diff.max()))))
    bad = [tuple(CASES[i]) for i in np.flatnonzero(per_case)[:5]]
    assert exact == len(CASES), (
        f"Pillow {wheel} (pillow_version={line!r}) on {device}: {len(CASES) - exact} of {len(CASES)} "
        f"size pairs differ, max |diff| {diff.max()}; first (in_h, in_w, out_h, out_w): {bad}"
    )


# --------------------------------------------------------------------------- parity


def test_cases_cover_the_brief():
    in_h, in_w, out_h, out_w = CASES.T
    ratios = np.concatenate([out_h / in_h, out_w / in_w])
    assert len(CASES) >= 500
    assert ratios.min() <= 1 / 40 and ratios.max() >= 40
    assert ((in_h == 1) & (in_w > 1)).any() and ((in_w == 1) & (in_h > 1)).any() and ((in_h == 1) & (in_w == 1)).any()
    assert ((out_h == 1) & (out_w > 1)).any() and ((out_w == 1) & (out_h > 1)).any() and ((out_h == 1) & (out_w == 1)).any()
    # Enough cases where each rule sends the height pass first.
    assert ((in_h > 100 * in_w) & (out_h < in_h)).sum() >= 50
    assert ((out_h < in_h) & (in_h - out_h > 2 * (in_w - out_w))).sum() >= 100


@pytest.mark.parametrize("wheel", WHEELS)
def test_release_matches_kernel_cpu(references, pillow_release_rows, wheel):
    check_release(references, pillow_release_rows, wheel, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("wheel", WHEELS)
def test_release_matches_kernel_cuda(references, pillow_release_rows, wheel):
    check_release(references, pillow_release_rows, wheel, "cuda")


def test_releases_differ_exactly_where_the_table_says(references):
    # Guards the table against vacuity and against rows that merge behaviours Pillow keeps apart.
    got = {wheel: _reference(references, wheel) for wheel in WHEELS}
    for older, newer in zip(WHEELS, WHEELS[1:]):
        same_rule = RELEASES[release_line(older)][1:] == RELEASES[release_line(newer)][1:]
        assert np.array_equal(got[older], got[newer]) == same_rule, (older, newer)


def test_release_line_maps_versions():
    assert [release_line(w) for w in WHEELS] == ["9", "10", "11", "12.0", "12.1", "12.2", "12.3", "13"]
    assert release_line("9.0.1") == "9" and release_line("12.2.0.dev0") == "12.2" and release_line("14.1.0") == NEWEST
    with pytest.raises(ValueError, match=r"9\.0 or newer, got '8\.4\.0'"):
        release_line("8.4.0")
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR.*got 'thirteen'"):
        release_line("thirteen")


def test_kernel_rejects_unknown_release():
    image = torch.zeros(1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"pillow_version must be one of 9, 10, 11, 12\.0, .*13, got '12'"):
        pillow_resize(image, 2, 2, pillow_version="12")


# --------------------------------------------------------------------------- the stages' parameter


@pytest.mark.parametrize("stage", ["PillowResizeTensor", "PillowResizeMat"])
def test_unknown_pillow_version_fails_generation(stage):
    with pytest.raises(ConfigError, match=r"'pillow_version' must be one of auto, 9, 10, 11, 12\.0, 12\.1, 12\.2, 12\.3, 13; got '12'"):
        load_graph({"backend": f"S[{stage}]", "resize_h": 8, "resize_w": 8, "pillow_version": "12"})


def _stage(name: str, **given):
    cls = lookup(name)
    stage = cls()
    stage.init(check_params(cls, {"resize_h": 8, "resize_w": 8, **given}))
    return stage


def test_auto_follows_the_installed_pillow(monkeypatch):
    import PIL

    assert _stage("PillowResizeMat").pillow_version == release_line(PIL.__version__)
    assert _stage("PillowResizeTensor", pillow_version="12.2").pillow_version == "12.2"
    monkeypatch.setattr(PIL, "__version__", "8.4.0")
    with pytest.raises(ConfigError, match=r"8\.4\.0.*one of 9, 10, 11, 12\.0"):
        _stage("PillowResizeMat")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    assert _stage("PillowResizeMat").pillow_version == NEWEST
