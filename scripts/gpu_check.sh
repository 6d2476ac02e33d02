#!/usr/bin/env bash
# Trust a GPU box: serves the bundled models on CPU, on CUDA, and on TensorRT where its
# libraries are present; checks that the GPU answers agree with the CPU answers (tolerance
# below); measures each over HTTP (closed loop, 16 clients) and the bare model's ceiling on
# the GPU (instances x batch); prints the table. Writes everything under $OUT (default
# bench-results/gpu).
#
#   ./build.sh            # on the GPU machine: fetches the GPU flavour (or CVSERVE_GPU=1)
#   scripts/gpu_check.sh
#   MODELS="coco/1" PROVIDERS="cuda" SECONDS_PER_TRIAL=5 CEILING_SECONDS=2 scripts/gpu_check.sh
#   taskset -c 0-7 scripts/gpu_check.sh   # the target box's 8 cores on a bigger machine
#   SERVER_CORES=0-7 CLIENT_CORES=8-15 scripts/gpu_check.sh   # server and clients apart
#
# On the GPU providers each model is also swept over concurrency (SWEEP, default 16 64 256
# 1000: closed loops of that many clients, REQUEST_TIMEOUT_S=60 so that 1,000 at once are
# queued rather than refused), the load generator on CLIENT_CORES and the server on
# SERVER_CORES (on a machine of 16 cores or more, by default 8-15 and 0-7: the target box's
# 8 cores for the server). Beside the GPU's bare ceiling the sweep table gives the front-end
# bound: 8 cores / the server's front-end CPU per image (its stage counters).
#
# Agreement: every CPU box scoring at least 0.05 above the threshold has a box of the same
# class on the GPU with IoU >= 0.90 and confidence within 0.02 (CUDA, FP32), or IoU >= 0.85
# and confidence within 0.05 (TensorRT, FP16 by default); and the other way round.
# Classification: the same top class, confidence within 0.02 (0.05 on TensorRT).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN="${CVSERVE_BIN:-}"
if [ -z "$BIN" ]; then
  if [ -x target/release/cvserve ]; then BIN=$ROOT/target/release/cvserve; else BIN=$(command -v cvserve); fi
fi
VER="${ORT_VERSION:-1.31.1}"
if [ -z "${ORT_DYLIB_PATH:-}" ] && [ -f "vendor/onnxruntime-gpu/libonnxruntime.so.$VER" ]; then
  export ORT_DYLIB_PATH=$ROOT/vendor/onnxruntime-gpu/libonnxruntime.so.$VER
  export LD_LIBRARY_PATH="$ROOT/vendor/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
