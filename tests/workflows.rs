//! Roboflow Workflows over real HTTP: the reference's own answers (tests/fixtures/golden/
//! workflows, Roboflow Inference 1.8.3) replayed and compared, volatile fields aside; the
//! rules of the reference document the goldens do not show (coordinate systems on crops,
//! `continue_if` on a batch, zero crops, dimension collapse); the reference's two-crop bug
//! answered correctly; the limits; saved workflows (the `local` workspace, Roboflow's API
//! stand-in on loopback, offline); and `inference_sdk` unchanged.
//!
//! Tier: full (docs/tests.md).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::workflows::{post, replay, replay_case, same};
use common::{b64, eventually, fixture, golden, metric, python_check, repo, Server};
use serde_json::{json, Value};

const MODELS: &str = "coco/1,imagenet/1,shapes-seg/1,shapes-pose/1";

/// The successful cases answer as the reference did.
#[test]
fn golden_cases_answer_as_the_reference() {
    let s = Server::start(MODELS, &[]);
    for name in [
        "01_object_detection",
        "02_detections_filter",
        "03b_two_stage_single_crop",
        "04_instance_segmentation",
        "05_keypoint_detection",
        "06_visualization",
        "07_property_definition_count",
        "09_batch_two_images",
        "10a_parameters_default",
        "10b_parameters_override_excluded",
        "12_classification",
        "14a_validate_ok",
        "14c2_describe_interface",
        "14d_ee_versions",
        "15b_detection_offset",
    ] {
        let (r, case) = replay_case(&s, name);
        if name.starts_with("14c2") {
            // The interface: inputs and outputs with their kinds.
            for k in ["inputs", "outputs"] {
                assert_eq!(r.body[k], case["response"][k], "{name}.{k}");
            }
            continue;
        }
        same(&r.body, &case["response"], name);
    }
}

/// A drawn image is a JPEG of the image's size with the boxes drawn where the detections
/// are (not the reference's pixels: its text is drawn with OpenCV's fonts).
#[test]
fn drawn_images_are_jpegs_with_the_boxes() {
    use base64::Engine as _;
    let s = Server::start("coco/1", &[]);
    let case = golden("workflows/06_visualization.json");
    let mut req = replay(&case);
    req["specification"]["steps"].as_array_mut().unwrap().pop();
    req["specification"]["outputs"][1]["selector"] = json!("$steps.bbox.image");
    let r = s.post_json("/workflows/run", &req);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    assert_eq!(out["annotated"]["type"], "base64");
    assert_eq!(
        out["annotated"]["video_metadata"]["video_identifier"],
        "image"
    );
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(out["annotated"]["value"].as_str().unwrap())
        .unwrap();
    let drawn = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    let plain = image::load_from_memory(&fixture("images/dog.jpg"))
        .unwrap()
        .to_rgb8();
    assert_eq!(drawn.dimensions(), (768, 576));
    // The bicycle's box (x 346, w 448 → left edge 122) is drawn in the palette's first
    // colour for class 1 (#FF4040): the left edge changed, the box's middle did not.
    let p = &out["predictions"]["predictions"][0];
    let (x1, y) = (
        (p["x"].as_f64().unwrap() - p["width"].as_f64().unwrap() / 2.0).round() as u32,
        p["y"].as_f64().unwrap() as u32,
    );
    // The line is 2 pixels wide and JPEG's halved chroma blurs its colour: at the reddest
    // pixel near the edge, red rose and green fell against the photo.
    let x = (x1 - 3..=x1 + 3)
        .max_by_key(|&x| {
            let p = drawn.get_pixel(x, y).0;
            p[0] as i32 - p[1] as i32
        })
        .unwrap();
    let (px, was) = (drawn.get_pixel(x, y).0, plain.get_pixel(x, y).0);
    assert!(
        px[0] as i32 >= was[0] as i32 + 40 && px[1] as i32 + 20 <= was[1] as i32,
        "edge pixel {px:?}, the photo's {was:?}"
    );
    let diff = |a: [u8; 3], b: [u8; 3]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as i32 - y as i32).abs())
            .sum::<i32>()
    };
    let mid = (p["x"].as_f64().unwrap() as u32, y);
    assert!(
        diff(
            drawn.get_pixel(mid.0, mid.1).0,
            plain.get_pixel(mid.0, mid.1).0
        ) < 40,
        "the middle of the box changed"
    );
}

