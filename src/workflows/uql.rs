//! Roboflow's Universal Query Language, the part the core blocks use: operation chains
//! (`SequenceLength`, `DetectionsFilter`, `ClassificationPropertyExtract`, ...) and
//! statements (`StatementGroup`, `BinaryStatement`, `UnaryStatement`) over operands that are
//! literals or named values. Parsed once when a definition compiles; evaluated per element.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::error::WorkflowError;
use super::value::{Det, Detections, Value};

/// One operation of a chain.
#[derive(Debug, Clone)]
pub enum Op {
    SequenceLength,
    SequenceElementsCount,
    SequenceAggregate(String),
    DetectionsPropertyExtract(String),
    ExtractDetectionProperty(String),
    DetectionsFilter(Box<StatementGroup>),
    SortDetections {
        mode: String,
        ascending: bool,
    },
    /// One detection (or none of none): `first`, `last`, `top_confidence` (the first of the
    /// most confident), `left_most` (the first of the least centre x), `right_most` (the last
    /// of the greatest centre x), as the reference picks them.
    DetectionsSelection(Selection),
    DetectionsOffset {
        x: i64,
        y: i64,
    },
    DetectionsRename {
        map: BTreeMap<String, String>,
        strict: bool,
        id_offset: i64,
    },
    ClassificationPropertyExtract(String),
    ExtractImageProperty(String),
    ToString,
    ToNumber {
        int: bool,
    },
    NumberRound(i32),
    LookupTable(serde_json::Map<String, Json>),
    /// Each element of a list through a lookup table; an element not in it is an error.
    SequenceMap(serde_json::Map<String, Json>),
    Multiply(f64),
    Divide(f64),
    ToBoolean,
    StringToUpperCase,
    StringToLowerCase,
}

/// An operand: a literal or a named value, each through its operations.
#[derive(Debug, Clone)]
pub enum Operand {
    Static { value: Json, ops: Vec<Op> },
    Dynamic { name: String, ops: Vec<Op> },
}

/// A condition.
#[derive(Debug, Clone)]
pub enum Statement {
    Binary {
        left: Operand,
        comparator: String,
        right: Operand,
        negate: bool,
    },
    Unary {
        operand: Operand,
        operator: String,
        negate: bool,
    },
    Group(StatementGroup),
}

/// Statements joined by `or` (Roboflow's default) or `and`.
#[derive(Debug, Clone)]
pub struct StatementGroup {
    pub statements: Vec<Statement>,
    pub and: bool,
}

/// The operations this server evaluates (`/workflows/blocks/describe` lists them).
pub const OPERATIONS: &[&str] = &[
    "SequenceLength",
    "SequenceElementsCount",
    "SequenceAggregate",
    "DetectionsPropertyExtract",
    "ExtractDetectionProperty",
    "DetectionsFilter",
    "SortDetections",
    "DetectionsSelection",
    "DetectionsOffset",
    "DetectionsRename",
    "ClassificationPropertyExtract",
    "ExtractImageProperty",
    "ToString",
    "ToNumber",
    "NumberRound",
    "LookupTable",
    "SequenceMap",
    "Multiply",
    "Divide",
    "ToBoolean",
    "StringToUpperCase",
    "StringToLowerCase",
];

/// Which detection `DetectionsSelection` keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    First,
    Last,
    TopConfidence,
    LeftMost,
    RightMost,
}

/// The comparators of binary statements.
pub const BINARY: &[&str] = &[
    "==",
    "(Number) ==",
    "!=",
    "(Number) !=",
    "(Number) >",
    "(Number) >=",
    "(Number) <",
    "(Number) <=",
    "(Number) in range",
    "(String) startsWith",
    "(String) endsWith",
    "(String) contains",
    "in (Sequence)",
    "str in str",
    "all in (Sequence)",
    "any in (Sequence)",
    "(Sequence) contains",
];

/// The operators of unary statements.
pub const UNARY: &[&str] = &[
    "Exists",
    "DoesNotExist",
    "(Boolean) is True",
    "(Boolean) is False",
    "(Sequence) is empty",
    "(Sequence) is not empty",
];

fn bad(what: impl Into<String>) -> WorkflowError {
    WorkflowError::definition(what)
}

fn str_field<'a>(o: &'a Json, k: &str) -> Option<&'a str> {
    o.get(k).and_then(Json::as_str)
}

/// Parses an operation chain (a JSON list).
pub fn parse_ops(v: &Json) -> Result<Vec<Op>, WorkflowError> {
    match v {
        Json::Null => Ok(Vec::new()),
        Json::Array(items) => items.iter().map(parse_op).collect(),
        _ => Err(bad("operations must be a list")),
    }
}