: "${ORT_DYLIB_PATH:?the GPU build of ONNX Runtime: run CVSERVE_GPU=1 ./build.sh, or set ORT_DYLIB_PATH}"
MODELS_DIR="${CVSERVE_MODELS:-$ROOT/models}"
IMAGES="${CVSERVE_IMAGES:-$ROOT/tests/fixtures/images}"
MODELS="${MODELS:-coco/1 shapes-seg/1 imagenet/1}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-10}"
OUT="${OUT:-$ROOT/bench-results/gpu}"
PORT="${GPU_CHECK_PORT:-9301}"
SWEEP="${SWEEP:-16 64 256 1000}"
# Server and clients apart by default where this process may use CPUs 0-15 or more.
allowed=$(taskset -pc $$ 2>/dev/null | sed 's/.*: //')
if [[ "$allowed" =~ ^0-([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 15 ]; then
  SERVER_CORES="${SERVER_CORES:-0-7}" CLIENT_CORES="${CLIENT_CORES:-8-15}"
fi
# Command prefixes that pin to those cores (taskset execs the command: same pid).
server_on=() client_on=()
[ -n "${SERVER_CORES:-}" ] && server_on=(taskset -c "$SERVER_CORES")
[ -n "${CLIENT_CORES:-}" ] && client_on=(taskset -c "$CLIENT_CORES")
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo "no nvidia-smi" > "$OUT/gpu.txt"
echo "GPU: $(cat "$OUT/gpu.txt")"
if [ -z "${PROVIDERS:-}" ]; then
  PROVIDERS="cpu cuda"
  trt_lib=$(ldconfig -p 2>/dev/null | grep -c "libnvinfer.so.10" || true)
  for d in ${LD_LIBRARY_PATH//:/ }; do [ -e "$d/libnvinfer.so.10" ] && trt_lib=1; done
  [ "${trt_lib:-0}" != 0 ] && PROVIDERS="$PROVIDERS tensorrt"
fi
case " $PROVIDERS " in *" cpu "*) ;; *) PROVIDERS="cpu $PROVIDERS" ;; esac
echo "providers: $PROVIDERS; models: $MODELS"

for p in $PROVIDERS; do
  mkdir -p "$OUT/$p"
  EXECUTION_PROVIDERS=$p MODEL_CACHE_DIR="$MODELS_DIR" PRELOAD_MODELS="$(echo $MODELS | tr ' ' ,)" \
    REQUEST_TIMEOUT_S="${REQUEST_TIMEOUT_S:-60}" \
    "${server_on[@]}" "$BIN" serve --host 127.0.0.1 --port "$PORT" > "$OUT/$p/server.out" 2> "$OUT/$p/server.log" &
  pid=$!
  ready=0
  for _ in $(seq 1200); do   # TensorRT builds its engines before readiness: allow 10 minutes
    if curl -sf "127.0.0.1:$PORT/readiness" >/dev/null; then ready=1; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
  done
  if [ $ready = 0 ]; then echo "$p: the server did not become ready; see $OUT/$p/server.log" >&2; kill $pid 2>/dev/null || true; continue; fi
  curl -s "127.0.0.1:$PORT/info" > "$OUT/$p/info.json"
  curl -s "127.0.0.1:$PORT/healthz" > "$OUT/$p/healthz.json"
  for m in $MODELS; do
    d="$OUT/$p/answers/$(echo "$m" | tr / -)"; mkdir -p "$d"
    case $m in shapes-*) imgs="${CVSERVE_SAMPLES:-$ROOT/tests/fixtures/samples/shapes}" ;; *) imgs=$IMAGES ;; esac
    [ -d "$imgs" ] || imgs=$IMAGES
    for f in "$imgs"/*.jpg; do
      curl -s -F "file=@$f" "127.0.0.1:$PORT/$m" > "$d/$(basename "$f" .jpg).json"
    done
    l=$(echo "$m" | tr / -)
    "${client_on[@]}" "$BIN" bench --url "http://127.0.0.1:$PORT" --model "$m" --images "$imgs" --concurrency 16 \
      --duration "$SECONDS_PER_TRIAL" --warmup 20 --json "$OUT/$p/bench-$l.json" >/dev/null
    "${client_on[@]}" "$BIN" bench --url "http://127.0.0.1:$PORT" --model "$m" --images "$imgs" --concurrency 1 \
      --duration "$SECONDS_PER_TRIAL" --warmup 5 --json "$OUT/$p/bench1-$l.json" >/dev/null
    if [ "$p" != cpu ]; then
      for c in $SWEEP; do
        "${client_on[@]}" "$BIN" bench --url "http://127.0.0.1:$PORT" --model "$m" --images "$imgs" \
          --concurrency "$c" --duration "$SECONDS_PER_TRIAL" --warmup "$c" --timeout 120 \
          --json "$OUT/$p/sweep-$l-$c.json" >/dev/null || true
      done
    fi
  done
  kill -TERM $pid; wait $pid 2>/dev/null || true
  for m in $MODELS; do
    if [ "$p" = cpu ]; then
      # the CPU reference row gets its bare ceiling too (instances x intra-op threads x batch
      # within this process's cores: run the script under `taskset -c 0-7` for an 8-core table)
      search=${CPU_CEILING_SEARCH:-"--instances 2,4,8 --threads 1,2,4 --batches 1,2"}
    else
      search=${GPU_CEILING_SEARCH:-"--threads 1 --instances 1,2,4 --batches 1,2,4,8,16 --cores 64"}
    fi
    # shellcheck disable=SC2086
    EXECUTION_PROVIDERS=$p "${server_on[@]}" "$BIN" ceiling --model "$m" --model-cache-dir "$MODELS_DIR" $search \
      --seconds "${CEILING_SECONDS:-3}" \
      > "$OUT/$p/ceiling-$(echo "$m" | tr / -).json" 2>> "$OUT/$p/ceiling.log" || true
  done
done

python3 - "$OUT" "$PROVIDERS" $MODELS <<'PY'
import glob, json, os, sys
out, providers, models = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
def iou(a, b):
    ax0, ay0, ax1, ay1 = a["x"] - a["width"] / 2, a["y"] - a["height"] / 2, a["x"] + a["width"] / 2, a["y"] + a["height"] / 2
    bx0, by0, bx1, by1 = b["x"] - b["width"] / 2, b["y"] - b["height"] / 2, b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
    iw, ih = max(0, min(ax1, bx1) - max(ax0, bx0)), max(0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union > 0 else 0
def agree(ref, got, min_iou, dconf, threshold=0.4):
    problems = []
    if "top" in ref:
        if ref["top"] != got.get("top") or abs(ref["confidence"] - got.get("confidence", -1)) > dconf:
            problems.append(f"top {ref['top']} {ref['confidence']:.3f} vs {got.get('top')} {got.get('confidence')}")
        return problems
    for a, b, what in ((ref, got, "missing on GPU"), (got, ref, "extra on GPU")):
        for p in a.get("predictions", []):
            if p["confidence"] < threshold + 0.05:
                continue
            if not any(q["class"] == p["class"] and iou(p, q) >= min_iou and abs(q["confidence"] - p["confidence"]) <= dconf
                       for q in b.get("predictions", [])):
                problems.append(f"{what}: {p['class']} {p['confidence']:.3f} at ({p['x']:.0f},{p['y']:.0f})")
    return problems
ok = True
gpu = open(f"{out}/gpu.txt").read().strip()
lines = [f"GPU: {gpu}", "", "| model | provider | served img/s (16 clients) | 1 client p50 ms | bare best img/s (instances x batch) | ratio | answers vs CPU |",
         "|---|---|---|---|---|---|---|"]
for m in models:
    l = m.replace("/", "-")
    for p in providers:
        b = load(f"{out}/{p}/bench-{l}.json")
        b1 = load(f"{out}/{p}/bench1-{l}.json")
        c = load(f"{out}/{p}/ceiling-{l}.json")
        verdict = "reference"
        if p != "cpu":
            min_iou, dconf = (0.85, 0.05) if p == "tensorrt" else (0.90, 0.02)
            bad = []
            files = sorted(glob.glob(f"{out}/cpu/answers/{l}/*.json"))
            for f in files:
                ref, got = load(f), load(f.replace("/cpu/", f"/{p}/"))
                if ref is None or got is None:
                    bad.append(f"{os.path.basename(f)}: no answer")
                    continue
                bad += [f"{os.path.basename(f)}: {x}" for x in agree(ref, got, min_iou, dconf)]
            verdict = f"{len(files)} images agree" if not bad and files else f"{len(bad)} differences"
            if bad:
                ok = False
                print(f"{m} on {p}:", *bad[:10], sep="\n  ")
        served = f"{b['images_per_second']:.1f}" if b else "-"
        p50 = f"{b1['latency_ms']['p50']:.1f}" if b1 else "-"
        if c:
            best = f"{c['images_per_second']:.1f} ({c['best']['instances']} x b{c['best']['batch']})"
            ratio = f"{b['images_per_second'] / c['images_per_second']:.2f}" if b else "-"
        else:
            best, ratio = "-", "-"
        lines.append(f"| {m} | {p} | {served} | {p50} | {best} | {ratio} | {verdict} |")
sweep = [int(c) for c in os.environ.get("SWEEP", "16 64 256 1000").split()]
lines += ["", "Concurrency sweep (img/s, p50 ms); front-end CPU per image at the largest load, and "
          "the bound it puts on 8 cores: 8000 / it.", "",
          "| model | provider | " + " | ".join(f"{c} clients" for c in sweep)
          + " | front-end CPU ms/img | front-end bound, 8 cores img/s | bare GPU img/s |",
          "|---|---|" + "---|" * (len(sweep) + 3)]
for m in models:
    l = m.replace("/", "-")
    for p in providers:
        if p == "cpu":
            continue
        cells, front = [], None
        for c in sweep:
            r = load(f"{out}/{p}/sweep-{l}-{c}.json")
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{r['images_per_second']:.0f} ({r['latency_ms']['p50']:.0f} ms)")
            front = r.get("stage_cpu_ms_per_image", {}).get("front_end", front)
        c = load(f"{out}/{p}/ceiling-{l}.json")
        lines.append(f"| {m} | {p} | " + " | ".join(cells)
                     + (f" | {front:.2f} | {8000 / front:.0f}" if front else " | - | -")
                     + (f" | {c['images_per_second']:.0f} |" if c else " | - |"))
open(f"{out}/gpu_table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
PY
