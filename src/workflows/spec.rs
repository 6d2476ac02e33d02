//! A workflow definition compiled once: inputs, steps checked against their blocks' fields,
//! selectors resolved to inputs and steps, each step's dimensionality (1 per input image,
//! +1 inside crops), and the waves steps run in (a step runs once every step it reads has).

use std::collections::HashMap;

use serde_json::Value as Json;

use super::blocks::{self, BlockType, Dflt, Kind, REFUSED};
use super::error::WorkflowError;
use super::uql::{self, Op, StatementGroup};

/// The one execution engine version this server implements.
pub const ENGINE_VERSION: &str = "1.17.0";

/// What a selector points at.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Input(usize),
    Output {
        step: usize,
        name: String,
    },
    /// `$steps.<name>.*`: all of a step's outputs.
    All(usize),
}

/// A field's value in a step: a literal, a selector, or a dict of them (parameters).
#[derive(Debug, Clone)]
pub enum Field {
    Lit(Json),
    Sel(Selector),
    Dict(Vec<(String, Field)>),
}

/// An input of the workflow.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub image: bool,
    /// A step other than a model reads the image's pixels (a crop, tiles, a drawing): it is
    /// decoded once, first, and the models read the decoded pixels instead of decoding again.
    pub pixels_needed: bool,
    pub default: Json,
    pub kinds: Vec<String>,
}

/// A `CaseDefinition`'s result.
#[derive(Debug, Clone)]
pub enum CaseResult {
    Static(Json),
    Dynamic { name: String, ops: Vec<Op> },
}

/// What a step's literal-only fields compile to.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub ops: Vec<Op>,
    pub condition: Option<StatementGroup>,
    pub next_steps: Vec<usize>,
    pub data_ops: Vec<(String, Vec<Op>)>,
    pub cases: Vec<(StatementGroup, CaseResult)>,
    pub default: Option<CaseResult>,
}

/// One step, compiled.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub block: &'static BlockType,
    pub fields: HashMap<&'static str, Field>,
    pub extra: Extra,
    /// Steps it reads (or that gate it).
    pub deps: Vec<usize>,
    /// Dimensionality of its outputs (0: one value for the whole request).
    pub dim: usize,
    /// Dimensionality it runs at.
    pub run_dim: usize,
}

/// One output of the workflow.
#[derive(Debug, Clone)]
pub struct Output {
    pub name: String,
    pub selector: Selector,
    /// `coordinates_system: own`.
    pub own: bool,
    pub dim: usize,
}

/// A compiled definition.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub inputs: Vec<Input>,
    pub steps: Vec<Step>,
    pub outputs: Vec<Output>,
    /// Steps in waves: a wave's steps read only steps of earlier waves.
    pub waves: Vec<Vec<usize>>,
}

/// Limits a definition must keep.
#[derive(Debug, Clone, Copy)]
pub struct DefinitionLimits {
    pub max_steps: usize,
}

fn obj<'a>(v: &'a Json, what: &str) -> Result<&'a serde_json::Map<String, Json>, WorkflowError> {
    v.as_object()
        .ok_or_else(|| WorkflowError::definition(format!("{what} must be an object")))
}

fn list<'a>(v: &'a Json, key: &str) -> Result<&'a Vec<Json>, WorkflowError> {
    v.get(key).and_then(Json::as_array).ok_or_else(|| {
        WorkflowError::definition(format!("The definition's `{key}` must be a list"))
    })
}

