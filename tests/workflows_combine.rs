//! Roboflow Workflows II: slicing and stitching (SAHI), consensus between models, classes
//! replaced by a second-stage classifier, and the mask, polygon, crop and
//! classification-label drawings; the reference's captured answers (cases 21-27 of
//! tests/fixtures/golden/workflows, Roboflow Inference 1.8.3) replayed and compared, the
//! tiles of a request going through the model's batches together, and the limits.
//!
//! Tier: full (docs/tests.md).

mod common;

use base64::Engine as _;
use common::workflows::{replay, replay_case, same};
use common::{fixture, golden, metric, Server};
use image::RgbImage;
use serde_json::{json, Value};

const MODELS: &str = "coco/1,imagenet/1,shapes-seg/1,shapes-det/1,shapes-det-v5/1";

/// Every captured case of the blocks answers as the reference did.
#[test]
fn captured_cases_answer_as_the_reference() {
    let s = Server::start(MODELS, &[]);
    for name in [
        "21_sahi_v2_nms",
        "22_sahi_v1_nmm_batch",
        "23_sahi_v2_none_params",
        "24_consensus_two_models",
        "24b_consensus_modes",
        "24c_consensus_required_per_class",
        "25_classes_replacement",
        "25b_classes_replacement_fallback",
        "25c_classes_replacement_no_fallback",
        "26_mask_polygon_visualization",
        "27_crop_and_classification_label_visualization",
    ] {
        let (r, case) = replay_case(&s, name);
        same(&r.body, &case["response"], name);
        // What a stitch, a vote or a replacement keeps is as many detections as the
        // reference kept (case 23 keeps every tile's, where the two NMS rules differ).
        if !name.starts_with("23") {
            for (o, g) in r.body["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(case["response"]["outputs"].as_array().unwrap())
            {
                for (k, gv) in g.as_object().unwrap() {
                    if let Some(gp) = gv.get("predictions").and_then(Value::as_array) {
                        if gv.get("top").is_none() && k != "tiles" {
                            let n = o[k]["predictions"].as_array().map_or(0, Vec::len);
                            assert_eq!(n, gp.len(), "{name}.{k}: how many kept");
                        }
                    }
                }
            }
        }
    }
}

fn spec(steps: Value, outputs: &[(&str, &str)]) -> Value {
    json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": steps,
        "outputs": outputs.iter().map(|(n, s)| json!({"type": "JsonField", "name": n, "selector": s})).collect::<Vec<_>>()})
}

fn image(file: &str) -> Value {
    json!({"type": "base64", "value": base64::engine::general_purpose::STANDARD.encode(fixture(file))})
}

fn sahi(v: &str, w: u32, h: u32, strategy: &str) -> Value {
    json!([
        {"type": format!("roboflow_core/image_slicer@{v}"), "name": "slicer", "image": "$inputs.image",
         "slice_width": w, "slice_height": h},
        {"type": "roboflow_core/roboflow_object_detection_model@v2", "name": "det",
         "images": "$steps.slicer.slices", "model_id": "coco/1"},
        {"type": "roboflow_core/detections_stitch@v1", "name": "stitch", "reference_image": "$inputs.image",
         "predictions": "$steps.det.predictions", "overlap_filtering_strategy": strategy}])
}

/// How far two pixels are apart: the sum of the channels' differences.
fn apart(a: &RgbImage, b: &RgbImage, x: u32, y: u32) -> i32 {
    a.get_pixel(x, y)
        .0
        .iter()
        .zip(b.get_pixel(x, y).0)
        .map(|(p, q)| (*p as i32 - q as i32).abs())
        .sum()
}

fn decode(v: &Value) -> RgbImage {
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(v["value"].as_str().expect("an image"))
        .unwrap();
    image::load_from_memory(&jpeg).unwrap().to_rgb8()
}