fn parse_op(o: &Json) -> Result<Op, WorkflowError> {
    let ty = str_field(o, "type").ok_or_else(|| bad("an operation has no `type`"))?;
    let prop = || -> Result<String, WorkflowError> {
        str_field(o, "property_name")
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("operation {ty} needs `property_name`")))
    };
    let num = |k: &str| -> Result<f64, WorkflowError> {
        o.get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| bad(format!("operation {ty} needs a number `{k}`")))
    };
    Ok(match ty {
        "SequenceLength" => Op::SequenceLength,
        "SequenceElementsCount" => Op::SequenceElementsCount,
        "SequenceAggregate" => match str_field(o, "mode") {
            Some(m @ ("first" | "last" | "most_common" | "least_common")) => {
                Op::SequenceAggregate(m.to_owned())
            }
            other => {
                return Err(bad(format!(
                    "SequenceAggregate `mode` must be 'first', 'last', 'most_common' or 'least_common', not {other:?}"
                )))
            }
        },
        "DetectionsPropertyExtract" => Op::DetectionsPropertyExtract(prop()?),
        "ExtractDetectionProperty" => Op::ExtractDetectionProperty(prop()?),
        "DetectionsFilter" => Op::DetectionsFilter(Box::new(parse_group(
            o.get("filter_operation")
                .ok_or_else(|| bad("DetectionsFilter needs `filter_operation`"))?,
        )?)),
        "SortDetections" => Op::SortDetections {
            mode: str_field(o, "mode").unwrap_or("confidence").to_owned(),
            ascending: o.get("ascending").and_then(Json::as_bool).unwrap_or(true),
        },
        "DetectionsSelection" => Op::DetectionsSelection(match str_field(o, "mode") {
            Some("first") => Selection::First,
            Some("last") => Selection::Last,
            Some("top_confidence") => Selection::TopConfidence,
            Some("left_most") => Selection::LeftMost,
            Some("right_most") => Selection::RightMost,
            other => {
                return Err(bad(format!(
                    "DetectionsSelection `mode` must be first, last, top_confidence, left_most or right_most, not {other:?}"
                )))
            }
        }),
        "DetectionsOffset" => Op::DetectionsOffset {
            x: num("offset_x")? as i64,
            y: num("offset_y")? as i64,
        },
        "DetectionsRename" => Op::DetectionsRename {
            map: o
                .get("class_map")
                .and_then(Json::as_object)
                .ok_or_else(|| bad("DetectionsRename needs `class_map`"))?
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect(),
            strict: o.get("strict").and_then(Json::as_bool).unwrap_or(true),
            id_offset: o
                .get("new_classes_id_offset")
                .and_then(Json::as_i64)
                .unwrap_or(1024),
        },
        "ClassificationPropertyExtract" => Op::ClassificationPropertyExtract(prop()?),
        "ExtractImageProperty" => Op::ExtractImageProperty(prop()?),
        "ToString" => Op::ToString,
        "ToNumber" => Op::ToNumber {
            int: str_field(o, "cast_to") == Some("int"),
        },
        "NumberRound" => {
            Op::NumberRound(o.get("decimal_digits").and_then(Json::as_i64).unwrap_or(0) as i32)
        }
        "LookupTable" => Op::LookupTable(
            o.get("lookup_table")
                .and_then(Json::as_object)
                .cloned()
                .ok_or_else(|| bad("LookupTable needs `lookup_table`"))?,
        ),
        "SequenceMap" => Op::SequenceMap(
            o.get("lookup_table")
                .and_then(Json::as_object)
                .cloned()
                .ok_or_else(|| bad("SequenceMap needs `lookup_table`"))?,
        ),
        "Multiply" => Op::Multiply(num("other")?),
        "Divide" => Op::Divide(num("other")?),
        "ToBoolean" => Op::ToBoolean,
        "StringToUpperCase" => Op::StringToUpperCase,
        "StringToLowerCase" => Op::StringToLowerCase,
        other => {
            return Err(WorkflowError::short(
                400,
                "OperationTypeNotRecognisedError",
                "workflow_compilation | workflow_definition_parsing",
                format!("Operation type `{other}` is not available on this server"),
            ))
        }
    })
}

fn parse_operand(o: &Json) -> Result<Operand, WorkflowError> {
    let ops = parse_ops(o.get("operations").unwrap_or(&Json::Null))?;
    match str_field(o, "type") {
        Some("StaticOperand") => Ok(Operand::Static {
            value: o.get("value").cloned().unwrap_or(Json::Null),
            ops,
        }),
        Some("DynamicOperand") => Ok(Operand::Dynamic {
            name: str_field(o, "operand_name").unwrap_or("_").to_owned(),
            ops,
        }),
        _ => Err(bad("an operand's type is StaticOperand or DynamicOperand")),
    }
}

