"""Starting a cvserve for the measuring scripts: on an ephemeral port, the bundled models,
and waiting until it is ready. Imported by scripts/*.py (run from anywhere)."""

import os
import subprocess
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(binary, env):
    """Starts `binary serve` with the bundled models and `env` on top; returns the process
    and its base URL once it listens (stdout is drained in the background)."""
    full = dict(os.environ, HOST="127.0.0.1", PORT="0", GRPC_PORT="0", LOG_LEVEL="warn",
                MODEL_CACHE_DIR=os.path.join(REPO, "models"))
    full.setdefault("ORT_DYLIB_PATH",
                    os.path.join(REPO, "vendor/onnxruntime/libonnxruntime.so.1.31.1"))
    full.update(env)
    proc = subprocess.Popen([binary, "serve"], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    base = None
    for line in proc.stdout:
        if line.startswith("cvserve listening on "):
            base = line.split()[-1]
            break
    if base is None:
        raise SystemExit(f"{binary} exited before listening")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, base


def wait_ready(base, limit=300):
    """Waits until `base`'s /readiness answers 200."""
    until = time.time() + limit
    while time.time() < until:
        try:
            with urllib.request.urlopen(base + "/readiness", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} not ready in {limit} s")
