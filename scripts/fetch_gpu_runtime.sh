#!/usr/bin/env bash
# Fetches what the GPU flavour needs, from PyPI only, into vendor/ (git-ignored):
#   vendor/onnxruntime-gpu/  libonnxruntime.so.$ORT_VERSION with its CUDA and TensorRT provider
#                            libraries (the onnxruntime-gpu wheel: CUDA 13 + cuDNN 9)
#   vendor/cuda/lib/         the CUDA 13 runtime libraries it links (cudart, cuBLAS(Lt), cuFFT,
#                            cuRAND, NVRTC), cuDNN 9, and, where it can be had, TensorRT 10 for
#                            CUDA 13 (libnvinfer, libnvonnxparser; tensorrt-cu13-libs 10.16, not
#                            the 11.x releases)
# Only the NVIDIA driver (>= 580 for CUDA 13) must come with the machine. x86_64 only: PyPI has
# no aarch64 onnxruntime-gpu wheel (fetch_onnxruntime.sh says so and stops; on a Jetson use
# JetPack's onnxruntime-gpu and ORT_DYLIB_PATH).
# TensorRT is optional: PyPI holds tensorrt-cu13-libs 10.x only as a stub that downloads the
# real wheel from NVIDIA's index (pypi.nvidia.com). Where that cannot be reached the TensorRT
# provider will not start (EXECUTION_PROVIDERS=auto then runs on CUDA and logs why); put the
# TensorRT 10 libraries in vendor/cuda/lib by hand to use it.
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
tags=(--only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --python-version 3.11 --implementation cp)
python3 -m pip download "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" "${tags[@]}" -d "$WHEELS" -q
# TensorRT: the wheel itself lives on NVIDIA's index; the PyPI package is a stub pointing there.
if ! ls "$WHEELS"/tensorrt_cu13_libs-"$TENSORRT_VERSION"-*.whl >/dev/null 2>&1 &&
   ! python3 -m pip download "tensorrt-cu13-libs==$TENSORRT_VERSION" --no-deps "${tags[@]}" \
       --extra-index-url https://pypi.nvidia.com -d "$WHEELS" -q 2>/dev/null; then
  echo "fetch_gpu_runtime: TensorRT $TENSORRT_VERSION (tensorrt-cu13-libs) could not be fetched" \
       "(its wheel is on pypi.nvidia.com); the TensorRT provider will not start, CUDA will" >&2
fi
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
for need in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcufft.so.12 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
  [ -e "vendor/cuda/lib/$need" ] || { echo "fetch_gpu_runtime: $need is missing from the wheels" >&2; exit 1; }
done
touch vendor/cuda/.complete
trt="without TensorRT"; [ -e vendor/cuda/lib/libnvinfer.so.10 ] && trt="TensorRT $TENSORRT_VERSION"
echo "GPU flavour: vendor/onnxruntime-gpu (ONNX Runtime $ORT_VERSION), vendor/cuda/lib (CUDA 13, cuDNN 9, $trt)"
