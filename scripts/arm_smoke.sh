#!/usr/bin/env bash
# ARM smoke test: cross-compiles cvserve for aarch64-unknown-linux-gnu (a Jetson, a Raspberry
# Pi 4/5, a Graviton box) with Debian's cross toolchain (libjpeg-turbo is built for the target
# by the turbojpeg crate), then runs the ARM binary under qemu-user: it serves coco/1 on
# tract (no ONNX Runtime library for it to load) and must answer one photo with the boxes the
# x86 build answers on tract. Slow (an emulated CPU), but correct is the point.
#
#   scripts/arm_smoke.sh            # installs what it needs (apt, rustup target) first
#   ARM_SMOKE_BUILD_ONLY=1 scripts/arm_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  echo "arm: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v rustup >/dev/null || { echo "arm: rustup is needed to add the $TARGET standard library (https://rustup.rs)" >&2; exit 1; }
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# The `arm` profile is the release profile without debug information (a smaller binary to
# copy onto a board, and less to link here).
cargo build --locked --profile arm --target "$TARGET" --bin cvserve
BIN=target/$TARGET/arm/cvserve
aarch64-linux-gnu-readelf -h "$BIN" | grep -q "AArch64" || { echo "arm: $BIN is not an aarch64 binary" >&2; exit 1; }
echo "arm: built $BIN ($(du -h "$BIN" | cut -f1))"
[ -n "${ARM_SMOKE_BUILD_ONLY:-}" ] && exit 0

# The x86 binary's answer on tract is the reference (ONNX Runtime's differs in the last
# digits of the confidences). Built as `cargo test` builds it (with the dev-dependencies'
# features), so that after the tests this is no second build of the library.
cargo test --release --locked -q --no-run
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
fail() { echo "arm: $1" >&2; tail -20 "$work/$2.log" >&2; exit 1; }
photo=tests/fixtures/images/dog.jpg
serve() { # name binary-and-runner...
  local name=$1; shift
  BACKEND=tract ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so MODEL_CACHE_DIR=models \
    PRELOAD_MODELS=coco/1 HOST=127.0.0.1 PORT=0 GRPC_PORT=0 RING_DIR="$work" \
    INSTANCES_PER_MODEL=1 LONE_REQUEST_THREADS=1 REQUEST_TIMEOUT_S=600 \
    "$@" serve > "$work/$name.out" 2> "$work/$name.log" &
  local pid=$! port=""
  for _ in $(seq 600); do
    port=$(sed -n 's|^cvserve listening on http://127.0.0.1:||p' "$work/$name.out")
    [ -n "$port" ] && curl -sf "127.0.0.1:$port/readiness" >/dev/null && break
    sleep 1
  done
  curl -sf "127.0.0.1:$port/readiness" >/dev/null || fail "$name did not become ready" "$name"
  curl -sf "127.0.0.1:$port/info" > "$work/$name.info" || fail "$name: /info failed" "$name"
  curl -sf -F "file=@$photo" "127.0.0.1:$port/coco/1" > "$work/$name.json" || fail "$name: no answer" "$name"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
serve x86 target/release/cvserve
started=$(date +%s)
serve arm qemu-aarch64 -L /usr/aarch64-linux-gnu "$BIN"
echo "arm: the emulated server loaded coco/1 and answered in $(( $(date +%s) - started )) s"
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
x86, arm = (json.load(open(f"{w}/{n}.json")) for n in ("x86", "arm"))
info = json.load(open(f"{w}/arm.info"))
assert [m["backend"] for m in info["models"]] == ["tract"], info
key = lambda p: (p["class"], p["x"], p["y"])
a, b = sorted(x86["predictions"], key=key), sorted(arm["predictions"], key=key)
assert a and len(a) == len(b), f"x86 {a}\narm {b}"
for p, q in zip(a, b):
    assert p["class"] == q["class"], (p, q)
    assert all(abs(p[k] - q[k]) <= 1 for k in ("x", "y", "width", "height")), (p, q)
    assert abs(p["confidence"] - q["confidence"]) < 1e-3, (p, q)
print("arm: the aarch64 build answers as the x86 build on tract:",
      [(p["class"], round(p["confidence"], 3)) for p in b])
PY
