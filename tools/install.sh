#!/usr/bin/env bash
# Create .venv (if missing) and install tritonpipe with its test dependencies.
# PYTHON picks the interpreter (3.10-3.12), default python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
echo "installing tritonpipe into .venv (the first run downloads the Triton server and torch) ..."
.venv/bin/python -m pip install --progress-bar off -q -e ".[test]" -c constraints.txt
.venv/bin/python -c "import tritonpipe, torch, cv2, numpy; print('tritonpipe ready: torch', torch.__version__, '| opencv', cv2.__version__, '| numpy', numpy.__version__)"
