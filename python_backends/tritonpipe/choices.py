"""The choice lists and defaults that both the library and the command line use, and the repository marker.

Only the standard library is imported here: ``tritonpipe VERB --help`` reads these before torch or
tritonclient could load, and the modules that act on a choice import it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

#: where GPU-capable stages run
DEVICES = ("auto", "gpu", "cpu")
#: which engine runs a model stage
ENGINES = ("auto", "tensorrt", "onnxruntime", "torch")
#: TensorRT build precisions
PRECISIONS = ("fp32", "fp16", "int8", "best")
#: how a client reaches the server
PROTOCOLS = ("grpc", "http")

#: the environment variable naming an unpacked server bundle, used instead of the nvidia-pytriton wheel
HOME_ENV = "TRITONPIPE_TRITON_HOME"
#: the single top folder of a server bundle
BUNDLE_DIR = "tritonpipe-triton"
#: xz level; 9 | lzma.PRESET_EXTREME saves well under 1 % here, for ~10 % more time
DEFAULT_PRESET = 9
#: who may load and unload models through Triton's model-repository API
MODEL_CONTROL = ("owner", "explicit")

#: the systems the benchmark compares
SYSTEMS = ("ensemble", "baseline", "dali-served", "floor", "inprocess", "dali")
#: the benchmark's concurrency levels
DEFAULT_CONCURRENCY = (1, 8, 32, 64, 128)
#: perf_analyzer's measurement modes
MEASUREMENT_MODES = ("time_windows", "count_windows")
#: where perf_analyzer puts inputs and outputs
SHARED_MEMORY = ("none", "system", "cuda")

#: written into every generated repository: its entry model, its models, and every file written with
#: its sha256 (what ``--force`` may replace: see repository/ownership.py)
MARKER = "tritonpipe.json"


def read_marker(repository: str | Path) -> dict | None:
    """The marker of a repository tritonpipe generated (its ``entry`` and ``models``), or None."""
    try:
        marker = json.loads((Path(repository) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entry"), str) else None
