#!/usr/bin/env bash
# Fetches what the GPU flavour needs, from PyPI only, into vendor/ (git-ignored):
#   vendor/onnxruntime-gpu/  libonnxruntime.so.$ORT_VERSION with its CUDA and TensorRT provider
#                            libraries (the onnxruntime-gpu wheel: CUDA 13 + cuDNN 9)
#   vendor/cuda/lib/         the CUDA 13 runtime libraries it links (cudart, cuBLAS(Lt), cuFFT,
#                            cuRAND, NVRTC), cuDNN 9, and TensorRT 10 for CUDA 13 (libnvinfer,
#                            libnvonnxparser; tensorrt-cu13-libs, not the 11.x releases)
# Only the NVIDIA driver (>= 580 for CUDA 13) must come with the machine.
# Usage: scripts/fetch_gpu_runtime.sh            (idempotent; ~3 GB of wheels, cached in ~/.cache)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION="${ORT_VERSION:-1.31.1}"
TENSORRT_VERSION="${TENSORRT_VERSION:-10.16.1.11}"
scripts/fetch_onnxruntime.sh vendor/onnxruntime-gpu gpu >/dev/null
if [ -f vendor/cuda/.complete ]; then echo "vendor/cuda already present"; exit 0; fi
WHEELS="${CVSERVE_WHEEL_CACHE:-$HOME/.cache/cvserve-gpu-wheels}"
mkdir -p "$WHEELS" vendor/cuda/lib
# Explicit tags: the result does not depend on the local Python. The [cuda,cudnn] extras of
# onnxruntime-gpu name exactly the CUDA 13 runtime wheels it was built against.
python3 -m pip download "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" "tensorrt-cu13-libs==$TENSORRT_VERSION" \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --python-version 3.11 --implementation cp -d "$WHEELS" -q
python3 - "$WHEELS" vendor/cuda/lib <<'PY'
import os, re, shutil, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
taken = []
for whl in sorted(os.listdir(wheels)):
    if not whl.endswith(".whl") or not re.match(r"(nvidia|tensorrt)", whl):
        continue
    with zipfile.ZipFile(os.path.join(wheels, whl)) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            # Shared libraries only (lib*.so, lib*.so.N...), flattened into one folder.
            if base.startswith("lib") and re.search(r"\.so(\.\d+)*$", base):
                with z.open(n) as s, open(os.path.join(dest, base), "wb") as d:
                    shutil.copyfileobj(s, d)
                taken.append(base)
print(f"unpacked {len(taken)} libraries into {dest}")
PY
for need in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcufft.so.12 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9 libnvinfer.so.10 libnvonnxparser.so.10; do
  [ -e "vendor/cuda/lib/$need" ] || { echo "fetch_gpu_runtime: $need is missing from the wheels" >&2; exit 1; }
done
touch vendor/cuda/.complete
echo "GPU flavour: vendor/onnxruntime-gpu (ONNX Runtime $ORT_VERSION), vendor/cuda/lib (CUDA 13, cuDNN 9, TensorRT $TENSORRT_VERSION)"
