"""Old import paths keep working, warn with the new path, and give the very same objects."""

import importlib
import sys
import warnings

import pytest

from tritonpipe import _moved


@pytest.mark.parametrize("old,new", [(o, n) for o, n in _moved.MOVED.items() if o not in _moved._PACKAGES])
def test_old_path_forwards_to_the_new_module(old, new):
    if new == "tritonpipe.model.triton_model":
        pytest.skip("imports triton_python_backend_utils, which only exists inside Triton's stub")
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(new in str(w.message) and issubclass(w.category, DeprecationWarning) for w in caught)
    target = importlib.import_module(new)
    public = [name for name in vars(target) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(target, name) for name in public)


def test_unknown_name_under_an_old_path_is_an_attribute_error():
    module = importlib.import_module("tritonpipe.pipeline.spec")
    with pytest.raises(AttributeError):
        module.no_such_thing  # noqa: B018


def test_the_generated_shim_imports_the_new_path():
    from tritonpipe.repository.generate import SHIM

    assert "tritonpipe.model.triton_model" in SHIM and "serving" not in SHIM


def test_tensor_spec_is_public():
    import tritonpipe
    from tritonpipe.spec import TensorSpec

    assert tritonpipe.TensorSpec is TensorSpec
