//! Server-side drawing: legacy `format=image` / `image_and_json` and `visualize_predictions`
//! on `/infer/*`. The picture is a JPEG of the original size whose pixels along each returned
//! box's edge carry the box colour while pixels far from every box are unchanged; a request
//! without drawing answers exactly the JSON it did before.
//!
//! Tier: full (docs/tests.md).

mod common;

use base64::Engine;
use common::{b64, fixture, Server};
use serde_json::{json, Value};

/// Roboflow's default annotation colour (no COLORS in the bundled models).
const BOX: [u8; 3] = [0x48, 0x92, 0xEA];

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

fn check_picture(jpeg: &[u8], predictions: &Value) {
    let drawn = image::load_from_memory(jpeg)
        .expect("a decodable JPEG")
        .into_rgb8();
    let original = image::load_from_memory(&fixture("images/dog.jpg"))
        .unwrap()
        .into_rgb8();
    assert_eq!(drawn.dimensions(), original.dimensions());
    let boxes = common::boxes(predictions);
    assert!(boxes.iter().any(|b| b.0 == "dog") && boxes.iter().any(|b| b.0 == "bicycle"));
    for (class, x1, y1, x2, y2, _) in &boxes {
        // Mid-points of the box's left and bottom edges (stroke 3 draws edge .. edge + 2
        // inwards); the top edge carries the label.
        let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        let left = (x1.round() as u32 + 1, cy as u32);
        let bottom = (cx as u32, y2.round() as u32 - 2);
        for (px, py) in [left, bottom] {
            let p = drawn.get_pixel(px, py).0;
            assert!(close(p, BOX, 40), "{class} edge at ({px},{py}) is {p:?}");
        }
    }
    // Far from any box (and from labels): unchanged within JPEG tolerance, on average.
    let inside_any = |px: f64, py: f64| {
        boxes.iter().any(|(_, x1, y1, x2, y2, _)| {
            px >= x1 - 40.0 && px <= x2 + 40.0 && py >= y1 - 40.0 && py <= y2 + 40.0
        })
    };
    let (mut diff, mut n) = (0i64, 0i64);
    for py in (0..drawn.height()).step_by(7) {
        for px in (0..drawn.width()).step_by(7) {
            if inside_any(px as f64, py as f64) {
                continue;
            }
            let (a, b) = (drawn.get_pixel(px, py).0, original.get_pixel(px, py).0);
            diff += a
                .iter()
                .zip(b)
                .map(|(x, y)| (*x as i64 - y as i64).abs())
                .sum::<i64>();
            n += 3;
        }
    }
    assert!(n > 1000, "too few far pixels sampled");
    assert!(
        (diff as f64 / n as f64) < 4.0,
        "far pixels changed by {} on average",
        diff as f64 / n as f64
    );
}

#[test]
fn legacy_format_image_and_image_and_json_draw_the_boxes() {
    let s = Server::start("coco/1", &[]);
    let url = s.url("/coco/1?format=image&labels=true&stroke=3");
    let boundary = "b7d1f";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"dog.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").into_bytes();
    body.extend_from_slice(&fixture("images/dog.jpg"));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(&url)
        .header(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body)
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let jpeg = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    let json_answer = s.post_multipart(
        "/coco/1?stroke=3&labels=true&format=image_and_json",
        "file",
        &fixture("images/dog.jpg"),
    );
    assert_eq!(json_answer.status, 200);
    let vis = base64::engine::general_purpose::STANDARD
        .decode(
            json_answer.body["visualization"]
                .as_str()
                .expect("visualization"),
        )
        .unwrap();
    check_picture(&vis, &json_answer.body["predictions"]);
    check_picture(&jpeg, &json_answer.body["predictions"]);
}

#[test]
fn visualize_predictions_on_infer_routes_and_nothing_extra_without_it() {
    let s = Server::start("coco/1", &[]);
    let base =
        json!({"model_id": "coco/1", "image": {"type": "base64", "value": b64("images/dog.jpg")}});
    let plain = s.post_json("/infer/object_detection", &base);
    assert_eq!(plain.status, 200);
    let mut keys: Vec<&String> = plain.body.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "image",
            "inference_id",
            "predictions",
            "resolved_model",
            "time"
        ]
    );
    let mut asked = base.clone();
    asked["visualize_predictions"] = json!(true);
    asked["visualization_stroke_width"] = json!(3);
    asked["visualization_labels"] = json!(true);
    let drawn = s.post_json("/infer/object_detection", &asked);
    assert_eq!(drawn.status, 200, "{:?}", drawn.body);
    assert_eq!(
        common::boxes(&drawn.body["predictions"]),
        common::boxes(&plain.body["predictions"])
    );
    let vis = base64::engine::general_purpose::STANDARD
        .decode(drawn.body["visualization"].as_str().unwrap())
        .unwrap();
    check_picture(&vis, &drawn.body["predictions"]);
    asked["visualization_stroke_width"] = json!(0);
    assert_eq!(s.post_json("/infer/object_detection", &asked).status, 422);
}
