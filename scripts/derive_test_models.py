#!/usr/bin/env python3
"""Derives the test models of the end-to-end layouts from the bundled YOLOv8-layout ones, so
the repository does not carry three more copies of their weights.

    derive_test_models.py MODELS_DIR OUT_DIR

- shapes-yolo26seg/1 (instance-segmentation, model_type yolo26n-seg) from shapes-seg/1:
  `output0` [B, 300, 38] = x1, y1, x2, y2, score, class, 32 mask coefficients (per-class NMS
  at IoU 0.5 and the top 300 inside the graph, zero-score padding) and the prototypes
  `output1` [B, 32, 160, 160] unchanged.
- shapes-yolo26pose/1 (keypoint-detection, model_type yolo26n-pose) from shapes-pose/1:
  `output0` [B, 300, 21] = x1, y1, x2, y2, score, class, 5 x (x, y, visibility).
- shapes-rfdetrseg/1 (instance-segmentation, model_type rfdetr-seg-nano) from shapes-seg/1,
  as Roboflow's RF-DETR exports: input `input` [1, 3, 640, 640] ImageNet-normalised (undone
  inside), `dets` [1, 300, 4] normalised cx, cy, w, h, `labels` [1, 300, 5] logits (4 classes
  and a never-firing 5th column; suppressed pairs about -13.8) and `masks` [1, 300, 160, 160]
  mask logits over the whole input (the query's prototype mask, -20 outside its box).
- tiny-coco/1 (object-detection, yolov8n) with coco/1's input `images` [B, 3, 416, 416] and
  output `output0` [B, 84, 3549] but almost no network: a mean over the input (so every
  image is read) times zero plus a fixed output of 12 boxes of 80 COCO classes among 3,549
  low-scoring candidates, as a real frame gives. It costs next to nothing, so a server
  serving it at high concurrency measures its front end alone (scripts/front_end_table.sh).

The output is a function of the input files only (same bytes every run), so the golden answers
in tests/fixtures/golden made from it stay valid.
"""

import json
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class Graph:
    """Appends nodes to a model's graph with generated names."""

    def __init__(self, model, prefix):
        self.g = model.graph
        self.prefix = prefix
        self.n = 0

    def name(self):
        self.n += 1
        return f"{self.prefix}_{self.n}"

    def const(self, value, dtype=np.float32):
        name = self.name()
        self.g.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, outputs=1, **attrs):
        names = [self.name() for _ in range(outputs)]
        self.g.node.append(helper.make_node(op_type, inputs, names, name=self.name(), **attrs))
        return names[0] if outputs == 1 else names


def set_outputs(model, outputs):
    del model.graph.output[:]
    for name, elem, shape in outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, elem, shape))


