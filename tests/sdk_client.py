"""Drives a running cvserve with Roboflow's own Python client (inference_sdk), unchanged.

Usage: sdk_client.py BASE_URL FIXTURES_DIR. Prints one JSON object of the client's answers.
"""
import json
import sys
import warnings

from inference_sdk import InferenceHTTPClient

warnings.simplefilter("ignore")
url, fixtures = sys.argv[1], sys.argv[2]
img = lambda name: f"{fixtures}/{name}"

client = InferenceHTTPClient(api_url=url, api_key="x")
out = {
    # v1 mode: GET /model/registry, POST /model/add, POST /infer/<task from the registry>
    "detection": client.infer(img("images/dog.jpg"), model_id="coco/1"),
    "detection_list": client.infer(
        [img("images/dog.jpg"), img("images/giraffe.jpg")], model_id="coco/1"
    ),
    "segmentation": client.infer(img("samples/shapes/000000.jpg"), model_id="shapes-seg/1"),
    "classification": client.infer(img("images/chelsea.jpg"), model_id="imagenet/1"),
    "keypoints": client.infer(img("samples/shapes/000000.jpg"), model_id="shapes-pose/1"),
    "registry": client.list_loaded_models(),
}
# v0 mode: POST /{dataset}/{version} with a base64 body
client.select_api_v0()
out["detection_v0"] = client.infer(img("images/dog.jpg"), model_id="coco/1")
print(json.dumps(out, default=str))
