#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup.sh), checks formatting, then runs
# the unit tests and the HTTP tests (which start the real server on free ports with the
# bundled models). Release profile: the same build the server ships with.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --sdk
export CVSERVE_SDK_PYTHON="$PWD/vendor/sdk-venv/bin/python"
export CVSERVE_DEPLOY_PYTHON="$PWD/vendor/deploy-venv/bin/python"
export CVSERVE_TRITON_PYTHON="$PWD/vendor/triton-venv/bin/python"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; fi
cargo test --release --locked "$@"