/// The reference fails with 500 when a classification step gets two crops (case 03);
/// cvserve classifies each crop, and the dog's crop as the single-crop case (03b) did.
#[test]
fn two_crops_are_each_classified() {
    let s = Server::start("coco/1,imagenet/1", &[]);
    let case = golden("workflows/03_two_stage_crop_classify.json");
    assert_eq!(case["status"], 500);
    let mut req = replay(&case);
    // As 03b, which shows the reference's answer for the dog's crop.
    req["specification"]["steps"][2]["confidence"] = json!(0.05);
    let r = s.post_json("/workflows/run", &req);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let dets = out["detections"]["predictions"].as_array().unwrap();
    let classes = out["crop_classes"].as_array().unwrap();
    let crops = out["crops"].as_array().unwrap();
    assert_eq!((dets.len(), classes.len(), crops.len()), (2, 2, 2), "{out}");
    for ((d, c), crop) in dets.iter().zip(classes).zip(crops) {
        assert_eq!(c["parent_id"], d["detection_id"]);
        assert_eq!(crop["parent_id"], d["detection_id"]);
        assert_eq!(c["root_parent_id"], "image");
        assert_eq!(
            c["image"]["width"].as_f64().unwrap(),
            d["width"].as_f64().unwrap()
        );
        assert_eq!(
            crop["parent_origin"]["offset_x"].as_f64().unwrap(),
            d["x"].as_f64().unwrap() - d["width"].as_f64().unwrap() / 2.0
        );
    }
    let gold = golden("workflows/03b_two_stage_single_crop.json");
    let gold_dog = &gold["response"]["outputs"][0]["crop_classes"][0];
    let dog = dets.iter().position(|d| d["class"] == "dog").unwrap();
    assert_eq!(classes[dog]["top"], gold_dog["top"], "{}", classes[dog]);
    let names = |c: &Value| {
        c["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["class"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&classes[dog]), names(gold_dog));
    assert!(
        (classes[dog]["confidence"].as_f64().unwrap() - gold_dog["confidence"].as_f64().unwrap())
            .abs()
            < 0.03
    );
}

/// Errors have the reference's statuses, types, contexts and step names.
#[test]
fn errors_answer_as_the_reference() {
    let s = Server::start("coco/1", &[]);
    for name in [
        "08a_error_unknown_block",
        "08b_error_missing_input",
        "08c_error_bad_selector",
        "08d_error_unknown_model",
        "08e_error_bad_image",
        "08f_error_missing_step_field",
        "08g_error_field_out_of_range",
        "08h_error_no_specification",
        "14b_validate_bad",
    ] {
        let case = golden(&format!("workflows/{name}.json"));
        let r = post(&s, &case);
        let g = &case["response"];
        assert_eq!(
            r.status,
            case["status"].as_u64().unwrap() as u16,
            "{name}: {}",
            r.body
        );
        if name.starts_with("08h") {
            assert_eq!(r.body, *g, "{name}");
            continue;
        }
        for k in ["error_type", "context"] {
            assert_eq!(r.body[k], g[k], "{name}.{k}: {}", r.body);
        }
        if ["08b", "08c", "08f", "08g", "08a", "14b"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            assert_eq!(r.body["message"], g["message"], "{name}");
        }
        if let Some(be) = g["blocks_errors"].as_array() {
            let ours = r.body["blocks_errors"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {}", r.body));
            for k in ["block_id", "block_type", "property_name"] {
                assert_eq!(ours[0][k], be[0][k], "{name}.blocks_errors.{k}");
            }
            if ["08c", "08f", "08g"].iter().any(|p| name.starts_with(p)) {
                assert_eq!(
                    ours[0]["property_details"], be[0]["property_details"],
                    "{name}"
                );
            }
        }
    }
    // The server keeps serving.
    let ok = s.post_json(
        "/workflows/run",
        &replay(&golden("workflows/01_object_detection.json")),
    );
    assert_eq!(ok.status, 200);
}

fn detect(conf: f64) -> Value {
    json!({"type": "roboflow_core/roboflow_object_detection_model@v1", "name": "det",
           "images": "$inputs.image", "model_id": "coco/1", "confidence": conf})
}

fn image(file: &str) -> Value {
    json!({"type": "base64", "value": b64(file)})
}

fn run(s: &Server, spec: Value, inputs: Value) -> common::Resp {
    s.post_json(
        "/workflows/run",
        &json!({"specification": spec, "inputs": inputs}),
    )
}

/// Detections made on crops come back in the root image's coordinates by default
/// (`parent`) and in the crop's with `own`; `$steps.x.*` gives all of a step's outputs.
#[test]
fn coordinates_systems_on_crops() {
    let s = Server::start("coco/1", &[]);
    let spec = json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [detect(0.5),
            {"type": "roboflow_core/detection_offset@v1", "name": "grow", "predictions": "$steps.det.predictions", "offset_width": 100, "offset_height": 100},
            {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": "$inputs.image", "predictions": "$steps.grow.predictions"},
            {"type": "roboflow_core/roboflow_object_detection_model@v1", "name": "det2", "images": "$steps.crop.crops", "model_id": "coco/1", "confidence": 0.3}],
        "outputs": [
            {"type": "JsonField", "name": "root", "selector": "$steps.det2.predictions"},
            {"type": "JsonField", "name": "own", "selector": "$steps.det2.predictions", "coordinates_system": "own"},
            {"type": "JsonField", "name": "all", "selector": "$steps.det2.*"},
            {"type": "JsonField", "name": "crops", "selector": "$steps.crop.crops"}]});
    let r = run(&s, spec, json!({"image": image("images/horses.jpg")}));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let (root, own, crops) = (
        out["root"].as_array().unwrap(),
        out["own"].as_array().unwrap(),
        out["crops"].as_array().unwrap(),
    );
    assert!(!root.is_empty() && root.len() == own.len() && own.len() == crops.len());
    let mut checked = 0;
    for ((r, o), c) in root.iter().zip(own).zip(crops) {
        assert_eq!(r["image"], json!({"width": 773, "height": 512}));
        assert_eq!(
            o["image"]["width"],
            c["parent_origin"]["width"]
                .as_u64()
                .map(|_| o["image"]["width"].clone())
                .unwrap()
        );
        let (dx, dy) = (
            c["root_parent_origin"]["offset_x"].as_f64().unwrap(),
            c["root_parent_origin"]["offset_y"].as_f64().unwrap(),
        );
        for (pr, po) in r["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .zip(o["predictions"].as_array().unwrap())
        {
            assert_eq!(pr["x"].as_f64().unwrap(), po["x"].as_f64().unwrap() + dx);
            assert_eq!(pr["y"].as_f64().unwrap(), po["y"].as_f64().unwrap() + dy);
            assert_eq!(pr["parent_id"], "image");
            assert!(pr.get("parent_origin").is_none());
            assert_eq!(po["parent_id"], c["parent_id"]);
            assert_eq!(po["root_parent_id"], "image");
            assert_eq!(po["parent_origin"]["offset_x"].as_f64().unwrap(), dx);
            checked += 1;
        }
    }
    assert!(checked > 0, "no detections on the crops: {out}");
    let all = out["all"].as_array().unwrap();
    assert!(all[0]["inference_id"].is_string() && all[0]["predictions"]["predictions"].is_array());
}

/// `continue_if` stops the branch of the images whose condition fails: their outputs are
/// `null`, the others' are computed.
#[test]
fn continue_if_gates_each_image_of_a_batch() {
    let s = Server::start("coco/1", &[]);
    let spec = json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [detect(0.4),
            {"type": "roboflow_core/property_definition@v1", "name": "count", "data": "$steps.det.predictions", "operations": [{"type": "SequenceLength"}]},
            {"type": "roboflow_core/continue_if@v1", "name": "gate",
             "condition_statement": {"type": "StatementGroup", "statements": [{"type": "BinaryStatement",
                "left_operand": {"type": "DynamicOperand", "operand_name": "dets", "operations": [{"type": "DetectionsPropertyExtract", "property_name": "class_name"}]},
                "comparator": {"type": "(Sequence) contains"}, "right_operand": {"type": "StaticOperand", "value": "dog"}}]},
             "evaluation_parameters": {"dets": "$steps.det.predictions"}, "next_steps": ["$steps.viz"]},
            {"type": "roboflow_core/bounding_box_visualization@v1", "name": "viz", "image": "$inputs.image", "predictions": "$steps.det.predictions"}],
        "outputs": [{"type": "JsonField", "name": "count", "selector": "$steps.count.output"},
                    {"type": "JsonField", "name": "viz", "selector": "$steps.viz.image"}]});
    let r = run(
        &s,
        spec,
        json!({"image": [image("images/dog.jpg"), image("images/horses.jpg")]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let out = r.body["outputs"].as_array().unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["count"], 2);
    assert_eq!(out[0]["viz"]["type"], "base64");
    assert_eq!(
        out[0]["viz"]["video_metadata"]["video_identifier"],
        "image.[0]"
    );
    // cow 0.58, cow 0.53, horse 0.48 (the next, a horse, is 0.37).
    assert_eq!(out[1]["count"], 3);
    assert!(out[1]["viz"].is_null(), "{}", out[1]["viz"]);
}

/// No detections: no crops, the nested outputs are empty lists, and dimension_collapse
/// gives an empty list per image; with detections it gathers one value per crop.
#[test]
fn zero_crops_and_dimension_collapse() {
    let s = Server::start("coco/1,imagenet/1", &[]);
    let spec = |conf: f64| {
        json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [detect(conf),
            {"type": "roboflow_core/detection_offset@v1", "name": "grow", "predictions": "$steps.det.predictions", "offset_width": 10, "offset_height": 10},
            {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": "$inputs.image", "predictions": "$steps.grow.predictions"},
            {"type": "roboflow_core/roboflow_classification_model@v1", "name": "cls", "images": "$steps.crop.crops", "model_id": "imagenet/1"},
            {"type": "roboflow_core/property_definition@v1", "name": "top", "data": "$steps.cls.predictions", "operations": [{"type": "ClassificationPropertyExtract", "property_name": "top_class"}]},
            {"type": "roboflow_core/dimension_collapse@v1", "name": "tops", "data": "$steps.top.output"}],
        "outputs": [{"type": "JsonField", "name": "crops", "selector": "$steps.crop.crops"},
                    {"type": "JsonField", "name": "classes", "selector": "$steps.cls.predictions"},
                    {"type": "JsonField", "name": "tops", "selector": "$steps.tops.output"}]})
    };
    let r = run(&s, spec(0.99), json!({"image": image("images/dog.jpg")}));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    assert_eq!(out["crops"], json!([]));
    assert_eq!(out["classes"], json!([]));
    assert_eq!(out["tops"], json!([]));
    let r = run(&s, spec(0.4), json!({"image": image("images/dog.jpg")}));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let tops = out["tops"].as_array().unwrap();
    assert_eq!(tops.len(), 2);
    let classes = out["classes"].as_array().unwrap();
    for (t, c) in tops.iter().zip(classes) {
        assert_eq!(t, &c["top"]);
    }
}

/// Expression, UQL transformations and static crops, checked against what they must give.
#[test]
fn expression_transformation_and_static_crops() {
    let s = Server::start("coco/1", &[]);
    let spec = json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"},
            {"type": "WorkflowParameter", "name": "wanted", "default_value": "dog"}],
        "steps": [detect(0.3),
            {"type": "roboflow_core/detections_transformation@v1", "name": "sorted", "predictions": "$steps.det.predictions",
             "operations": [{"type": "SortDetections", "mode": "confidence", "ascending": true},
                            {"type": "DetectionsFilter", "filter_operation": {"type": "StatementGroup", "statements": [
                               {"type": "BinaryStatement", "left_operand": {"type": "DynamicOperand", "operations": [{"type": "ExtractDetectionProperty", "property_name": "class_name"}]},
                                "comparator": {"type": "in (Sequence)"}, "right_operand": {"type": "DynamicOperand", "operand_name": "keep"}}]}}],
             "operations_parameters": {"keep": ["dog", "bicycle", "truck"]}},
            {"type": "roboflow_core/expression@v1", "name": "verdict", "data": {"dets": "$steps.sorted.predictions", "wanted": "$inputs.wanted"},
             "data_operations": {"dets": [{"type": "DetectionsPropertyExtract", "property_name": "class_name"}]},
             "switch": {"type": "CasesDefinition", "cases": [{"type": "CaseDefinition",
                 "condition": {"type": "StatementGroup", "statements": [{"type": "BinaryStatement",
                    "left_operand": {"type": "DynamicOperand", "operand_name": "wanted"}, "comparator": {"type": "in (Sequence)"},
                    "right_operand": {"type": "DynamicOperand", "operand_name": "dets"}}]},
                 "result": {"type": "StaticCaseResult", "value": "FOUND"}}],
               "default": {"type": "StaticCaseResult", "value": "MISSING"}}},
            {"type": "roboflow_core/absolute_static_crop@v1", "name": "abs", "images": "$inputs.image", "x_center": 100, "y_center": 50, "width": 80, "height": 40},
            {"type": "roboflow_core/relative_statoic_crop@v1", "name": "rel", "images": "$inputs.image", "x_center": 0.5, "y_center": 0.5, "width": 0.5, "height": 0.25},
            {"type": "roboflow_core/property_definition@v1", "name": "relsize", "data": "$steps.rel.crops", "operations": [{"type": "ExtractImageProperty", "property_name": "size"}]},
            {"type": "roboflow_core/relative_statoic_crop@v1", "name": "rel2", "images": "$inputs.image", "x_center": 0.3, "y_center": 0.6, "width": 0.4, "height": 0.6},
            {"type": "roboflow_core/property_definition@v1", "name": "rel2size", "data": "$steps.rel2.crops", "operations": [{"type": "ExtractImageProperty", "property_name": "size"}]},
            {"type": "roboflow_core/property_definition@v1", "name": "height", "data": "$inputs.image", "operations": [{"type": "ExtractImageProperty", "property_name": "height"}]},
            {"type": "roboflow_core/property_definition@v1", "name": "mapped", "data": "$steps.sorted.predictions", "operations": [
                {"type": "DetectionsPropertyExtract", "property_name": "class_name"},
                {"type": "SequenceMap", "lookup_table": {"dog": "pet", "bicycle": "vehicle", "truck": "vehicle"}}]}],
        "outputs": [{"type": "JsonField", "name": "sorted", "selector": "$steps.sorted.predictions"},
                    {"type": "JsonField", "name": "verdict", "selector": "$steps.verdict.output"},
                    {"type": "JsonField", "name": "abs", "selector": "$steps.abs.crops"},
                    {"type": "JsonField", "name": "relsize", "selector": "$steps.relsize.output"},
                    {"type": "JsonField", "name": "rel2", "selector": "$steps.rel2.crops"},
                    {"type": "JsonField", "name": "rel2size", "selector": "$steps.rel2size.output"},
                    {"type": "JsonField", "name": "height", "selector": "$steps.height.output"},
                    {"type": "JsonField", "name": "mapped", "selector": "$steps.mapped.output"}]});
    let r = run(&s, spec.clone(), json!({"image": image("images/dog.jpg")}));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let sorted = out["sorted"]["predictions"].as_array().unwrap();
    let confs: Vec<f64> = sorted
        .iter()
        .map(|p| p["confidence"].as_f64().unwrap())
        .collect();
    assert!(confs.windows(2).all(|w| w[0] <= w[1]), "{confs:?}");
    assert!(sorted
        .iter()
        .all(|p| ["dog", "bicycle", "truck"].contains(&p["class"].as_str().unwrap())));
    assert_eq!(sorted.len(), 3, "{}", out["sorted"]);
    assert_eq!(out["verdict"], "FOUND");
    assert_eq!(
        out["abs"]["parent_origin"],
        json!({"offset_x": 60, "offset_y": 30, "width": 768, "height": 576})
    );
    assert_eq!(out["relsize"], 384 * 144);
    // As the reference crops (captured from Roboflow Inference 1.8.3): fractions rounded to
    // whole pixels first, halves to even (x: 230 - 307 / 2 = 76.5 gives 76), and crops named
    // after their block.
    assert_eq!(
        out["rel2"]["parent_origin"],
        json!({"offset_x": 76, "offset_y": 173, "width": 768, "height": 576})
    );
    assert_eq!(out["rel2size"], 307 * 346);
    // An input image's property (decoded for it), and each class through a lookup table.
    assert_eq!(out["height"], 576);
    let mapped: Vec<&str> = sorted
        .iter()
        .map(|p| match p["class"].as_str().unwrap() {
            "dog" => "pet",
            _ => "vehicle",
        })
        .collect();
    assert_eq!(out["mapped"], json!(mapped));
    for (k, block) in [
        ("rel2", "relative_static_crop."),
        ("abs", "absolute_static_crop."),
    ] {
        let id = out[k]["video_metadata"]["video_identifier"]
            .as_str()
            .unwrap();
        assert!(id.starts_with(block), "{id}");
    }
    let r = run(
        &s,
        spec,
        json!({"image": image("images/dog.jpg"), "wanted": "cat"}),
    );
    assert_eq!(r.body["outputs"][0]["verdict"], "MISSING");
}

