//! The page at `/` in a real headless Chromium (Selenium): it lists the models, runs coco/1
//! on dog.jpg and draws the answer, and runs a pasted workflow (sliced detection, stitched,
//! drawn) on the same photo, showing the drawn image and the JSON; `/openapi.json` validates as OpenAPI 3 and `/docs`
//! renders it. The checks are in `web_check.py`; the browser, its driver and the Python
//! packages come from `scripts/setup.sh --sdk`. A screenshot is left in `target/`.
//!
//! Tier: full (docs/tests.md).

mod common;

use common::{repo, Server};

#[test]
fn the_page_runs_a_model_in_a_browser_and_the_api_is_documented() {
    let s = Server::start("coco/1,shapes-seg/1,shapes-cls/1", &[]);
    let python = std::env::var("CVSERVE_WEB_PYTHON")
        .unwrap_or_else(|_| format!("{}/vendor/web-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let screenshot = repo().join("target/web-page.png");
    let dog = repo().join("tests/fixtures/images/dog.jpg");
    let (ok, report) = common::python_check(
        &python,
        "web_check.py",
        &[s.base.as_ref(), dog.as_os_str(), screenshot.as_os_str()],
    );
    assert!(ok, "{report}\n{}", s.logs());
    assert!(report.contains("web check: ok"), "{report}");
    assert!(screenshot.exists());
}
