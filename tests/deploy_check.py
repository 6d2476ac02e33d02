"""Checks deploy/ and the Dockerfiles against the server's defaults (called by tests/deploy.rs).

Renders the Kustomize base and GPU overlay with `kubectl kustomize`, validates every object
against the Kubernetes schemas (kubernetes-validate, strict), first proving that the
validator rejects a broken manifest; then checks that ports, probes, the grace period and
/dev/shm agree with the server's defaults, and that the Dockerfiles mirror build.sh/run.sh.
Exit status 0 when everything holds; every problem is printed.
"""
import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile

import yaml

ap = argparse.ArgumentParser()
ap.add_argument("--repo", required=True)
ap.add_argument("--kubectl", required=True)
ap.add_argument("--validator", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--drain-s", type=float, required=True)
ap.add_argument("--ring-bytes", type=int, required=True)
ap.add_argument("--max-inflight", type=int, required=True)
args = ap.parse_args()
problems = []


def check(cond, what):
    if not cond:
        problems.append(what)


def render(path):
    out = subprocess.run([args.kubectl, "kustomize", path], capture_output=True, text=True)
    if out.returncode != 0:
        problems.append(f"kubectl kustomize {path} failed: {out.stderr}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs, label):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
        name = f.name
    out = subprocess.run([args.validator, "--strict", "--quiet", name], capture_output=True, text=True)
    os.unlink(name)
    return out.returncode == 0, out.stdout + out.stderr


def quantity_bytes(q):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 1000, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    return int(m.group(1)) * units.get(m.group(2), 1)


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


k8s = os.path.join(args.repo, "deploy", "kubernetes")
variants = {"base": render(os.path.join(k8s, "base")), "gpu": render(os.path.join(k8s, "overlays", "gpu"))}

# The validator must be able to fail: a Deployment with a misspelled field is rejected.
base_deploy = by_kind(variants["base"], "Deployment")
if base_deploy:
    broken = copy.deepcopy(base_deploy[0])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    ok, _ = validate([broken], "broken")
    check(not ok, "kubernetes-validate accepted a Deployment with an unknown field: it checks nothing")

for label, docs in variants.items():
    kinds = sorted(d["kind"] for d in docs)
    check(kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
          f"{label}: unexpected objects {kinds}")
    ok, report = validate(docs, label)
    check(ok, f"{label}: schema validation failed:\n{report}")
    for dep in by_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        port = int(env.get("PORT", args.port))
        check(port == args.port, f"{label}: PORT {port} in the manifest, the server's default is {args.port}")
        check(ports.get("http") == port, f"{label}: container port {ports} is not the server's port {port}")
        for probe, path in (("readinessProbe", "/readiness"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path, f"{label}: {probe} path {get.get('path')} is not {path}")
            target = get.get("port")
            check(ports.get(target, target) == port, f"{label}: {probe} port {target} is not the server's {port}")
        drain = float(env.get("DRAIN_TIMEOUT_S", args.drain_s))
        check(drain == args.drain_s, f"{label}: DRAIN_TIMEOUT_S {drain} in the manifest, the server's default is {args.drain_s}")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0.0
        grace = pod.get("terminationGracePeriodSeconds", 30)
        check(grace > pause + drain,
              f"{label}: terminationGracePeriodSeconds {grace} <= preStop {pause} s + DRAIN_TIMEOUT_S {drain} s")
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        ring_dir = env.get("RING_DIR", "/dev/shm")
        check(mounts.get(ring_dir) in [v["name"] for v in shm], f"{label}: RING_DIR {ring_dir} is not a memory emptyDir")
        for v in shm:
            size = quantity_bytes(v["emptyDir"].get("sizeLimit", "0"))
            check(size >= args.ring_bytes,
                  f"{label}: /dev/shm sizeLimit {size >> 20} MiB is smaller than the default ring {args.ring_bytes >> 20} MiB")
        limit = quantity_bytes(c.get("resources", {}).get("limits", {}).get("memory", "0"))
        check(limit > args.ring_bytes, f"{label}: the memory limit does not even hold the ring (memory emptyDirs count)")
        check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{label}: not runAsNonRoot")
        if label == "gpu":
            check(c["resources"]["limits"].get("nvidia.com/gpu") == 1, "gpu: no nvidia.com/gpu: 1 limit")
    for svc in by_kind(docs, "Service"):
        check(svc["spec"]["ports"][0]["port"] == args.port, f"{label}: Service port is not {args.port}")
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        m = hpa["spec"]["metrics"][0]
        check(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "cvserve_inflight_requests",
              f"{label}: the HPA does not scale on cvserve_inflight_requests")
        target = quantity_bytes(m["pods"]["target"]["averageValue"])
        check(0 < target < args.max_inflight,
              f"{label}: HPA target {target} is not below MAX_INFLIGHT_REQUESTS {args.max_inflight} (pods would answer 429 first)")

# Prometheus Operator and KEDA objects (CRDs: not in the Kubernetes schemas) point at the
# same port, path and metric.
mon = render(os.path.join(k8s, "monitoring"))
check([d["kind"] for d in mon] == ["PodMonitor"], f"monitoring: {[d['kind'] for d in mon]}")
for d in mon:
    ep = d["spec"]["podMetricsEndpoints"][0]
    check(ep["port"] == "http" and ep["path"] == "/metrics", "monitoring: PodMonitor does not scrape http /metrics")
keda = yaml.safe_load(open(os.path.join(k8s, "autoscaling", "keda", "scaledobject.yaml")))
check("cvserve_inflight_requests" in keda["spec"]["triggers"][0]["metadata"]["query"], "keda: not on cvserve_inflight_requests")
adapter = yaml.safe_load(open(os.path.join(k8s, "autoscaling", "prometheus-adapter", "values.yaml")))
check(any(r["name"]["as"] == "cvserve_inflight_requests" for r in adapter["rules"]["custom"]),
      "prometheus-adapter: no cvserve_inflight_requests rule")

# Dockerfiles: a Rust build stage that runs build.sh, a slim runtime stage with run.sh as the
# entry point, a non-root user, the server's port and a health check on /healthz.
build_sh = open(os.path.join(args.repo, "build.sh")).read()
check("scripts/setup.sh" in build_sh and "cargo build --release --locked" in build_sh,
      "build.sh no longer runs setup.sh + cargo build: update the Dockerfiles with it")
for name, flavor, libdir in (("Dockerfile", "0", "vendor/onnxruntime"), ("Dockerfile.gpu", "1", "vendor/onnxruntime-gpu")):
    text = open(os.path.join(args.repo, name)).read()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.startswith("FROM ")]
    check(len(froms) == 2 and froms[0].startswith("FROM rust:") and " AS build" in froms[0]
          and froms[1].startswith("FROM debian:") and "slim" in froms[1], f"{name}: stages {froms}")
    check(f"RUN CVSERVE_GPU={flavor} ./build.sh" in lines, f"{name}: the build stage does not run CVSERVE_GPU={flavor} ./build.sh")
    runtime = lines[lines.index(froms[1]):]
    for need in ("target/release/cvserve", libdir, "vendor/flavor", "run.sh", "models"):
        check(any(l.startswith("COPY --from=build") and need in l for l in runtime), f"{name}: runtime stage lacks {need}")
    users = [l.split()[1] for l in runtime if l.startswith("USER ")]
    check(users and not users[-1].startswith(("0", "root")), f"{name}: runs as root")
    check(f"EXPOSE {args.port}" in lines, f"{name}: does not EXPOSE {args.port}")
    check(any(f"127.0.0.1:{args.port}/healthz" in l for l in lines), f"{name}: no HEALTHCHECK on /healthz at port {args.port}")
    check('ENTRYPOINT ["./run.sh"]' in lines, f"{name}: the entry point is not run.sh")
ignore = open(os.path.join(args.repo, ".dockerignore")).read().split()
for need in ("target/", "vendor/"):
    check(need in ignore, f".dockerignore does not exclude {need}")

for p in problems:
    print("PROBLEM:", p)
print(f"deploy check: {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
