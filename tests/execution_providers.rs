//! Execution providers on a machine without a GPU (as CI is): `auto` serves on the CPU and
//! says so everywhere an operator looks; asking for CUDA or TensorRT by name from the CPU build
//! of ONNX Runtime fails the model's load with a message naming what is missing, never a
//! silent CPU run.
//!
//! Tier: full (docs/tests.md).

mod common;

use common::*;
use serde_json::json;

const MODEL: &str = "shapes-cls/1";

fn classify(s: &Server) -> Resp {
    s.post_json(
        "/infer/classification",
        &json!({"model_id": MODEL, "image": {"type": "base64", "value": b64("samples/shapes-cls/000000.jpg")}}),
    )
}

#[test]
fn auto_serves_on_the_cpu_and_reports_it() {
    let s = Server::start(
        MODEL,
        &[("EXECUTION_PROVIDERS", "auto"), ("LOG_FORMAT", "json")],
    );
    assert_eq!(classify(&s).status, 200);
    let info = s.get("/info").body;
    assert_eq!(info["models"][0]["model_id"], MODEL);
    assert_eq!(
        info["models"][0]["execution_provider"],
        "CPUExecutionProvider"
    );
    let registry = s.get("/model/registry").body;
    assert_eq!(
        registry["models"][0]["execution_provider"],
        "CPUExecutionProvider"
    );
    let metrics = s.get("/metrics").body;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("cvserve_model_instances{backend=\"onnxruntime\",execution_provider=\"CPUExecutionProvider\",model=\"shapes-cls/1\"}"));
    // The start-up log says it, once per model.
    let logs = s.logs();
    let loaded: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"model loaded\""))
        .collect();
    assert_eq!(loaded.len(), 1, "{logs}");
    assert!(
        loaded[0].contains("\"provider\":\"CPUExecutionProvider\""),
        "{}",
        loaded[0]
    );
}

/// The model is reported failed with `needle` in its reason, and requests for it get a 500
/// saying the same; the server itself stays up (alive) but is not ready, with the reason.
fn assert_refused(s: &Server, needle: &str) {
    let health = s.get("/healthz").body;
    let why = health["models_failed_to_load"][MODEL]
        .as_str()
        .unwrap_or_else(|| panic!("not reported failed: {health}"));
    assert!(why.contains(needle), "{why}");
    assert!(why.contains("CVSERVE_GPU=1 ./build.sh"), "{why}");
    assert!(s.get("/info").body["models"].as_array().unwrap().is_empty());
    let r = classify(s);
    assert_eq!(r.status, 500);
    assert!(r.body["message"].as_str().unwrap().contains(needle));
    let ready = s.get("/readiness");
    assert_eq!(ready.status, 503);
    assert!(
        ready.body["models_failed_to_load"][MODEL]
            .as_str()
            .is_some_and(|why| why.contains(needle)),
        "{:?}",
        ready.body
    );
}

#[test]
fn cuda_asked_by_name_from_the_cpu_build_is_refused_with_the_reason() {
    let s = Server::start_settled(MODEL, &[("EXECUTION_PROVIDERS", "cuda")]);
    assert_refused(
        &s,
        "CUDAExecutionProvider is not in the loaded ONNX Runtime library",
    );
}

#[test]
fn roboflows_provider_list_is_honoured_the_same_way() {
    let s = Server::start_settled(
        MODEL,
        &[(
            "ONNXRUNTIME_EXECUTION_PROVIDERS",
            "[TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider]",
        )],
    );
    assert_refused(
        &s,
        "TensorrtExecutionProvider is not in the loaded ONNX Runtime library",
    );
    // An explicit CPU list serves.
    let s = Server::start(
        MODEL,
        &[(
            "ONNXRUNTIME_EXECUTION_PROVIDERS",
            "['OpenVINOExecutionProvider', 'CPUExecutionProvider']",
        )],
    );
    assert_eq!(classify(&s).status, 200);
}

#[test]
fn an_unknown_provider_stops_the_server_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
        .args(["serve", "--execution-providers", "gpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown execution provider 'gpu'"), "{err}");
}

#[test]
fn exit_on_load_error_ends_the_process_when_a_preloaded_model_fails() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
        .args(["serve"])
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("GRPC_PORT", "0")
        .env("MODEL_CACHE_DIR", common::repo().join("models"))
        .env("ORT_DYLIB_PATH", common::ort_dylib())
        .env("RING_DIR", std::env::temp_dir())
        .env("PRELOAD_MODELS", MODEL)
        .env("EXECUTION_PROVIDERS", "cuda")
        .env("EXIT_ON_LOAD_ERROR", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EXIT_ON_LOAD_ERROR"), "{err}");
    assert!(err.contains(MODEL), "{err}");
}

#[test]
fn a_setting_out_of_range_stops_the_start_with_its_name() {
    for (name, value) in [
        ("REQUEST_TIMEOUT_S", "1e20"),
        ("RING_MODEL_SHARE", "nan"),
        ("HEADER_READ_TIMEOUT_S", "-1"),
        ("INSTANCES_PER_MODEL", "100000"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
            .args(["serve"])
            .env("PORT", "0")
            .env("GRPC_PORT", "0")
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}
