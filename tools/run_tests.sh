#!/usr/bin/env bash
# Install (if needed), check the code's shape (lint and layering), then run the whole test suite:
# unit tests and real-server tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
echo "ruff: lint and import order ..."
.venv/bin/ruff check python_backends tools tests
echo "lint-imports: the layering contract in pyproject.toml ..."
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
