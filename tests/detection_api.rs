//! Object detection over real HTTP against the bundled models, compared with the answers
//! of Roboflow Inference 1.8.3 (tests/fixtures/golden).
//!
//! Tier: quick (docs/tests.md).

mod common;

use common::{assert_matches_golden, b64, boxes, fixture, golden, Server, COCO_PHOTOS};
use serde_json::json;

#[test]
fn dog_jpg_finds_the_dog_and_matches_roboflow() {
    let s = Server::start("coco/1", &[]);
    let r = s.detect("coco/1", "images/dog.jpg", json!({}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["image"], json!({"width": 768, "height": 576}));
    let classes: Vec<String> = boxes(&r.body["predictions"])
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert!(classes.contains(&"dog".to_string()), "{classes:?}");
    let p = &r.body["predictions"][0];
    for field in [
        "x",
        "y",
        "width",
        "height",
        "confidence",
        "class",
        "class_id",
        "detection_id",
    ] {
        assert!(!p[field].is_null(), "missing {field} in {p}");
    }
    assert!(r.body["inference_id"].is_string() && r.body["time"].is_f64());
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn coco_matches_roboflow_on_every_photo() {
    let s = Server::start("coco/1", &[]);
    for name in COCO_PHOTOS {
        let g = golden(&format!("coco-1/{name}.json"));
        let r = s.detect("coco/1", &format!("images/{name}.jpg"), json!({}));
        assert_eq!(r.status, 200);
        assert_eq!(r.body["image"], g["response"]["image"], "{name}");
        assert_matches_golden(
            &r.body["predictions"],
            &g["response"]["predictions"],
            0.4,
            name,
        );
    }
}

#[test]
fn shapes_models_match_roboflow_in_both_yolo_layouts() {
    let s = Server::start("shapes-det/1,shapes-det-v5/1", &[]);
    for model in ["shapes-det/1", "shapes-det-v5/1"] {
        let dir = model.replace('/', "-");
        for i in 0..10 {
            let g = golden(&format!("{dir}/{i:06}.json"));
            let r = s.detect(model, &format!("samples/shapes/{i:06}.jpg"), json!({}));
            assert_eq!(r.status, 200);
            assert_matches_golden(
                &r.body["predictions"],
                &g["response"]["predictions"],
                0.4,
                &format!("{model} {i}"),
            );
        }
    }
}

#[test]
fn a_list_of_images_gets_a_list_of_answers_in_order() {
    let s = Server::start("coco/1", &[]);
    let names = ["giraffe", "dog", "kite", "giraffe"];
    let images: Vec<_> = names
        .iter()
        .map(|n| json!({"type": "base64", "value": b64(&format!("images/{n}.jpg"))}))
        .collect();
    let r = s.post_json(
        "/infer/object_detection",
        &json!({"model_id": "coco/1", "image": images}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let list = r.body.as_array().expect("a list");
    assert_eq!(list.len(), 4);
    for (answer, name) in list.iter().zip(names) {
        let single = s.detect("coco/1", &format!("images/{name}.jpg"), json!({}));
        assert_eq!(answer["image"], single.body["image"], "{name}");
        let a: Vec<_> = boxes(&answer["predictions"])
            .into_iter()
            .map(|b| b.0)
            .collect();
        let b: Vec<_> = boxes(&single.body["predictions"])
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn legacy_route_agrees_with_the_json_route() {
    let s = Server::start("coco/1", &[]);
    let json_route = s.detect("coco/1", "images/dog.jpg", json!({}));
    let summary = |v: &serde_json::Value| -> Vec<(String, i64, i64)> {
        boxes(&v["predictions"])
            .into_iter()
            .map(|b| (b.0, b.1.round() as i64, b.2.round() as i64))
            .collect()
    };
    // The SDK's v0 mode: base64 text with a JSON content type.
    let b64_body = s.post_raw(
        "/coco/1?api_key=x&confidence=40&overlap=30",
        Some("application/json"),
        b64("images/dog.jpg").as_bytes(),
    );
    assert_eq!(b64_body.status, 200, "{:?}", b64_body.body);
    assert_eq!(summary(&b64_body.body), summary(&json_route.body));
    let multipart = s.post_multipart("/coco/1", "file", &fixture("images/dog.jpg"));
    assert_eq!(multipart.status, 200, "{:?}", multipart.body);
    assert_eq!(summary(&multipart.body), summary(&json_route.body));
    // Legacy thresholds as percentages: confidence=90 keeps nothing on dog.jpg.
    let strict = s.post_multipart("/coco/1?confidence=90", "file", &fixture("images/dog.jpg"));
    assert_eq!(strict.body["predictions"], json!([]));
}

#[test]
fn request_parameters_change_the_answer() {
    let s = Server::start("coco/1", &[]);
    let all = s.detect("coco/1", "images/kite.jpg", json!({"confidence": 0.2}));
    let n_all = all.body["predictions"].as_array().unwrap().len();
    let capped = s.detect(
        "coco/1",
        "images/kite.jpg",
        json!({"confidence": 0.2, "max_detections": 2}),
    );
    assert_eq!(
        capped.body["predictions"].as_array().unwrap().len(),
        2.min(n_all)
    );
    let kites = s.detect(
        "coco/1",
        "images/kite.jpg",
        json!({"confidence": 0.2, "class_filter": ["kite"]}),
    );
    let k = boxes(&kites.body["predictions"]);
    assert!(!k.is_empty() && k.iter().all(|b| b.0 == "kite"), "{k:?}");
    assert!(k.len() < n_all);
}

#[test]
fn sdk_flow_registry_add_infer_remove_clear() {
    let s = Server::start("none", &[]);
    let reg = s.get("/model/registry?api_key=x");
    assert_eq!(reg.status, 200);
    assert_eq!(reg.body["models"], json!([]));
    let add = s.post_json(
        "/model/add",
        &json!({"model_id": "shapes-det/1", "api_key": "x"}),
    );
    assert_eq!(add.status, 200, "{:?}", add.body);
    let m = &add.body["models"][0];
    assert_eq!(m["model_id"], "shapes-det/1");
    assert_eq!(m["task_type"], "object-detection");
    assert_eq!(m["request_paths"], json!(["/infer/object_detection"]));
    assert_eq!(
        (m["input_width"].as_u64(), m["input_height"].as_u64()),
        (Some(640), Some(640))
    );
    let r = s.detect("shapes-det/1", "samples/shapes/000000.jpg", json!({}));
    assert_eq!(r.status, 200);
    // A model not loaded yet is loaded on first use.
    let r = s.detect("coco/1", "images/dog.jpg", json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(
        s.get("/model/registry").body["models"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let rm = s.post_json("/model/remove", &json!({"model_id": "coco/1"}));
    assert_eq!(rm.status, 200);
    assert_eq!(rm.body["models"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.post_json("/model/remove", &json!({"model_id": "coco/1"}))
            .status,
        404
    );
    let cleared = s.post_raw("/model/clear", None, b"");
    assert_eq!(cleared.status, 200);
    assert_eq!(cleared.body["models"], json!([]));
}

/// MAX_ACTIVE_MODELS bounds the models held in memory: loading one more unloads the least
/// recently used (as Roboflow's fixed-size model cache); an unloaded model loads again on
/// its next request.
#[test]
fn loading_past_max_active_models_unloads_the_least_recently_used() {
    let s = Server::start("none", &[("MAX_ACTIVE_MODELS", "2")]);
    let loaded = || -> Vec<String> {
        let mut ids: Vec<String> = s.get("/model/registry").body["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["model_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let cls = |model: &str| {
        let r = s.post_json(
            "/infer/classification",
            &json!({"model_id": model, "image": {"type": "base64", "value": b64("samples/shapes-cls/000000.jpg")}}),
        );
        assert_eq!(r.status, 200, "{model}: {}", r.body);
    };
    let det = |model: &str| {
        let r = s.detect(model, "samples/shapes/000000.jpg", json!({}));
        assert_eq!(r.status, 200, "{model}: {}", r.body);
    };
    det("shapes-det/1");
    cls("shapes-cls/1");
    det("shapes-det/1"); // shapes-cls/1 is now the least recently used
    det("shapes-yolov10/1");
    assert_eq!(loaded(), ["shapes-det/1", "shapes-yolov10/1"]);
    cls("shapes-cls/1"); // loads again, unloading shapes-det/1
    assert_eq!(loaded(), ["shapes-cls/1", "shapes-yolov10/1"]);
    let metrics = s.get("/metrics").body;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("cvserve_models_evicted_total 2"),
        "two unloads counted"
    );
}

#[test]
fn info_health_readiness() {
    let s = Server::start("none", &[]);
    let info = s.get("/info");
    assert_eq!(info.status, 200);
    assert!(info.body["version"].is_string());
    assert_eq!(s.get("/healthz").body, json!({"status": "healthy"}));
    assert_eq!(s.get("/readiness").body, json!({"status": "ready"}));
    assert_eq!(s.get("/nope").status, 404);
}

#[test]
fn reduced_scale_decoding_still_finds_the_objects() {
    let s = Server::start("coco/1", &[("DECODE_REDUCED_SCALE", "true")]);
    for name in ["dog", "giraffe", "horses"] {
        let g = golden(&format!("coco-1/{name}.json"));
        let r = s.detect("coco/1", &format!("images/{name}.jpg"), json!({}));
        assert_eq!(
            r.body["image"], g["response"]["image"],
            "sizes are the original's"
        );
        let ours: Vec<_> = boxes(&r.body["predictions"]);
        for gb in boxes(&g["response"]["predictions"])
            .iter()
            .filter(|b| b.5 > 0.6)
        {
            assert!(
                ours.iter().any(|o| o.0 == gb.0 && common::iou(o, gb) > 0.8),
                "{name}: {gb:?} not found in {ours:?}"
            );
        }
    }
}

/// Two inference instances with batches of up to 4, loaded by concurrent clients: every
/// answer still matches Roboflow's, and both instances took batches.
#[test]
fn two_instances_under_concurrent_load_match_roboflow() {
    let s = Server::start(
        "coco/1",
        &[
            ("INSTANCES_PER_MODEL", "2"),
            ("ORT_INTRA_THREADS", "1"),
            ("MAX_BATCH_SIZE", "4"),
            ("MAX_QUEUE_DELAY_MICROSECONDS", "20000"),
        ],
    );
    std::thread::scope(|scope| {
        for round in 0..3 {
            for name in COCO_PHOTOS {
                let s = &s;
                scope.spawn(move || {
                    let g = golden(&format!("coco-1/{name}.json"));
                    let r = s.detect("coco/1", &format!("images/{name}.jpg"), json!({}));
                    assert_eq!(r.status, 200, "{name} round {round}: {}", r.body);
                    assert_eq!(r.body["image"], g["response"]["image"], "{name}");
                    assert_matches_golden(
                        &r.body["predictions"],
                        &g["response"]["predictions"],
                        0.4,
                        &format!("{name} round {round}"),
                    );
                });
            }
        }
    });
    let metrics = s.get("/metrics").body;
    let text = metrics.as_str().expect("metrics are text");
    for instance in ["0", "1"] {
        let line =
            format!("cvserve_instance_batches_total{{instance=\"{instance}\",model=\"coco/1\"}}");
        assert!(
            text.lines().any(|l| l.starts_with(&line)),
            "instance {instance} ran no batch:\n{text}"
        );
    }
    assert!(text.contains(&format!(
        "cvserve_model_instances{{backend=\"{}\",execution_provider=\"CPUExecutionProvider\",model=\"coco/1\"}} 2",
        common::backend_name()
    )));
}

/// The route table: an unknown path is a JSON 404, a known path asked with the wrong method a
/// JSON 405, `/infer/<not a task>` is not taken for a model id, the legacy route takes a
/// trailing slash, and fixed paths win over `/{dataset_id}/{version_id}`.
#[test]
fn routes_answer_json_for_unknown_paths_and_wrong_methods() {
    let s = Server::start("shapes-det/1", &[]);
    let status_and_body = |head: &str| {
        let answer = s.raw(head, b"");
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    };
    let host = "Host: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    for (request, want) in [
        ("GET /no/such/path", 404),
        ("GET /infer/foo", 404),
        ("POST /infer/foo", 404),
        ("GET /infer/object_detection", 405),
        ("POST /healthz", 405),
        ("GET /model/add", 405),
    ] {
        let (status, body) = status_and_body(&format!("{request} HTTP/1.1\r\n{host}"));
        assert_eq!(status, want, "{request}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let path = request.split(' ').nth(1).unwrap();
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(path)),
            "{request}: {body}"
        );
    }
    // The legacy route, with and without a trailing slash: the model answers (the missing
    // Content-Type is its own 400, not a 404).
    for path in ["/shapes-det/1", "/shapes-det/1/"] {
        let r = s.post_raw(path, Some("application/x-www-form-urlencoded"), b"@@");
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert!(
            r.body["message"].as_str().unwrap().contains("base64"),
            "{path}: {:?}",
            r.body
        );
    }
    // `/model/registry` is the registry, not model "model/registry".
    assert!(s.get("/model/registry").body["models"].is_array());
}
