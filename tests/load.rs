//! Load test over loopback, bounded in time: 1,000 concurrent connections (the seeds'
//! benchmark parallelism) against the real server, driven by `cvserve bench`.
//!
//! Tier: full (docs/tests.md).

mod common;

use common::{repo, Server};
use serde_json::Value;

#[test]
fn a_thousand_concurrent_clients_get_only_200_or_429_and_memory_stays_bounded() {
    // Bodies are read before admission, counted against MAX_BODY_MEMORY_BYTES as they arrive.
    let s = Server::start(
        "shapes-cls/1,coco/1",
        &[("MAX_BODY_MEMORY_BYTES", &(128 << 20).to_string())],
    );
    let rss_before = s.proc_kib("VmHWM:");
    let report_path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("load-{}.json", std::process::id()));
    for (model, images) in [
        ("shapes-cls/1", "tests/fixtures/samples/shapes-cls"),
        ("coco/1", "tests/fixtures/images"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
            .args([
                "bench",
                "--url",
                &s.base,
                "--model",
                model,
                "--concurrency",
                "1000",
                "--duration",
                "5",
                "--warmup",
                "2",
            ])
            .arg("--images")
            .arg(repo().join(images))
            .arg("--json")
            .arg(&report_path)
            .env("CVSERVE_BENCH_DEBUG", "1")
            .output()
            .expect("run cvserve bench");
        assert!(
            out.status.success(),
            "bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
        let statuses: Vec<&String> = report["by_status"].as_object().unwrap().keys().collect();
        assert!(
            statuses.iter().all(|k| *k == "200" || *k == "429"),
            "{model}: only 200 and 429 expected, got {}\n{}",
            report["by_status"],
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            report["by_status"]["200"].as_u64().unwrap_or(0) > 0,
            "{model}: {}",
            report["by_status"]
        );
    }
    // Bounded memory: the peak grows by far less than a request body per connection would
    // (1,000 x ~1 MB): by at most the body budget (128 MiB), the parsed copies of the
    // admitted requests, and the ring slots touched (a file mapping, counted in RSS here).
    let rss_after = s.proc_kib("VmHWM:");
    assert!(
        rss_after < rss_before + 512 * 1024,
        "peak RSS grew from {rss_before} KiB to {rss_after} KiB under load"
    );
    // And it answers normally afterwards, with every ring slot back.
    let r = s.detect("coco/1", "images/dog.jpg", serde_json::json!({}));
    assert_eq!(r.status, 200);
    let metrics = s.get("/metrics").body;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("cvserve_ring_slots_in_use 0"));
    std::fs::remove_file(&report_path).ok();
}