/// Compiles a definition.
pub fn compile(def: &Json, limits: DefinitionLimits) -> Result<Workflow, WorkflowError> {
    obj(def, "The workflow definition")?;
    if let Some(v) = def.get("version") {
        let v = v.as_str().unwrap_or("");
        let major = v.split('.').next().and_then(|m| m.parse::<u32>().ok());
        if major != Some(1) {
            return Err(WorkflowError::short(
                400,
                "WorkflowEnvironmentConfigurationError",
                "workflow_compilation | engine_initialisation",
                format!("There is no Execution Engine for version `{v}` of the definition language; this server has {ENGINE_VERSION}"),
            ));
        }
    }
    let mut inputs = Vec::new();
    for i in list(def, "inputs")? {
        let name = i
            .get("name")
            .and_then(Json::as_str)
            .ok_or_else(|| WorkflowError::definition("Every input needs a `name`"))?;
        let image = match i.get("type").and_then(Json::as_str) {
            Some("WorkflowImage" | "InferenceImage") => true,
            Some("WorkflowParameter" | "InferenceParameter") => false,
            other => {
                return Err(WorkflowError::definition(format!(
                    "Input `{name}` has type {other:?}; this server takes WorkflowImage and WorkflowParameter inputs"
                )))
            }
        };
        if inputs.iter().any(|x: &Input| x.name == name) {
            return Err(WorkflowError::definition(format!(
                "Input name `{name}` is used twice"
            )));
        }
        let kinds = i
            .get("kind")
            .and_then(Json::as_array)
            .map(|k| {
                k.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_else(|| vec![if image { "image".into() } else { "*".into() }]);
        inputs.push(Input {
            name: name.to_owned(),
            image,
            pixels_needed: false,
            default: i.get("default_value").cloned().unwrap_or(Json::Null),
            kinds,
        });
    }
    let raw_steps = list(def, "steps")?;
    if raw_steps.len() > limits.max_steps {
        return Err(WorkflowError::limit(
            413,
            format!(
                "The definition has {} steps; this server runs at most {} (WORKFLOW_MAX_STEPS)",
                raw_steps.len(),
                limits.max_steps
            ),
        ));
    }
    // Names and blocks first: selectors may point forward.
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut typed = Vec::with_capacity(raw_steps.len());
    for (i, s) in raw_steps.iter().enumerate() {
        let name = s.get("name").and_then(Json::as_str).unwrap_or("");
        let ty = s.get("type").and_then(Json::as_str).unwrap_or("");
        let Some(block) = blocks::find(ty) else {
            let details = if REFUSED.contains(&ty) {
                format!("Block type '{ty}' is not available on this server: it would run client-supplied code or send data elsewhere")
            } else {
                format!("Input tag '{ty}' found using 'type' does not match any of the expected tags: {}", blocks::all_tags())
            };
            let inner =
                format!("1 validation error for WorkflowSpecificationV1\nsteps.{i}\n  {details}");
            return Err(WorkflowError::syntax(name, Some(ty), None, details, inner));
        };
        if name.is_empty() {
            return Err(WorkflowError::syntax(
                name,
                Some(ty),
                Some("name"),
                "Field required",
                format!("steps.{i}.name: Field required"),
            ));
        }
        if names.insert(name, i).is_some() {
            return Err(WorkflowError::definition(format!(
                "Step name `{name}` is used twice"
            )));
        }
        typed.push((name, block, s));
    }
    let input_index: HashMap<&str, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| (x.name.as_str(), i))
        .collect();
    let resolve = |sel: &str, block_id: &str, prop: &str| -> Result<Selector, WorkflowError> {
        let parts: Vec<&str> = sel.split('.').collect();
        match parts.as_slice() {
            ["$inputs", name] => input_index
                .get(name)
                .map(|&i| Selector::Input(i))
                .ok_or_else(|| WorkflowError::reference(block_id, prop, sel, "input")),
            ["$steps", step, rest @ ..] if rest.len() <= 1 => {
                let &i = names.get(step).ok_or_else(|| {
                    WorkflowError::reference(block_id, prop, &format!("$steps.{step}"), "block")
                })?;
                match rest.first() {
                    None => Ok(Selector::All(i)),
                    Some(&"*") => Ok(Selector::All(i)),
                    Some(out) => {
                        if !typed[i].1.outputs.iter().any(|(n, _)| n == out) {
                            return Err(WorkflowError::reference(
                                block_id,
                                prop,
                                sel,
                                "output of a block",
                            ));
                        }
                        Ok(Selector::Output {
                            step: i,
                            name: (*out).to_owned(),
                        })
                    }
                }
            }
            _ => Err(WorkflowError::reference(
                block_id,
                prop,
                sel,
                "input or block",
            )),
        }
    };
    let field_of = |v: &Json, block_id: &str, prop: &str| -> Result<Field, WorkflowError> {
        match v {
            Json::String(s) if s.starts_with('$') => Ok(Field::Sel(resolve(s, block_id, prop)?)),
            other => Ok(Field::Lit(other.clone())),
        }
    };
    let mut steps = Vec::with_capacity(typed.len());
    for (i, (name, block, raw)) in typed.iter().enumerate() {
        let syntax = |prop: &str, details: String, ty: &str| {
            let inner = format!(
                "1 validation error for WorkflowSpecificationV1\nsteps.{i}.{}.{prop}\n  {details} [type={ty}]",
                block.id
            );
            WorkflowError::syntax(name, Some(block.id), Some(prop), details, inner)
        };
        let mut fields = HashMap::new();
        for spec in block.fields {
            // `predictions` is the reference's other name for a consensus' sources.
            let given = raw.get(spec.name).or_else(|| {
                (spec.name == "predictions_batches")
                    .then(|| raw.get("predictions"))
                    .flatten()
            });
            let v = match (given, spec.default) {
                (Some(v), _) => v.clone(),
                (None, Dflt::Required) => {
                    return Err(syntax(spec.name, "Field required".into(), "missing"));
                }
                (None, Dflt::Is(d)) => serde_json::from_str(d).unwrap_or(Json::Null),
            };
            if !spec.selector {
                fields.insert(spec.name, Field::Lit(v));
                continue;
            }
            if let (Some((lo, hi)), Some(x)) = (spec.range, v.as_f64()) {
                if x > hi {
                    return Err(syntax(
                        spec.name,
                        format!("Input should be less than or equal to {}", fmt_num(hi)),
                        "less_than_equal",
                    ));
                }
                if x < lo {
                    return Err(syntax(
                        spec.name,
                        format!("Input should be greater than or equal to {}", fmt_num(lo)),
                        "greater_than_equal",
                    ));
                }
            }
            fields.insert(spec.name, field_of(&v, name, spec.name)?);
        }
        let mut extra = Extra::default();
        let lit = |fields: &HashMap<&'static str, Field>, k: &str| match fields.get(k) {
            Some(Field::Lit(v)) => v.clone(),
            _ => Json::Null,
        };
        let params =
            |fields: &HashMap<&'static str, Field>, k: &str| -> Result<Field, WorkflowError> {
                let v = lit(fields, k);
                let o = obj(&v, &format!("`{k}` of step `{name}`"))?;
                Ok(Field::Dict(
                    o.iter()
                        .map(|(pk, pv)| Ok((pk.clone(), field_of(pv, name, k)?)))
                        .collect::<Result<_, WorkflowError>>()?,
                ))
            };
        match block.kind {
            Kind::DetectionsFilter | Kind::DetectionsTransformation | Kind::PropertyDefinition => {
                extra.ops = uql::parse_ops(&lit(&fields, "operations"))?;
                if block.kind != Kind::PropertyDefinition {
                    let p = params(&fields, "operations_parameters")?;
                    fields.insert("operations_parameters", p);
                }
            }
            Kind::DetectionsConsensus => {
                // A list of detection selectors: one source each.
                let v = lit(&fields, "predictions_batches");
                let sources = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                    syntax(
                        "predictions_batches",
                        "List should have at least 1 item after validation".into(),
                        "too_short",
                    )
                })?;
                if sources.len() > limits.max_steps {
                    return Err(WorkflowError::limit(
                        413,
                        format!(
                            "Step `{name}` has {} sources; this server takes at most {} (WORKFLOW_MAX_STEPS)",
                            sources.len(),
                            limits.max_steps
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(sources.len());
                for (k, src) in sources.iter().enumerate() {
                    match src.as_str().filter(|x| x.starts_with('$')) {
                        Some(sel) => items.push((
                            k.to_string(),
                            Field::Sel(resolve(sel, name, "predictions_batches")?),
                        )),
                        None => {
                            return Err(syntax(
                                "predictions_batches",
                                format!("Item {k} must be a selector of detections"),
                                "value_error",
                            ))
                        }
                    }
                }
                fields.insert("predictions_batches", Field::Dict(items));
            }
            Kind::ContinueIf => {
                extra.condition = Some(uql::parse_group(&lit(&fields, "condition_statement"))?);
                let p = params(&fields, "evaluation_parameters")?;
                fields.insert("evaluation_parameters", p);
                let next = lit(&fields, "next_steps");
                for s in next.as_array().ok_or_else(|| {
                    WorkflowError::definition("`next_steps` must be a list of step selectors")
                })? {
                    let sel = s.as_str().unwrap_or("");
                    match resolve(sel, name, "next_steps")? {
                        Selector::All(j) => extra.next_steps.push(j),
                        _ => {
                            return Err(WorkflowError::definition(format!(
                                "`next_steps` names steps (`$steps.<name>`), not `{sel}`"
                            )))
                        }
                    }
                }
            }
            Kind::Expression => {
                let p = params(&fields, "data")?;
                fields.insert("data", p);
                let ops = lit(&fields, "data_operations");
                for (k, v) in obj(&ops, "`data_operations`")? {
                    extra.data_ops.push((k.clone(), uql::parse_ops(v)?));
                }
                let switch = lit(&fields, "switch");
                let result = |r: &Json| -> Result<CaseResult, WorkflowError> {
                    match r.get("type").and_then(Json::as_str) {
                        Some("StaticCaseResult") => Ok(CaseResult::Static(
                            r.get("value").cloned().unwrap_or(Json::Null),
                        )),
                        Some("DynamicCaseResult") => Ok(CaseResult::Dynamic {
                            name: r
                                .get("parameter_name")
                                .and_then(Json::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            ops: uql::parse_ops(r.get("operations").unwrap_or(&Json::Null))?,
                        }),
                        _ => Err(WorkflowError::definition(
                            "A case result is StaticCaseResult or DynamicCaseResult",
                        )),
                    }
                };
                for c in switch
                    .get("cases")
                    .and_then(Json::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    let cond = uql::parse_group(c.get("condition").unwrap_or(&Json::Null))?;
                    extra
                        .cases
                        .push((cond, result(c.get("result").unwrap_or(&Json::Null))?));
                }
                extra.default = Some(result(switch.get("default").unwrap_or(&Json::Null))?);
            }
            _ => {}
        }
        steps.push(Step {
            name: (*name).to_owned(),
            block,
            fields,
            extra,
            deps: Vec::new(),
            dim: 0,
            run_dim: 0,
        });
    }
    // Dependencies: every selector, and the gates of continue_if.
    for step in steps.iter_mut() {
        let mut deps = Vec::new();
        for f in step.fields.values() {
            collect_steps(f, &mut deps);
        }
        deps.sort_unstable();
        deps.dedup();
        step.deps = deps;
    }
    for i in 0..steps.len() {
        for &n in &steps[i].extra.next_steps.clone() {
            if !steps[n].deps.contains(&i) {
                steps[n].deps.push(i);
            }
        }
    }
    let waves = waves(&steps)?;
    // Dimensionality, in wave order.
    for wave in &waves {
        for &i in wave {
            let mut run = 0;
            for f in steps[i].fields.values() {
                run = run.max(field_dim(f, &inputs, &steps));
            }
            let dim = (run as i64 + steps[i].block.dim_offset as i64).max(0) as usize;
            if steps[i].block.kind == Kind::DimensionCollapse && run == 0 {
                return Err(WorkflowError::short(
                    400,
                    "StepInputDimensionalityError",
                    "workflow_compilation | execution_graph_construction",
                    format!(
                        "Step `{}` collapses a dimension its data does not have",
                        steps[i].name
                    ),
                ));
            }
            steps[i].run_dim = run;
            steps[i].dim = dim;
        }
    }
    let mut outputs = Vec::new();
    for o in list(def, "outputs")? {
        let name = o
            .get("name")
            .and_then(Json::as_str)
            .ok_or_else(|| WorkflowError::definition("Every output needs a `name`"))?;
        let sel = o.get("selector").and_then(Json::as_str).unwrap_or("");
        let selector = resolve(sel, "$outputs", name)?;
        let dim = sel_dim(&selector, &inputs, &steps);
        outputs.push(Output {
            name: name.to_owned(),
            selector,
            own: o.get("coordinates_system").and_then(Json::as_str) == Some("own"),
            dim,
        });
    }
    for step in &steps {
        if matches!(step.block.kind, Kind::Model(..)) {
            continue;
        }
        let mut sels = Vec::new();
        for f in step.fields.values() {
            collect_inputs(f, &mut sels);
        }
        for i in sels {
            if inputs[i].image {
                inputs[i].pixels_needed = true;
            }
        }
    }
    Ok(Workflow {
        inputs,
        steps,
        outputs,
        waves,
    })
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn collect_inputs(f: &Field, out: &mut Vec<usize>) {
    match f {
        Field::Sel(Selector::Input(i)) => out.push(*i),
        Field::Dict(items) => items.iter().for_each(|(_, f)| collect_inputs(f, out)),
        _ => {}
    }
}

fn collect_steps(f: &Field, out: &mut Vec<usize>) {
    match f {
        Field::Sel(Selector::Output { step, .. } | Selector::All(step)) => out.push(*step),
        Field::Dict(items) => items.iter().for_each(|(_, f)| collect_steps(f, out)),
        _ => {}
    }
}

/// Dimensionality of what a selector points at.
pub fn sel_dim(s: &Selector, inputs: &[Input], steps: &[Step]) -> usize {
    match s {
        Selector::Input(i) => usize::from(inputs[*i].image),
        Selector::Output { step, .. } | Selector::All(step) => steps[*step].dim,
    }
}

fn field_dim(f: &Field, inputs: &[Input], steps: &[Step]) -> usize {
    match f {
        Field::Lit(_) => 0,
        Field::Sel(s) => sel_dim(s, inputs, steps),
        Field::Dict(items) => items
            .iter()
            .map(|(_, f)| field_dim(f, inputs, steps))
            .max()
            .unwrap_or(0),
    }
}

/// Kahn's algorithm by levels; a cycle is a definition error.
fn waves(steps: &[Step]) -> Result<Vec<Vec<usize>>, WorkflowError> {
    let mut level = vec![usize::MAX; steps.len()];
    let mut done = 0;
    let mut waves: Vec<Vec<usize>> = Vec::new();
    while done < steps.len() {
        let ready: Vec<usize> = (0..steps.len())
            .filter(|&i| {
                level[i] == usize::MAX && steps[i].deps.iter().all(|&d| level[d] < waves.len())
            })
            .collect();
        if ready.is_empty() {
            return Err(WorkflowError::short(
                400,
                "ExecutionGraphStructureError",
                "workflow_compilation | execution_graph_construction",
                "Detected cycle in execution graph: the steps depend on each other",
            ));
        }
        for &i in &ready {
            level[i] = waves.len();
        }
        done += ready.len();
        waves.push(ready);
    }
    Ok(waves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: DefinitionLimits = DefinitionLimits { max_steps: 64 };

    fn two_stage() -> Json {
        json!({"version": "1.0", "inputs": [{"type": "WorkflowImage", "name": "image"}],
          "steps": [
            {"type": "roboflow_core/roboflow_classification_model@v1", "name": "cls", "images": "$steps.crop.crops", "model_id": "imagenet/1"},
            {"type": "Crop", "name": "crop", "images": "$inputs.image", "predictions": "$steps.det.predictions"},
            {"type": "roboflow_core/roboflow_object_detection_model@v1", "name": "det", "images": "$inputs.image", "model_id": "coco/1"},
            {"type": "roboflow_core/dimension_collapse@v1", "name": "all", "data": "$steps.cls.predictions"}],
          "outputs": [{"type": "JsonField", "name": "c", "selector": "$steps.cls.predictions"},
                      {"type": "JsonField", "name": "a", "selector": "$steps.all.output"}]})
    }

    /// Steps given in any order run in dependency waves; crops add a dimension that
    /// dimension_collapse takes away.
    #[test]
    fn waves_and_dimensions() {
        let w = compile(&two_stage(), LIMITS).unwrap();
        assert_eq!(w.waves, vec![vec![2], vec![1], vec![0], vec![3]]);
        assert_eq!(w.steps[2].dim, 1);
        assert_eq!(w.steps[1].dim, 2);
        assert_eq!(w.steps[0].dim, 2);
        assert_eq!(w.steps[3].dim, 1);
        assert_eq!((w.outputs[0].dim, w.outputs[1].dim), (2, 1));
    }

    #[test]
    fn reference_errors_name_the_selector() {
        let mut d = two_stage();
        d["outputs"][0]["selector"] = json!("$steps.nope.predictions");
        let e = compile(&d, LIMITS).unwrap_err();
        assert_eq!(e.error_type, "InvalidReferenceTargetError");
        assert_eq!(
            e.message,
            "Workflow references '$steps.nope' which points to a non-existent block."
        );
        assert_eq!(e.blocks_errors.unwrap()[0].block_id, "$outputs");
    }

    #[test]
    fn field_errors_name_the_field() {
        let mut d = two_stage();
        d["steps"][2]["confidence"] = json!(1.5);
        let e = compile(&d, LIMITS).unwrap_err();
        let b = &e.blocks_errors.unwrap()[0];
        assert_eq!(
            (b.block_id.as_str(), b.property_name.as_deref()),
            ("det", Some("confidence"))
        );
        assert_eq!(
            b.property_details,
            "Input should be less than or equal to 1"
        );
        let mut d = two_stage();
        d["steps"][2].as_object_mut().unwrap().remove("model_id");
        let e = compile(&d, LIMITS).unwrap_err();
        assert_eq!(
            e.blocks_errors.unwrap()[0].property_details,
            "Field required"
        );
    }

    #[test]
    fn cycles_and_step_caps_are_refused() {
        let d = json!({"version": "1.0", "inputs": [], "steps": [
            {"type": "roboflow_core/property_definition@v1", "name": "a", "data": "$steps.b.output", "operations": []},
            {"type": "roboflow_core/property_definition@v1", "name": "b", "data": "$steps.a.output", "operations": []}],
            "outputs": []});
        assert_eq!(
            compile(&d, LIMITS).unwrap_err().error_type,
            "ExecutionGraphStructureError"
        );
        let e = compile(&two_stage(), DefinitionLimits { max_steps: 3 }).unwrap_err();
        assert_eq!(e.status, 413);
    }

    #[test]
    fn code_running_blocks_are_refused_by_name() {
        let mut d = two_stage();
        d["steps"][0]["type"] = json!("roboflow_core/webhook_sink@v1");
        let e = compile(&d, LIMITS).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.error_type, "WorkflowSyntaxError");
        let b = &e.blocks_errors.unwrap()[0];
        assert_eq!(
            b.block_type.as_deref(),
            Some("roboflow_core/webhook_sink@v1")
        );
        assert!(b.property_details.contains("not available on this server"));
    }
}
