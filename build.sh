#!/usr/bin/env bash
# Builds cvserve for release: installs missing system packages, fetches the ONNX Runtime
# library from PyPI into vendor/onnxruntime, then `cargo build --release`. Idempotent.
#
# GPU flavour: on a machine with an NVIDIA GPU (nvidia-smi answers), or with CVSERVE_GPU=1,
# it also fetches onnxruntime-gpu and the CUDA 13 / cuDNN 9 / TensorRT 10 runtime libraries
# from PyPI into vendor/ (scripts/fetch_gpu_runtime.sh); CVSERVE_GPU=0 never does. The same
# binary serves both flavours: run.sh picks the library.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/toolchain.sh
scripts/setup.sh
gpu="${CVSERVE_GPU:-auto}"
if [ "$gpu" = auto ]; then
  # x86_64 only: PyPI has no aarch64 onnxruntime-gpu (a Jetson takes JetPack's, see docs/gpu.md).
  if [ "$(uname -m)" = x86_64 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi
if [ "$gpu" = 1 ]; then
  scripts/fetch_gpu_runtime.sh
  echo gpu > vendor/flavor
else
  echo cpu > vendor/flavor
fi
cargo build --release --locked
echo "built target/release/cvserve ($(cat vendor/flavor) flavour); start it with ./run.sh"
