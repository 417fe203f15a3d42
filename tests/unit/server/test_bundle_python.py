"""`bundle verify` names a bundle whose Python backend stubs are for another Python than this one."""

import json
import sys

from tritonpipe.server import bundle as B

THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _bundle(root, pythons):
    """The files verify looks at, empty: no ELF file, so ldd has nothing to read."""
    server_root = root / "pytriton" / "tritonserver"
    (server_root / "bin").mkdir(parents=True)
    (server_root / "bin" / "tritonserver").write_text("")
    (server_root / "backends" / "python").mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (server_root / "backends" / "python" / name).write_text("")
    for version in pythons:
        (server_root / "python_backend_stubs" / version).mkdir(parents=True)
        (server_root / "python_backend_stubs" / version / "triton_python_backend_stub").write_text("")
    (root / "nvidia_pytriton.libs").mkdir()
    (root / B.MANIFEST).write_text(json.dumps({"pythons": pythons}))
    return root


def test_verify_names_a_bundle_packed_for_another_python(tmp_path):
    problems = B.verify(_bundle(tmp_path / "other", ["3.9"]))
    assert problems == [f"the bundle has Python backend stubs for Python 3.9, but tritonpipe serve runs models with "
                        f"this Python, {THIS_PYTHON}: pack with --python {THIS_PYTHON}"]
    assert B.verify(_bundle(tmp_path / "this", ["3.9", THIS_PYTHON])) == []
