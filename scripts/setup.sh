#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian/Ubuntu box, idempotently:
# cmake + nasm (libjpeg-turbo is built from source by the turbojpeg crate), protoc (the gRPC code), python3 + pip (to
# fetch the ONNX Runtime library from its PyPI wheel), and the ONNX Runtime library itself
# into vendor/onnxruntime (git-ignored; never committed).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v nasm >/dev/null || missing+=(nasm)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v curl >/dev/null || missing+=(curl)
command -v cc >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }

scripts/fetch_onnxruntime.sh vendor/onnxruntime cpu >/dev/null
echo "setup: ONNX Runtime at vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}"

# Roboflow's Python client, for the compatibility test (tests/python_sdk.rs). Only with --sdk.
if [ "${1:-}" = "--sdk" ] && ! vendor/sdk-venv/bin/python -c "import inference_sdk" 2>/dev/null; then
  rm -rf vendor/sdk-venv
  if ! python3 -m venv vendor/sdk-venv 2>/dev/null; then
    rm -rf vendor/sdk-venv
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv vendor/sdk-venv
  fi
  vendor/sdk-venv/bin/pip install -q "inference-sdk==1.8.3"
  echo "setup: inference_sdk 1.8.3 in vendor/sdk-venv"
fi

# Triton's Python client, for the Open Inference Protocol tests (tests/open_inference.rs) and
# examples/video_client.py, with NumPy and OpenCV. Only with --sdk.
if [ "${1:-}" = "--sdk" ] && ! vendor/triton-venv/bin/python -c "import tritonclient.http, tritonclient.grpc, cv2" 2>/dev/null; then
  rm -rf vendor/triton-venv
  python3 -m venv vendor/triton-venv
  vendor/triton-venv/bin/pip install -q "tritonclient[http,grpc]==2.73.0" "numpy>=2,<3" "opencv-python-headless==5.0.0.93"
  echo "setup: tritonclient 2.73.0 in vendor/triton-venv"
fi

# Test models of the end-to-end layouts (YOLO26-seg, YOLO26-pose, RF-DETR-seg), derived from
# the bundled shapes models by scripts/derive_test_models.py with the `onnx` package (in
# vendor/models-venv) into vendor/test-models, rather than kept as three more weight files.
if [ "${1:-}" = "--sdk" ]; then
  if ! vendor/models-venv/bin/python -c "import onnx, numpy" 2>/dev/null; then
    rm -rf vendor/models-venv
    python3 -m venv vendor/models-venv
    vendor/models-venv/bin/pip install -q "onnx==1.23.2" "numpy>=2,<3"
    echo "setup: onnx in vendor/models-venv"
  fi
  vendor/models-venv/bin/python scripts/derive_test_models.py models vendor/test-models
  echo "setup: derived test models in vendor/test-models"
fi

# Tools of the deployment test (tests/deploy.rs): kubectl (for `kubectl kustomize`; Debian's
# kubernetes-client when none is installed) and kubernetes-validate with the Kubernetes
# schemas, in vendor/deploy-venv. Only with --sdk (the test command).
if [ "${1:-}" = "--sdk" ]; then
  if ! kubectl kustomize --help >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
  fi
  if ! vendor/deploy-venv/bin/kubernetes-validate --version >/dev/null 2>&1; then
    rm -rf vendor/deploy-venv
    python3 -m venv vendor/deploy-venv
    vendor/deploy-venv/bin/pip install -q "kubernetes-validate==1.37.0" "PyYAML>=6"
    echo "setup: kubernetes-validate in vendor/deploy-venv"
  fi
fi

# Tools of the browser test (tests/web_page.rs): Debian's Chromium and its WebDriver, and
# Selenium + openapi-spec-validator in vendor/web-venv. Only with --sdk (the test command).
if [ "${1:-}" = "--sdk" ]; then
  if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    echo "setup: chromium and chromium-driver installed"
  fi
  if ! vendor/web-venv/bin/python -c "import selenium, openapi_spec_validator" 2>/dev/null; then
    rm -rf vendor/web-venv
    python3 -m venv vendor/web-venv
    vendor/web-venv/bin/pip install -q "selenium==4.*" "openapi-spec-validator==0.7.*"
    echo "setup: selenium and openapi-spec-validator in vendor/web-venv"
  fi
fi
