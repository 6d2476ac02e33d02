#!/usr/bin/env python3
"""Where the server's time goes under load: for each model, a closed-loop run of `cvserve
bench` (16 clients, one photo) while the server's own counters are read from
/proc/PID/stat before and after: CPU per image, the share of it in the kernel, minor page
faults per image. Then the resident memory (RSS) idle, at the peak, and 15 s after the load,
and the CPU the idle server uses over 5 s (it must be 0).

    scripts/server_cost.py [--binary target/release/cvserve] [--seconds 10] [--env K=V ...]
    scripts/server_cost.py --binary /tmp/cvserve-old --binary target/release/cvserve
    scripts/server_cost.py --ceiling      # also the bare model (`cvserve ceiling`) and the ratio

With several binaries, each is measured in turn in the same run (same machine state), and
the table has a row per binary and model. Standard library only.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("imagenet/1", "tests/fixtures/images/chelsea.jpg"),
    ("coco/1", "tests/fixtures/images/dog.jpg"),
    ("shapes-seg/1", "tests/fixtures/samples/shapes/000000.jpg"),
]
TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    """(user s, system s, minor faults) of the process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3, minflt 10, utime 14, stime 15 (1-based in proc(5)).
    return int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[7])


def rss_mib(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def start(binary, port, env):
    e = dict(os.environ, PORT=str(port), HOST="127.0.0.1", LOG_LEVEL="warn", **env)
    e.setdefault("ORT_DYLIB_PATH", f"{REPO}/vendor/onnxruntime/libonnxruntime.so.1.31.1")
    proc = subprocess.Popen([binary, "serve"], cwd=REPO, env=e, stdout=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readiness", timeout=1) as r:
                if r.status == 200:
                    return proc
        except Exception:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{binary} did not become ready")


def bench(binary, port, model, image, seconds, clients):
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(REPO, image), d)
        out = os.path.join(d, "report.json")
        subprocess.run(
            [binary, "bench", "--url", f"http://127.0.0.1:{port}", "--model", model,
             "--images", d, "--concurrency", str(clients), "--duration", str(seconds),
             "--warmup", "20", "--json", out],
            cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(out))


def measure(binary, args, env):
    port = args.port
    proc = start(binary, port, env)
    pid = proc.pid
    rows = []
    try:
        time.sleep(2)
        idle = rss_mib(pid)
        for model, image in CASES:
            if args.models and model not in args.models:
                continue
            # Warm the model and its instances first, outside the counted window.
            bench(binary, port, model, image, 2, args.clients)
            u0, s0, f0 = stat(pid)
            report = bench(binary, port, model, image, args.seconds, args.clients)
            u1, s1, f1 = stat(pid)
            n = report["by_status"].get("200", 0)
            cpu = (u1 - u0) + (s1 - s0)
            rows.append({
                "binary": binary, "model": model, "image": os.path.basename(image),
                "img_per_s": report["images_per_second"],
                "p50_ms": report["latency_ms"]["p50"],
                "cpu_ms_per_image": 1000 * cpu / max(n, 1),
                "kernel_share": (s1 - s0) / cpu if cpu else 0.0,
                "minor_faults_per_image": (f1 - f0) / max(n, 1),
                "statuses": report["by_status"],
            })
        peak = rss_mib(pid, "VmHWM:")
        time.sleep(15)
        after = rss_mib(pid)
        u0, s0, _ = stat(pid)
        time.sleep(5)
        u1, s1, _ = stat(pid)
        idle_cpu = (u1 - u0) + (s1 - s0)
    finally:
        proc.terminate()
        proc.wait()
    return rows, {"binary": binary, "idle_rss_mib": idle, "peak_rss_mib": peak,
                  "rss_15s_after_mib": after, "idle_cpu_s_over_5s": idle_cpu}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", action="append")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--port", type=int, default=9131)
    p.add_argument("--model", dest="models", action="append")
    p.add_argument("--env", action="append", default=[], help="K=V for the server")
    p.add_argument("--ceiling", action="store_true",
                   help="after the server runs, search each model's bare ceiling (server stopped)")
    p.add_argument("--json")
    args = p.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    binaries = args.binary or [os.path.join(REPO, "target/release/cvserve")]
    all_rows, memory = [], []
    for b in binaries:
        rows, mem = measure(b, args, env)
        all_rows += rows
        memory.append(mem)
    bare = {}
    if args.ceiling:
        e = dict(os.environ)
        e.setdefault("ORT_DYLIB_PATH", f"{REPO}/vendor/onnxruntime/libonnxruntime.so.1.31.1")
        for model in sorted({r["model"] for r in all_rows}):
            out = subprocess.run([binaries[-1], "ceiling", "--model", model, "--seconds", "3"],
                                 cwd=REPO, env=e, check=True, capture_output=True, text=True).stdout
            bare[model] = json.loads(out)["images_per_second"]
    print("| binary | model (photo) | img/s | bare best img/s | ratio | p50 ms | server CPU ms/img | in kernel | minor faults/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        b = bare.get(r["model"])
        r["bare_img_per_s"] = b
        print(f"| {os.path.basename(r['binary'])} | {r['model']} ({r['image']}) | {r['img_per_s']:.1f} "
              f"| {b or float('nan'):.1f} | {r['img_per_s'] / b if b else float('nan'):.2f} "
              f"| {r['p50_ms']:.0f} | {r['cpu_ms_per_image']:.1f} | {100 * r['kernel_share']:.1f} % "
              f"| {r['minor_faults_per_image']:.0f} |")
    print()
    print("| binary | idle RSS MiB | peak RSS MiB | RSS 15 s after MiB | idle CPU s over 5 s |")
    print("|---|---|---|---|---|")
    for m in memory:
        print(f"| {os.path.basename(m['binary'])} | {m['idle_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} "
              f"| {m['rss_15s_after_mib']:.0f} | {m['idle_cpu_s_over_5s']:.2f} |")
    if args.json:
        json.dump({"rows": all_rows, "memory": memory}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
