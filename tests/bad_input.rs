//! Bad input gets a clear 4xx JSON `{"message"}` and the server keeps serving, with every ring
//! slot back.
//!
//! Tier: quick (docs/tests.md).

mod common;

use base64::Engine;
use common::{fixture, Server};
use serde_json::json;

fn det(s: &Server, image: serde_json::Value, extra: serde_json::Value) -> common::Resp {
    let mut body = json!({"model_id": "shapes-det/1", "image": image});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    s.post_json("/infer/object_detection", &body)
}

fn b64(bytes: &[u8]) -> serde_json::Value {
    json!({"type": "base64", "value": base64::engine::general_purpose::STANDARD.encode(bytes)})
}

fn assert_error(r: &common::Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    let msg = r.body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {:?}", r.body));
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "message {msg:?} should mention {needle:?}"
    );
}

/// An image whose header claims 50000 x 50000 pixels: a BMP (no checksum to fix up) or a
/// JPEG with a patched frame header.
fn absurd(fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(8, 8).write_to(&mut out, fmt).unwrap();
    let mut data = out.into_inner();
    if fmt == image::ImageFormat::Bmp {
        data[18..22].copy_from_slice(&50000i32.to_le_bytes());
        data[22..26].copy_from_slice(&50000i32.to_le_bytes());
    } else {
        let sof = data.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        data[sof + 5..sof + 7].copy_from_slice(&50000u16.to_be_bytes());
        data[sof + 7..sof + 9].copy_from_slice(&50000u16.to_be_bytes());
    }
    data
}