/// Every limit answers 413 naming its setting, and the server keeps serving.
#[test]
fn limits_answer_413() {
    let s = Server::start(
        "coco/1",
        &[
            ("WORKFLOW_MAX_IMAGES", "2"),
            ("WORKFLOW_MAX_CROPS", "1"),
            ("WORKFLOW_MAX_STEPS", "3"),
            ("WORKFLOW_MAX_ANSWER_BYTES", "2000"),
        ],
    );
    let crop = json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [detect(0.3), {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": "$inputs.image", "predictions": "$steps.det.predictions"}],
        "outputs": [{"type": "JsonField", "name": "n", "selector": "$steps.crop.crops"}]});
    let dog = image("images/dog.jpg");
    let r = run(
        &s,
        crop.clone(),
        json!({"image": [dog.clone(), dog.clone(), dog.clone()]}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("WORKFLOW_MAX_IMAGES"));
    let r = run(&s, crop.clone(), json!({"image": dog.clone()}));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("WORKFLOW_MAX_CROPS"));
    let mut many = crop.clone();
    for i in 0..3 {
        many["steps"].as_array_mut().unwrap().push(json!({"type": "roboflow_core/property_definition@v1", "name": format!("p{i}"), "data": "$steps.det.predictions", "operations": []}));
    }
    let r = run(&s, many, json!({"image": dog.clone()}));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("WORKFLOW_MAX_STEPS"));
    let echo = json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}], "steps": [],
        "outputs": [{"type": "JsonField", "name": "same", "selector": "$inputs.image"}]});
    let r = run(&s, echo, json!({"image": dog.clone()}));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("WORKFLOW_MAX_ANSWER_BYTES"));
    let ok = run(
        &s,
        json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}], "steps": [detect(0.9)],
        "outputs": [{"type": "JsonField", "name": "p", "selector": "$steps.det.predictions"}]}),
        json!({"image": dog}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// Runs are counted per workflow and timed per step, with bounded labels; the crops of a
/// request reach the classifier as one batch.
#[test]
fn metrics_per_workflow_and_step() {
    // Batches of up to 4, and time enough to fill them: the two crops are one batch.
    let s = Server::start(
        "coco/1,imagenet/1",
        &[
            ("MAX_BATCH_SIZE", "4"),
            ("MAX_QUEUE_DELAY_MICROSECONDS", "50000"),
        ],
    );
    let before = metric(&s, "cvserve_batch_size_count");
    let r = s.post_json(
        "/workflows/run",
        &replay(&golden("workflows/03_two_stage_crop_classify.json")),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        metric(
            &s,
            "cvserve_workflow_requests_total{status=\"200\",workflow=\"inline\"}"
        ),
        1.0
    );
    let metrics = s.get("/metrics").body;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("cvserve_workflow_step_seconds_count{block=\"roboflow_core/dynamic_crop@v1\",workflow=\"inline\"} 1"), "{text}");
    // One detection batch and one batch of the two crops.
    assert_eq!(metric(&s, "cvserve_batch_size_count") - before, 2.0);
}