def end_to_end_rows(g, raw, num_classes, extra_from):
    """From a YOLOv8 output [B, 4 + nc + E, N]: per-class NMS (IoU 0.5, at most 300 per
    class, scores above 0.001) then the 300 best anchors by their best kept class score.
    Returns (xyxy [B, 300, 4], score [B, 300, 1], class [B, 300, 1] float, extra [B, 300, E],
    cxcywh [B, 300, 4])."""
    t = g.op("Transpose", [raw], perm=[0, 2, 1])  # [B, N, A]
    cxcywh = g.op("Slice", [t, g.const([0], np.int64), g.const([4], np.int64), g.const([2], np.int64)])
    scores = g.op("Slice", [t, g.const([4], np.int64), g.const([4 + num_classes], np.int64), g.const([2], np.int64)])
    extra = g.op("Slice", [t, g.const([extra_from], np.int64), g.const([1 << 30], np.int64), g.const([2], np.int64)])
    scores_t = g.op("Transpose", [scores], perm=[0, 2, 1])  # [B, C, N]
    selected = g.op(
        "NonMaxSuppression",
        [cxcywh, scores_t, g.const([300], np.int64), g.const([0.5]), g.const([0.001])],
        center_point_box=1,
    )  # [K, 3]: batch, class, box
    zeros = g.op("ConstantOfShape", [g.op("Shape", [scores_t])], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    k = g.op("Slice", [g.op("Shape", [selected]), g.const([0], np.int64), g.const([1], np.int64)])
    ones = g.op("ConstantOfShape", [k], value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0]))
    keep = g.op("ScatterND", [zeros, selected, ones])
    kept = g.op("Mul", [scores_t, keep])  # [B, C, N]
    best = g.op("ReduceMax", [kept], axes=[1], keepdims=0)  # [B, N]
    cls = g.op("ArgMax", [kept], axis=1, keepdims=0)  # [B, N]
    top, idx = g.op("TopK", [best, g.const([300], np.int64)], outputs=2, axis=1, largest=1, sorted=1)
    idx3 = g.op("Unsqueeze", [idx, g.const([2], np.int64)])  # [B, 300, 1]

    def gather_rows(src, width):
        shape = g.op("Concat", [g.op("Shape", [idx3]), g.const([width], np.int64)], axis=0)
        shape = g.op("Slice", [shape, g.const([0], np.int64), g.const([2], np.int64)])
        full = g.op("Concat", [shape, g.const([width], np.int64)], axis=0)
        return g.op("GatherElements", [src, g.op("Expand", [idx3, full])], axis=1)

    box = gather_rows(cxcywh, 4)
    c = g.op("Slice", [box, g.const([0], np.int64), g.const([2], np.int64), g.const([2], np.int64)])
    wh = g.op("Slice", [box, g.const([2], np.int64), g.const([4], np.int64), g.const([2], np.int64)])
    half = g.op("Mul", [wh, g.const(0.5)])
    xyxy = g.op("Concat", [g.op("Sub", [c, half]), g.op("Add", [c, half])], axis=2)
    score = g.op("Unsqueeze", [top, g.const([2], np.int64)])
    cls_f = g.op("Cast", [g.op("GatherElements", [cls, idx], axis=1)], to=TensorProto.FLOAT)
    cls_f = g.op("Unsqueeze", [cls_f, g.const([2], np.int64)])
    return xyxy, score, cls_f, extra, box, idx3, gather_rows


