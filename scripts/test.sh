#!/usr/bin/env bash
# The test command (docs/tests.md has the tiers, what each runs, and their budgets).
#
#   scripts/test.sh                   the full x86 suite: set-up (--sdk), rustfmt, the feature
#                                     check, clippy, then every test (unit tests, the HTTP tests
#                                     with the real clients and the browser), and the golden
#                                     comparisons again on tract
#   scripts/test.sh --quick           the edit loop: rustfmt, clippy, the unit tests and the
#                                     test files whose header says "Tier: quick"
#   scripts/test.sh [--quick] 'FILTERSET'
#                                     only the tests a nextest filterset selects within the
#                                     tier, e.g. 'test(overload)' or 'binary(=hostile)'; no lints
#
# The slow stages (the ARM build under qemu) are scripts of their own, run by .ci/run after
# this one. The tests run under cargo-nextest in the release profile, with debug assertions
# and overflow checks turned on in cvserve's own code (its dependencies stay as they ship, so
# the build is shared with ./build.sh's but for cvserve itself).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=full filter=""
for arg in "$@"; do
  case "$arg" in
    --quick) tier=quick ;;
    -*) echo "test: unknown option $arg (see the top of $0)" >&2; exit 2 ;;
    *) filter=$arg ;;
  esac
done
start=$(date +%s)
step() { echo "==> $* [$(($(date +%s) - start)) s]"; }

source scripts/toolchain.sh
step "set-up ($tier)"
if [ $tier = quick ]; then scripts/setup.sh; else scripts/setup.sh --sdk; fi
export CVSERVE_SDK_PYTHON="$PWD/vendor/sdk-venv/bin/python"
export CVSERVE_DEPLOY_PYTHON="$PWD/vendor/deploy-venv/bin/python"
export CVSERVE_TRITON_PYTHON="$PWD/vendor/triton-venv/bin/python"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
# clippy and rustfmt of the pinned toolchain, and cargo-nextest (on the machine, or built once).
for tool in clippy fmt; do
  cargo $tool --version >/dev/null 2>&1 || { echo "test: cargo $tool is missing (rustup component add clippy rustfmt)" >&2; exit 1; }
done
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest --version 0.9.143

if [ -z "$filter" ]; then
  step rustfmt
  cargo fmt --all -- --check
  step "feature check"
  scripts/check_features.py
  step clippy
  cargo clippy --locked --all-targets -- -D warnings
fi

# The quick tier: the unit tests and the test files that say "Tier: quick" (only those are built).
quick='kind(lib) | kind(bin)'
targets=(--lib --bins)
for f in $(grep -l '^//! Tier: quick' tests/*.rs); do
  quick+=" | binary(=$(basename "$f" .rs))"
  targets+=(--test "$(basename "$f" .rs)")
done
if [ $tier = quick ]; then set -- "($quick)${filter:+ & ($filter)}"; else set -- "${filter:-all()}"; targets=(); fi
profile=$tier; [ $tier = full ] && profile=default
rm -f target/nextest/$profile/junit.xml target/nextest/tract/junit.xml
step "tests ($tier): $1"
status=0
cargo nextest run --release --locked "${test_build[@]}" "${targets[@]}" --profile $profile -E "$1" || status=$?

if [ $tier = full ] && [ $status -eq 0 ]; then
  # The golden comparisons and Roboflow's Python client again, every server on tract.
  golden='(binary(=detection_api) | binary(=model_compat) | binary(=segmentation_classification_api) | binary(=python_sdk))'
  golden+=' & (test(roboflow) | test(masks_match_ground_truth) | test(shapes_classifier) | test(inference_sdk))'
  step "tests again on tract: $golden"
  CVSERVE_TEST_BACKEND=tract cargo nextest run --release --locked "${test_build[@]}" --profile tract --no-tests=pass \
    -E "$golden${filter:+ & ($filter)}" || status=$?
fi
step "done (status $status)"
scripts/test_times.py "$tier" "$(($(date +%s) - start))" target/nextest/$profile/junit.xml \
  $([ $tier = full ] && echo target/nextest/tract/junit.xml) || true
exit $status
