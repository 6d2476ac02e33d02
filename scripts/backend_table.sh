#!/usr/bin/env bash
# The back-end table: each model served on ONNX Runtime and on tract (BACKEND), in the same
# run: served img/s (closed loop, CONCURRENCY clients, default 16), one client's p50 latency,
# and the bare model's ceiling on that back end (`cvserve ceiling`: instances x intra-op
# threads x batch 1-2, with the server stopped). Writes bench-results/backends/table.md.
#
#   scripts/backend_table.sh
#   MODELS="coco/1" SECONDS_PER_TRIAL=5 scripts/backend_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
MODELS="${MODELS:-coco/1 shapes-det/1 shapes-seg/1 shapes-pose/1 imagenet/1 shapes-cls/1 shapes-rfdetr/1 shapes-yolonas/1}"
BACKENDS="${BACKENDS:-ort tract}"
CONCURRENCY="${CONCURRENCY:-16}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-8}"
CEILING_SECONDS="${CEILING_SECONDS:-2}"
PORT="${BACKEND_TABLE_PORT:-9121}"
OUT=bench-results/backends
BIN=target/release/cvserve
mkdir -p "$OUT"

images_for() {
  case "$1" in
    shapes-cls/*) echo tests/fixtures/samples/shapes-cls ;;
    shapes-*) echo tests/fixtures/samples/shapes ;;
    *) echo tests/fixtures/images ;;
  esac
}

for b in $BACKENDS; do
  BACKEND=$b "$BIN" serve --host 127.0.0.1 --port "$PORT" --grpc-port 0 --model-cache-dir models \
    --preload-models "$(echo $MODELS | tr ' ' ,)" >/dev/null 2>"$OUT/server-$b.log" &
  pid=$!
  for _ in $(seq 600); do curl -sf "127.0.0.1:$PORT/readiness" >/dev/null && break; sleep 0.5; done
  curl -sf "127.0.0.1:$PORT/readiness" >/dev/null || { echo "$b: not ready, see $OUT/server-$b.log" >&2; kill $pid; exit 1; }
  for m in $MODELS; do
    l=$(echo "$m" | tr / -)
    echo "$b: serving $m" >&2
    "$BIN" bench --url "http://127.0.0.1:$PORT" --model "$m" --images "$(images_for "$m")" \
      --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_TRIAL" --warmup 10 --json "$OUT/$b-$l.json" >/dev/null
    "$BIN" bench --url "http://127.0.0.1:$PORT" --model "$m" --images "$(images_for "$m")" \
      --concurrency 1 --duration "$SECONDS_PER_TRIAL" --warmup 3 --json "$OUT/$b-$l-c1.json" >/dev/null
  done
  kill -TERM $pid; wait $pid 2>/dev/null || true
  for m in $MODELS; do
    l=$(echo "$m" | tr / -)
    echo "$b: ceiling of $m" >&2
    BACKEND=$b "$BIN" ceiling --model "$m" --batches 1,2 --seconds "$CEILING_SECONDS" \
      > "$OUT/$b-$l-ceiling.json" 2>/dev/null
  done
done

python3 - "$OUT" "$BACKENDS" $MODELS <<'PY'
import json, os, sys
out, backends, models = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
load = lambda p: json.load(open(p)) if os.path.exists(p) else None
lines = [f"{os.cpu_count()} cores; {os.environ.get('CONCURRENCY', '16')} clients on the same cores.", "",
         "| model | back end | served img/s | 1 client p50 ms | bare best img/s (instances x threads, batch) | bare batch 2 vs 1 | served / bare |",
         "|---|---|---|---|---|---|---|"]
for m in models:
    l = m.replace("/", "-")
    for b in backends:
        s, s1, c = (load(f"{out}/{b}-{l}{x}.json") for x in ("", "-c1", "-ceiling"))
        if not (s and s1 and c):
            lines.append(f"| {m} | {b} | - | - | - | - | - |")
            continue
        best = c["best"]
        by = lambda batch: max((x["images_per_second"] for x in c["configurations"] if x["batch"] == batch), default=0)
        pays = f"{by(2) / by(1):.2f}x" if by(1) and by(2) else "-"
        lines.append(f"| {m} | {'ONNX Runtime' if b == 'ort' else 'tract'} | {s['images_per_second']:.1f} | {s1['latency_ms']['p50']:.0f} "
                     f"| {c['images_per_second']:.1f} ({best['instances']} x {best['intra_threads']}, b{best['batch']}) | {pays} "
                     f"| {s['images_per_second'] / c['images_per_second']:.2f} |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
