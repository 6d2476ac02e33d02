//! The Open Inference Protocol (KServe v2) beside Roboflow's API, driven by Triton's own
//! Python client (`tritonclient`, pinned in scripts/setup.sh; scripts/test.sh sets
//! CVSERVE_TRITON_PYTHON): every answer is checked against what the Roboflow route answers
//! for the same image, and shared-memory hazards against the server going on serving.
//!
//! Tier: full (docs/tests.md).

mod common;

use std::time::Duration;

use common::{b64, free_port, repo, Server};
use serde_json::{json, Value};

/// Runs tests/triton_client.py over `protocol` against `addr` (host:port).
fn triton(protocol: &str, addr: &str, server: &Server) -> Value {
    let python = std::env::var("CVSERVE_TRITON_PYTHON").expect(
        "CVSERVE_TRITON_PYTHON is not set: run the tests through scripts/test.sh, which installs tritonclient",
    );
    let out = std::process::Command::new(python)
        .arg(repo().join("tests/triton_client.py"))
        .arg(protocol)
        .arg(addr)
        .arg(repo().join("tests/fixtures"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "triton_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    serde_json::from_slice(&out.stdout).expect("triton_client.py prints JSON")
}

/// An answer without what differs between any two calls: its ids and timing.
fn comparable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("inference_id");
        o.remove("time");
        if let Some(Value::Array(preds)) = o.get_mut("predictions") {
            for p in preds {
                if let Some(p) = p.as_object_mut() {
                    p.remove("detection_id");
                }
            }
        }
    }
    v
}

fn comparable_list(v: &Value) -> Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("a list of answers: {v}"))
        .iter()
        .map(comparable)
        .collect()
}

/// What the Roboflow route answers for `images` (one answer per image).
fn roboflow(s: &Server, route: &str, model: &str, images: &[&str], extra: Value) -> Vec<Value> {
    let image: Vec<Value> = images
        .iter()
        .map(|i| json!({"type": "base64", "value": b64(i)}))
        .collect();
    let mut body = json!({"model_id": model, "image": image});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = s.post_json(route, &body);
    assert_eq!(r.status, 200, "{route}: {}", r.body);
    comparable_list(&r.body)
}