/// A saved workflow: the `local` workspace from MODEL_CACHE_DIR (case 08j), another
/// workspace from Roboflow's API (a stand-in on loopback; cached, `use_cache: false`
/// fetches again), and 503 when the API cannot be reached (case 08i).
#[test]
fn saved_workflows_local_api_and_offline() {
    let case = golden("workflows/08j_predefined_local_workspace.json");
    let cache = tempdir_with_models(&case);
    let api = FakeApi::start(
        case["local_file"]["content"]["config"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let s = Server::start(
        "coco/1",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("API_BASE_URL", &api.base),
        ],
    );
    let r = s.post_json(case["path"].as_str().unwrap(), &replay(&case));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, case["response"]);
    let r = s.post_json("/local/workflows/nope", &replay(&case));
    assert_eq!(r.status, 404, "{}", r.body);
    let body = replay(&case);
    let r = s.post_json("/my-ws/workflows/counting", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, case["response"]);
    let r = s.post_json("/infer/workflows/my-ws/counting", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        api.hits.load(Ordering::SeqCst),
        1,
        "the definition is cached"
    );
    let mut fresh = body.clone();
    fresh["use_cache"] = json!(false);
    assert_eq!(s.post_json("/my-ws/workflows/counting", &fresh).status, 200);
    assert_eq!(api.hits.load(Ordering::SeqCst), 2);
    assert_eq!(s.post_json("/my-ws/workflows/missing", &body).status, 404);
    drop(s);
    let offline = Server::start("coco/1", &[("OFFLINE_MODE", "true")]);
    let case = golden("workflows/08i_error_predefined_offline.json");
    let r = offline.post_json(case["path"].as_str().unwrap(), &replay(&case));
    assert_eq!(r.status, 503);
    assert_eq!(r.body, case["response"]);
}