fn parse_statement(o: &Json) -> Result<Statement, WorkflowError> {
    let negate = o.get("negate").and_then(Json::as_bool).unwrap_or(false);
    match str_field(o, "type") {
        Some("BinaryStatement") => {
            let comparator = o
                .get("comparator")
                .and_then(|c| str_field(c, "type"))
                .ok_or_else(|| bad("BinaryStatement needs `comparator`"))?;
            if !BINARY.contains(&comparator) {
                return Err(bad(format!("comparator `{comparator}` is not known")));
            }
            Ok(Statement::Binary {
                left: parse_operand(
                    o.get("left_operand")
                        .ok_or_else(|| bad("BinaryStatement needs `left_operand`"))?,
                )?,
                comparator: comparator.to_owned(),
                right: parse_operand(
                    o.get("right_operand")
                        .ok_or_else(|| bad("BinaryStatement needs `right_operand`"))?,
                )?,
                negate,
            })
        }
        Some("UnaryStatement") => {
            let operator = o
                .get("operator")
                .and_then(|c| str_field(c, "type"))
                .ok_or_else(|| bad("UnaryStatement needs `operator`"))?;
            if !UNARY.contains(&operator) {
                return Err(bad(format!("operator `{operator}` is not known")));
            }
            Ok(Statement::Unary {
                operand: parse_operand(
                    o.get("operand")
                        .ok_or_else(|| bad("UnaryStatement needs `operand`"))?,
                )?,
                operator: operator.to_owned(),
                negate,
            })
        }
        Some("StatementGroup") => Ok(Statement::Group(parse_group(o)?)),
        _ => Err(bad(
            "a statement's type is BinaryStatement, UnaryStatement or StatementGroup",
        )),
    }
}

/// Parses a `StatementGroup`.
pub fn parse_group(o: &Json) -> Result<StatementGroup, WorkflowError> {
    let statements = o
        .get("statements")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("a StatementGroup needs `statements`"))?
        .iter()
        .map(parse_statement)
        .collect::<Result<_, _>>()?;
    Ok(StatementGroup {
        statements,
        and: str_field(o, "operator") == Some("and"),
    })
}

/// An error of evaluation (a value of the wrong kind for its operation).
fn mismatch(op: &str, v: &Value) -> WorkflowError {
    WorkflowError::short(
        400,
        "InvalidInputTypeError",
        "workflow_execution | step_execution",
        format!("Operation {op} cannot take a value of kind {}", v.kind()),
    )
}

fn det_property(d: &Det, w: u32, h: u32, p: &str) -> Result<Json, WorkflowError> {
    let (cx, cy) = ((d.x1 + d.x2) / 2.0, (d.y1 + d.y2) / 2.0);
    Ok(match p {
        "confidence" => json!(d.confidence as f64),
        "class_name" => json!(d.class_name),
        "class_id" => json!(d.class_id),
        "x_min" => json!(d.x1 as f64),
        "y_min" => json!(d.y1 as f64),
        "x_max" => json!(d.x2 as f64),
        "y_max" => json!(d.y2 as f64),
        "size" => json!((d.width() * d.height()) as f64),
        // Whole pixels, as the reference's anchors answer (halves to even).
        "center" => json!([
            (cx as f64).round_ties_even() as i64,
            (cy as f64).round_ties_even() as i64
        ]),
        "top_left" => json!([d.x1 as f64, d.y1 as f64]),
        "top_right" => json!([d.x2 as f64, d.y1 as f64]),
        "bottom_left" => json!([d.x1 as f64, d.y2 as f64]),
        "bottom_right" => json!([d.x2 as f64, d.y2 as f64]),
        "left_center" => json!([d.x1 as f64, cy as f64]),
        "right_center" => json!([d.x2 as f64, cy as f64]),
        "top_center" => json!([cx as f64, d.y1 as f64]),
        "bottom_center" => json!([cx as f64, d.y2 as f64]),
        "detection_id" => json!(d.detection_id),
        "tracker_id" => Json::Null,
        "width" => json!(d.width() as f64),
        "height" => json!(d.height() as f64),
        "image_width" => json!(w),
        "image_height" => json!(h),
        other => {
            return Err(bad(format!("detection property `{other}` is not known")));
        }
    })
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_json().and_then(Json::as_f64)
}

fn json_list(v: &Value) -> Option<Vec<Json>> {
    match v {
        Value::Json(Json::Array(a)) => Some(a.clone()),
        Value::List(items) => items.iter().map(|i| i.as_json().cloned()).collect(),
        _ => None,
    }
}

fn seq_len(v: &Value) -> Option<usize> {
    match v {
        Value::Detections(d) => Some(d.dets.len()),
        Value::Json(Json::Array(a)) => Some(a.len()),
        Value::Json(Json::String(s)) => Some(s.chars().count()),
        Value::Json(Json::Object(o)) => Some(o.len()),
        Value::List(l) => Some(l.len()),
        Value::Dict(d) => Some(d.len()),
        _ => None,
    }
}

/// Values that name operands in statements (`_` inside a filter is the detection).
pub type Scope<'a> = &'a dyn Fn(&str) -> Option<Value>;

/// Applies `ops` to `v`, left to right.
pub fn apply(ops: &[Op], mut v: Value, scope: Scope<'_>) -> Result<Value, WorkflowError> {
    for op in ops {
        v = apply_one(op, v, scope)?;
    }
    Ok(v)
}

