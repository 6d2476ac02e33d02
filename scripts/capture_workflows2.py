"""Captures the Workflows II cases (slicing and stitching, consensus, classes replacement,
the mask/polygon/crop/classification-label drawings) from a running Roboflow Inference
reference server, in the layout of tests/fixtures/golden/workflows (see its README).

    BASE=http://127.0.0.1:9600 python scripts/capture_workflows2.py tests/fixtures/golden/workflows

Run with the reference's Python (shared/reference/rf-peer); images are read from
tests/fixtures. Base64 images are cut to 64 characters and listed under `image_files`."""
import base64, copy, json, os, sys, time, urllib.error, urllib.request

BASE = os.environ.get("BASE", "http://127.0.0.1:9600")
OUT = sys.argv[1]
ONLY = set(sys.argv[2:])
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def image(rel):
    with open(os.path.join(FIX, rel), "rb") as f:
        return {"type": "base64", "value": base64.b64encode(f.read()).decode(), "_file": rel}


def strip(obj, at, files):
    """The request without its images (recorded in `files` with where they were)."""
    if isinstance(obj, dict):
        if "_file" in obj:
            files.append({"at": at + "/value", "file": obj["_file"]})
            return {k: (v[:64] + f"...<truncated, {len(v)} chars>" if k == "value" else v)
                    for k, v in obj.items() if k != "_file"}
        return {k: strip(v, f"{at}/{k}", files) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip(v, f"{at}/{i}", files) for i, v in enumerate(obj)]
    return obj


def unfile(obj):
    if isinstance(obj, dict):
        return {k: unfile(v) for k, v in obj.items() if k != "_file"}
    if isinstance(obj, list):
        return [unfile(v) for v in obj]
    return obj


def truncate(obj, note):
    if isinstance(obj, dict):
        return {k: truncate(v, note) for k, v in obj.items()}
    if isinstance(obj, list):
        return [truncate(v, note) for v in obj]
    if isinstance(obj, str) and len(obj) > 256 and " " not in obj:
        note.append(len(obj))
        return obj[:64] + f"...<truncated, {len(obj)} chars>"
    return obj


