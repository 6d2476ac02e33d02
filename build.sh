#!/usr/bin/env bash
# Builds cvserve for release: installs missing system packages, fetches the ONNX Runtime
# library from PyPI into vendor/onnxruntime, then `cargo build --release`. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
cargo build --release --locked
echo "built target/release/cvserve; start it with ./run.sh"
