"""The overlays rendered as users apply them: ``kubectl kustomize`` (kustomize v5, built into kubectl)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

NO_KUBECTL = "kubectl is not on PATH: the overlays are rendered with `kubectl kustomize`, as `kubectl apply -k` does"


def kubectl_kustomize(folder: Path) -> list[dict]:
    """The objects ``kubectl kustomize folder`` renders; fails the test with kubectl's message if it refuses."""
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def kustomize():
    """``kubectl kustomize`` as a function of the folder; skips the test where kubectl is missing."""
    if shutil.which("kubectl") is None:
        pytest.skip(NO_KUBECTL)
    return kubectl_kustomize