def run(name, comment, steps, outputs, inputs, params=None):
    if ONLY and name not in ONLY:
        return
    spec = {"version": "1.0",
            "inputs": [{"type": "WorkflowImage", "name": k} for k in inputs]
            + [{"type": "WorkflowParameter", "name": k} for k in (params or {})],
            "steps": steps,
            "outputs": [{"type": "JsonField", "name": n, "selector": s} for n, s in outputs]}
    body = {"specification": spec, "inputs": {**inputs, **(params or {})}}
    req = urllib.request.Request(BASE + "/workflows/run", data=json.dumps(unfile(body)).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    try:
        r = urllib.request.urlopen(req, timeout=900)
        status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    dt = time.time() - t
    resp = json.loads(raw)
    files = []
    note = []
    rec = {"case": name, "comment": comment, "method": "POST", "path": "/workflows/run",
           "request": strip(copy.deepcopy(body), "request", files), "status": status,
           "response": truncate(resp, note), "seconds": round(dt, 2),
           "truncated_lengths": {"request": [], "response": note}, "image_files": files}
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(rec, f, indent=1)
    print(name, status, round(dt, 1), "s", flush=True)


def det(name, images, model="coco/1", **kw):
    return {"type": "roboflow_core/roboflow_object_detection_model@v2", "name": name,
            "images": images, "model_id": model, **kw}


KITE = image("images/kite.jpg")
DOG = image("images/dog.jpg")
HORSES = image("images/horses.jpg")

run("21_sahi_v2_nms", "kite.jpg (1352x900) sliced by image_slicer@v2 into 640x640 tiles (overlap 0.2), "
    "coco/1 on every tile, detections_stitch with nms: stitched detections in the photo's pixels, and each tile's own",
    [{"type": "roboflow_core/image_slicer@v2", "name": "slicer", "image": "$inputs.image"},
     det("det", "$steps.slicer.slices"),
     {"type": "roboflow_core/detections_stitch@v1", "name": "stitch", "reference_image": "$inputs.image",
      "predictions": "$steps.det.predictions", "overlap_filtering_strategy": "nms"}],
    [("stitched", "$steps.stitch.predictions"), ("tiles", "$steps.det.predictions")],
    {"image": KITE})

run("22_sahi_v1_nmm_batch", "kite.jpg and dog.jpg in one request, image_slicer@v1 at 480x400 with overlaps "
    "0.25/0.1 (border tiles smaller), coco/1 at confidence 0.3, detections_stitch nmm at IoU 0.2",
    [{"type": "roboflow_core/image_slicer@v1", "name": "slicer", "image": "$inputs.image",
      "slice_width": 480, "slice_height": 400, "overlap_ratio_width": 0.25, "overlap_ratio_height": 0.1},
     det("det", "$steps.slicer.slices", confidence=0.3),
     {"type": "roboflow_core/detections_stitch@v1", "name": "stitch", "reference_image": "$inputs.image",
      "predictions": "$steps.det.predictions", "overlap_filtering_strategy": "nmm", "iou_threshold": 0.2}],
    [("stitched", "$steps.stitch.predictions")],
    {"image": [KITE, DOG]})

run("23_sahi_v2_none_params", "image_slicer@v2 with slice size from parameters (320x320, overlap 0.5) "
    "on horses.jpg, stitch none: every tile's detection kept",
    [{"type": "roboflow_core/image_slicer@v2", "name": "slicer", "image": "$inputs.image",
      "slice_width": "$inputs.sw", "slice_height": "$inputs.sh", "overlap_ratio_width": 0.5,
      "overlap_ratio_height": 0.5},
     det("det", "$steps.slicer.slices"),
     {"type": "roboflow_core/detections_stitch@v1", "name": "stitch", "reference_image": "$inputs.image",
      "predictions": "$steps.det.predictions", "overlap_filtering_strategy": "none"}],
    [("stitched", "$steps.stitch.predictions")],
    {"image": HORSES}, {"sw": 320, "sh": 320})

SH = [image(f"samples/shapes/00000{i}.jpg") for i in range(4)]
run("24_consensus_two_models", "shapes-det/1 and shapes-det-v5/1 vote on shapes/000000.jpg and 000001.jpg "
    "(required_votes 2, class-aware, defaults)",
    [det("a", "$inputs.image", "shapes-det/1"), det("b", "$inputs.image", "shapes-det-v5/1"),
     {"type": "roboflow_core/detections_consensus@v1", "name": "vote",
      "predictions_batches": ["$steps.a.predictions", "$steps.b.predictions"], "required_votes": 2}],
    [("consensus", "$steps.vote.predictions"), ("present", "$steps.vote.object_present"),
     ("presence", "$steps.vote.presence_confidence")],
    {"image": [SH[0], SH[1]]})

run("24b_consensus_modes", "consensus class-agnostic, required_objects 3, presence min, confidence max, "
    "boxes max, on shapes/000002.jpg and 000003.jpg; a third source at confidence 0.9",
    [det("a", "$inputs.image", "shapes-det/1", confidence=0.3), det("b", "$inputs.image", "shapes-det-v5/1"),
     det("c", "$inputs.image", "shapes-det/1", confidence=0.9),
     {"type": "DetectionsConsensus", "name": "vote",
      "predictions_batches": ["$steps.a.predictions", "$steps.b.predictions", "$steps.c.predictions"],
      "required_votes": 2, "class_aware": False, "iou_threshold": 0.5, "required_objects": 3,
      "presence_confidence_aggregation": "min", "detections_merge_confidence_aggregation": "max",
      "detections_merge_coordinates_aggregation": "max"}],
    [("consensus", "$steps.vote.predictions"), ("present", "$steps.vote.object_present"),
     ("presence", "$steps.vote.presence_confidence")],
    {"image": [SH[2], SH[3]]})

run("24c_consensus_required_per_class", "consensus with required_objects per class and classes_to_consider, "
    "merge confidence min and boxes min, on shapes/000002.jpg and 000003.jpg",
    [det("a", "$inputs.image", "shapes-det/1"), det("b", "$inputs.image", "shapes-det-v5/1"),
     {"type": "roboflow_core/detections_consensus@v1", "name": "vote",
      "predictions_batches": ["$steps.a.predictions", "$steps.b.predictions"], "required_votes": 1,
      "classes_to_consider": ["circle", "square"], "required_objects": {"circle": 1},
      "detections_merge_confidence_aggregation": "min", "detections_merge_coordinates_aggregation": "min"}],
    [("consensus", "$steps.vote.predictions"), ("present", "$steps.vote.object_present"),
     ("presence", "$steps.vote.presence_confidence")],
    {"image": [SH[2], SH[3]]})

two_stage = [det("det", "$inputs.image", class_filter=["dog"]),
             {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": "$inputs.image",
              "predictions": "$steps.det.predictions"},
             {"type": "roboflow_core/roboflow_classification_model@v2", "name": "cls",
              "images": "$steps.crop.crops", "model_id": "imagenet/1", "confidence": 0.05}]
run("25_classes_replacement", "coco/1 (dogs only) on dog.jpg, each crop classified by imagenet/1, "
    "detections_classes_replacement: the dog takes its breed",
    two_stage + [{"type": "roboflow_core/detections_classes_replacement@v1", "name": "replace",
                  "object_detection_predictions": "$steps.det.predictions",
                  "classification_predictions": "$steps.cls.predictions"}],
    [("replaced", "$steps.replace.predictions"), ("detections", "$steps.det.predictions")],
    {"image": DOG})

high = copy.deepcopy(two_stage)
high[2]["confidence"] = 0.99
run("25b_classes_replacement_fallback", "as 25 with the classifier at confidence 0.99 (nothing passes): "
    "no classification has a top class, so the answer is empty detections, fallback or not",
    high + [{"type": "DetectionsClassesReplacement", "name": "replace",
             "object_detection_predictions": "$steps.det.predictions",
             "classification_predictions": "$steps.cls.predictions",
             "fallback_class_name": "unknown", "fallback_class_id": 7}],
    [("replaced", "$steps.replace.predictions")],
    {"image": DOG})

run("25c_classes_replacement_no_fallback", "as 25b without a fallback: the detection is dropped",
    high + [{"type": "roboflow_core/detections_classes_replacement@v1", "name": "replace",
             "object_detection_predictions": "$steps.det.predictions",
             "classification_predictions": "$steps.cls.predictions"}],
    [("replaced", "$steps.replace.predictions")],
    {"image": DOG})

run("26_mask_polygon_visualization", "shapes-seg/1 on shapes/000000.jpg drawn by mask_visualization then "
    "polygon_visualization; image outputs",
    [{"type": "roboflow_core/roboflow_instance_segmentation_model@v2", "name": "seg", "images": "$inputs.image",
      "model_id": "shapes-seg/1"},
     {"type": "roboflow_core/mask_visualization@v1", "name": "mask", "image": "$inputs.image",
      "predictions": "$steps.seg.predictions", "opacity": 0.6},
     {"type": "roboflow_core/polygon_visualization@v1", "name": "poly", "image": "$steps.mask.image",
      "predictions": "$steps.seg.predictions", "thickness": 3}],
    [("mask", "$steps.mask.image"), ("drawn", "$steps.poly.image"), ("seg", "$steps.seg.predictions")],
    {"image": SH[0]})

run("27_crop_and_classification_label_visualization", "crop_visualization of coco/1 on dog.jpg and "
    "classification_label_visualization of imagenet/1 on the same photo",
    [det("det", "$inputs.image"),
     {"type": "roboflow_core/crop_visualization@v1", "name": "cropvis", "image": "$inputs.image",
      "predictions": "$steps.det.predictions", "scale_factor": 0.5},
     {"type": "roboflow_core/roboflow_classification_model@v2", "name": "cls", "images": "$inputs.image",
      "model_id": "imagenet/1", "confidence": 0.05},
     {"type": "roboflow_core/classification_label_visualization@v1", "name": "label",
      "image": "$steps.cropvis.image", "predictions": "$steps.cls.predictions",
      "text": "Class and Confidence", "text_position": "BOTTOM_LEFT"}],
    [("drawn", "$steps.label.image"), ("cls", "$steps.cls.predictions")],
    {"image": DOG})