/// MODEL_CACHE_DIR for a test: the repository's models linked in, and 08j's local file.
fn tempdir_with_models(case: &Value) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("wf-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo().join("models")).unwrap().flatten() {
        std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let file = dir.join(case["local_file"]["name"].as_str().unwrap());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, case["local_file"]["content"].to_string()).unwrap();
    dir
}

/// A stand-in of Roboflow's API answering `/my-ws/workflows/counting`.
struct FakeApi {
    base: String,
    hits: Arc<AtomicUsize>,
}

impl FakeApi {
    fn start(config: String) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                loop {
                    let mut hdr = String::new();
                    if reader.read_line(&mut hdr).unwrap_or(0) == 0 || hdr == "\r\n" {
                        break;
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .split('?')
                    .next()
                    .unwrap_or("/")
                    .to_owned();
                let (status, body) = if path == "/my-ws/workflows/counting" {
                    (
                        "200 OK",
                        json!({"workflow": {"id": "counting", "config": config}}).to_string(),
                    )
                } else {
                    ("404 Not Found", "{}".to_owned())
                };
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        FakeApi { base, hits }
    }
}

/// `inference_sdk`'s `run_workflow` (inline, a batch, by id) and `infer_from_workflow`
/// work unchanged.
#[test]
fn inference_sdk_runs_workflows_unchanged() {
    let python = std::env::var("CVSERVE_SDK_PYTHON")
        .expect("CVSERVE_SDK_PYTHON is not set: run the tests through scripts/test.sh");
    let case = golden("workflows/08j_predefined_local_workspace.json");
    let cache = tempdir_with_models(&case);
    let s = Server::start(
        "coco/1",
        &[
            ("MODEL_CACHE_DIR", cache.to_str().unwrap()),
            ("OFFLINE_MODE", "true"),
        ],
    );
    let (ok, report) = python_check(
        &python,
        "workflow_sdk.py",
        &[
            s.base.as_ref(),
            repo().join("tests/fixtures").as_os_str(),
            "my-local-workflow".as_ref(),
        ],
    );
    assert!(ok, "{report}\n{}", s.logs());
    // The report is stdout then stderr (the client's warnings): the JSON line is stdout's.
    let line = report
        .lines()
        .find(|l| l.starts_with("{\"single\""))
        .unwrap_or_else(|| panic!("no result line: {report}"));
    let out: Value = serde_json::from_str(line).unwrap();
    assert_eq!(out["single"]["keys"], json!(["predictions"]));
    assert_eq!(out["single"]["classes"], json!(["bicycle"]));
    assert_eq!(out["batch"].as_array().unwrap().len(), 2);
    assert_eq!(out["batch"][0]["viz_type"], "str");
    assert!(out["batch"][0]["viz_len"].as_u64().unwrap() > 10_000);
    assert!(out["batch"][1]["classes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "horse"));
    assert_eq!(out["legacy"]["classes"], json!(["bicycle", "dog"]));
    assert_eq!(out["local"], json!([{"count": 3}]));
    assert_eq!(
        out["offline_error"]["status"], 503,
        "{}",
        out["offline_error"]
    );
}

/// The describe routes list this server's blocks in the reference's shape.
#[test]
fn blocks_describe_and_schema() {
    let s = Server::start("none", &[]);
    let r = s.get("/workflows/blocks/describe");
    assert_eq!(r.status, 200);
    let gold = golden("workflows/14e_workflows_blocks_describe.json");
    let keys: Vec<&str> = gold["response"]["example_block_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let blocks = r.body["blocks"].as_array().unwrap();
    for b in blocks {
        let mut ours: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        ours.sort();
        assert_eq!(ours, keys);
    }
    let ids: Vec<&str> = blocks
        .iter()
        .map(|b| b["manifest_type_identifier"].as_str().unwrap())
        .collect();
    for id in [
        "roboflow_core/dynamic_crop@v1",
        "roboflow_core/roboflow_object_detection_model@v2",
        "roboflow_core/label_visualization@v1",
    ] {
        assert!(ids.contains(&id), "{id}");
    }
    for k in [
        "declared_kinds",
        "kinds_connections",
        "primitives_connections",
        "universal_query_language_description",
        "dynamic_block_definition_schema",
    ] {
        assert!(r.body.get(k).is_some(), "{k}");
    }
    let schema = s.get("/workflows/definition/schema");
    assert_eq!(schema.body["schema"]["title"], "WorkflowSpecificationV1");
    assert_eq!(
        schema.body["schema"]["required"].as_array().unwrap().len(),
        4
    );
    let no_key = golden("workflows/14c_describe_interface_no_key.json");
    let r = post(&s, &no_key);
    assert_eq!((r.status, &r.body), (400, &no_key["response"]));
}

fn classify_spec() -> Value {
    json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [{"type": "roboflow_core/roboflow_classification_model@v1", "name": "cls",
                   "images": "$inputs.image", "model_id": "imagenet/1"}],
        "outputs": [{"type": "JsonField", "name": "cls", "selector": "$steps.cls.predictions"}]})
}

fn detect_spec() -> Value {
    json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [detect(0.4)],
        "outputs": [{"type": "JsonField", "name": "p", "selector": "$steps.det.predictions"}]})
}

