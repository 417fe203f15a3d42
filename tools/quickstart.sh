#!/usr/bin/env bash
# Install, build the example model repository, serve it on a real tritonserver and
# send it a sample JPEG over HTTP and gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/tritonpipe export-example
.venv/bin/tritonpipe generate examples/resnet18/pipeline.toml -o model_repository --force
.venv/bin/tritonpipe client examples/resnet18/sample.jpg --serve model_repository --protocol all