fn apply_one(op: &Op, v: Value, scope: Scope<'_>) -> Result<Value, WorkflowError> {
    Ok(match op {
        Op::SequenceLength => Value::Json(json!(
            seq_len(&v).ok_or_else(|| mismatch("SequenceLength", &v))?
        )),
        Op::SequenceElementsCount => {
            let list = json_list(&v).ok_or_else(|| mismatch("SequenceElementsCount", &v))?;
            let mut counts = serde_json::Map::new();
            for item in list {
                let key = match &item {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let n = counts.get(&key).and_then(Json::as_u64).unwrap_or(0);
                counts.insert(key, json!(n + 1));
            }
            Value::Json(Json::Object(counts))
        }
        Op::SequenceAggregate(mode) => {
            let list = json_list(&v).ok_or_else(|| mismatch("SequenceAggregate", &v))?;
            // Counts in first-seen order, as Python's Counter keeps them.
            let mut counts: Vec<(&Json, usize)> = Vec::new();
            for item in &list {
                match counts.iter_mut().find(|(k, _)| *k == item) {
                    Some(c) => c.1 += 1,
                    None => counts.push((item, 1)),
                }
            }
            Value::Json(match mode.as_str() {
                "first" => list.first().cloned().unwrap_or(Json::Null),
                "last" => list.last().cloned().unwrap_or(Json::Null),
                // Counter.most_common(): by count, ties in first-seen order; the first of the
                // greatest and the last of the least.
                "most_common" => counts
                    .iter()
                    .rev()
                    .max_by_key(|c| c.1)
                    .map_or(Json::Null, |c| c.0.clone()),
                _ => counts
                    .iter()
                    .rev()
                    .min_by_key(|c| c.1)
                    .map_or(Json::Null, |c| c.0.clone()),
            })
        }
        Op::DetectionsPropertyExtract(p) => match &v {
            Value::Detections(d) => Value::Json(Json::Array(
                d.dets
                    .iter()
                    .map(|x| det_property(x, d.width, d.height, p))
                    .collect::<Result<_, _>>()?,
            )),
            _ => return Err(mismatch("DetectionsPropertyExtract", &v)),
        },
        Op::ExtractDetectionProperty(p) => match &v {
            Value::Detection(d) => Value::Json(det_property(&d.0, d.1, d.2, p)?),
            _ => return Err(mismatch("ExtractDetectionProperty", &v)),
        },
        Op::DetectionsFilter(group) => match &v {
            Value::Detections(d) => {
                let mut kept = Vec::new();
                for det in &d.dets {
                    let this = Value::Detection(Arc::new((det.clone(), d.width, d.height)));
                    let inner = |name: &str| {
                        if name == "_" {
                            Some(this.clone())
                        } else {
                            scope(name)
                        }
                    };
                    if eval_group(group, &inner)? {
                        kept.push(det.clone());
                    }
                }
                Value::Detections(Arc::new(Detections {
                    dets: kept,
                    ..(**d).clone()
                }))
            }
            _ => return Err(mismatch("DetectionsFilter", &v)),
        },
        Op::SortDetections { mode, ascending } => match &v {
            Value::Detections(d) => {
                let mut keyed = d
                    .dets
                    .iter()
                    .map(|x| {
                        Ok((
                            det_property(x, d.width, d.height, mode)?
                                .as_f64()
                                .unwrap_or(0.0),
                            x.clone(),
                        ))
                    })
                    .collect::<Result<Vec<_>, WorkflowError>>()?;
                keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
                if !ascending {
                    keyed.reverse();
                }
                Value::Detections(Arc::new(Detections {
                    dets: keyed.into_iter().map(|k| k.1).collect(),
                    ..(**d).clone()
                }))
            }
            _ => return Err(mismatch("SortDetections", &v)),
        },
        Op::DetectionsSelection(mode) => match &v {
            Value::Detections(d) => {
                let dets = &d.dets;
                let cx = |x: &Det| (x.x1 + x.x2) / 2.0;
                let pick = match mode {
                    Selection::First => (!dets.is_empty()).then_some(0),
                    Selection::Last => dets.len().checked_sub(1),
                    // The first of the greatest (ties keep the earlier).
                    Selection::TopConfidence => dets
                        .iter()
                        .enumerate()
                        .rev()
                        .max_by(|a, b| a.1.confidence.total_cmp(&b.1.confidence))
                        .map(|(i, _)| i),
                    // The first of the least (min_by keeps the earlier).
                    Selection::LeftMost => dets
                        .iter()
                        .enumerate()
                        .min_by(|a, b| cx(a.1).total_cmp(&cx(b.1)))
                        .map(|(i, _)| i),
                    // The last of the greatest.
                    Selection::RightMost => dets
                        .iter()
                        .enumerate()
                        .max_by(|a, b| cx(a.1).total_cmp(&cx(b.1)))
                        .map(|(i, _)| i),
                };
                Value::Detections(Arc::new(Detections {
                    dets: pick.map(|i| dets[i].clone()).into_iter().collect(),
                    ..(**d).clone()
                }))
            }
            _ => return Err(mismatch("DetectionsSelection", &v)),
        },
        Op::DetectionsOffset { x, y } => match &v {
            Value::Detections(d) => {
                Value::Detections(Arc::new(offset_detections(d, *x, *y, false)))
            }
            _ => return Err(mismatch("DetectionsOffset", &v)),
        },
        Op::DetectionsRename {
            map,
            strict,
            id_offset,
        } => match &v {
            Value::Detections(d) => {
                let mut names: Vec<&String> = map.values().collect();
                names.sort();
                names.dedup();
                // The new ids: strict, each new name's place among the sorted new names; else
                // a class keeps its id (a new name that is an existing class takes that
                // class's), and the other new names take `id_offset` on, in sorted order.
                let ids: BTreeMap<&str, i64> = if *strict {
                    if let Some(det) = d.dets.iter().find(|x| !map.contains_key(&x.class_name)) {
                        return Err(bad(format!(
                            "DetectionsRename (strict): class '{}' not found in class_map",
                            det.class_name
                        )));
                    }
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (n.as_str(), i as i64))
                        .collect()
                } else {
                    let mut ids: BTreeMap<&str, i64> = d
                        .dets
                        .iter()
                        .map(|x| (x.class_name.as_str(), x.class_id))
                        .collect();
                    let fresh: Vec<&String> = names
                        .into_iter()
                        .filter(|n| !ids.contains_key(n.as_str()))
                        .collect();
                    for (i, n) in fresh.into_iter().enumerate() {
                        ids.insert(n.as_str(), id_offset + i as i64);
                    }
                    ids
                };
                let mut dets = Vec::with_capacity(d.dets.len());
                for det in &d.dets {
                    let mut det = det.clone();
                    let name = map.get(&det.class_name).unwrap_or(&det.class_name).clone();
                    det.class_id = ids.get(name.as_str()).copied().unwrap_or(det.class_id);
                    det.class_name = name;
                    dets.push(det);
                }
                Value::Detections(Arc::new(Detections {
                    dets,
                    ..(**d).clone()
                }))
            }
            _ => return Err(mismatch("DetectionsRename", &v)),
        },
        Op::ClassificationPropertyExtract(p) => match &v {
            Value::Classification(c) => {
                use crate::tasks::classification::ClassificationOutput as C;
                let top = c.top();
                Value::Json(match (p.as_str(), &c.output) {
                    ("top_class", C::SingleLabel { top, .. }) => json!(top),
                    (
                        "top_class",
                        C::MultiLabel {
                            predicted_classes, ..
                        },
                    ) => json!(predicted_classes),
                    ("top_class_confidence", C::SingleLabel { confidence, .. }) => {
                        json!(*confidence as f64)
                    }
                    (
                        "top_class_confidence",
                        C::MultiLabel {
                            predictions,
                            predicted_classes,
                        },
                    ) => json!(predicted_classes
                        .iter()
                        .filter_map(|n| predictions.get(n).map(|s| s.confidence as f64))
                        .collect::<Vec<_>>()),
                    ("top_class_confidence_single", _) => {
                        top.map_or(Json::Null, |t| json!(t.2 as f64))
                    }
                    ("all_classes", C::SingleLabel { predictions, .. }) => {
                        json!(predictions
                            .iter()
                            .map(|p| p.class_name.clone())
                            .collect::<Vec<_>>())
                    }
                    ("all_classes", C::MultiLabel { predictions, .. }) => {
                        json!(predictions.keys().cloned().collect::<Vec<_>>())
                    }
                    ("all_confidences", C::SingleLabel { predictions, .. }) => {
                        json!(predictions
                            .iter()
                            .map(|p| p.confidence as f64)
                            .collect::<Vec<_>>())
                    }
                    ("all_confidences", C::MultiLabel { predictions, .. }) => {
                        json!(predictions
                            .values()
                            .map(|p| p.confidence as f64)
                            .collect::<Vec<_>>())
                    }
                    (other, _) => {
                        return Err(bad(format!(
                            "classification property `{other}` is not known"
                        )))
                    }
                })
            }
            _ => return Err(mismatch("ClassificationPropertyExtract", &v)),
        },
        Op::ExtractImageProperty(p) => match &v {
            Value::Image(i) => {
                let (w, h) = i
                    .size()
                    .ok_or_else(|| mismatch("ExtractImageProperty", &v))?;
                Value::Json(match p.as_str() {
                    "size" => json!(w as u64 * h as u64),
                    "height" => json!(h),
                    "width" => json!(w),
                    "aspect_ratio" => json!(w as f64 / h.max(1) as f64),
                    other => return Err(bad(format!("image property `{other}` is not known"))),
                })
            }
            _ => return Err(mismatch("ExtractImageProperty", &v)),
        },
        Op::ToString => Value::Json(Json::String(match &v {
            Value::Json(Json::String(s)) => s.clone(),
            Value::Json(j) => j.to_string(),
            other => return Err(mismatch("ToString", other)),
        })),
        Op::ToNumber { int } => {
            let n = match &v {
                Value::Json(Json::String(s)) => s.trim().parse::<f64>().ok(),
                Value::Json(Json::Bool(b)) => Some(*b as u8 as f64),
                other => as_f64(other),
            }
            .ok_or_else(|| mismatch("ToNumber", &v))?;
            Value::Json(if *int {
                json!(n.trunc() as i64)
            } else {
                json!(n)
            })
        }
        Op::NumberRound(digits) => {
            let n = as_f64(&v).ok_or_else(|| mismatch("NumberRound", &v))?;
            let k = 10f64.powi(*digits);
            Value::Json(json!((n * k).round() / k))
        }
        Op::SequenceMap(table) => {
            let list = json_list(&v).ok_or_else(|| mismatch("SequenceMap", &v))?;
            let mut out = Vec::with_capacity(list.len());
            for item in list {
                let key = match &item {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let Some(mapped) = table.get(&key) else {
                    let keys: Vec<&String> = table.keys().collect();
                    return Err(WorkflowError::short(
                        400,
                        "InvalidInputTypeError",
                        "workflow_execution | step_execution",
                        format!("While executing operation sequence_map(...), encountered value `{key}` which cannot be found in lookup table with keys: {keys:?}"),
                    ));
                };
                out.push(mapped.clone());
            }
            Value::Json(Json::Array(out))
        }
        Op::LookupTable(table) => {
            let key = match &v {
                Value::Json(Json::String(s)) => s.clone(),
                Value::Json(j) => j.to_string(),
                other => return Err(mismatch("LookupTable", other)),
            };
            Value::Json(table.get(&key).cloned().unwrap_or(Json::Null))
        }
        Op::Multiply(k) => Value::Json(json!(
            as_f64(&v).ok_or_else(|| mismatch("Multiply", &v))? * k
        )),
        Op::Divide(k) => Value::Json(json!(as_f64(&v).ok_or_else(|| mismatch("Divide", &v))? / k)),
        Op::ToBoolean => Value::Json(json!(truthy(&v))),
        Op::StringToUpperCase | Op::StringToLowerCase => match &v {
            Value::Json(Json::String(s)) => {
                Value::Json(json!(if matches!(op, Op::StringToUpperCase) {
                    s.to_uppercase()
                } else {
                    s.to_lowercase()
                }))
            }
            other => return Err(mismatch("StringToUpperCase", other)),
        },
    })
}

/// Boxes grown by `dx`, `dy` pixels in all (half on each side), clamped to the image;
/// `new_ids`: each box gets a fresh id and its old id as parent (`detection_offset`).
pub fn offset_detections(d: &Detections, dx: i64, dy: i64, new_ids: bool) -> Detections {
    let (hx, hy) = ((dx / 2) as f32, (dy / 2) as f32);
    let (w, h) = (d.width as f32, d.height as f32);
    let dets = d
        .dets
        .iter()
        .map(|x| {
            let mut n = x.clone();
            (n.x1, n.y1, n.x2, n.y2) = (x.x1 - hx, x.y1 - hy, x.x2 + hx, x.y2 + hy);
            if new_ids {
                // The block keeps boxes inside the image; the UQL operation does not.
                n.x1 = n.x1.clamp(0.0, w);
                n.y1 = n.y1.clamp(0.0, h);
                n.x2 = n.x2.clamp(0.0, w);
                n.y2 = n.y2.clamp(0.0, h);
                n.lineage.parent_id = x.detection_id.as_str().into();
                n.detection_id = uuid::Uuid::new_v4().to_string();
            }
            n
        })
        .collect();
    Detections { dets, ..d.clone() }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Json(Json::Null) => false,
        Value::Json(Json::Bool(b)) => *b,
        Value::Json(Json::Number(n)) => n.as_f64() != Some(0.0),
        other => seq_len(other).is_none_or(|n| n > 0),
    }
}

