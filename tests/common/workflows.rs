//! Replaying the reference's captured Workflows answers (tests/fixtures/golden/workflows)
//! and comparing answers with them, volatile fields aside.

use serde_json::Value;

use super::{assert_matches_golden, b64, Server};

/// A golden case's request with its images put back.
pub fn replay(case: &Value) -> Value {
    let mut req = case["request"].clone();
    for f in case["image_files"].as_array().into_iter().flatten() {
        let at = f["at"].as_str().unwrap();
        let file = f["file"].as_str().unwrap();
        let mut node = &mut req;
        for part in at.trim_start_matches("request/").split('/') {
            node = match part.parse::<usize>() {
                Ok(i) => &mut node[i],
                Err(_) => &mut node[part],
            };
        }
        *node = Value::String(b64(file));
    }
    req
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

/// Compares an answer with the reference's, volatile fields aside: detection lists as the
/// golden tests compare them (IoU >= 0.85, confidence within 0.03), other numbers within
/// 0.03 (or 1 % of their size), ids that are UUIDs, times and JPEG bytes not at all, every
/// other key and string exactly.
pub fn same(ours: &Value, gold: &Value, path: &str) {
    match (ours, gold) {
        (Value::Object(o), Value::Object(g)) => {
            let is_dets = g
                .get("predictions")
                .and_then(Value::as_array)
                .is_some_and(|p| p.first().is_some_and(|d| d.get("x").is_some()))
                || (g
                    .get("predictions")
                    .is_some_and(|p| p.as_array().is_some_and(Vec::is_empty))
                    && g.contains_key("image")
                    && !g.contains_key("top"));
            let ok: Vec<&String> = o.keys().collect();
            let gk: Vec<&String> = g.keys().collect();
            let mut ok_sorted = ok.clone();
            ok_sorted.sort();
            let mut gk_sorted = gk.clone();
            gk_sorted.sort();
            assert_eq!(ok_sorted, gk_sorted, "{path}: keys differ");
            if is_dets {
                assert_eq!(o["image"], g["image"], "{path}.image");
                assert_matches_golden(&o["predictions"], &g["predictions"], 0.45, path);
                let (op, gp) = (
                    o["predictions"].as_array().unwrap(),
                    g["predictions"].as_array().unwrap(),
                );
                // Every detection has the reference's fields, in its order.
                if let (Some(a), Some(b)) = (op.first(), gp.first()) {
                    let ak: Vec<&String> = a.as_object().unwrap().keys().collect();
                    let bk: Vec<&String> = b.as_object().unwrap().keys().collect();
                    assert_eq!(ak, bk, "{path}: detection keys");
                    if let (Some(pa), Some(pb)) = (a.get("points"), b.get("points")) {
                        assert!(
                            pa.as_array().unwrap().len() >= 3 && pb.as_array().unwrap().len() >= 3
                        );
                    }
                    if let (Some(ka), Some(kb)) = (a.get("keypoints"), b.get("keypoints")) {
                        let names = |k: &Value| {
                            k.as_array()
                                .unwrap()
                                .iter()
                                .map(|p| p["class"].clone())
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(names(ka), names(kb), "{path}: keypoint names");
                    }
                }
                for p in op {
                    if let Some(parent) = p.get("parent_id") {
                        let gparent = &gp[0]["parent_id"];
                        if !is_uuid(gparent.as_str().unwrap_or("")) {
                            assert_eq!(parent, gparent, "{path}: parent_id");
                        }
                    }
                }
                return;
            }
            for (k, gv) in g {
                same(&o[k], gv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(o), Value::Array(g)) => {
            assert_eq!(o.len(), g.len(), "{path}: lengths differ: {ours} vs {gold}");
            for (i, (a, b)) in o.iter().zip(g).enumerate() {
                same(a, b, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            if path.ends_with(".time") {
                return;
            }
            assert!(
                (a - b).abs() <= 0.03f64.max(b.abs() * 0.01),
                "{path}: {a} vs {b}"
            );
        }
        (Value::String(a), Value::String(b)) => {
            if is_uuid(b) || b.contains("<truncated") || path.ends_with("frame_timestamp") {
                assert!(!a.is_empty(), "{path}: empty");
                return;
            }
            assert_eq!(a, b, "{path}");
        }
        _ => assert_eq!(ours, gold, "{path}"),
    }
}

pub fn post(s: &Server, case: &Value) -> super::Resp {
    let path = case["path"].as_str().unwrap();
    match case["method"].as_str().unwrap() {
        "GET" => s.get(path),
        _ => s.post_json(path, &replay(case)),
    }
}

/// Replays captured case `name` (tests/fixtures/golden/workflows/`name`.json) on `s` and
/// checks the status; returns the answer and the case.
pub fn replay_case(s: &Server, name: &str) -> (super::Resp, Value) {
    let case = super::golden(&format!("workflows/{name}.json"));
    let r = post(s, &case);
    assert_eq!(
        r.status,
        case["status"].as_u64().unwrap() as u16,
        "{name}: {}",
        r.body
    );
    (r, case)
}
