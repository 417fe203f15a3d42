"""Served models import tritonpipe inside Triton's Python stub, where tritonclient may be absent."""

import subprocess
import sys
import textwrap


def test_generic_model_imports_without_tritonclient():
    script = textwrap.dedent(
        """
        import sys, types

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tritonclient":
                    raise ImportError("tritonclient is not installed here")

        sys.meta_path.insert(0, Block())
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
        import tritonpipe.model.triton_model
        from tritonpipe.stages import load_builtin_stages
        load_builtin_stages()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
