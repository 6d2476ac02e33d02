#!/usr/bin/env bash
# Serves the bundled models (./models) on 0.0.0.0:9001. Every setting can be changed with its
# environment variable or flag: ./run.sh --help lists them.
# With the GPU flavour built (./build.sh on a GPU machine, or CVSERVE_GPU=1 ./build.sh), the
# GPU build of ONNX Runtime is used and the CUDA/cuDNN/TensorRT libraries in vendor/cuda/lib
# are put on the library path; EXECUTION_PROVIDERS=auto then picks TensorRT, CUDA or CPU.
set -euo pipefail
cd "$(dirname "$0")"
ver="${ORT_VERSION:-1.31.1}"
flavor=cpu
[ -f vendor/flavor ] && flavor=$(cat vendor/flavor)
if [ "$flavor" = gpu ] && [ -f "vendor/onnxruntime-gpu/libonnxruntime.so.$ver" ]; then
  export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime-gpu/libonnxruntime.so.$ver}"
  export LD_LIBRARY_PATH="$PWD/vendor/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.$ver}"
fi
export MODEL_CACHE_DIR="${MODEL_CACHE_DIR:-$PWD/models}"
# In a checkout with cargo, the release build of these sources (scripts/test.sh leaves its own
# build, with debug assertions, at the same path; an up-to-date build costs a second).
if command -v cargo >/dev/null 2>&1 && [ -f Cargo.toml ]; then cargo build --release --locked -q; fi
[ -x target/release/cvserve ] || { echo "run ./build.sh first" >&2; exit 1; }
exec target/release/cvserve serve "$@"
