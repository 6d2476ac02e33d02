"""Validates deploy/kubernetes/kserve/ against KServe's own schemas (called by tests/deploy.rs).

Each manifest is checked against the openAPIV3Schema of its kind from KServe's CRDs (in
deploy/kubernetes/kserve/schemas/, strictly: an unknown field is an error, as with
`kubectl apply --validate=strict`), after proving that the validator rejects a broken copy;
then the manifests are checked against each other and against the server's defaults: the
InferenceServices name the runtime, its model format and one of its protocols; the runtime's
port, gRPC port and health paths are the server's.
Exit status 0 when everything holds; every problem is printed.
"""
import copy
import glob
import gzip
import json
import os
import sys

import jsonschema
import yaml

repo, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
here = os.path.join(repo, "deploy/kubernetes/kserve")
problems = []


def strict(schema):
    """Unknown fields refused wherever the schema lists the known ones."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


validators = {}
for path in glob.glob(os.path.join(here, "schemas/*.json.gz")):
    crd = json.load(gzip.open(path, "rt"))
    key = (f"{crd['group']}/{crd['version']}", crd["kind"])
    validators[key] = jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"]))


def errors(doc):
    v = validators.get((doc.get("apiVersion"), doc.get("kind")))
    if v is None:
        return [f"no KServe schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


docs = {}
for path in sorted(glob.glob(os.path.join(here, "*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        docs[os.path.basename(path)] = doc
        for e in errors(doc):
            problems.append(f"{os.path.basename(path)}: {e}")

runtime = docs.get("servingruntime.yaml")
if runtime is None:
    sys.exit("servingruntime.yaml is missing")
# The validator must refuse what the API server would: a misspelled field, a wrong type.
broken = copy.deepcopy(runtime)
broken["spec"]["protocolVersion"] = broken["spec"].pop("protocolVersions")
if not errors(broken):
    problems.append("the validator accepted a misspelled field (protocolVersion)")
broken = copy.deepcopy(runtime)
broken["spec"]["containers"][0]["ports"][0]["containerPort"] = "9001"
if not errors(broken):
    problems.append("the validator accepted a port given as a string")

spec = runtime["spec"]
container = spec["containers"][0]
env = {e["name"]: e.get("value") for e in container.get("env", [])}
formats = {f["name"] for f in spec["supportedModelFormats"]}
protocols = set(spec["protocolVersions"])
if {"v2", "grpc-v2"} - protocols:
    problems.append(f"the runtime must declare v2 and grpc-v2, not {sorted(protocols)}")
if container["ports"][0]["containerPort"] != http_port or env.get("PORT") != str(http_port):
    problems.append(f"the runtime's HTTP port is not the server's ({http_port})")
if env.get("GRPC_PORT") != str(grpc_port):
    problems.append(f"the runtime's GRPC_PORT is not the server's default ({grpc_port})")
probe = lambda kind: container.get(kind, {}).get("httpGet", {}).get("path")
if probe("readinessProbe") != "/v2/health/ready":
    problems.append("the readiness probe is not /v2/health/ready")
if probe("livenessProbe") != "/v2/health/live":
    problems.append("the liveness probe is not /v2/health/live")
if env.get("ALLOW_CLIENT_SHM") != "off":
    problems.append("behind KServe's proxies every client looks local: ALLOW_CLIENT_SHM must be off")
if env.get("MODEL_CACHE_DIR") != "/mnt/models":
    problems.append("MODEL_CACHE_DIR must be KServe's model mount, /mnt/models")
for name, doc in docs.items():
    if doc["kind"] != "InferenceService":
        continue
    model = doc["spec"]["predictor"]["model"]
    if model.get("runtime") != runtime["metadata"]["name"]:
        problems.append(f"{name}: runtime is not {runtime['metadata']['name']}")
    if model["modelFormat"]["name"] not in formats:
        problems.append(f"{name}: model format {model['modelFormat']['name']} is not the runtime's")
    if model.get("protocolVersion") not in protocols:
        problems.append(f"{name}: protocol {model.get('protocolVersion')} is not the runtime's")
    if model.get("protocolVersion") == "grpc-v2":
        ports = model.get("ports", [])
        if not any(p.get("name") == "h2c" and p.get("containerPort") == grpc_port for p in ports):
            problems.append(f"{name}: a grpc-v2 service needs port h2c = {grpc_port}")

for p in problems:
    print(p)
print(f"{len(docs)} manifests checked against KServe's schemas; {len(problems)} problems")
sys.exit(1 if problems else 0)
