#!/usr/bin/env python3
"""What a model load costs the other models' requests.

Starts the server with SERVED preloaded, then measures SERVED's latency (`cvserve bench`,
--clients closed-loop clients, --seconds each) three ways: with nothing loading, while
LOADED loads (its load made --load-s slower with the test-only CVSERVE_INJECT_LOAD_DELAY_MS,
as a TensorRT engine build is), and the first-request latency of a third model, COLD, asked
for while LOADED is still loading. A load that held a global lock would stall COLD for the
whole of LOADED's load.

    scripts/load_stall.py [--binary target/release/cvserve] [--served shapes-cls/1]
        [--loaded coco/1] [--cold shapes-det/1] [--load-s 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import serverlib

ROOT = serverlib.REPO


def post(url, body, timeout=120):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.time() - t


def bench(binary, url, model, clients, seconds):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "bench", "--url", url, "--model", model, "--concurrency",
                        str(clients), "--duration", str(seconds), "--warmup", "0",
                        "--json", out.name], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return json.load(open(out.name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/cvserve"))
    ap.add_argument("--served", default="shapes-cls/1")
    ap.add_argument("--loaded", default="coco/1")
    ap.add_argument("--cold", default="shapes-det/1")
    ap.add_argument("--load-s", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    server, url = serverlib.start(a.binary, {
        "PRELOAD_MODELS": a.served, "CVSERVE_INJECT_LOAD_DELAY_MS": str(int(a.load_s * 1000)),
        "CVSERVE_INJECT_MODEL": a.loaded})
    try:
        serverlib.wait_ready(url)
        quiet = bench(a.binary, url, a.served, a.clients, a.seconds)
        adding = threading.Thread(target=post, args=(url + "/model/add", {"model_id": a.loaded}))
        started = time.time()
        adding.start()
        time.sleep(0.5)
        cold = post(url + "/model/add", {"model_id": a.cold})
        during = bench(a.binary, url, a.served, a.clients, a.seconds)
        still_loading = adding.is_alive()
        adding.join()
        load_s = time.time() - started
    finally:
        server.terminate()
        server.wait(30)
    print(f"{a.served} served by {a.clients} clients, {a.seconds:g} s each; {a.loaded} loading "
          f"for {load_s:.1f} s ({a.load_s:g} s of it injected); {os.cpu_count()} cores")
    print("| | img/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, r in (("nothing loading", quiet), (f"while {a.loaded} loads", during)):
        lat = r["latency_ms"]
        print(f"| {name} | {r['images_per_second']:.1f} | {lat['p50']:.1f} | {lat['p99']:.1f} |")
    print(f"\n{a.cold} asked for while {a.loaded} loaded: {cold[0]} after {cold[1]:.2f} s "
          f"(the bench ran while it was {'still ' if still_loading else 'no longer '}loading)")


if __name__ == "__main__":
    sys.exit(main())
