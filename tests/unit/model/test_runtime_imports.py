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


def test_the_stubs_info_records_reach_the_servers_log_once_each():
    script = textwrap.dedent(
        """
        import logging, sys, types
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
        from tritonpipe.model import triton_model
        triton_model._show_info()
        triton_model._show_info()  # a second model in the process adds no second handler
        logging.getLogger("tritonpipe.stages.model").info("TensorrtTensor: chosen")
        logging.getLogger("tritonpipe").warning("a warning")
        logging.getLogger("tritonpipe").debug("not shown")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["tritonpipe INFO: TensorrtTensor: chosen", "tritonpipe WARNING: a warning"]
