# Sourced by build.sh, scripts/test.sh and scripts/arm_smoke.sh. rust-toolchain.toml pins the
# Rust release every build uses; on a machine whose rustup has that release only under the
# name `stable`, use it by that name (rustup would otherwise look for a toolchain named after
# the version and, unable to download it, stop).
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../rust-toolchain.toml")
if command -v rustup >/dev/null && ! rustup run "$pinned" rustc --version >/dev/null 2>&1 &&
   [ "$(rustup run stable rustc --version 2>/dev/null | cut -d' ' -f2)" = "$pinned" ]; then
  export RUSTUP_TOOLCHAIN=stable
fi
unset pinned
if ! cargo --version >/dev/null 2>&1; then
  echo "the Rust toolchain of rust-toolchain.toml is not installed (rustup toolchain install $(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../rust-toolchain.toml"))" >&2
  exit 1
fi
# The test build (scripts/test.sh; scripts/arm_smoke.sh's x86 reference): the release profile
# with, for cvserve's own code only, debug assertions, overflow checks and incremental
# compilation. The dependencies stay as ./build.sh builds them, so the two builds share them,
# and after a one-file change the test build takes seconds instead of minutes.
test_build=(--config 'profile.release.package.cvserve.debug-assertions=true'
            --config 'profile.release.package.cvserve.overflow-checks=true'
            --config 'profile.release.incremental=true')
