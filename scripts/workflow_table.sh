#!/usr/bin/env bash
# The Workflows table: three workflows (benches/workflows/*.json) and the model route, served
# by cvserve and, with PEER_URL, by another server (Roboflow Inference's standard server) on
# the same machine, measured the same way: `cvserve bench`, closed loop, CONCURRENCY clients
# (default 16), SECONDS_PER_TRIAL each (default 15), TRIALS trials (default 2) alternated
# between the servers, best trial kept. FPS counts 200 answers only.
#
#   - detect: one coco/1 step on dog.jpg (beside the model route on dog.jpg);
#   - crop_classify: coco/1 (dogs) -> dynamic_crop -> imagenet/1 -> detections_classes_replacement
#     on dog.jpg, one crop per image (the reference answers 500 at two crops or more);
#   - sliced: image_slicer@v2 (640x640, overlap 0.2: 6 tiles) -> coco/1 -> detections_stitch
#     (nms) on kite.jpg, 1352x900 (beside the model route on kite.jpg).
#
#   PEER_URL=http://127.0.0.1:9600 scripts/workflow_table.sh
#   RENDER_ONLY=1 scripts/workflow_table.sh     # re-render bench-results/workflow_table.md
#   CASES="crop_classify:dog:workflow:crop_classify" TRIALS=4 ...   # re-measure some rows only
#                                               # (label:images:route:workflow)
#
# The reference here: its own start script, `start.sh standard models/ 9600` (see
# docs/benchmarks.md), with the project's models/ as its model cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --locked -q
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
TRIALS="${TRIALS:-2}"
CONCURRENCY="${CONCURRENCY:-16}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-15}"
PORT="${WF_PORT:-9102}"
OUT=bench-results/workflows
BIN=target/release/cvserve
mkdir -p "$OUT"

if [ -z "${RENDER_ONLY:-}" ]; then
IMAGES=$(mktemp -d)
trap 'rm -rf "$IMAGES"; kill ${SERVER:-} 2>/dev/null || true' EXIT
mkdir -p "$IMAGES/dog" "$IMAGES/kite"
cp tests/fixtures/images/dog.jpg "$IMAGES/dog/"
cp tests/fixtures/images/kite.jpg "$IMAGES/kite/"
PRELOAD_MODELS=coco/1,imagenet/1 "$BIN" serve --host 127.0.0.1 --port "$PORT" --model-cache-dir models \
  >/dev/null 2>"$OUT/server.log" &
SERVER=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/readiness" >/dev/null && break
  sleep 0.2
done
run() { # url label images route [workflow]
  local url=$1 label=$2 images=$3 route=$4 wf=${5:-}
  local args=(--url "$url" --model coco/1 --images "$IMAGES/$images" --route "$route"
    --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_TRIAL" --warmup 10 --timeout 120
    --json "$OUT/trial.json")
  [ -n "$wf" ] && args+=(--workflow "benches/workflows/$wf.json")
  "$BIN" bench "${args[@]}" >/dev/null
  python3 - "$OUT/trial.json" "$OUT/$label.json" <<'PY'
import json, os, sys
new = json.load(open(sys.argv[1]))
old = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
if old is None or new["images_per_second"] > old["images_per_second"]:
    json.dump(new, open(sys.argv[2], "w"))
PY
}
CASES="${CASES:-route-dog:dog:infer: detect:dog:workflow:detect crop_classify:dog:workflow:crop_classify route-kite:kite:infer: sliced:kite:workflow:sliced}"
for c in $CASES; do rm -f "$OUT/server-${c%%:*}.json" "$OUT/peer-${c%%:*}.json"; done
for t in $(seq "$TRIALS"); do
  for c in $CASES; do
    IFS=: read -r label images route wf <<<"$c"
    echo "trial $t: $label on cvserve" >&2
    run "http://127.0.0.1:$PORT" "server-$label" "$images" "$route" "$wf"
    if [ -n "${PEER_URL:-}" ]; then
      echo "trial $t: $label on $PEER_URL" >&2
      run "$PEER_URL" "peer-$label" "$images" "$route" "$wf"
    fi
  done
done
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
def load(name):
    p = f"{out}/{name}.json"
    return json.load(open(p)) if os.path.exists(p) else None
rows = [("detect-only workflow (coco/1, dog.jpg)", "detect", "route-dog"),
        ("detect -> crop -> classify -> replace (one crop, dog.jpg)", "crop_classify", "route-dog"),
        ("sliced detection, 6 tiles of 640 (kite.jpg, 1352x900)", "sliced", "route-kite")]
lines = [f"Machine: {os.cpu_count()} cores, {cpu}. `cvserve bench`, closed loop, "
         f"{os.environ.get('CONCURRENCY', '16')} clients, best of the trials; 200 answers counted.", "",
         "| workload | cvserve img/s (p50 ms) | cvserve model route img/s | workflow / route | reference img/s (p50 ms) | reference model route img/s | cvserve / reference |",
         "|---|---|---|---|---|---|---|"]
fmt = lambda r: f"{r['images_per_second']:.1f} ({r['latency_ms']['p50']:.0f})" if r else "-"
for name, wf, route in rows:
    s, sr, p, pr = load(f"server-{wf}"), load(f"server-{route}"), load(f"peer-{wf}"), load(f"peer-{route}")
    ratio = lambda a, b: f"{a['images_per_second'] / b['images_per_second']:.2f}" if a and b and b["images_per_second"] else "-"
    lines.append(f"| {name} | {fmt(s)} | {sr['images_per_second']:.1f} | {ratio(s, sr)} | {fmt(p)} | "
                 f"{pr['images_per_second']:.1f} | {ratio(s, p)}× |" if pr else
                 f"| {name} | {fmt(s)} | {sr['images_per_second']:.1f} | {ratio(s, sr)} | {fmt(p)} | - | {ratio(s, p)} |")
for wf in ("detect", "crop_classify", "sliced"):
    for who in ("server", "peer"):
        r = load(f"{who}-{wf}")
        if r and r.get("by_status") and set(r["by_status"]) != {"200"}:
            lines.append(f"\n{who} {wf}: answers {r['by_status']}")
open(f"{out}/../workflow_table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
