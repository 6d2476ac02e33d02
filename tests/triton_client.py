"""Drives a running cvserve with Triton's own Python client (tritonclient), unchanged, over the
Open Inference Protocol: HTTP (`http`) or gRPC (`grpc`).

Usage: triton_client.py http|grpc HOST:PORT FIXTURES_DIR. Prints one JSON object of what the
client got; tests/open_inference.rs checks it against the server's Roboflow routes.
"""
import base64
import json
import os
import sys
import uuid

import cv2
import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

protocol, url, fixtures = sys.argv[1], sys.argv[2], sys.argv[3]
if protocol == "http":
    import tritonclient.http as client_lib
else:
    import tritonclient.grpc as client_lib

client = client_lib.InferenceServerClient(url=url)
out = {}


def read(rel):
    with open(os.path.join(fixtures, rel), "rb") as f:
        return f.read()


def rgb(rel):
    return cv2.cvtColor(cv2.imread(os.path.join(fixtures, rel)), cv2.COLOR_BGR2RGB)


def predictions(result):
    return [json.loads(p) for p in result.as_numpy("predictions").reshape(-1)]


def error_of(call):
    try:
        call()
    except InferenceServerException as e:
        return str(e)
    return None


def infer_image(model, images, version="", binary=True, **params):
    # JSON carries text only: base64, as in Roboflow's `image.value`.
    text = protocol == "http" and not binary
    encode = (lambda b: base64.b64encode(b).decode()) if text else (lambda b: b)
    data = np.array([encode(read(i)) for i in images], dtype=np.object_)
    inp = client_lib.InferInput("image", [len(images)], "BYTES")
    if protocol == "http":
        inp.set_data_from_numpy(data, binary_data=binary)
        outputs = [client_lib.InferRequestedOutput("predictions", binary_data=binary)]
    else:
        inp.set_data_from_numpy(data)
        outputs = [client_lib.InferRequestedOutput("predictions")]
    return predictions(
        client.infer(model, [inp], model_version=version, outputs=outputs, parameters=params)
    )


out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
meta = client.get_server_metadata()
out["extensions"] = meta["extensions"] if protocol == "http" else list(meta.extensions)
model_meta = client.get_model_metadata("coco")
if protocol == "http":
    out["model_inputs"] = [(i["name"], i["datatype"], i["shape"]) for i in model_meta["inputs"]]
else:
    out["model_inputs"] = [(i.name, i.datatype, list(i.shape)) for i in model_meta.inputs]
out["model_ready"] = client.is_model_ready("coco")

# Encoded images (BYTES), compared by the test with /infer/<task>'s answers.
out["detection"] = infer_image("coco", ["images/dog.jpg"], confidence=0.5)
out["detection_versioned_json"] = infer_image(
    "coco", ["images/dog.jpg", "images/giraffe.jpg"], version="1", binary=False, confidence=0.5
)
out["segmentation"] = infer_image("shapes-seg", ["samples/shapes/000000.jpg"])
out["classification"] = infer_image("imagenet", ["images/chelsea.jpg"])

# Raw frames in the request (pixels, UINT8 [B, H, W, 3]).
frames = np.stack([rgb("images/dog.jpg"), rgb("images/dog.jpg")])
inp = client_lib.InferInput("pixels", list(frames.shape), "UINT8")
inp.set_data_from_numpy(frames)
out["pixels_inline"] = predictions(client.infer("coco", [inp], parameters={"confidence": 0.5}))

# Raw frames through a registered shared-memory region, the answer written into another.
tag = uuid.uuid4().hex[:8]
frame = rgb("images/dog.jpg")
in_key, out_key = f"/cvserve_in_{tag}", f"/cvserve_out_{tag}"
inside = shm.create_shared_memory_region("frames", in_key, frame.nbytes)
answers = shm.create_shared_memory_region("answers", out_key, 1 << 20)
shm.set_shared_memory_region(inside, [frame])
client.register_system_shared_memory("frames", in_key, frame.nbytes)
client.register_system_shared_memory("answers", out_key, 1 << 20)
status = client.get_system_shared_memory_status()
if protocol == "http":
    out["regions"] = sorted(r["name"] for r in status)
else:
    out["regions"] = sorted(status.regions.keys())
inp = client_lib.InferInput("pixels", [1, *frame.shape], "UINT8")
inp.set_shared_memory("frames", frame.nbytes)
out["pixels_shm"] = predictions(client.infer("coco", [inp], parameters={"confidence": 0.5}))
requested = client_lib.InferRequestedOutput("predictions")
requested.set_shared_memory("answers", 1 << 20)
result = client.infer("coco", [inp], outputs=[requested], parameters={"confidence": 0.5})
written = result.get_output("predictions")
assert written is not None
answer = shm.get_contents_as_numpy(answers, np.object_, [1])
out["pixels_shm_into_region"] = [json.loads(a) for a in answer]

# Hazards: each refused with an error, and the server goes on serving.
out["traversal_error"] = error_of(
    lambda: client.register_system_shared_memory("evil", "/../../etc/passwd", 16)
)
out["oversized_error"] = error_of(
    lambda: client.register_system_shared_memory("big", in_key, frame.nbytes + 1)
)
os.truncate("/dev/shm/" + in_key[1:], 1024)
out["truncated_error"] = error_of(lambda: client.infer("coco", [inp]))
out["after_hazards"] = infer_image("coco", ["images/dog.jpg"], confidence=0.5)

client.unregister_system_shared_memory()
status = client.get_system_shared_memory_status()
out["regions_after_unregister"] = len(status) if protocol == "http" else len(status.regions)
shm.destroy_shared_memory_region(inside)
shm.destroy_shared_memory_region(answers)

out["unknown_model_error"] = error_of(lambda: infer_image("no-such-model", ["images/dog.jpg"]))
print(json.dumps(out, default=str))
