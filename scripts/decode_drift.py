#!/usr/bin/env python3
"""The drift of reduced-scale JPEG decoding (DECODE_REDUCED_SCALE): every golden request of
tests/fixtures/golden (Roboflow Inference 1.8.3's answers) sent to two cvserve servers, one
decoding every JPEG whole (the default, as Roboflow does) and one at reduced DCT scale, and
each answer compared with the other and with the golden one. Prints a Markdown table per
model: images decoded smaller, boxes matched, the smallest IoU and largest confidence change
between the two servers' boxes, boxes found by one server only, and for classification
whether the top class is the same (and agrees with Roboflow's).

    scripts/decode_drift.py [BINARY]      # default target/release/cvserve

Needs the derived test models (scripts/setup.sh --sdk).
"""

import base64
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serverlib  # noqa: E402

REPO = serverlib.REPO
GOLDEN = os.path.join(REPO, "tests/fixtures/golden")


def repository():
    """The bundled models, the derived ones and the preprocessing variants of coco/1 in one
    model cache (links)."""
    root = tempfile.mkdtemp(prefix="cvserve-drift-")
    for base in ("models", "vendor/test-models"):
        for m in os.listdir(os.path.join(REPO, base)):
            if os.path.isdir(os.path.join(REPO, base, m, "1")):
                os.symlink(os.path.join(REPO, base, m), os.path.join(root, m))
    pre = os.path.join(REPO, "tests/fixtures/models-pre")
    for m in os.listdir(pre):
        if not os.path.isdir(os.path.join(pre, m, "1")):
            continue
        dst = os.path.join(root, m, "1")
        shutil.copytree(os.path.join(pre, m, "1"), dst)
        os.symlink(os.path.join(REPO, "models/coco/1/weights.onnx"), os.path.join(dst, "weights.onnx"))
    return root


def image_path(model_id, name):
    if model_id.startswith("shapes-"):
        return os.path.join(REPO, "tests/fixtures/samples/shapes", name)
    return os.path.join(REPO, "tests/fixtures/images", name)


def post(base, route, body):
    """The answer, waiting out 503s (a model still loading: Retry-After)."""
    for _ in range(60):
        req = urllib.request.Request(base + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            time.sleep(float(e.headers.get("Retry-After") or 1))
    raise SystemExit(f"{base}{route}: still 503 after a minute")


def box(p):
    return (p["x"] - p["width"] / 2, p["y"] - p["height"] / 2,
            p["x"] + p["width"] / 2, p["y"] + p["height"] / 2)


def iou(a, b):
    a, b = box(a), box(b)
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(ours, theirs):
    """Greedy pairs of the same class, best IoU first (IoU > 0.5); the unpaired of each."""
    pairs = sorted(((iou(a, b), i, j) for i, a in enumerate(ours) for j, b in enumerate(theirs)
                    if a["class"] == b["class"]), reverse=True)
    used_a, used_b, out = set(), set(), []
    for v, i, j in pairs:
        if v > 0.5 and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((ours[i], theirs[j], v))
    return out, len(ours) - len(used_a), len(theirs) - len(used_b)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target/release/cvserve")
    root = repository()
    models = sorted(d[:-2] for d in os.listdir(GOLDEN) if d.endswith("-1"))
    env = {"MODEL_CACHE_DIR": root, "REQUEST_TIMEOUT_S": "120", "MAX_ACTIVE_MODELS": "32"}
    servers = {}
    for name, reduced in (("full", "false"), ("reduced", "true")):
        servers[name] = serverlib.start(binary, dict(env, DECODE_REDUCED_SCALE=reduced))
    try:
        for _, base in servers.values():
            serverlib.wait_ready(base)
        print("| model | images | decoded smaller | boxes paired | min IoU | max conf change "
              "| boxes of one only | top-1 same (and as Roboflow) |")
        print("|---|---|---|---|---|---|---|---|")
        for model in models:
            rows = {"images": 0, "paired": 0, "iou": 1.0, "conf": 0.0,
                    "alone": 0, "top": 0, "top_rf": 0, "cls": False}
            for f in sorted(os.listdir(os.path.join(GOLDEN, f"{model}-1"))):
                if "." in f[:-5]:  # parameter variants (e.g. mask_decode_mode) decode alike
                    continue
                g = json.load(open(os.path.join(GOLDEN, f"{model}-1", f)))
                req = g["request"]
                data = open(image_path(req["model_id"], req["image"]), "rb").read()
                body = {"model_id": req["model_id"],
                        "image": {"type": "base64", "value": base64.b64encode(data).decode()}}
                a = post(servers["full"][1], req["route"], body)
                b = post(servers["reduced"][1], req["route"], body)
                rows["images"] += 1
                if "top" in a:
                    rows["cls"] = True
                    rows["top"] += int(a["top"] == b["top"])
                    rows["top_rf"] += int(b["top"] == g["response"].get("top"))
                    rows["conf"] = max(rows["conf"], abs(a["confidence"] - b["confidence"]))
                    continue
                pairs, alone_a, alone_b = match(a["predictions"], b["predictions"])
                rows["paired"] += len(pairs)
                rows["alone"] += alone_a + alone_b
                for p, q, v in pairs:
                    rows["iou"] = min(rows["iou"], v)
                    rows["conf"] = max(rows["conf"], abs(p["confidence"] - q["confidence"]))
            smaller = smaller_count(servers["reduced"][1], model)
            top = (f"{rows['top']}/{rows['images']} ({rows['top_rf']}/{rows['images']})"
                   if rows["cls"] else "")
            paired = "" if rows["cls"] else str(rows["paired"])
            min_iou = "" if rows["cls"] or not rows["paired"] else f"{rows['iou']:.3f}"
            alone = "" if rows["cls"] else str(rows["alone"])
            print(f"| {model}/1 | {rows['images']} | {smaller} | {paired} | {min_iou} | "
                  f"{rows['conf']:.3f} | {alone} | {top} |")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def smaller_count(base, model):
    """Images of `model` the reduced server decoded below full size, from its metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    prefix = f'cvserve_decode_reduced_total{{model="{model}/1"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix):]))
    return 0


if __name__ == "__main__":
    main()
