#!/usr/bin/env bash
# The ARM stage (a slow stage of .ci/run, after the test command; docs/tests.md): cross-compiles
# cvserve for aarch64-unknown-linux-gnu (a Jetson, a Raspberry Pi 4/5, a Graviton box) with
# Debian's cross toolchain (libjpeg-turbo is built for the target by the turbojpeg crate), then
# runs the ARM binary under qemu-user twice, side by side, serving coco/1:
#   - on ONNX Runtime, loading the aarch64 library of PyPI's onnxruntime wheel (what ./build.sh
#     fetches on an aarch64 board), which must answer one photo as the x86 build does on
#     ONNX Runtime (the emulated process is shown an ARM /proc/cpuinfo, see below);
#   - on tract (no ONNX Runtime library given), which must answer as the x86 build on tract.
# Slow (an emulated CPU), but correct is the point.
#
#   scripts/arm_smoke.sh            # installs what it needs (apt, rustup target, the wheel)
#   ARM_SMOKE_BUILD_ONLY=1 scripts/arm_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/toolchain.sh
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

# The references: the x86 build's answers on each back end (the test command's build: nothing
# to compile after it).
cargo build --release --locked "${test_build[@]}" --bin cvserve
scripts/fetch_onnxruntime.sh vendor/onnxruntime cpu >/dev/null
scripts/fetch_onnxruntime.sh vendor/onnxruntime-aarch64 cpu aarch64 >/dev/null
ORT_VERSION="${ORT_VERSION:-1.31.1}"
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# A failing server is stopped with its check (`pid` is serve's, seen here by bash's scoping).
fail() { echo "arm: $1" >&2; tail -20 "$work/$2.log" >&2; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; exit 1; }
photo=tests/fixtures/images/dog.jpg
serve() { # name backend ort-library binary-and-runner...
  local name=$1 backend=$2 lib=$3; shift 3
  BACKEND=$backend ORT_DYLIB_PATH=$lib MODEL_CACHE_DIR=models \
    PRELOAD_MODELS=coco/1 HOST=127.0.0.1 PORT=0 GRPC_PORT=0 RING_DIR="$work" \
    INSTANCES_PER_MODEL=1 LONE_REQUEST_THREADS=1 REQUEST_TIMEOUT_S=600 \
    "$@" serve > "$work/$name.out" 2> "$work/$name.log" &
  local pid=$! port="" started
  started=$(date +%s)
  for _ in $(seq 900); do
    kill -0 "$pid" 2>/dev/null || break # exited: no point waiting
    port=$(sed -n 's|^cvserve listening on http://127.0.0.1:||p' "$work/$name.out")
    [ -n "$port" ] && curl -sf "127.0.0.1:$port/readiness" >/dev/null && break
    sleep 1
  done
  curl -sf "127.0.0.1:$port/readiness" >/dev/null || fail "$name did not become ready" "$name"
  curl -sf "127.0.0.1:$port/info" > "$work/$name.info" || fail "$name: /info failed" "$name"
  curl -sf -F "file=@$photo" "127.0.0.1:$port/coco/1" > "$work/$name.json" || fail "$name: no answer" "$name"
  echo "arm: $name loaded coco/1 and answered in $(( $(date +%s) - started )) s"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
x86_ort="$PWD/vendor/onnxruntime/libonnxruntime.so.$ORT_VERSION"
arm_ort="$PWD/vendor/onnxruntime-aarch64/libonnxruntime.so.$ORT_VERSION"
serve x86-ort ort "$x86_ort" target/release/cvserve
serve x86-tract tract /nonexistent/libonnxruntime.so target/release/cvserve
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
# Under qemu-user /proc/cpuinfo is the x86 host's, which ONNX Runtime's CPU detection
# (cpuinfo) cannot parse on aarch64: it crashes at start. The emulated server sees an ARM one
# (Cortex-A72 cores, a Raspberry Pi 4's, as many as the host has) bound over it in a mount
# namespace of its own (root, or an unprivileged user namespace). A real board needs none of this.
printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' \
  $(seq 0 $(($(nproc --all) - 1))) > "$work/cpuinfo" # as many as /sys says the host has
um=(unshare --mount); [ "$(id -u)" -ne 0 ] && um=(unshare --map-root-user --mount)
"${um[@]}" -- mount --bind "$work/cpuinfo" /proc/cpuinfo ||
  { echo "arm: serving on ONNX Runtime under qemu needs a private mount namespace (root, or user namespaces)" >&2; exit 1; }
arm_cpu=("${um[@]}" -- sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$work/cpuinfo")
serve arm-ort ort "$arm_ort" "${arm_cpu[@]}" "${qemu[@]}" "$BIN" & ort_pid=$!
serve arm-tract tract /nonexistent/libonnxruntime.so "${qemu[@]}" "$BIN" & tract_pid=$!
wait $ort_pid || exit 1
wait $tract_pid || exit 1
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
key = lambda p: (p["class"], p["x"], p["y"])
# Confidences: tract runs the same Rust code on both, ONNX Runtime its own kernels per CPU.
for backend, name, tol in (("ort", "onnxruntime", 2e-3), ("tract", "tract", 1e-3)):
    x86, arm = (json.load(open(f"{w}/{n}-{backend}.json")) for n in ("x86", "arm"))
    info = json.load(open(f"{w}/arm-{backend}.info"))
    assert [m["backend"] for m in info["models"]] == [name], info
    a, b = sorted(x86["predictions"], key=key), sorted(arm["predictions"], key=key)
    assert a and len(a) == len(b), f"{backend}: x86 {a}\narm {b}"
    for p, q in zip(a, b):
        assert p["class"] == q["class"], (backend, p, q)
        assert all(abs(p[k] - q[k]) <= 1 for k in ("x", "y", "width", "height")), (backend, p, q)
        assert abs(p["confidence"] - q["confidence"]) < tol, (backend, p, q)
    print(f"arm: the aarch64 build answers as the x86 build on {name}:",
          [(p["class"], round(p["confidence"], 3)) for p in b])
PY
