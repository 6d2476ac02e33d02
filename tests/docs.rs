//! The configuration page (`docs/configuration.md`) against the binary: every setting
//! `cvserve serve --help` lists (what `./run.sh --help` prints) has a row there, and every
//! row names a setting the binary reads, so a setting can go neither undocumented nor stale.
//!
//! Tier: quick (docs/tests.md).

mod common;

use std::collections::BTreeSet;

/// Variables the binary reads outside its flags (the log filter, in `main`).
const NOT_FLAGS: [&str; 2] = ["LOG_LEVEL", "RUST_LOG"];

fn help_variables() -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvserve"))
        .args(["serve", "--help"])
        .output()
        .expect("run cvserve serve --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_string())
        .collect()
}

/// The backticked names in the first column of the page's table rows.
fn documented_variables() -> BTreeSet<String> {
    let page = std::fs::read_to_string(common::repo().join("docs/configuration.md")).unwrap();
    page.lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            let first = l.split('|').nth(1).unwrap_or("");
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_setting_of_run_sh_help_is_documented_and_every_documented_one_exists() {
    let help = help_variables();
    assert!(help.len() > 50, "too few settings parsed: {help:?}");
    let documented = documented_variables();
    let missing: Vec<_> = help.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "settings of `cvserve serve --help` missing from docs/configuration.md: {missing:?}"
    );
    let stale: Vec<_> = documented
        .iter()
        .filter(|v| !help.contains(*v) && !NOT_FLAGS.contains(&v.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md documents settings the binary does not have: {stale:?}"
    );
}