fn operand(o: &Operand, scope: Scope<'_>) -> Result<Value, WorkflowError> {
    match o {
        Operand::Static { value, ops } => apply(ops, Value::Json(value.clone()), scope),
        Operand::Dynamic { name, ops } => {
            let v = scope(name).ok_or_else(|| {
                WorkflowError::short(
                    400,
                    "InvalidInputTypeError",
                    "workflow_execution | step_execution",
                    format!("Operand `{name}` is not among the step's parameters"),
                )
            })?;
            apply(ops, v, scope)
        }
    }
}

/// Evaluates a statement group.
pub fn eval_group(g: &StatementGroup, scope: Scope<'_>) -> Result<bool, WorkflowError> {
    let mut any = false;
    let mut all = true;
    for s in &g.statements {
        let r = eval(s, scope)?;
        any |= r;
        all &= r;
        // Short-circuit as Python's any()/all() do.
        if (g.and && !r) || (!g.and && r) {
            break;
        }
    }
    Ok(if g.and { all } else { any })
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a.as_json(), b.as_json()) {
        (Some(x), Some(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => p == q,
            _ => x == y,
        },
        _ => false,
    }
}

fn eval(s: &Statement, scope: Scope<'_>) -> Result<bool, WorkflowError> {
    let (r, negate) = match s {
        Statement::Group(g) => (eval_group(g, scope)?, false),
        Statement::Unary {
            operand: o,
            operator,
            negate,
        } => {
            let v = operand(o, scope)?;
            let r = match operator.as_str() {
                "Exists" => !v.is_null(),
                "DoesNotExist" => v.is_null(),
                "(Boolean) is True" => matches!(v, Value::Json(Json::Bool(true))),
                "(Boolean) is False" => matches!(v, Value::Json(Json::Bool(false))),
                "(Sequence) is empty" => seq_len(&v) == Some(0),
                "(Sequence) is not empty" => seq_len(&v).is_some_and(|n| n > 0),
                _ => false,
            };
            (r, *negate)
        }
        Statement::Binary {
            left,
            comparator,
            right,
            negate,
        } => {
            let (l, r) = (operand(left, scope)?, operand(right, scope)?);
            let num = |v: &Value| as_f64(v).ok_or_else(|| mismatch(comparator, v));
            let text = |v: &Value| match v {
                Value::Json(Json::String(s)) => Ok(s.clone()),
                other => Err(mismatch(comparator, other)),
            };
            let res = match comparator.as_str() {
                "==" | "(Number) ==" => loose_eq(&l, &r),
                "!=" | "(Number) !=" => !loose_eq(&l, &r),
                "(Number) >" => num(&l)? > num(&r)?,
                "(Number) >=" => num(&l)? >= num(&r)?,
                "(Number) <" => num(&l)? < num(&r)?,
                "(Number) <=" => num(&l)? <= num(&r)?,
                "(Number) in range" => {
                    let range = json_list(&r).ok_or_else(|| mismatch(comparator, &r))?;
                    let x = num(&l)?;
                    match (
                        range.first().and_then(Json::as_f64),
                        range.get(1).and_then(Json::as_f64),
                    ) {
                        (Some(lo), Some(hi)) => lo <= x && x <= hi,
                        _ => return Err(mismatch(comparator, &r)),
                    }
                }
                "(String) startsWith" => text(&l)?.starts_with(&text(&r)?),
                "(String) endsWith" => text(&l)?.ends_with(&text(&r)?),
                "(String) contains" | "str in str" => {
                    let (a, b) = (text(&l)?, text(&r)?);
                    if comparator == "str in str" {
                        b.contains(&a)
                    } else {
                        a.contains(&b)
                    }
                }
                "in (Sequence)" => json_list(&r)
                    .ok_or_else(|| mismatch(comparator, &r))?
                    .iter()
                    .any(|x| loose_eq(&l, &Value::Json(x.clone()))),
                "(Sequence) contains" => json_list(&l)
                    .ok_or_else(|| mismatch(comparator, &l))?
                    .iter()
                    .any(|x| loose_eq(&r, &Value::Json(x.clone()))),
                "all in (Sequence)" | "any in (Sequence)" => {
                    let a = json_list(&l).ok_or_else(|| mismatch(comparator, &l))?;
                    let b = json_list(&r).ok_or_else(|| mismatch(comparator, &r))?;
                    let inside = |x: &Json| b.contains(x);
                    if comparator.starts_with("all") {
                        a.iter().all(inside)
                    } else {
                        a.iter().any(inside)
                    }
                }
                _ => false,
            };
            (res, *negate)
        }
    };
    Ok(r != negate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflows::value::Lineage;

    fn dets() -> Value {
        let l = Lineage::root("image", 100, 100);
        let mk = |name: &str, conf: f32| Det {
            x1: 0.0,
            y1: 0.0,
            x2: 10.0,
            y2: 10.0,
            confidence: conf,
            class_id: 0,
            class_name: name.into(),
            detection_id: name.into(),
            lineage: l.clone(),
            polygon: None,
            keypoints: None,
        };
        Value::Detections(Arc::new(Detections {
            width: 100,
            height: 100,
            lineage: l.clone(),
            dets: vec![mk("dog", 0.3), mk("cat", 0.7), mk("car", 0.2)],
        }))
    }

    /// The reference's filter (class == dog OR confidence > 0.5) keeps the dog and the
    /// confident cat; `and` keeps neither; names extract in order.
    #[test]
    fn detections_filter_or_and() {
        let filter = |op: &str| {
            json!([{"type": "DetectionsFilter", "filter_operation": {"type": "StatementGroup", "operator": op, "statements": [
                {"type": "BinaryStatement", "left_operand": {"type": "DynamicOperand", "operand_name": "_",
                  "operations": [{"type": "ExtractDetectionProperty", "property_name": "class_name"}]},
                 "comparator": {"type": "=="}, "right_operand": {"type": "StaticOperand", "value": "dog"}},
                {"type": "BinaryStatement", "left_operand": {"type": "DynamicOperand",
                  "operations": [{"type": "ExtractDetectionProperty", "property_name": "confidence"}]},
                 "comparator": {"type": "(Number) >"}, "right_operand": {"type": "StaticOperand", "value": 0.5}}]}},
             {"type": "DetectionsPropertyExtract", "property_name": "class_name"}])
        };
        let none = |_: &str| None;
        let or = apply(&parse_ops(&filter("or")).unwrap(), dets(), &none).unwrap();
        assert_eq!(or.as_json().unwrap(), &json!(["dog", "cat"]));
        let and = apply(&parse_ops(&filter("and")).unwrap(), dets(), &none).unwrap();
        assert_eq!(and.as_json().unwrap(), &json!([]));
    }

    /// One detection per mode; with every box in one place, ties go as the reference's
    /// (the first of the leftmost, the last of the rightmost, the first of the most confident).
    #[test]
    fn detections_selection_modes_and_ties() {
        let none = |_: &str| None;
        let pick = |mode: &str, v: Value| {
            let ops = json!([{"type": "DetectionsSelection", "mode": mode},
                             {"type": "DetectionsPropertyExtract", "property_name": "class_name"}]);
            apply(&parse_ops(&ops).unwrap(), v, &none)
                .unwrap()
                .as_json()
                .unwrap()
                .clone()
        };
        for (mode, want) in [
            ("first", "dog"),
            ("last", "car"),
            ("top_confidence", "cat"),
            ("left_most", "dog"),
            ("right_most", "car"),
        ] {
            assert_eq!(pick(mode, dets()), json!([want]), "{mode}");
        }
        let Value::Detections(d) = dets() else {
            unreachable!()
        };
        let mut moved = (*d).clone();
        moved.dets[2].x1 = 50.0;
        moved.dets[2].x2 = 60.0;
        moved.dets[0].x1 = -4.0;
        let moved = Value::Detections(Arc::new(moved));
        assert_eq!(pick("left_most", moved.clone()), json!(["dog"]));
        assert_eq!(pick("right_most", moved), json!(["car"]));
        let empty = Value::Detections(Arc::new(Detections {
            dets: Vec::new(),
            ..(*d).clone()
        }));
        assert_eq!(pick("top_confidence", empty), json!([]));
        assert!(parse_ops(&json!([{"type": "DetectionsSelection", "mode": "middle"}])).is_err());
    }

    /// The reference's aggregation modes, ties as Python's Counter breaks them; other modes
    /// are refused when the definition is read.
    #[test]
    fn sequence_aggregate_modes() {
        let none = |_: &str| None;
        let agg = |mode: &str| {
            let ops = json!([{"type": "SequenceAggregate", "mode": mode}]);
            let v = Value::Json(json!(["b", "a", "a", "c", "b", "d"]));
            apply(&parse_ops(&ops).unwrap(), v, &none)
                .unwrap()
                .as_json()
                .unwrap()
                .clone()
        };
        assert_eq!(agg("first"), json!("b"));
        assert_eq!(agg("last"), json!("d"));
        assert_eq!(agg("most_common"), json!("b"));
        assert_eq!(agg("least_common"), json!("d"));
        assert!(parse_ops(&json!([{"type": "SequenceAggregate", "mode": "max"}])).is_err());
    }

    /// Non-strict renaming keeps ids (a new name that is an existing class takes its id) and
    /// numbers the other new names from the offset; the UQL offset leaves boxes unclamped;
    /// centres are whole pixels.
    #[test]
    fn rename_offset_and_centre_as_the_reference() {
        let none = |_: &str| None;
        let run = |ops: Json, prop: &str| {
            let mut ops = ops.as_array().unwrap().clone();
            ops.push(json!({"type": "DetectionsPropertyExtract", "property_name": prop}));
            apply(&parse_ops(&Json::Array(ops)).unwrap(), dets(), &none)
                .unwrap()
                .as_json()
                .unwrap()
                .clone()
        };
        let rename = json!([{"type": "DetectionsRename", "class_map": {"dog": "pet", "cat": "car"}, "strict": false}]);
        assert_eq!(
            run(rename.clone(), "class_name"),
            json!(["pet", "car", "car"])
        );
        assert_eq!(run(rename, "class_id"), json!([1024, 0, 0]));
        let strict = json!([{"type": "DetectionsRename", "class_map": {"dog": "b", "cat": "a", "car": "b"}}]);
        assert_eq!(run(strict, "class_id"), json!([1, 0, 1]));
        let offset = json!([{"type": "DetectionsOffset", "offset_x": 10, "offset_y": 4}]);
        assert_eq!(run(offset.clone(), "x_min"), json!([-5.0, -5.0, -5.0]));
        assert_eq!(run(json!([]), "center"), json!([[5, 5], [5, 5], [5, 5]]));
    }

    #[test]
    fn sequence_length_and_unknown_operation() {
        let none = |_: &str| None;
        let n = apply(
            &parse_ops(&json!([{"type": "SequenceLength"}])).unwrap(),
            dets(),
            &none,
        )
        .unwrap();
        assert_eq!(n.as_json().unwrap(), &json!(3));
        let e = parse_ops(&json!([{"type": "RunPython"}])).unwrap_err();
        assert_eq!(e.error_type, "OperationTypeNotRecognisedError");
    }

    #[test]
    fn numbers_compare_across_int_and_float() {
        let g = parse_group(&json!({"type": "StatementGroup", "statements": [
            {"type": "BinaryStatement", "left_operand": {"type": "DynamicOperand", "operand_name": "n"},
             "comparator": {"type": "(Number) =="}, "right_operand": {"type": "StaticOperand", "value": 2.0}}]}))
        .unwrap();
        let scope = |n: &str| (n == "n").then(|| Value::Json(json!(2)));
        assert!(eval_group(&g, &scope).unwrap());
    }
}
