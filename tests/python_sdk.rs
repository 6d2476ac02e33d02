//! Roboflow's Python client, `inference_sdk` (pinned in scripts/setup.sh), against the real
//! server, unchanged. scripts/test.sh creates its virtualenv and sets CVSERVE_SDK_PYTHON.
//!
//! Tier: full (docs/tests.md).

mod common;

use common::{repo, Server};
use serde_json::Value;

fn sdk(server: &Server) -> Value {
    let python = std::env::var("CVSERVE_SDK_PYTHON").expect(
        "CVSERVE_SDK_PYTHON is not set: run the tests through scripts/test.sh, which installs inference_sdk",
    );
    let out = std::process::Command::new(python)
        .arg(repo().join("tests/sdk_client.py"))
        .arg(&server.base)
        .arg(repo().join("tests/fixtures"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "sdk_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    serde_json::from_slice(&out.stdout).expect("sdk_client.py prints JSON")
}

fn classes(answer: &Value) -> Vec<String> {
    answer["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .map(|p| p["class"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn inference_sdk_works_unchanged() {
    // Nothing preloaded: the client's /model/add must load the model.
    let s = Server::start("none", &[]);
    let out = sdk(&s);
    assert!(
        classes(&out["detection"]).contains(&"dog".to_string()),
        "{}",
        out["detection"]
    );
    let list = out["detection_list"].as_array().expect("a list for a list");
    assert_eq!(list.len(), 2);
    assert!(classes(&list[1]).contains(&"giraffe".to_string()));
    assert_eq!(classes(&out["detection_v0"]), classes(&out["detection"]));
    let seg = &out["segmentation"]["predictions"][0];
    assert_eq!(seg["class"], "rectangle", "{}", out["segmentation"]);
    assert!(seg["points"].as_array().is_some_and(|p| p.len() >= 4));
    assert!(out["classification"]["top"]
        .as_str()
        .is_some_and(|t| t.contains("cat")));
    let kp = &out["keypoints"]["predictions"][0];
    assert_eq!(kp["class"], "rectangle", "{}", out["keypoints"]);
    assert_eq!(kp["keypoints"].as_array().map(Vec::len), Some(4), "{kp}");
    assert_eq!(kp["keypoints"][0]["class"], "corner0");
    let registry = out["registry"].to_string();
    for id in ["coco/1", "shapes-seg/1", "imagenet/1", "shapes-pose/1"] {
        assert!(registry.contains(id), "{id} missing from {registry}");
    }
}
