#!/usr/bin/env bash
# Serves the bundled models (./models) on 0.0.0.0:9001. Every setting can be changed with its
# environment variable or flag: ./run.sh --help lists them.
set -euo pipefail
cd "$(dirname "$0")"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
export MODEL_CACHE_DIR="${MODEL_CACHE_DIR:-$PWD/models}"
[ -x target/release/cvserve ] || { echo "run ./build.sh first" >&2; exit 1; }
exec target/release/cvserve serve "$@"
