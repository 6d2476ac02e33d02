"""Roboflow's Python client against cvserve's Workflows routes, unchanged.

Usage: workflow_sdk.py BASE_URL FIXTURES_DIR LOCAL_WORKFLOW_ID
Prints one JSON object with what each call returned (images as their type and length).
"""

import json
import sys

from inference_sdk import InferenceHTTPClient

base, fixtures, local_id = sys.argv[1:4]
dog = f"{fixtures}/images/dog.jpg"
horses = f"{fixtures}/images/horses.jpg"

spec = {
    "version": "1.0",
    "inputs": [
        {"type": "WorkflowImage", "name": "image"},
        {"type": "WorkflowParameter", "name": "conf", "default_value": 0.4},
    ],
    "steps": [
        {
            "type": "roboflow_core/roboflow_object_detection_model@v1",
            "name": "det",
            "images": "$inputs.image",
            "model_id": "coco/1",
            "confidence": "$inputs.conf",
        },
        {
            "type": "roboflow_core/bounding_box_visualization@v1",
            "name": "viz",
            "image": "$inputs.image",
            "predictions": "$steps.det.predictions",
        },
    ],
    "outputs": [
        {"type": "JsonField", "name": "predictions", "selector": "$steps.det.predictions"},
        {"type": "JsonField", "name": "viz", "selector": "$steps.viz.image"},
    ],
}


def classes(result):
    return [p["class"] for p in result["predictions"]["predictions"]]


client = InferenceHTTPClient(api_url=base, api_key=None)
out = {}
one = client.run_workflow(
    specification=spec,
    images={"image": dog},
    parameters={"conf": 0.5},
    excluded_fields=["viz"],
)
out["single"] = {"keys": sorted(one[0].keys()), "classes": classes(one[0]), "len": len(one)}
batch = client.run_workflow(specification=spec, images={"image": [dog, horses]})
out["batch"] = [
    {"classes": classes(r), "viz_type": type(r["viz"]).__name__, "viz_len": len(r["viz"])}
    for r in batch
]
legacy = client.infer_from_workflow(specification=spec, images={"image": dog})
out["legacy"] = {"classes": classes(legacy[0]), "viz_type": type(legacy[0]["viz"]).__name__}
local = client.run_workflow(workspace_name="local", workflow_id=local_id, images={"image": horses})
out["local"] = local
try:
    client.run_workflow(workspace_name="my-ws", workflow_id="my-wf", images={"image": dog})
    out["offline_error"] = None
except Exception as e:  # the client raises HTTPCallErrorError
    out["offline_error"] = {"type": type(e).__name__, "status": getattr(e, "status_code", None)}
print(json.dumps(out))
