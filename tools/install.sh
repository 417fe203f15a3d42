#!/usr/bin/env bash
# Create .venv (if missing) and install tritonpipe with its test dependencies and the Triton server.
# PYTHON picks the interpreter (3.10-3.13), default python3.
# TORCH_INDEX_URL installs torch and torchvision from that index first, e.g. the CPU-only builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install --progress-bar off -q)
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
echo "installing tritonpipe into .venv (the first run downloads the Triton server and torch) ..."
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" torch torchvision --index-url "$TORCH_INDEX_URL" -c constraints.txt
fi
"${PIP[@]}" -e ".[test]" -c constraints.txt
# The server: Triton 2.51 from the nvidia-pytriton wheel. --no-deps: only its files are used, and its
# numpy<2 pin would otherwise downgrade numpy for the whole environment.
"${PIP[@]}" --no-deps nvidia-pytriton==0.7.0
# perf_analyzer: only the tritonclient 2.51 wheel ships a real one. It goes into a folder of its own,
# so that the tritonclient the project imports stays the one resolved above.
"${PIP[@]}" --no-deps --upgrade --target .venv/perf_analyzer tritonclient==2.51.0
ln -sf ../perf_analyzer/bin/perf_analyzer .venv/bin/perf_analyzer
.venv/bin/python -c "import tritonpipe, torch, cv2, numpy, tritonclient; from tritonpipe.server.install import locate_triton; locate_triton(); print('tritonpipe ready: torch', torch.__version__, '| opencv', cv2.__version__, '| numpy', numpy.__version__)"
