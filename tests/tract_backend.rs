//! The tract back end (BACKEND=tract, or `auto` without ONNX Runtime's library): it serves the
//! bundled models with Roboflow's answers, says which back end runs them, refuses a GPU, and
//! names the operator it lacks. The golden comparisons of the other test binaries run on it
//! too (`scripts/test.sh` runs them with CVSERVE_TEST_BACKEND=tract).
//!
//! Tier: full (docs/tests.md).

mod common;

use std::path::PathBuf;

use common::{assert_matches_golden, golden, repo, Server};
use serde_json::json;

/// A repository holding coco/1 and `tract-lacks/1` (a classifier whose graph uses `Det`).
fn repository() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tract-repo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(repo().join("models/coco"), dir.join("coco")).unwrap();
    std::os::unix::fs::symlink(
        repo().join("tests/fixtures/tract-lacks"),
        dir.join("tract-lacks"),
    )
    .unwrap();
    dir
}

#[test]
fn without_onnx_runtime_auto_serves_on_tract_and_says_why() {
    let s = Server::start(
        "coco/1",
        &[
            ("BACKEND", "auto"),
            ("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1"),
        ],
    );
    // The answers are Roboflow's, at the tolerance ONNX Runtime's are held to.
    for name in ["dog", "giraffe"] {
        let g = golden(&format!("coco-1/{name}.json"));
        let r = s.detect("coco/1", &format!("images/{name}.jpg"), json!({}));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_matches_golden(
            &r.body["predictions"],
            &g["response"]["predictions"],
            0.4,
            name,
        );
    }
    let info = s.get("/info").body;
    assert_eq!(info["models"][0]["backend"], "tract", "{info}");
    assert_eq!(
        info["models"][0]["execution_provider"],
        "CPUExecutionProvider"
    );
    assert_eq!(
        s.get("/model/registry").body["models"][0]["backend"],
        "tract"
    );
    let metrics = s.get("/metrics").body;
    assert!(
        metrics.as_str().unwrap().contains(
            "cvserve_model_instances{backend=\"tract\",execution_provider=\"CPUExecutionProvider\",model=\"coco/1\"}"
        ),
        "{metrics}"
    );
    // The log says why, naming the library it looked for.
    let logs = s.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("ONNX Runtime is not usable: serving on tract"))
        .unwrap_or_else(|| panic!("no fallback line in:\n{logs}"));
    assert!(
        line.contains("/nonexistent/libonnxruntime.so.1.31.1"),
        "{line}"
    );
}

#[test]
fn backend_ort_without_its_library_refuses_instead_of_falling_back() {
    let s = Server::start_settled(
        "coco/1",
        &[
            ("BACKEND", "ort"),
            ("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1"),
        ],
    );
    let r = s.get("/readiness");
    assert_eq!(r.status, 503, "{}", r.body);
    let failed = r.body["models_failed_to_load"].to_string();
    assert!(
        failed.contains("ONNX Runtime library not found"),
        "{failed}"
    );
    assert!(!s.logs().contains("serving on tract"));
}

#[test]
fn tract_with_a_gpu_provider_stops_the_start_saying_why() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
        .arg("serve")
        .env("PORT", "0")
        .env("GRPC_PORT", "0")
        .env("BACKEND", "tract")
        .env("EXECUTION_PROVIDERS", "cuda")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BACKEND=tract runs on the CPU only"), "{err}");
    // A misspelt back end is refused by name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
        .arg("serve")
        .env("PORT", "0")
        .env("GRPC_PORT", "0")
        .env("BACKEND", "tensorflow")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be auto, ort or tract"));
}

#[test]
fn an_operator_tract_lacks_fails_the_load_naming_it_and_the_others_serve() {
    let models = repository();
    let models = models.to_str().unwrap();
    let s = Server::start_settled(
        "coco/1,tract-lacks/1",
        &[("BACKEND", "tract"), ("MODEL_CACHE_DIR", models)],
    );
    let r = s.get("/readiness");
    assert_eq!(r.status, 503);
    let failed = r.body["models_failed_to_load"].to_string();
    assert!(failed.contains("tract-lacks/1"), "{failed}");
    assert!(failed.contains("Det"), "the operator is named: {failed}");
    assert_eq!(s.detect("coco/1", "images/dog.jpg", json!({})).status, 200);
    // ONNX Runtime has Det: the same model serves there.
    let s = Server::start(
        "tract-lacks/1",
        &[("BACKEND", "ort"), ("MODEL_CACHE_DIR", models)],
    );
    let r = s.post_json(
        "/infer/classification",
        &json!({"model_id": "tract-lacks/1", "image": {"type": "base64",
                "value": common::b64("images/dog.jpg")}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}
