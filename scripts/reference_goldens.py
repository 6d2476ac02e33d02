#!/usr/bin/env python3
"""Writes the golden answers of Roboflow Inference 1.8.3 (its legacy ONNX model classes, the
ones its parallel server runs) for the derived test models (scripts/derive_test_models.py),
in the format of tests/fixtures/golden: one file per request, `{"request": ..., "response":
...}`, without the random ids and times. Needs `pip install inference-cpu==1.8.3`.

    MODEL_CACHE_DIR=DERIVED_DIR reference_goldens.py SAMPLES_DIR OUT_DIR
"""

import json
import os
import sys

import numpy as np
from PIL import Image

from inference.core.entities.requests.inference import (
    InstanceSegmentationInferenceRequest,
    KeypointsDetectionInferenceRequest,
)
from inference.models.rfdetr.rfdetr import RFDETRInstanceSegmentation
from inference.models.yolo26.yolo26_instance_segmentation import YOLO26InstanceSegmentation
from inference.models.yolo26.yolo26_keypoints_detection import YOLO26KeypointsDetection

CASES = [
    ("shapes-yolo26seg/1", YOLO26InstanceSegmentation, InstanceSegmentationInferenceRequest, "/infer/instance_segmentation", [{}, {"mask_decode_mode": "fast"}]),
    ("shapes-rfdetrseg/1", RFDETRInstanceSegmentation, InstanceSegmentationInferenceRequest, "/infer/instance_segmentation", [{}, {"mask_decode_mode": "fast"}]),
    ("shapes-yolo26pose/1", YOLO26KeypointsDetection, KeypointsDetectionInferenceRequest, "/infer/keypoints_detection", [{}]),
]


def scrub(v):
    if isinstance(v, dict):
        return {k: scrub(x) for k, x in v.items() if k not in ("detection_id", "inference_id", "time", "parent_id")}
    if isinstance(v, list):
        return [scrub(x) for x in v]
    return v


def main():
    samples, out = sys.argv[1], sys.argv[2]
    images = sorted(f for f in os.listdir(samples) if f.endswith(".jpg"))
    for model_id, cls, req_cls, route, variants in CASES:
        model = cls(model_id=model_id, api_key="unused")
        d = os.path.join(out, model_id.replace("/", "-"))
        os.makedirs(d, exist_ok=True)
        for img in images:
            with open(os.path.join(samples, img), "rb") as f:
                import base64

                b64 = base64.b64encode(f.read()).decode()
            for extra in variants:
                req = req_cls(model_id=model_id, api_key="unused", image={"type": "base64", "value": b64}, **extra)
                resp = model.infer_from_request(req)
                resp = resp[0] if isinstance(resp, list) else resp
                body = scrub(json.loads(resp.model_dump_json(by_alias=True, exclude_none=True)))
                suffix = "".join(f".{k}={v}" for k, v in extra.items())
                stem = img.rsplit(".", 1)[0]
                with open(os.path.join(d, f"{stem}{suffix}.json"), "w") as f:
                    json.dump({"request": {"model_id": model_id, "image": img, "route": route, **extra}, "response": body}, f, indent=1)
        print(model_id, "done")


if __name__ == "__main__":
    main()
