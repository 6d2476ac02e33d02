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
