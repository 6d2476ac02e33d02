#!/usr/bin/env bash
# The protocol table: one server (default settings, gRPC on), each model measured the same way
# (closed loop, CONCURRENCY clients, SECONDS_PER_TRIAL seconds, best of TRIALS) as
#   Roboflow's /infer/<task> with a base64 JSON body,
#   the Open Inference Protocol with the encoded image as a binary BYTES tensor (HTTP, gRPC),
#   raw RGB frames through a shared-memory region per client (HTTP, gRPC; no decoding),
# beside the bare model (`cvserve ceiling`, the server stopped). Writes
# bench-results/protocol_table.md and .json.
#
#   scripts/protocol_table.sh
#   MODELS="coco/1" TRIALS=1 SECONDS_PER_TRIAL=5 scripts/protocol_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --locked -q
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"

MODELS="${MODELS:-coco/1 imagenet/1}"
TRIALS="${TRIALS:-2}"
CONCURRENCY="${CONCURRENCY:-16}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-8}"
CEILING_SECONDS="${CEILING_SECONDS:-3}"
PORT="${PROTOCOL_PORT:-9111}"
GRPC="${PROTOCOL_GRPC_PORT:-9112}"
OUT=bench-results
mkdir -p "$OUT"
BIN=target/release/cvserve
LOADS="roboflow v2-http v2-grpc v2-http-shm v2-grpc-shm"

images_for() {
  case "$1" in
    shapes-cls/*) echo tests/fixtures/samples/shapes-cls ;;
    shapes-*) echo tests/fixtures/samples/shapes ;;
    *) echo tests/fixtures/images ;;
  esac
}

PORT=$PORT GRPC_PORT=$GRPC PRELOAD_MODELS="${MODELS// /,}" "$BIN" serve >"$OUT/protocol-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/readiness" >/dev/null && break
  sleep 0.2
done

for m in $MODELS; do
  l=${m//\//-}
  for load in $LOADS; do
    args=(--protocol "${load%-shm}")
    [ "${load%-shm}" != "$load" ] && args+=(--shm)
    best=""
    for t in $(seq "$TRIALS"); do
      "$BIN" bench --url "http://127.0.0.1:$PORT" --grpc-url "http://127.0.0.1:$GRPC" \
        --model "$m" --images "$(images_for "$m")" --concurrency "$CONCURRENCY" \
        --duration "$SECONDS_PER_TRIAL" --warmup 20 "${args[@]}" --json "$OUT/trial.json" >/dev/null
      best=$(python3 - "$OUT/trial.json" "$best" <<'PY'
import json, sys
new = json.load(open(sys.argv[1]))
old = json.loads(sys.argv[2]) if sys.argv[2] else None
print(json.dumps(new if old is None or new["images_per_second"] > old["images_per_second"] else old))
PY
)
    done
    echo "$best" >"$OUT/protocol-$l-$load.json"
    python3 - "$m $load" "$best" >&2 <<'PY'
import json, sys
r = json.loads(sys.argv[2])
print(f"{sys.argv[1]}: {r['images_per_second']:.1f} img/s, p50 {r['latency_ms']['p50']:.0f} ms, errors {r['error_rate']:.3f}")
PY
  done
done
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT
for m in $MODELS; do
  l=${m//\//-}
  "$BIN" ceiling --model "$m" --seconds "$CEILING_SECONDS" >"$OUT/ceiling-$l.json" 2>/dev/null
done

python3 - "$OUT" "$LOADS" $MODELS <<'PY'
import json, os, sys
out, loads, models = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
names = {
    "roboflow": "Roboflow JSON, base64 image",
    "v2-http": "v2 HTTP, binary BYTES image",
    "v2-grpc": "v2 gRPC, BYTES image",
    "v2-http-shm": "v2 HTTP, raw frame in shared memory",
    "v2-grpc-shm": "v2 gRPC, raw frame in shared memory",
}
rows = [f"{os.cpu_count()} cores; closed loop; best of trials; ratio = served / bare model.", "",
        "| model | how | img/s | p50 ms | served / bare | errors |", "|---|---|---|---|---|---|"]
data = {}
for m in models:
    l = m.replace("/", "-")
    bare = json.load(open(f"{out}/ceiling-{l}.json"))["images_per_second"]
    for load in loads:
        r = json.load(open(f"{out}/protocol-{l}-{load}.json"))
        data[f"{m} {load}"] = r
        rows.append(f"| {m} | {names[load]} | {r['images_per_second']:.1f} | {r['latency_ms']['p50']:.0f} "
                    f"| {r['images_per_second'] / bare:.2f} | {r['error_rate']:.3f} |")
    rows.append(f"| {m} | bare model (`cvserve ceiling`) | {bare:.1f} | | 1.00 | |")
open(f"{out}/protocol_table.md", "w").write("\n".join(rows) + "\n")
json.dump(data, open(f"{out}/protocol_table.json", "w"), indent=1)
print("\n".join(rows))
PY
