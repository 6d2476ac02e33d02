//! The deployment files (`deploy/kubernetes`, `Dockerfile`, `Dockerfile.gpu`) render, pass the
//! Kubernetes schemas, and agree with the server's own defaults: a change of `PORT`,
//! `DRAIN_TIMEOUT_S` or the ring's size that forgets the manifests fails here. The checks
//! are in `deploy_check.py`; the tools come from `scripts/setup.sh --sdk`.
//!
//! Tier: full (docs/tests.md).

mod common;

use clap::Parser;
use cvserve::config::ServeConfig;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeConfig,
}

#[test]
fn manifests_and_dockerfiles_agree_with_the_servers_defaults() {
    // The defaults, as the binary has them (no flags; the variables are not set in tests).
    let cfg = Cli::parse_from(["cvserve"]).serve;
    let repo = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("CVSERVE_DEPLOY_PYTHON")
        .unwrap_or_else(|_| format!("{repo}/vendor/deploy-venv/bin/python"));
    let validator = std::path::Path::new(&python).with_file_name("kubernetes-validate");
    let ring_bytes = cfg.ring_slots as usize * cfg.ring_slot_pixels * 3;
    let ring_bytes = ring_bytes.to_string();
    let port = cfg.port.to_string();
    let drain = cfg.drain_timeout_s.to_string();
    let inflight = cfg.max_inflight_requests.to_string();
    let flags = [
        "--repo",
        repo,
        "--kubectl",
        "kubectl",
        "--port",
        &port,
        "--drain-s",
        &drain,
        "--ring-bytes",
        &ring_bytes,
        "--max-inflight",
        &inflight,
    ];
    let args: Vec<&std::ffi::OsStr> = flags
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([std::ffi::OsStr::new("--validator"), validator.as_os_str()])
        .collect();
    let (ok, report) = common::python_check(&python, "deploy_check.py", &args);
    assert!(ok, "{report}");
    assert!(report.contains("deploy check: 0 problem(s)"), "{report}");
}

/// deploy/kubernetes/kserve/ (the ServingRuntime and InferenceService examples) validates
/// strictly against KServe's CRD schemas and agrees with the server's ports and v2 health
/// routes; the checker first proves it refuses a misspelled field.
#[test]
fn kserve_manifests_validate_against_kserves_schemas() {
    let cfg = Cli::parse_from(["cvserve"]).serve;
    let repo = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("CVSERVE_DEPLOY_PYTHON")
        .unwrap_or_else(|_| format!("{repo}/vendor/deploy-venv/bin/python"));
    let (port, grpc) = (cfg.port.to_string(), cfg.grpc_port.to_string());
    let args = [repo, port.as_str(), grpc.as_str()];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (ok, report) = common::python_check(&python, "kserve_check.py", &args);
    assert!(ok, "{report}");
    assert!(report.contains("3 manifests checked"), "{report}");
    assert!(report.contains("0 problems"), "{report}");
}
