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
tier=full
if [ "${1:-}" = --quick ]; then tier=quick; shift; fi
filter="${1:-}"
start=$(date +%s)
step() { echo "==> $* [$(($(date +%s) - start)) s]"; }

source scripts/toolchain.sh
step "set-up ($tier)"
if [ $tier = quick ]; then scripts/setup.sh; else scripts/setup.sh --sdk; fi
export CVSERVE_SDK_PYTHON="$PWD/vendor/sdk-venv/bin/python"
export CVSERVE_DEPLOY_PYTHON="$PWD/vendor/deploy-venv/bin/python"
export CVSERVE_TRITON_PYTHON="$PWD/vendor/triton-venv/bin/python"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
# The toolchain of rust-toolchain.toml, with clippy and rustfmt (rustup adds them when missing).
cargo clippy --version >/dev/null && cargo fmt --version >/dev/null
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

if [ -z "$filter" ]; then
  step rustfmt
  cargo fmt --all -- --check
  step "feature check"
  scripts/check_features.py
  step clippy
  cargo clippy --locked --all-targets -- -D warnings
fi

# cvserve's own code (not its dependencies, which stay shared with ./build.sh's build) with
# debug assertions, overflow checks, and incremental compilation: after a one-file change the
# test build takes seconds instead of four minutes of recompiling the crate three times.
checks=(--config 'profile.release.package.cvserve.debug-assertions=true'
        --config 'profile.release.package.cvserve.overflow-checks=true'
        --config 'profile.release.incremental=true')
# The quick tier: the unit tests and the test files that say "Tier: quick" (only those are built).
quick='kind(lib) | kind(bin)'
targets=(--lib --bins)
for f in $(grep -l '^//! Tier: quick' tests/*.rs); do
  quick+=" | binary(=$(basename "$f" .rs))"
  targets+=(--test "$(basename "$f" .rs)")
done
if [ $tier = quick ]; then set -- "($quick)${filter:+ & ($filter)}"; else set -- "${filter:-all()}"; targets=(); fi
profile=$tier; [ $tier = full ] && profile=default
step "tests ($tier): $1"
status=0
cargo nextest run --release --locked "${checks[@]}" "${targets[@]}" --profile $profile -E "$1" || status=$?

if [ $tier = full ] && [ $status -eq 0 ]; then
  # The golden comparisons and Roboflow's Python client again, every server on tract.
  golden='(binary(=detection_api) | binary(=model_compat) | binary(=segmentation_classification_api) | binary(=python_sdk))'
  golden+=' & (test(roboflow) | test(masks_match_ground_truth) | test(shapes_classifier) | test(inference_sdk))'
  step "tests again on tract: $golden"
  CVSERVE_TEST_BACKEND=tract cargo nextest run --release --locked "${checks[@]}" --profile tract --no-tests=pass \
    -E "$golden${filter:+ & ($filter)}" || status=$?
fi
step "done (status $status)"
scripts/test_times.py "$tier" "$(($(date +%s) - start))" target/nextest/$profile/junit.xml \
  $([ $tier = full ] && echo target/nextest/tract/junit.xml) || true
exit $status