fn host_port(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// What Triton's client got over `protocol` (`http` or `grpc`), checked against the Roboflow
/// routes' answers for the same images.
fn check_triton_client(protocol: &str) {
    let grpc_port = free_port().to_string();
    let s = Server::start(
        "coco/1,shapes-seg/1,imagenet/1",
        &[("GRPC_PORT", grpc_port.as_str())],
    );
    let addr = match protocol {
        "http" => host_port(&s),
        _ => s.grpc.clone().expect("the server listens for gRPC"),
    };
    let out = triton(protocol, &addr, &s);
    assert_eq!(out["live"], true);
    assert_eq!(out["ready"], true);
    assert_eq!(out["model_ready"], true);
    for ext in [
        "binary_tensor_data",
        "system_shared_memory",
        "model_repository",
    ] {
        assert!(
            out["extensions"].as_array().unwrap().contains(&json!(ext)),
            "{ext}: {}",
            out["extensions"]
        );
    }
    assert_eq!(
        out["model_inputs"],
        json!([
            ["image", "BYTES", [-1]],
            ["pixels", "UINT8", [-1, -1, -1, 3]]
        ])
    );
    let conf = json!({"confidence": 0.5});
    let dog = roboflow(
        &s,
        "/infer/object_detection",
        "coco/1",
        &["images/dog.jpg"],
        conf.clone(),
    );
    assert!(!dog[0]["predictions"].as_array().unwrap().is_empty());
    // Encoded images, binary and JSON: exactly the Roboflow route's answers.
    assert_eq!(comparable_list(&out["detection"]), dog);
    let both = roboflow(
        &s,
        "/infer/object_detection",
        "coco/1",
        &["images/dog.jpg", "images/giraffe.jpg"],
        conf,
    );
    assert_eq!(comparable_list(&out["detection_versioned_json"]), both);
    let seg = roboflow(
        &s,
        "/infer/instance_segmentation",
        "shapes-seg/1",
        &["samples/shapes/000000.jpg"],
        json!({}),
    );
    assert_eq!(comparable_list(&out["segmentation"]), seg);
    let cls = roboflow(
        &s,
        "/infer/classification",
        "imagenet/1",
        &["images/chelsea.jpg"],
        json!({}),
    );
    assert_eq!(comparable_list(&out["classification"]), cls);
    // Raw frames (decoded by OpenCV's libjpeg-turbo, as the server decodes): the same
    // detections as the JPEG, inline, through a region, and written into a region.
    assert_eq!(
        comparable_list(&out["pixels_inline"]),
        [dog[0].clone(), dog[0].clone()]
    );
    assert_eq!(comparable_list(&out["pixels_shm"]), dog);
    assert_eq!(comparable_list(&out["pixels_shm_into_region"]), dog);
    assert_eq!(out["regions"], json!(["answers", "frames"]));
    // Hazards: refused with an error naming why; the server goes on serving.
    let err = |k: &str| {
        out[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k}: no error"))
            .to_string()
    };
    let (invalid, not_found) = match protocol {
        "http" => ("[400]", "[404]"),
        _ => ("INVALID_ARGUMENT", "NOT_FOUND"),
    };
    assert!(
        err("traversal_error").contains(invalid),
        "{}",
        err("traversal_error")
    );
    assert!(err("traversal_error").contains("not accepted"));
    assert!(
        err("oversized_error").contains("do not fit"),
        "{}",
        err("oversized_error")
    );
    assert!(
        err("truncated_error").contains("truncated"),
        "{}",
        err("truncated_error")
    );
    assert_eq!(comparable_list(&out["after_hazards"]), dog);
    assert_eq!(out["regions_after_unregister"], 0);
    assert!(err("unknown_model_error").contains(not_found));
    // Counted in the request metrics under the protocol's route.
    let route = match protocol {
        "http" => "/v2/models/{model_name}/infer",
        _ => "grpc ModelInfer",
    };
    let metrics = s.get("/metrics").body.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!(r#"route="{route}",status="200""#)),
        "{metrics}"
    );
}

#[test]
fn tritonclient_over_http_gets_the_roboflow_answers_and_shared_memory_hazards_are_refused() {
    check_triton_client("http");
}

#[test]
fn tritonclient_over_grpc_gets_the_roboflow_answers_and_shared_memory_hazards_are_refused() {
    check_triton_client("grpc");
}

/// Errors are `{"error": ...}` with Triton's statuses, the binary extension is framed as
/// declared, and nothing but a plain name in the shm directory can be registered.
#[test]
fn v2_http_errors_and_binary_framing() {
    let s = Server::start("coco/1", &[]);
    let r = s.get("/v2/models/nope");
    assert_eq!(r.status, 404);
    assert!(
        r.body["error"].as_str().unwrap().contains("nope"),
        "{}",
        r.body
    );
    let r = s.post_json("/v2/models/coco/infer", &json!({"inputs": []}));
    assert_eq!(r.status, 400);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("expected 1 input"));
    // A JSON header claiming more binary bytes than follow.
    let head = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
        "parameters": {"binary_data_size": 100}}]})
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&[1, 0, 0, 0, 7]);
    let raw = s.raw(
        &format!(
            "POST /v2/models/coco/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            head.len(),
            body.len()
        ),
        &body,
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("binary_data_size is 100"), "{raw}");
    // Shape and bytes must agree for raw frames.
    let r = s.post_json(
        "/v2/models/coco/infer",
        &json!({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
            "data": [1, 2, 3]}]}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"].as_str().unwrap().contains("needs 12 bytes"),
        "{}",
        r.body
    );
    // A batch larger than the ring, or a frame over MAX_IMAGE_PIXELS, is refused before
    // anything is allocated for it (a sparse region could back either).
    let r = s.post_json(
        "/v2/models/coco/infer",
        &json!({"inputs": [{"name": "pixels", "datatype": "UINT8",
            "shape": [17_179_869_184_u64, 1, 1, 3],
            "parameters": {"shared_memory_region": "x", "shared_memory_byte_size": 1}}]}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["error"].as_str().unwrap().contains("RING_SLOTS"));
    let r = s.post_json(
        "/v2/models/coco/infer",
        &json!({"inputs": [{"name": "pixels", "datatype": "UINT8",
            "shape": [1, 4_000_000_000_u64, 4_000_000_000_u64, 3],
            "parameters": {"shared_memory_region": "x", "shared_memory_byte_size": 1}}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("MAX_IMAGE_PIXELS"));
    // A region naming a cvserve ring, or a missing region in a request.
    let r = s.post_json(
        "/v2/systemsharedmemory/region/x/register",
        &json!({"key": "/cvserve-ring-1-2", "byte_size": 8}),
    );
    assert_eq!(r.status, 400);
    let r = s.post_json(
        "/v2/models/coco/infer",
        &json!({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
            "parameters": {"shared_memory_region": "missing", "shared_memory_byte_size": 12}}]}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    // The repository extension: unload, then index shows it unavailable, load brings it back.
    let r = s.post_json("/v2/repository/models/coco/unload", &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/v2/models/coco/ready").status, 400);
    let r = s.post_json("/v2/repository/index", &json!({"ready": true}));
    assert_eq!(r.body, json!([]));
    let r = s.post_json("/v2/repository/models/coco/load", &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/v2/models/coco/versions/1/ready").status, 200);
    let cfg = s.get("/v2/models/coco/config").body;
    assert_eq!(
        cfg["dynamic_batching"]["max_queue_delay_microseconds"],
        2000
    );
    assert_eq!(
        cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
        64
    );
    // Every v2 route is in the OpenAPI document.
    let doc = s.get("/openapi.json").body;
    for path in [
        "/v2",
        "/v2/models/{model_name}/infer",
        "/v2/systemsharedmemory/region/{region_name}/register",
        "/v2/repository/index",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
}

/// examples/video_client.py streams a short video (made now from the fixture photos) over
/// gRPC's ModelStreamInfer, frames handed over in a shared-memory region: one answer per
/// frame, in order, each exactly what the Roboflow route answers for the scene's frame (the
/// video is lossless FFV1, so its frames are the scenes' pixels).
#[test]
fn the_video_client_streams_frames_through_shared_memory_and_gets_each_frames_detections() {
    let python = std::env::var("CVSERVE_TRITON_PYTHON").expect("CVSERVE_TRITON_PYTHON");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = std::process::Command::new(&python)
        .arg(repo().join("tests/make_test_video.py"))
        .arg(repo().join("tests/fixtures"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let frames: usize = String::from_utf8_lossy(&made.stdout)
        .trim()
        .parse()
        .unwrap();
    let grpc_port = free_port().to_string();
    let s = Server::start("coco/1", &[("GRPC_PORT", grpc_port.as_str())]);
    let out = std::process::Command::new(&python)
        .arg(repo().join("examples/video_client.py"))
        .args([
            "--url",
            s.grpc.as_deref().unwrap(),
            "--model",
            "coco",
            "--json",
        ])
        .arg("--source")
        .arg(dir.join("video.avi"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", s.logs());
    assert!(stderr.contains(&format!("{frames} frames in")), "{stderr}");
    let answers: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), frames);
    let scenes: Vec<Value> = (0..2)
        .map(|i| {
            let png = std::fs::read(dir.join(format!("scene{i}.png"))).unwrap();
            use base64::Engine as _;
            let r = s.post_json(
                "/infer/object_detection",
                &json!({"model_id": "coco/1", "image": {"type": "base64",
                    "value": base64::engine::general_purpose::STANDARD.encode(png)}}),
            );
            assert_eq!(r.status, 200);
            assert!(!r.body["predictions"].as_array().unwrap().is_empty());
            comparable(&r.body)
        })
        .collect();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["frame"], i, "answers in order");
        assert_eq!(
            comparable(&a["answer"]),
            scenes[i * 2 / frames],
            "frame {i}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// gRPC gets HTTP's drain: on SIGTERM the calls in flight are answered before the process
/// exits, and its gRPC port closes.
#[test]
fn grpc_calls_in_flight_are_answered_through_the_drain() {
    use cvserve::http::v2::grpc::pb;
    use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
    let grpc_port = free_port().to_string();
    let mut s = Server::start(
        "shapes-cls/1",
        &[
            ("GRPC_PORT", grpc_port.as_str()),
            ("CVSERVE_INJECT_DELAY_MS", "300"),
            ("MAX_BATCH_SIZE", "1"),
            ("DRAIN_TIMEOUT_S", "20"),
        ],
    );
    let addr = format!("http://{}", s.grpc.clone().unwrap());
    let image = common::fixture("samples/shapes-cls/000000.jpg");
    let request = move || common::grpc_image_request("shapes-cls", &image);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        GrpcInferenceServiceClient::connect(addr.clone())
            .await
            .expect("connect")
    });
    let ok = rt.block_on(client.clone().model_infer(request())).unwrap();
    assert_eq!(ok.get_ref().raw_output_contents.len(), 1);
    // Three calls in flight, then SIGTERM: all three answered, then the process exits.
    let decoded = "cvserve_decode_seconds_count{model=\"shapes-cls/1\"}";
    let before = common::metric(&s, decoded);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            let r = request();
            rt.spawn(async move { c.model_infer(r).await })
        })
        .collect();
    common::eventually(
        "the three calls to be in the pipeline",
        Duration::from_secs(10),
        || common::metric(&s, decoded) >= before + 3.0,
    );
    s.signal(libc::SIGTERM);
    for call in calls {
        let answer = rt.block_on(call).unwrap();
        assert!(answer.is_ok(), "{answer:?}");
    }
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}\n{}", s.logs());
    assert!(std::net::TcpStream::connect(s.grpc.as_deref().unwrap()).is_err());
}

/// A gRPC connection that never speaks does not hold its place for ever: it is closed after
/// GRPC_IDLE_TIMEOUT_S (HTTP closes it at HEADER_READ_TIMEOUT_S).
#[test]
fn a_silent_grpc_connection_is_closed_after_the_idle_timeout() {
    use std::io::Read;
    let grpc_port = free_port().to_string();
    let s = Server::start(
        "shapes-cls/1",
        &[
            ("GRPC_PORT", grpc_port.as_str()),
            ("GRPC_IDLE_TIMEOUT_S", "1"),
        ],
    );
    let mut silent = std::net::TcpStream::connect(s.grpc.as_deref().unwrap()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match silent.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // the server's SETTINGS, then GOAWAY
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}
