#!/usr/bin/env python3
"""How a fresh server answers the seeds' burst: 1,000 requests at once, no warm-up traffic.

For each binary (alternating, --rounds times): start it on the bundled models with only
MODEL preloaded, wait for /readiness, send the burst with `cvserve bench` (the first
binary's), and report the answers by status and how fast the refusals came (429/503
latency p50/p99). A fresh server has measured its model only at warm-up: this shows whether
its waiting room refuses at the door or lets the burst wait until its deadline.

    scripts/fresh_burst.py --binary OLD --binary NEW [--model coco/1] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import serverlib


def one(binary, bench, model, burst, timeout_s):
    server, url = serverlib.start(binary, {"PRELOAD_MODELS": model,
                                           "REQUEST_TIMEOUT_S": str(timeout_s)})
    try:
        serverlib.wait_ready(url)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([bench, "bench", "--url", url, "--model", model,
                            "--concurrency", str(burst), "--requests", str(burst),
                            "--warmup", "0", "--json", out.name],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return json.load(open(out.name))
    finally:
        server.terminate()
        server.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", action="append", required=True)
    ap.add_argument("--model", default="coco/1")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    a = ap.parse_args()
    bench = a.binary[0]
    print(f"{a.burst} requests at once on a fresh server, {a.model}, "
          f"REQUEST_TIMEOUT_S={a.timeout_s:g}, {os.cpu_count()} cores")
    print("| binary | round | answers | refused p50 / p99 ms | with Retry-After | served p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in range(a.rounds):
        for b in a.binary:
            rep = one(b, bench, a.model, a.burst, a.timeout_s)
            answers = ", ".join(f"{n} x {k}" for k, n in sorted(rep["by_status"].items()))
            ref, ok = rep["refused_latency_ms"], rep["latency_ms"]
            print(f"| {os.path.basename(b)} | {r + 1} | {answers} | {ref['p50']:.0f} / "
                  f"{ref['p99']:.0f} | {rep['refused_with_retry_after']} | "
                  f"{ok['p50']:.0f} / {ok['p99']:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