/// A workflow whose model is not loaded waits for the load only until its deadline (503 with
/// Retry-After, the load goes on), and a workflow on a loaded model is served meanwhile
/// (the reference stalls every workflow during a load, roboflow/inference#2448).
#[test]
fn a_cold_model_in_one_workflow_never_stalls_another() {
    let s = Server::start(
        "coco/1",
        &[
            ("CVSERVE_INJECT_LOAD_DELAY_MS", "5000"),
            ("CVSERVE_INJECT_MODEL", "imagenet/1"),
        ],
    );
    let cold =
        json!({"specification": classify_spec(), "inputs": {"image": image("images/chelsea.jpg")}});
    let r = s.post_json_with_headers("/workflows/run", &cold, &[("X-Request-Timeout-Ms", "800")]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    assert_eq!(r.body["error_type"], "StepExecutionError", "{}", r.body);
    assert_eq!(r.body["blocks_errors"][0]["block_id"], "cls", "{}", r.body);
    // The load runs on: a workflow on the loaded model is answered meanwhile.
    let r = run(&s, detect_spec(), json!({"image": image("images/dog.jpg")}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["outputs"][0]["p"]["predictions"][0]["class"],
        "bicycle"
    );
    let registry = || s.get("/model/registry").body.to_string();
    assert!(
        !registry().contains("imagenet/1"),
        "loaded already: the injected delay is too short"
    );
    eventually("the load to finish", Duration::from_secs(60), || {
        registry().contains("imagenet/1")
    });
    let r = s.post_json("/workflows/run", &cold);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["outputs"][0]["cls"]["top"], "Egyptian cat",
        "{}",
        r.body
    );
}

/// A client that hangs up while its workflow's model step runs gives back its in-flight
/// place and its waiting-room ticket at once, while the batch still runs.
#[test]
fn a_workflow_cancelled_mid_flight_gives_back_its_place_and_ticket() {
    let s = Server::start(
        "coco/1",
        &[
            ("CVSERVE_INJECT_DELAY_MS", "8000"),
            ("CVSERVE_INJECT_MODEL", "coco/1"),
            ("MAX_BATCH_SIZE", "1"),
            ("REQUEST_TIMEOUT_S", "60"),
        ],
    );
    // The trailing space keeps each name from matching longer ones.
    let held = || {
        (
            metric(&s, "cvserve_inflight_requests "),
            metric(&s, "cvserve_requests_in_line "),
        )
    };
    let batches = || metric(&s, "cvserve_inference_seconds_count{model=\"coco/1\"}");
    assert_eq!(held(), (0.0, 0.0));
    let before = batches();
    let body = serde_json::to_vec(
        &json!({"specification": detect_spec(), "inputs": {"image": image("images/dog.jpg")}}),
    )
    .unwrap();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /workflows/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    eventually(
        "the run to hold its place and its ticket",
        Duration::from_secs(20),
        || held() == (1.0, 1.0),
    );
    drop(stream);
    eventually(
        "what the run held to come back",
        Duration::from_secs(5),
        || held() == (0.0, 0.0),
    );
    assert_eq!(batches(), before, "given back while its batch still ran");
}
