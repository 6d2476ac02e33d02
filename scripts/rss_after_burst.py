#!/usr/bin/env python3
"""Measures the server's resident memory (RSS) idle, at the peak of a burst of large
requests, and 30 s after the burst: memory taken by a burst must go back.

    scripts/rss_after_burst.py [--binary target/release/cvserve] [--clients 32] [--rounds 3]

Starts the server on a free port with the bundled models (PRELOAD_MODELS=coco/1), sends
`--clients` concurrent detection requests, each a 4000x3000 PNG (a few MB of base64, a
12-megapixel decode) plus a 30 MB JSON body of junk to /model/add (refused at 64 KiB), for
`--rounds` rounds, samples RSS from /proc every 50 ms, then waits `--settle` seconds and
prints one line of numbers (MiB). Standard library only.
"""

import argparse
import base64
import io
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import zlib

import serverlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid, field="RssAnon:"):
    """Resident memory of the process's heap (RssAnon). The ring is a shared file mapping,
    counted apart (RssFile/RssShmem): it is bounded by RING_SLOTS x RING_SLOT_PIXELS x 3 and
    reused, not allocated per request."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def noisy_png(w, h):
    """An RGB PNG of pseudo-random rows (compresses poorly, decodes at full cost)."""
    rows = bytearray()
    for y in range(h):
        block = os.urandom(1021)
        rows.append(0)
        rows += (block * (w * 3 // len(block) + 1))[: w * 3]
    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 1)) + chunk(b"IEND", b""))


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(REPO, "target/release/cvserve"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=30.0)
    args = ap.parse_args()

    proc, base = serverlib.start(args.binary, {
        "PRELOAD_MODELS": "coco/1", "REQUEST_TIMEOUT_S": "60", "RING_DIR": "/tmp",
        "LOG_LEVEL": "info"})
    try:
        serverlib.wait_ready(base)
        time.sleep(2)
        idle = rss_mib(proc.pid)

        png = noisy_png(4000, 3000)
        body = json.dumps({"model_id": "coco/1",
                           "image": {"type": "base64", "value": base64.b64encode(png).decode()}}).encode()
        junk = b'{"model_id": "' + b"x" * (30 << 20) + b'"}'
        peak = [idle]
        stop = threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(proc.pid))
                time.sleep(0.05)
        threading.Thread(target=sample, daemon=True).start()
        statuses = {}
        lock = threading.Lock()
        def client(i):
            for _ in range(args.rounds):
                url, b = ((base + "/infer/object_detection", body) if i % 4 else
                          (base + "/model/add", junk))
                s = post(url, b)
                with lock:
                    statuses[s] = statuses.get(s, 0) + 1
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst_s = time.time() - t0
        stop.set()
        after_end = rss_mib(proc.pid)
        time.sleep(args.settle)
        settled = rss_mib(proc.pid)
        print(json.dumps({
            "png_bytes": len(png), "body_bytes": len(body), "clients": args.clients,
            "rounds": args.rounds, "statuses": statuses, "burst_s": round(burst_s, 1),
            "heap_rss_mib": {"idle": round(idle), "peak": round(peak[0]),
                             "at_burst_end": round(after_end),
                             f"after_{int(args.settle)}s": round(settled)},
            "ring_rss_mib": round(rss_mib(proc.pid, "RssShmem:") + rss_mib(proc.pid, "RssFile:")),
        }))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
