#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: unit tests and real-server tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec .venv/bin/python -m pytest -q "$@"