#[test]
fn every_bad_input_is_a_4xx_and_the_server_keeps_serving() {
    let s = Server::start("shapes-det/1", &[("MAX_BODY_BYTES", "2000000")]);
    let good = b64(&fixture("samples/shapes/000000.jpg"));

    assert_error(
        &det(
            &s,
            json!({"type": "base64", "value": "%%%not base64%%%"}),
            json!({}),
        ),
        400,
        "base64",
    );
    assert_error(&det(&s, b64(b""), json!({})), 400, "empty");
    assert_error(
        &det(&s, b64(b"definitely not an image"), json!({})),
        400,
        "could not load input image",
    );
    let mut truncated = fixture("samples/shapes/000000.jpg");
    truncated.truncate(300);
    assert_error(
        &det(&s, b64(&truncated), json!({})),
        400,
        "could not load input image",
    );
    assert_error(
        &det(&s, b64(&absurd(image::ImageFormat::Bmp)), json!({})),
        400,
        "50000x50000",
    );
    assert_error(
        &det(&s, b64(&absurd(image::ImageFormat::Jpeg)), json!({})),
        400,
        "50000x50000",
    );
    assert_error(
        &s.post_json(
            "/infer/object_detection",
            &json!({"model_id": "nope/1", "image": good}),
        ),
        404,
        "nope/1",
    );
    assert_error(
        &s.post_json(
            "/infer/object_detection",
            &json!({"model_id": "../../etc/1", "image": good}),
        ),
        400,
        "invalid model_id",
    );
    assert_error(
        &det(&s, good.clone(), json!({"confidence": 7})),
        422,
        "confidence",
    );
    assert_error(
        &det(&s, good.clone(), json!({"iou_threshold": "high"})),
        422,
        "invalid",
    );
    assert_error(
        &s.post_raw(
            "/infer/object_detection",
            Some("application/json"),
            b"{oops",
        ),
        422,
        "invalid",
    );
    assert_error(
        &s.post_json(
            "/infer/object_detection",
            &json!({"model_id": "shapes-det/1"}),
        ),
        422,
        "image",
    );
    assert_error(
        &det(&s, json!({"type": "numpy", "value": "x"}), json!({})),
        400,
        "numpy",
    );
    assert_error(
        &det(
            &s,
            json!({"type": "url", "value": "http://127.0.0.1:1/x.jpg"}),
            json!({}),
        ),
        400,
        "ALLOW_URL_INPUT",
    );
    // A body declared larger than MAX_BODY_BYTES is refused before it is read.
    let answer = s.raw(
        "POST /infer/object_detection HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n",
        b"{\"model_id\": ",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("MAX_BODY_BYTES"), "{answer}");
    // One that grows past it without declaring its length (chunked) too.
    let chunk = vec![b'A'; 1_500_000];
    let mut chunked = Vec::new();
    for _ in 0..2 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = s.raw(
        "POST /infer/object_detection HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        &chunked,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_error(
        &s.post_raw("/shapes-det/1", None, b"abc"),
        400,
        "Content-Type",
    );
    assert_error(
        &s.post_multipart("/shapes-det/1", "upload", b"abc"),
        400,
        "file",
    );
    assert_error(
        &s.post_raw("/shapes-det/1", Some("application/json"), b"@@@"),
        400,
        "base64",
    );

    // Still serving, and no ring slot leaked: a full batch of answers comes back.
    let r = det(&s, good, json!({}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(!r.body["predictions"].as_array().unwrap().is_empty());
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn a_single_slot_ring_is_reused_after_every_failure() {
    // With one slot, any leaked slot would turn the next request into a 429.
    let s = Server::start("shapes-det/1", &[("RING_SLOTS", "1")]);
    let good = b64(&fixture("samples/shapes/000001.jpg"));
    for _ in 0..3 {
        assert_eq!(det(&s, b64(b"junk"), json!({})).status, 400);
        assert_eq!(
            det(&s, b64(&absurd(image::ImageFormat::Jpeg)), json!({})).status,
            400
        );
        assert_eq!(det(&s, good.clone(), json!({})).status, 200);
    }
}

#[test]
fn a_task_mismatch_is_a_clear_400() {
    let s = Server::start("shapes-det/1", &[]);
    let r = s.post_json(
        "/infer/classification",
        &json!({"model_id": "shapes-det/1", "image": b64(&fixture("samples/shapes/000000.jpg"))}),
    );
    assert_error(&r, 400, "/infer/object_detection");
}

/// A list of more images than the server can ever hold at once is a 413 naming the limit,
/// without `Retry-After`: a 429 would have a polite client retry forever. At the limit the
/// list is served.
#[test]
fn more_images_than_the_server_can_ever_take_is_413_not_429() {
    let s = Server::start(
        "shapes-det/1",
        &[("RING_SLOTS", "4"), ("MAX_QUEUE_SIZE", "8")],
    );
    let one = b64(&fixture("samples/shapes/000001.jpg"));
    let list = |n: usize| serde_json::Value::Array(vec![one.clone(); n]);
    let r = det(&s, list(5), json!({}));
    assert_error(&r, 413, "at most 4 per request (RING_SLOTS)");
    assert_eq!(r.header("retry-after"), None);
    let r = det(&s, list(4), json!({}));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body.as_array().map(Vec::len), Some(4));
    // The queue's limit is checked the same way.
    let s = Server::start(
        "shapes-det/1",
        &[("RING_SLOTS", "16"), ("MAX_QUEUE_SIZE", "2")],
    );
    assert_error(
        &det(&s, list(3), json!({})),
        413,
        "at most 2 per request (MAX_QUEUE_SIZE)",
    );
}

/// A connection that sends nothing, or stays idle after its request, is closed after
/// HEADER_READ_TIMEOUT_S, so idle connections cannot pile up.
#[test]
fn idle_and_silent_connections_are_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let s = Server::start("none", &[("HEADER_READ_TIMEOUT_S", "0.5")]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let closed_within = |mut c: std::net::TcpStream| {
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        // Whatever is left of an answer, then 0 bytes: the server closed it (a read timeout
        // would be an error instead).
        loop {
            match c.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    };
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    assert!(closed_within(silent), "a silent connection stays open");
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(
        closed_within(idle),
        "an idle keep-alive connection stays open"
    );
    assert_eq!(s.get("/healthz").status, 200);
}

/// Small review findings of the hardening issue, each as a user would meet it.
#[test]
fn methods_nan_and_echoed_input_are_answered_sensibly() {
    let s = Server::start("shapes-det/1", &[]);
    // GET on an inference route is 405, not a lookup of model "infer/object_detection".
    let r = s.get("/infer/object_detection");
    assert_eq!(r.status, 405, "{:?}", r.body);
    // HEAD works wherever GET does.
    let head = s.raw(
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // confidence=NaN is refused, not taken as 0.01.
    let png = common::fixture("samples/shapes/000000.jpg");
    let r = s.post_multipart("/shapes-det/1?confidence=NaN", "file", &png);
    assert_error(&r, 422, "confidence");
    // A megabyte model id is not echoed back whole.
    let id = "a".repeat(1 << 20);
    let r = s.post_json(
        "/infer/object_detection",
        &json!({"model_id": id, "image": {"type": "base64", "value": "AAAA"}}),
    );
    assert!((400..500).contains(&r.status), "{}", r.status);
    assert!(
        r.body["message"].as_str().unwrap().len() < 1024,
        "{} bytes",
        r.body["message"].as_str().unwrap().len()
    );
}
