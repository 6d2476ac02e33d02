//! The deployment files (`deploy/kubernetes`, `Dockerfile`, `Dockerfile.gpu`) render, pass the
//! Kubernetes schemas, and agree with the server's own defaults: a change of `PORT`,
//! `DRAIN_TIMEOUT_S` or the ring's size that forgets the manifests fails here. The checks
//! are in `deploy_check.py`; the tools come from `scripts/setup.sh --sdk`.

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
    let out = std::process::Command::new(&python)
        .arg(format!("{repo}/tests/deploy_check.py"))
        .args(["--repo", repo, "--kubectl", "kubectl"])
        .arg("--validator")
        .arg(&validator)
        .args(["--port", &cfg.port.to_string()])
        .args(["--drain-s", &cfg.drain_timeout_s.to_string()])
        .args(["--ring-bytes", &ring_bytes.to_string()])
        .args(["--max-inflight", &cfg.max_inflight_requests.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (scripts/setup.sh --sdk installs it)"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.contains("deploy check: 0 problem(s)"), "{report}");
}
