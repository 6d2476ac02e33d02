#!/usr/bin/env bash
# The FPS table: serves the bundled models, measures each one over HTTP with the seeds'
# methodology (closed loop, 1,000 concurrent clients, best of 3 trials) and, beside it, the
# in-process ceiling (same back end and threads, best batch size, no HTTP/decode). Writes
# bench-results/fps_table.md and .json.
#
#   scripts/fps_table.sh                      # all bundled models
#   MODELS="coco/1 shapes-seg/1" TRIALS=1 SECONDS_PER_TRIAL=5 scripts/fps_table.sh
#   PEER_URL=http://127.0.0.1:9001 scripts/fps_table.sh   # also measure another server
#                                                         # (e.g. Roboflow Inference) the same way
#
# Clients honour Retry-After (a 429 makes that client wait 1 s, as a polite client would);
# FPS counts 200 answers only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --locked -q
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"

MODELS="${MODELS:-coco/1 shapes-det/1 shapes-det-v5/1 shapes-seg/1 imagenet/1 shapes-cls/1}"
TRIALS="${TRIALS:-3}"
CONCURRENCY="${CONCURRENCY:-1000}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-10}"
PORT="${FPS_PORT:-9101}"
OUT=bench-results
mkdir -p "$OUT"
BIN=target/release/cvserve

images_for() {
  case "$1" in
    shapes-cls/*) echo tests/fixtures/samples/shapes-cls ;;
    shapes-*) echo tests/fixtures/samples/shapes ;;
    *) echo tests/fixtures/images ;;
  esac
}

best_of() { # url model label -> writes $OUT/<label>.json (best trial)
  local url=$1 model=$2 label=$3 best=""
  for t in $(seq "$TRIALS"); do
    "$BIN" bench --url "$url" --model "$model" --images "$(images_for "$model")" \
      --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_TRIAL" --warmup 20 \
      --respect-retry-after --json "$OUT/trial.json" >/dev/null
    best=$(python3 - "$OUT/trial.json" "$best" <<'PY'
import json, sys
new = json.load(open(sys.argv[1]))
old = json.loads(sys.argv[2]) if sys.argv[2] else None
print(json.dumps(new if old is None or new["images_per_second"] > old["images_per_second"] else old))
PY
)
  done
  echo "$best" > "$OUT/$label.json"
}

"$BIN" serve --host 127.0.0.1 --port "$PORT" --model-cache-dir models >/dev/null 2>"$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/readiness" >/dev/null && break
  sleep 0.2
done
for m in $MODELS; do
  label=$(echo "$m" | tr / -)
  echo "measuring $m over HTTP ($TRIALS x ${SECONDS_PER_TRIAL}s, $CONCURRENCY clients)" >&2
  best_of "http://127.0.0.1:$PORT" "$m" "server-$label"
  if [ -n "${PEER_URL:-}" ]; then
    echo "measuring $m on $PEER_URL" >&2
    best_of "$PEER_URL" "$m" "peer-$label"
  fi
done
grep -E "VmHWM" "/proc/$SERVER/status" > "$OUT/server-peak-rss.txt" || true
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

# Ceilings, with the server stopped so nothing competes for the cores.
for m in $MODELS; do
  label=$(echo "$m" | tr / -)
  echo "measuring the in-process ceiling of $m" >&2
  "$BIN" ceiling --model "$m" --seconds 4 > "$OUT/ceiling-$label.json"
done

python3 - "$OUT" $MODELS <<'PY'
import json, os, platform, sys
out, models = sys.argv[1], sys.argv[2:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rows = []
peer = any(os.path.exists(f"{out}/peer-{m.replace('/', '-')}.json") for m in models)
head = "| model | server FPS | ceiling FPS (batch) | ratio | p50 ms | p90 ms | 429s |"
if peer:
    head += " peer FPS | peer p50 ms |"
lines = [f"Machine: {os.cpu_count()} cores, {cpu}.", "", head, "|" + "---|" * (head.count("|") - 1)]
data = {}
for m in models:
    l = m.replace("/", "-")
    s = json.load(open(f"{out}/server-{l}.json"))
    c = json.load(open(f"{out}/ceiling-{l}.json"))
    ratio = s["images_per_second"] / c["images_per_second"]
    line = (f"| {m} | {s['images_per_second']:.1f} | {c['images_per_second']:.1f} ({c['best_batch']}) | {ratio:.2f} "
            f"| {s['latency_ms']['p50']:.0f} | {s['latency_ms']['p90']:.0f} | {s['by_status'].get('429', 0)} |")
    if peer:
        p = json.load(open(f"{out}/peer-{l}.json")) if os.path.exists(f"{out}/peer-{l}.json") else None
        line += f" {p['images_per_second']:.1f} | {p['latency_ms']['p50']:.0f} |" if p else " - | - |"
    lines.append(line)
    data[m] = {"server": s, "ceiling": c, "ratio": ratio}
open(f"{out}/fps_table.md", "w").write("\n".join(lines) + "\n")
json.dump(data, open(f"{out}/fps_table.json", "w"), indent=1)
print("\n".join(lines))
PY
