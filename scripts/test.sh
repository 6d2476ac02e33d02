#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup.sh), checks formatting, then runs
# the unit tests and the HTTP tests (which start the real server on free ports with the
# bundled models), the golden comparisons again on tract, and the ARM smoke test
# (scripts/arm_smoke.sh). Release profile: the same build the server ships with. With
# arguments (a test filter), only `cargo test` with them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --sdk
export CVSERVE_SDK_PYTHON="$PWD/vendor/sdk-venv/bin/python"
export CVSERVE_DEPLOY_PYTHON="$PWD/vendor/deploy-venv/bin/python"
export CVSERVE_TRITON_PYTHON="$PWD/vendor/triton-venv/bin/python"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; fi
cargo test --release --locked "$@"
if [ $# -eq 0 ]; then
  # The golden comparisons and Roboflow's Python client again, on the tract back end.
  CVSERVE_TEST_BACKEND=tract cargo test --release --locked --test detection_api --test model_compat \
    --test segmentation_classification_api --test python_sdk -- \
    roboflow masks_match_ground_truth shapes_classifier inference_sdk
  # The aarch64 build under qemu-user, serving coco/1 on tract.
  scripts/arm_smoke.sh
fi