def yolo26(src_model, num_classes, extra_width):
    m = onnx.load(src_model)
    g = Graph(m, "e2e")
    raw = m.graph.output[0].name
    xyxy, score, cls_f, extra, _, _, gather_rows = end_to_end_rows(g, raw, num_classes, 4 + num_classes)
    rows = g.op("Concat", [xyxy, score, cls_f, gather_rows(extra, extra_width)], axis=2)
    g.g.node.append(helper.make_node("Identity", [rows], ["output0_e2e"], name="out_rows"))
    outputs = [("output0_e2e", TensorProto.FLOAT, ["batch", 300, 6 + extra_width])]
    for o in list(m.graph.output)[1:]:
        dims = [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
        outputs.append((o.name, TensorProto.FLOAT, dims))
    set_outputs(m, outputs)
    # The rows output takes the name `output0` (the original output is an inner value now).
    rename(m, raw, "output0_yolov8")
    rename(m, "output0_e2e", "output0")
    return m


def rename(m, old, new):
    for n in m.graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for o in m.graph.output:
        if o.name == old:
            o.name = new


def rfdetr_seg(src_model, num_classes, size, proto):
    m = onnx.load(src_model)
    # Static batch 1, input `input`, ImageNet-normalised: undo it before the network.
    inp = m.graph.input[0]
    old_in = inp.name
    inp.name = "input"
    for i, d in enumerate([1, 3, size, size]):
        inp.type.tensor_type.shape.dim[i].Clear()
        inp.type.tensor_type.shape.dim[i].dim_value = d
    g = Graph(m, "detr")
    std = g.const(np.array(STD, np.float32).reshape(1, 3, 1, 1))
    mean = g.const(np.array(MEAN, np.float32).reshape(1, 3, 1, 1))
    unnorm = g.op("Add", [g.op("Mul", ["input", std]), mean])
    prelude = [helper.make_node("Identity", [unnorm], [old_in], name="detr_unnormalise")]
    # The prelude nodes were appended; move them first (topological order).
    nodes = list(m.graph.node)
    head = [n for n in nodes if n.name.startswith("detr_")]
    rest = [n for n in nodes if not n.name.startswith("detr_")]
    del m.graph.node[:]
    m.graph.node.extend(head + prelude + rest)

    raw, protos = m.graph.output[0].name, m.graph.output[1].name
    g = Graph(m, "detrhead")
    xyxy, score, cls_f, extra, box, idx3, gather_rows = end_to_end_rows(g, raw, num_classes, 4 + num_classes)
    dets = g.op("Div", [box, g.const(float(size))])
    # labels: logit of every class score of the query where NMS kept that (class, box) pair.
    t = g.op("Transpose", [raw], perm=[0, 2, 1])
    scores = g.op("Slice", [t, g.const([4], np.int64), g.const([4 + num_classes], np.int64), g.const([2], np.int64)])
    q_scores = gather_rows(scores, num_classes)  # [1, 300, C] (NMS keep not applied)
    # Keep only each query's best kept class (its row score); others are suppressed.
    cls_i = g.op("Cast", [cls_f], to=TensorProto.INT64)
    onehot_classes = g.const(np.arange(num_classes, dtype=np.int64).reshape(1, 1, num_classes), np.int64)
    is_cls = g.op("Cast", [g.op("Equal", [cls_i, onehot_classes])], to=TensorProto.FLOAT)
    kept_score = g.op("Mul", [score, is_cls])  # [1, 300, C]: the row score at its class, else 0
    p = g.op("Clip", [kept_score, g.const(1e-6), g.const(1 - 1e-6)])
    logits = g.op("Log", [g.op("Div", [p, g.op("Sub", [g.const(1.0), p])])])
    bg = g.op("Mul", [g.op("Slice", [logits, g.const([0], np.int64), g.const([1], np.int64), g.const([2], np.int64)]), g.const(0.0)])
    bg = g.op("Add", [bg, g.const(-20.0)])
    labels = g.op("Concat", [logits, bg], axis=2)
    _ = q_scores
    # masks: coefficients x prototypes over the whole grid, -20 outside the query's box.
    coeffs = gather_rows(extra, 32)  # [1, 300, 32]
    flat = g.op("Reshape", [protos, g.const([1, 32, proto * proto], np.int64)])
    mlog = g.op("Reshape", [g.op("MatMul", [coeffs, flat]), g.const([1, 300, proto, proto], np.int64)])
    scale = proto / size
    grid = g.const(np.arange(proto, dtype=np.float32) + 0.5)
    x1 = g.op("Slice", [xyxy, g.const([0], np.int64), g.const([1], np.int64), g.const([2], np.int64)])
    y1 = g.op("Slice", [xyxy, g.const([1], np.int64), g.const([2], np.int64), g.const([2], np.int64)])
    x2 = g.op("Slice", [xyxy, g.const([2], np.int64), g.const([3], np.int64), g.const([2], np.int64)])
    y2 = g.op("Slice", [xyxy, g.const([3], np.int64), g.const([4], np.int64), g.const([2], np.int64)])

    def inside(lo, hi, axis_shape):
        lo = g.op("Reshape", [g.op("Mul", [lo, g.const(scale)]), g.const(axis_shape, np.int64)])
        hi = g.op("Reshape", [g.op("Mul", [hi, g.const(scale)]), g.const(axis_shape, np.int64)])
        return g.op("And", [g.op("GreaterOrEqual", [grid, lo]), g.op("Less", [grid, hi])])

    in_x = g.op("Unsqueeze", [inside(x1, x2, [1, 300, 1]), g.const([2], np.int64)])  # [1,300,1,P]
    in_y = g.op("Unsqueeze", [inside(y1, y2, [1, 300, 1]), g.const([3], np.int64)])  # [1,300,P,1]
    inbox = g.op("And", [in_x, in_y])
    masks = g.op("Where", [inbox, mlog, g.const(-20.0)])
    for src, dst in [(dets, "dets"), (labels, "labels"), (masks, "masks")]:
        g.g.node.append(helper.make_node("Identity", [src], [dst], name=f"out_{dst}"))
    set_outputs(
        m,
        [
            ("dets", TensorProto.FLOAT, [1, 300, 4]),
            ("labels", TensorProto.FLOAT, [1, 300, num_classes + 1]),
            ("masks", TensorProto.FLOAT, [1, 300, proto, proto]),
        ],
    )
    return m


def tiny_like(src_model, boxes=12):
    """A network of almost no cost with `src_model`'s YOLOv8 input and output layout."""
    src = onnx.load(src_model)
    inp = src.graph.input[0]
    out = src.graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    rows, candidates = dims[1], dims[2]
    size = inp.type.tensor_type.shape.dim[2].dim_value
    fixed = np.full((1, rows, candidates), 1e-3, dtype=np.float32)
    # Candidates on a grid, boxes a tenth of the input; `boxes` of them score high, in a
    # few classes, some overlapping (NMS has work to do).
    k = np.arange(candidates)
    fixed[0, 0] = (k % 59 + 0.5) * size / 59
    fixed[0, 1] = (k // 59 % 59 + 0.5) * size / 59
    fixed[0, 2] = fixed[0, 3] = size / 10
    for i in range(boxes):
        c = (i * 293) % candidates
        fixed[0, 4 + (i * 7) % (rows - 4), c] = 0.9 - 0.05 * (i % 5)
        fixed[0, 4 + (i * 7) % (rows - 4), (c + 1) % candidates] = 0.5
    m = helper.make_model(
        helper.make_graph([], "tiny", [inp], [out]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=src.ir_version,
    )
    g = Graph(m, "tiny")
    mean = g.op("ReduceMean", [inp.name], axes=[1, 2, 3], keepdims=1)  # [B, 1, 1, 1]
    flat = g.op("Reshape", [mean, g.const([-1, 1, 1], np.int64)])  # [B, 1, 1]
    zero = g.op("Mul", [flat, g.const(0.0)])
    m.graph.node.append(
        helper.make_node("Add", [zero, g.const(fixed)], [out.name], name=g.name())
    )
    return m


def write(model, src_dir, out_dir, model_id, task, model_type, size=None, extra_files=()):
    d = os.path.join(out_dir, model_id, "1")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(d, "weights.onnx"))
    shutil.copyfile(os.path.join(src_dir, "class_names.txt"), os.path.join(d, "class_names.txt"))
    for f in extra_files:
        shutil.copyfile(os.path.join(src_dir, f), os.path.join(d, f))
    env = json.load(open(os.path.join(src_dir, "environment.json")))
    if size:
        pre = json.loads(env["PREPROCESSING"])
        pre["resize"]["width"] = pre["resize"]["height"] = size
        env["PREPROCESSING"] = json.dumps(pre)
    json.dump(env, open(os.path.join(d, "environment.json"), "w"), indent=1)
    json.dump(
        {"project_task_type": task, "model_type": model_type, "model_id": f"{model_id}/1"},
        open(os.path.join(d, "model_type.json"), "w"),
        indent=4,
    )


def main():
    models, out = sys.argv[1], sys.argv[2]
    seg = os.path.join(models, "shapes-seg", "1")
    pose = os.path.join(models, "shapes-pose", "1")
    write(yolo26(os.path.join(seg, "weights.onnx"), 4, 32), seg, out, "shapes-yolo26seg", "instance-segmentation", "yolo26n-seg")
    write(
        yolo26(os.path.join(pose, "weights.onnx"), 4, 15),
        pose,
        out,
        "shapes-yolo26pose",
        "keypoint-detection",
        "yolo26n-pose",
        extra_files=["keypoints_metadata.json"],
    )
    write(rfdetr_seg(os.path.join(seg, "weights.onnx"), 4, 640, 160), seg, out, "shapes-rfdetrseg", "instance-segmentation", "rfdetr-seg-nano")
    coco = os.path.join(models, "coco", "1")
    write(tiny_like(os.path.join(coco, "weights.onnx")), coco, out, "tiny-coco", "object-detection", "yolov8n")


if __name__ == "__main__":
    main()
