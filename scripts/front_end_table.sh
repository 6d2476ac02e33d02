#!/usr/bin/env bash
# The front end's ceiling: cvserve serving tiny-coco/1 (coco/1's input and output layout, a
# network of almost no cost: scripts/derive_test_models.py) at high concurrency, so what it
# measures is the front end alone: HTTP, JSON, base64, decode, preprocessing, batching,
# postprocessing and the answer. For the nine test photos re-encoded at VGA, 720p and 1080p
# (quality 90, 4:2:0), beside the server's decode of the same files alone
# (`cvserve decode-time`: libjpeg-turbo through the server's own path, one thread):
#   - img/s served (the load generator on the same cores),
#   - server CPU per image (the kernel's per-thread counts) and its front-end stages,
#   - the ceiling per core: 1000 / server CPU ms per image,
#   - the GPU feed bound of 8 cores: 8000 / front-end CPU ms per image.
# Writes bench-results/front_end.md and .json.
#
#   scripts/front_end_table.sh
#   SECONDS_PER_TRIAL=10 CONCURRENCY=64 SERVE_ENV="DECODE_REDUCED_SCALE=true" scripts/front_end_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --sdk >/dev/null
cargo build --release --locked -q
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/vendor/onnxruntime/libonnxruntime.so.${ORT_VERSION:-1.31.1}}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-12}"
CONCURRENCY="${CONCURRENCY:-64}"
PORT="${FRONT_END_PORT:-9102}"
OUT=bench-results
BIN=target/release/cvserve
mkdir -p "$OUT/front-end-images"

# The photos at each size (made once).
vendor/sdk-venv/bin/python - "$OUT/front-end-images" tests/fixtures/images/*.jpg <<'PY'
import os, sys
from PIL import Image
out, photos = sys.argv[1], sys.argv[2:]
for name, w, h in (("vga", 640, 480), ("720p", 1280, 720), ("1080p", 1920, 1080)):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    for p in photos:
        dst = os.path.join(d, os.path.basename(p))
        if not os.path.exists(dst):
            Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR).save(dst, quality=90)
PY

# shellcheck disable=SC2086
env ${SERVE_ENV:-} "$BIN" serve --host 127.0.0.1 --port "$PORT" --grpc-port 0 \
  --model-cache-dir vendor/test-models --preload-models tiny-coco/1 >/dev/null 2>"$OUT/front-end-server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/readiness" >/dev/null && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/readiness" >/dev/null \
  || { echo "front end: the server did not become ready: $OUT/front-end-server.log" >&2; exit 1; }
for size in vga 720p 1080p; do
  echo "measuring the front end on $size photos ($CONCURRENCY clients, ${SECONDS_PER_TRIAL}s)" >&2
  "$BIN" bench --url "http://127.0.0.1:$PORT" --model tiny-coco/1 --images "$OUT/front-end-images/$size" \
    --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_TRIAL" --warmup 50 \
    --json "$OUT/front-end-$size.json" >/dev/null
done
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT
for size in vga 720p 1080p; do
  "$BIN" decode-time --images "$OUT/front-end-images/$size" --input 416x416 > "$OUT/decode-$size.txt"
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
stages = ["http", "json", "base64", "decode", "preprocess", "postprocess", "answer"]
head = ("| photos | img/s served | server CPU ms/img | ceiling img/s per core | front-end CPU ms/img "
        "| of it: " + " / ".join(stages) + " | GPU feed bound, 8 cores img/s "
        "| decode alone ms (whole / reduced for 416) |")
lines = [f"Machine: {os.cpu_count()} cores; tiny-coco/1; the load generator on the same cores.",
         "", head, "|" + "---|" * (head.count("|") - 1)]
data = {}
for size in ("vga", "720p", "1080p"):
    r = json.load(open(f"{out}/front-end-{size}.json"))
    cpu = r["server_cpu_ms_per_image"]["total"]
    st = r["stage_cpu_ms_per_image"]
    front = st["front_end"]
    mean = open(f"{out}/decode-{size}.txt").read().strip().splitlines()[-1]
    whole, reduced = [float(x.split()[0]) for x in mean.split(":")[1].split(",")]
    lines.append(f"| {size} | {r['images_per_second']:.1f} | {cpu:.2f} | {1000 / cpu:.0f} "
                 f"| {front:.2f} | " + " / ".join(f"{st.get(s, 0):.2f}" for s in stages)
                 + f" | {8000 / front:.0f} | {whole:.2f} / {reduced:.2f} |")
    data[size] = {"bench": r, "decode_alone_ms": {"whole": whole, "reduced_416": reduced}}
open(f"{out}/front_end.md", "w").write("\n".join(lines) + "\n")
json.dump(data, open(f"{out}/front_end.json", "w"), indent=1)
print("\n".join(lines))
PY