/// The tiles of every image of a request reach the model in its batches together (never a
/// request per tile); each tile's own detections sit in the tile, stitched ones in the photo.
#[test]
fn tiles_of_a_request_share_the_models_batches() {
    let s = Server::start(
        "coco/1",
        &[
            ("MAX_BATCH_SIZE", "8"),
            ("MAX_QUEUE_DELAY_MICROSECONDS", "200000"),
        ],
    );
    let (count, sum) = (
        "cvserve_batch_size_count{model=\"coco/1\"}",
        "cvserve_batch_size_sum{model=\"coco/1\"}",
    );
    let before = (metric(&s, count), metric(&s, sum));
    // kite.jpg (1352x900) in six 640x640 tiles, dog.jpg (768x576) in two 640x576 ones.
    let body = json!({"specification": spec(sahi("v2", 640, 640, "none"),
        &[("stitched", "$steps.stitch.predictions"), ("tiles", "$steps.det.predictions"), ("slices", "$steps.slicer.slices")]),
        "inputs": {"image": [image("images/kite.jpg"), image("images/dog.jpg")]}});
    let mut body = body;
    body["specification"]["outputs"][1]["coordinates_system"] = json!("own");
    let r = s.post_json("/workflows/run", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(metric(&s, sum) - before.1, 8.0, "every tile inferred once");
    assert_eq!(
        metric(&s, count) - before.0,
        1.0,
        "the eight tiles in one batch"
    );
    let kite = &r.body["outputs"][0];
    assert_eq!(kite["slices"].as_array().unwrap().len(), 6);
    assert_eq!(r.body["outputs"][1]["slices"].as_array().unwrap().len(), 2);
    let origin = &kite["slices"][2]["parent_origin"];
    assert_eq!(
        (origin["offset_x"].as_i64(), origin["offset_y"].as_i64()),
        (Some(712), Some(0))
    );
    // `none` keeps every tile's detection: as many as the tiles have, moved into the photo.
    let tiles = kite["tiles"].as_array().unwrap();
    let n: usize = tiles
        .iter()
        .map(|t| t["predictions"].as_array().unwrap().len())
        .sum();
    assert!(n > 0);
    assert_eq!(kite["stitched"]["predictions"].as_array().unwrap().len(), n);
    assert_eq!(
        kite["stitched"]["image"],
        json!({"width": 1352, "height": 900})
    );
    // Each tile's own detections, moved by the tile's place, are among the stitched ones.
    let stitched = kite["stitched"]["predictions"].as_array().unwrap();
    let mut checked = 0;
    for (t, slice) in tiles.iter().zip(kite["slices"].as_array().unwrap()) {
        assert_eq!(t["image"], json!({"width": 640, "height": 640}));
        let (ox, oy) = (
            slice["parent_origin"]["offset_x"].as_f64().unwrap(),
            slice["parent_origin"]["offset_y"].as_f64().unwrap(),
        );
        for p in t["predictions"].as_array().unwrap() {
            let (x, y) = (p["x"].as_f64().unwrap() + ox, p["y"].as_f64().unwrap() + oy);
            assert!(
                stitched
                    .iter()
                    .any(|q| (q["x"].as_f64().unwrap() - x).abs() < 0.01
                        && (q["y"].as_f64().unwrap() - y).abs() < 0.01
                        && q["class"] == p["class"]),
                "tile detection {p} at ({ox}, {oy}) not stitched"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, n);
}

/// Tiles a request would cut past WORKFLOW_MAX_CROPS are refused with 413 before any is
/// made; a bad slice size or overlap is a 400 naming the field.
#[test]
fn slicing_limits_and_bad_settings() {
    let s = Server::start("coco/1", &[("WORKFLOW_MAX_CROPS", "50")]);
    let run = |steps: Value| {
        s.post_json(
            "/workflows/run",
            &json!({"specification": spec(steps, &[("o", "$steps.stitch.predictions")]),
            "inputs": {"image": image("images/dog.jpg")}}),
        )
    };
    let r = run(sahi("v1", 32, 32, "nms"));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("WORKFLOW_MAX_CROPS"),
        "{}",
        r.body
    );
    let mut bad = sahi("v2", 0, 640, "nms");
    let r = run(bad.clone());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.to_string().contains("slice_width"), "{}", r.body);
    bad[0]["slice_width"] = json!(640);
    bad[0]["overlap_ratio_height"] = json!(1.0);
    let r = run(bad);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains("overlap_ratio_height"),
        "{}",
        r.body
    );
    let r = run(sahi("v2", 640, 640, "soft"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains("overlap_filtering_strategy"),
        "{}",
        r.body
    );
    // The server still serves.
    assert_eq!(run(sahi("v2", 640, 640, "nmm")).status, 200);
}

/// A detect -> crop -> classify -> replace chain on two dogs (where the reference fails at
/// two crops): each dog takes its own crop's top class and confidence, with new ids.
#[test]
fn every_crop_replaces_its_own_detections_class() {
    let s = Server::start("coco/1,imagenet/1", &[]);
    let steps = json!([
        {"type": "roboflow_core/roboflow_object_detection_model@v2", "name": "det", "images": "$inputs.image", "model_id": "coco/1"},
        {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": "$inputs.image", "predictions": "$steps.det.predictions"},
        {"type": "roboflow_core/roboflow_classification_model@v2", "name": "cls", "images": "$steps.crop.crops", "model_id": "imagenet/1", "confidence": 0.01},
        {"type": "roboflow_core/detections_classes_replacement@v1", "name": "replace",
         "object_detection_predictions": "$steps.det.predictions", "classification_predictions": "$steps.cls.predictions"}]);
    let body = json!({"specification": spec(steps, &[("replaced", "$steps.replace.predictions"),
        ("detections", "$steps.det.predictions"), ("classes", "$steps.cls.predictions")]),
        "inputs": {"image": image("images/dog.jpg")}});
    let r = s.post_json("/workflows/run", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let dets = out["detections"]["predictions"].as_array().unwrap();
    let classes = out["classes"].as_array().unwrap();
    let replaced = out["replaced"]["predictions"].as_array().unwrap();
    assert!(dets.len() >= 2, "{}", out["detections"]);
    assert_eq!(replaced.len(), dets.len());
    for (d, (c, n)) in dets.iter().zip(classes.iter().zip(replaced)) {
        assert_eq!(c["parent_id"], d["detection_id"]);
        assert_eq!(n["class"], c["top"]);
        let conf = |v: &Value| v["confidence"].as_f64().unwrap();
        assert!((conf(n) - conf(c)).abs() < 1e-6, "{n} {c}");
        assert_eq!(
            (n["x"].clone(), n["width"].clone()),
            (d["x"].clone(), d["width"].clone())
        );
        assert_ne!(n["detection_id"], d["detection_id"]);
    }
}

/// Mask, polygon and crop drawings change the pixels where the instances are; the
/// classification label is written at the bottom-left.
#[test]
fn drawings_land_where_the_predictions_are() {
    let s = Server::start(MODELS, &[]);
    let case = golden("workflows/26_mask_polygon_visualization.json");
    let r = s.post_json("/workflows/run", &replay(&case));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let (mask, drawn) = (decode(&out["mask"]), decode(&out["drawn"]));
    let plain = image::load_from_memory(&fixture("samples/shapes/000000.jpg"))
        .unwrap()
        .to_rgb8();
    assert_eq!(mask.dimensions(), plain.dimensions());
    let diff = |a: &RgbImage, x: u32, y: u32| apart(a, &plain, x, y);
    for p in out["seg"]["predictions"].as_array().unwrap() {
        let (x, y) = (
            p["x"].as_f64().unwrap() as u32,
            p["y"].as_f64().unwrap() as u32,
        );
        // The instance's middle is tinted by the mask (opacity 0.6) ...
        assert!(diff(&mask, x, y) > 60, "mask at {x},{y}");
    }
    assert!(diff(&mask, 2, 2) < 30 && diff(&drawn, 2, 2) < 30);
    // The polygon's outline: a vertex of the first instance changed in `drawn` against `mask`.
    let v = &out["seg"]["predictions"][0]["points"][0];
    let (vx, vy) = (
        v["x"].as_f64().unwrap() as u32,
        v["y"].as_f64().unwrap() as u32,
    );
    let d = apart(&drawn, &mask, vx, vy);
    assert!(d > 60, "polygon outline at {vx},{vy}");
    // The outline follows the polygon, not the box: the box's corner (outside the tilted
    // rectangle) is as the mask left it.
    let p = &out["seg"]["predictions"][0];
    let (cx, cy) = (
        (p["x"].as_f64().unwrap() - p["width"].as_f64().unwrap() / 2.0) as u32,
        (p["y"].as_f64().unwrap() - p["height"].as_f64().unwrap() / 2.0) as u32,
    );
    let d = apart(&drawn, &mask, cx, cy);
    assert!(d < 40, "the box corner {cx},{cy} was drawn on");

    let case = golden("workflows/27_crop_and_classification_label_visualization.json");
    let r = s.post_json("/workflows/run", &replay(&case));
    assert_eq!(r.status, 200, "{}", r.body);
    let drawn = decode(&r.body["outputs"][0]["drawn"]);
    let dog = image::load_from_memory(&fixture("images/dog.jpg"))
        .unwrap()
        .to_rgb8();
    let changed = |x0: u32, y0: u32, x1: u32, y1: u32| {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let d: i32 = drawn
                    .get_pixel(x, y)
                    .0
                    .iter()
                    .zip(dog.get_pixel(x, y).0)
                    .map(|(p, q)| (*p as i32 - q as i32).abs())
                    .sum();
                n += usize::from(d > 60);
            }
        }
        n as f64 / ((x1 - x0) * (y1 - y0)) as f64
    };
    // The label sits at the bottom-left corner; the top-right corner is the photo's.
    assert!(
        changed(0, 540, 120, 576) > 0.3,
        "no label at the bottom-left"
    );
    assert!(changed(700, 0, 768, 30) < 0.05);
}

/// A crop visualisation puts the box's pixels, scaled, at its anchor: with the dog alone
/// and `scale_factor` 0.5 at `TOP_CENTER`, the half-size dog sits on the box's top edge,
/// centred.
#[test]
fn a_crop_is_drawn_scaled_at_its_anchor() {
    let s = Server::start("coco/1", &[]);
    let steps = json!([
        {"type": "roboflow_core/roboflow_object_detection_model@v2", "name": "det", "images": "$inputs.image",
         "model_id": "coco/1", "class_filter": ["dog"]},
        {"type": "roboflow_core/crop_visualization@v1", "name": "vis", "image": "$inputs.image",
         "predictions": "$steps.det.predictions", "scale_factor": 0.5, "border_thickness": 1}]);
    let body = json!({"specification": spec(steps, &[("drawn", "$steps.vis.image"), ("dets", "$steps.det.predictions")]),
        "inputs": {"image": image("images/dog.jpg")}});
    let r = s.post_json("/workflows/run", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = &r.body["outputs"][0];
    let p = &out["dets"]["predictions"][0];
    let f = |k: &str| p[k].as_f64().unwrap();
    let (x1, y1, x2, y2) = (
        f("x") - f("width") / 2.0,
        f("y") - f("height") / 2.0,
        f("x") + f("width") / 2.0,
        f("y") + f("height") / 2.0,
    );
    let drawn = decode(&out["drawn"]);
    let photo = image::load_from_memory(&fixture("images/dog.jpg"))
        .unwrap()
        .to_rgb8();
    let (cw, ch) = (((x2 - x1) * 0.5) as u32, ((y2 - y1) * 0.5) as u32);
    let crop = image::imageops::crop_imm(
        &photo,
        x1 as u32,
        y1 as u32,
        (x2 - x1) as u32,
        (y2 - y1) as u32,
    )
    .to_image();
    let want = image::imageops::resize(&crop, cw, ch, image::imageops::FilterType::Triangle);
    let (px, py) = (
        ((x1 + x2) / 2.0) as i64 - cw as i64 / 2,
        y1 as i64 - ch as i64,
    );
    assert!(py >= 0, "the dog's crop fits above its box");
    let (mut to_crop, mut to_photo, mut n) = (0i64, 0i64, 0i64);
    for y in 4..ch - 4 {
        for x in 4..cw - 4 {
            let d = drawn.get_pixel(px as u32 + x, py as u32 + y).0;
            let w = want.get_pixel(x, y).0;
            let o = photo.get_pixel(px as u32 + x, py as u32 + y).0;
            to_crop += d
                .iter()
                .zip(w)
                .map(|(a, b)| (*a as i64 - b as i64).abs())
                .sum::<i64>();
            to_photo += d
                .iter()
                .zip(o)
                .map(|(a, b)| (*a as i64 - b as i64).abs())
                .sum::<i64>();
            n += 3;
        }
    }
    let (to_crop, to_photo) = (to_crop as f64 / n as f64, to_photo as f64 / n as f64);
    assert!(
        to_crop < 12.0,
        "the scaled crop is not at the top centre: {to_crop:.1} per channel off"
    );
    assert!(
        to_photo > 2.0 * to_crop,
        "the photo was left there: {to_photo:.1} vs {to_crop:.1}"
    );
}
