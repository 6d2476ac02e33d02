#!/usr/bin/env bash
# Installs what building (no argument) or testing (--sdk) needs on a fresh Debian/Ubuntu box,
# idempotently and cheaply when everything is there (one apt pass for whatever is missing;
# each virtualenv checked by importing what it holds; the derived models by a stamp):
#   build: cmake + nasm (libjpeg-turbo is built from source by the turbojpeg crate), protoc
#          (the gRPC code), python3 + pip (to fetch the ONNX Runtime library from its PyPI
#          wheel), and that library itself into vendor/onnxruntime (git-ignored).
#   --sdk: also Roboflow's inference_sdk, Triton's tritonclient with OpenCV, the onnx package
#          and the test models it derives, kubectl and kubernetes-validate, Chromium with its
#          WebDriver and Selenium (the full test command's real clients).
set -euo pipefail
cd "$(dirname "$0")/.."
sdk=""; [ "${1:-}" = "--sdk" ] && sdk=1

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v nasm >/dev/null || missing+=(nasm)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v curl >/dev/null || missing+=(curl)
command -v cc >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ -n "$sdk" ]; then
  kubectl kustomize --help >/dev/null 2>&1 || missing+=(kubernetes-client)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }

scripts/fetch_onnxruntime.sh vendor/onnxruntime cpu >/dev/null
echo "setup: ONNX Runtime at vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}"
[ -n "$sdk" ] || exit 0

# venv DIR IMPORT-CHECK PACKAGE...: a virtualenv holding PACKAGEs, made again when the check fails.
venv() {
  local dir=$1 check=$2; shift 2
  "$dir/bin/python" -c "$check" 2>/dev/null && return 0
  rm -rf "$dir"
  if ! python3 -m venv "$dir" 2>/dev/null; then # Debian's python3 keeps venv apart
    rm -rf "$dir"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$dir"
  fi
  "$dir/bin/pip" install -q "$@"
  echo "setup: $* in $dir"
}
# Roboflow's Python client (tests/python_sdk.rs).
venv vendor/sdk-venv "import inference_sdk" "inference-sdk==1.8.3"
# Triton's Python client, for the Open Inference Protocol tests (tests/open_inference.rs) and
# examples/video_client.py, with NumPy and OpenCV.
venv vendor/triton-venv "import tritonclient.http, tritonclient.grpc, cv2" \
  "tritonclient[http,grpc]==2.73.0" "numpy>=2,<3" "opencv-python-headless==5.0.0.93"
# The deployment test (tests/deploy.rs): kubernetes-validate with the Kubernetes schemas.
venv vendor/deploy-venv "import kubernetes_validate, yaml" "kubernetes-validate==1.37.0" "PyYAML>=6"
# The browser test (tests/web_page.rs): Selenium and openapi-spec-validator.
venv vendor/web-venv "import selenium, openapi_spec_validator" "selenium==4.*" "openapi-spec-validator==0.7.*"

# Test models of the end-to-end layouts (YOLO26-seg, YOLO26-pose, RF-DETR-seg) and the front
# end's almost-free network (tiny-coco, coco/1's layout), derived from the bundled models by scripts/derive_test_models.py with the `onnx` package into
# vendor/test-models, rather than kept as more weight files. Made again only when the
# script or the models it reads change (the stamp holds their hashes).
venv vendor/models-venv "import onnx, numpy" "onnx==1.23.2" "numpy>=2,<3"
stamp=$( (grep '^venv vendor/models-venv' scripts/setup.sh; cat scripts/derive_test_models.py models/shapes-seg/1/* models/shapes-pose/1/* models/coco/1/*) | sha256sum | cut -d' ' -f1)
if [ "$(cat vendor/test-models/.stamp 2>/dev/null)" != "$stamp" ]; then
  rm -rf vendor/test-models
  vendor/models-venv/bin/python scripts/derive_test_models.py models vendor/test-models
  echo "$stamp" > vendor/test-models/.stamp
  echo "setup: derived test models in vendor/test-models"
fi
