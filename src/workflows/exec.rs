//! Runs a compiled workflow on one request's inputs: wave by wave, the steps of a wave
//! concurrently; each step once per element of its dimensionality (an input image, or a crop
//! of one), its model steps as one engine call over every element, so that the crops of a
//! request, and of every request in flight, share the model's batches. Elements a
//! `continue_if` stopped, or whose inputs are missing, give `null`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use image::RgbImage;
use serde_json::{json, Map, Value as Json};

use super::blocks::Kind;
use super::error::{RunError, WorkflowError};
use super::fusion::{self, Agg, Consensus, MaskAgg, Overlap, Replacement, Required};
use super::spec::{CaseResult, Field, Selector, Step, Workflow};
use super::uql;
use super::value::{
    self, Classification, Det, Detections, Keypoint, Lineage, Pixels, Value, WfImage,
};
use super::visual::DrawSettings;
use crate::engine::admission::{Ticket, Tickets};
use crate::engine::{Engine, EngineError, ImageInput, ImageOutput};
use crate::metrics::METRICS;
use crate::model::repository::TaskType;
use crate::pipeline::frame::{Frame, FramePixels};
use crate::tasks::classification::ClassificationParams;
use crate::tasks::detection::DetectionParams;
use crate::tasks::keypoints::KeypointsParams;
use crate::tasks::segmentation::{MaskBody, MaskDecodeMode, MaskFormat, SegmentationParams};
use crate::tasks::{TaskOutput, TaskParams};

/// An element's place: its index in the input batch, then in its crops.
pub type Index = Vec<usize>;

/// A step's named outputs for one element.
type Outputs = Vec<(String, Value)>;

/// The items of a step (or an image input) at its dimensionality, in order.
#[derive(Default)]
struct Data {
    items: Vec<(Index, Option<Outputs>)>,
    pos: HashMap<Index, usize>,
}

impl Data {
    fn push(&mut self, idx: Index, out: Option<Outputs>) {
        self.pos.insert(idx.clone(), self.items.len());
        self.items.push((idx, out));
    }

    fn get(&self, idx: &[usize]) -> Option<&Outputs> {
        self.pos.get(idx).and_then(|&p| self.items[p].1.as_ref())
    }
}

/// Limits of one run (WORKFLOW_MAX_IMAGES, WORKFLOW_MAX_CROPS, WORKFLOW_MAX_ANSWER_BYTES).
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub max_images: usize,
    pub max_crops: usize,
    pub max_answer_bytes: usize,
    pub max_image_pixels: u64,
    pub max_mask_work_pixels: u64,
}

/// One request's inputs: images (already fetched, one list per image input; `list`: the
/// client sent a list) and parameters.
pub struct RunInputs {
    pub images: HashMap<String, (Vec<ImageInput>, bool)>,
    pub params: Map<String, Json>,
}

/// What a run needs from the server.
pub struct Runner<'a> {
    pub engine: &'a Engine,
    pub api_key: Option<String>,
    pub arrived: Instant,
    pub deadline: Instant,
    pub limits: RunLimits,
    /// The workflow's metrics label.
    pub label: String,
}

enum InputData {
    Param(Value),
    Images(Data),
}

struct State<'w> {
    wf: &'w Workflow,
    inputs: Vec<InputData>,
    steps: Vec<Option<Data>>,
    /// Per step: elements a `continue_if` stopped.
    stopped: Vec<HashSet<Index>>,
}

impl State<'_> {
    /// The value a field holds for element `idx`; `None`: missing (the element is skipped).
    fn resolve(&self, f: &Field, idx: &[usize]) -> Option<Value> {
        match f {
            Field::Lit(j) => Some(Value::Json(j.clone())),
            Field::Sel(s) => self.select(s, idx),
            Field::Dict(items) => Some(Value::Dict(
                items
                    .iter()
                    .map(|(k, f)| (k.clone(), self.resolve(f, idx).unwrap_or_else(Value::null)))
                    .collect(),
            )),
        }
    }

    fn select(&self, s: &Selector, idx: &[usize]) -> Option<Value> {
        match s {
            Selector::Input(i) => match &self.inputs[*i] {
                InputData::Param(v) => Some(v.clone()),
                InputData::Images(d) => d.get(&idx[..1.min(idx.len())]).map(|o| o[0].1.clone()),
            },
            Selector::Output { step, name } => {
                let dim = self.wf.steps[*step].dim.min(idx.len());
                let outs = self.steps[*step].as_ref()?.get(&idx[..dim])?;
                outs.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
            }
            Selector::All(step) => {
                let dim = self.wf.steps[*step].dim.min(idx.len());
                let outs = self.steps[*step].as_ref()?.get(&idx[..dim])?;
                Some(Value::Dict(outs.clone()))
            }
        }
    }

    fn sel_data(&self, s: &Selector) -> Option<&Data> {
        match s {
            Selector::Input(i) => match &self.inputs[*i] {
                InputData::Images(d) => Some(d),
                InputData::Param(_) => None,
            },
            Selector::Output { step, .. } | Selector::All(step) => self.steps[*step].as_ref(),
        }
    }

    /// The elements a step runs for: the items of its deepest batch input.
    fn elements(&self, step: &Step) -> Vec<Index> {
        if step.run_dim == 0 {
            return vec![Vec::new()];
        }
        // Blocks that gather a deeper input per element run at their reference field's.
        if let Some(Field::Sel(s)) =
            reference_field(step.block.kind).and_then(|f| step.fields.get(f))
        {
            return self
                .sel_data(s)
                .map(|d| d.items.iter().map(|(i, _)| i.clone()).collect())
                .unwrap_or_default();
        }
        let mut sels = Vec::new();
        for f in step.fields.values() {
            collect_sels(f, &mut sels);
        }
        for s in sels {
            if super::spec::sel_dim(s, &self.wf.inputs, &self.wf.steps) == step.run_dim {
                if let Some(d) = self.sel_data(s) {
                    return d.items.iter().map(|(i, _)| i.clone()).collect();
                }
            }
        }
        Vec::new()
    }

    /// Whether a `continue_if` stopped element `idx` of step `i`.
    fn is_stopped(&self, i: usize, idx: &[usize]) -> bool {
        let s = &self.stopped[i];
        !s.is_empty() && (0..=idx.len()).any(|k| s.contains(&idx[..k]))
    }

    /// The values one level below `idx` of what `s` points at, in order (`None` where a
    /// child has none).
    fn children(&self, s: &Selector, idx: &[usize]) -> Vec<(Index, Option<Value>)> {
        let Some(d) = self.sel_data(s) else {
            return Vec::new();
        };
        d.items
            .iter()
            .filter(|(i, _)| i.len() == idx.len() + 1 && i.starts_with(idx))
            .map(|(i, _)| (i.clone(), self.select(s, i).filter(|v| !v.is_null())))
            .collect()
    }

    /// The step's batch fields all hold a value for `idx`.
    fn inputs_present(&self, step: &Step, idx: &[usize]) -> bool {
        step.fields.values().all(|f| match f {
            Field::Sel(s) if super::spec::sel_dim(s, &self.wf.inputs, &self.wf.steps) > 0 => {
                self.select(s, idx).is_some_and(|v| !v.is_null())
            }
            _ => true,
        })
    }
}

/// The field whose elements a step gathering a deeper input runs for.
fn reference_field(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::DetectionsStitch => Some("reference_image"),
        Kind::ClassesReplacement => Some("object_detection_predictions"),
        _ => None,
    }
}

fn collect_sels<'a>(f: &'a Field, out: &mut Vec<&'a Selector>) {
    match f {
        Field::Sel(s) => out.push(s),
        Field::Dict(items) => items.iter().for_each(|(_, f)| collect_sels(f, out)),
        Field::Lit(_) => {}
    }
}

/// The images of a model step that share a model and parameters: one engine call.
type ModelGroup = (String, TaskParams, Vec<(Index, Arc<WfImage>)>);

/// The run's deadline passed (504).
fn past_deadline() -> WorkflowError {
    WorkflowError::short(
        504,
        "DeadlineExceededError",
        "workflow_execution | step_execution",
        "Deadline exceeded while the workflow ran (REQUEST_TIMEOUT_S or X-Request-Timeout-Ms)",
    )
}

fn get_field(step: &Step, state: &State<'_>, name: &str, idx: &[usize]) -> Option<Value> {
    step.fields.get(name).and_then(|f| state.resolve(f, idx))
}

fn step_error(step: &Step, e: RunError) -> RunError {
    match e {
        RunError::Workflow(e) if e.blocks_errors.is_none() => {
            let (status, ty) = (e.status, e.error_type);
            RunError::Workflow(WorkflowError {
                status,
                ..WorkflowError::step(&step.name, step.block.id, status, ty, e.message)
            })
        }
        other => other,
    }
}

fn engine_error_named(step: &str, error: EngineError) -> RunError {
    RunError::Engine {
        step: step.to_owned(),
        block_type: "",
        error,
        input: None,
    }
}

/// An engine error in a step (mapped to its status by the HTTP layer).
fn engine_error(step: &Step, error: EngineError) -> RunError {
    RunError::Engine {
        step: step.name.clone(),
        block_type: step.block.id,
        error,
        input: None,
    }
}

/// A field's number, if it is one.
pub(super) fn num(v: &Option<Value>) -> Option<f64> {
    v.as_ref().and_then(|v| v.as_json()).and_then(Json::as_f64)
}

/// A field's string, if it is one.
pub(super) fn text(v: &Option<Value>) -> Option<String> {
    v.as_ref()
        .and_then(|v| v.as_json())
        .and_then(Json::as_str)
        .map(str::to_owned)
}

fn bad_field(step: &Step, field: &str, why: impl Into<String>) -> WorkflowError {
    let mut e = WorkflowError::step(
        &step.name,
        step.block.id,
        400,
        "InvalidInputTypeError",
        why.into(),
    );
    if let Some(b) = e.blocks_errors.as_mut().and_then(|b| b.first_mut()) {
        b.property_name = Some(field.to_owned());
    }
    e
}

impl Runner<'_> {
    /// Runs `wf`, answering `outputs` (one dict per input image, or one in all).
    pub async fn run(
        &self,
        wf: &Workflow,
        mut inputs: RunInputs,
        tickets: &mut Tickets,
        excluded: &[String],
    ) -> Result<Vec<Json>, RunError> {
        let mut state = State {
            wf,
            inputs: Vec::with_capacity(wf.inputs.len()),
            steps: (0..wf.steps.len()).map(|_| None).collect(),
            stopped: vec![HashSet::new(); wf.steps.len()],
        };
        let mut batch = 0usize;
        for input in &wf.inputs {
            if input.image {
                let (images, list) = inputs.images.remove(&input.name).ok_or_else(|| {
                    WorkflowError::input(format!(
                        "Detected runtime parameter `{}` defined as `WorkflowImage` (of kind `['image']`), but value is not provided.",
                        input.name
                    ))
                })?;
                if images.len() != 1 && batch > 1 && images.len() != batch {
                    return Err(WorkflowError::input(format!(
                        "Input `{}` has {} images where other inputs have {batch}: batch inputs have the same length, or length 1",
                        input.name,
                        images.len()
                    )).into());
                }
                batch = batch.max(images.len());
                let mut data = Data::default();
                for (i, img) in images.into_iter().enumerate() {
                    let id = if list {
                        format!("{}.[{i}]", input.name)
                    } else {
                        input.name.clone()
                    };
                    let image = WfImage {
                        pixels: Pixels::Encoded {
                            input: img,
                            decoded: Arc::new(tokio::sync::OnceCell::new()),
                        },
                        lineage: Lineage::root(&id, 0, 0),
                        base64: None,
                    };
                    data.push(
                        vec![i],
                        Some(vec![(String::new(), Value::Image(Arc::new(image)))]),
                    );
                }
                state.inputs.push(InputData::Images(data));
            } else {
                let v = inputs
                    .params
                    .remove(&input.name)
                    .unwrap_or_else(|| input.default.clone());
                state.inputs.push(InputData::Param(Value::Json(v)));
            }
        }
        if batch > self.limits.max_images {
            return Err(WorkflowError::limit(
                413,
                format!("The request has {batch} images; this server takes at most {} per workflow request (WORKFLOW_MAX_IMAGES)", self.limits.max_images),
            ).into());
        }
        // Broadcast inputs of one image to the batch.
        for d in &mut state.inputs {
            if let InputData::Images(data) = d {
                if data.items.len() == 1 && batch > 1 {
                    let first = data.items[0].1.clone();
                    for i in 1..batch {
                        data.push(vec![i], first.clone());
                    }
                }
            }
        }
        // Images whose pixels a crop, tile or drawing needs are decoded once, first; their
        // model steps then read the decoded pixels (one copy into the ring slot) instead of
        // decoding the bytes a second time.
        let mut first: Vec<Arc<WfImage>> = Vec::new();
        for (input, d) in wf.inputs.iter().zip(&state.inputs) {
            if let (true, InputData::Images(data)) = (input.pixels_needed, d) {
                for (_, out) in &data.items {
                    if let Some(Value::Image(img)) =
                        out.as_ref().and_then(|o| o.first()).map(|o| &o.1)
                    {
                        if !first.iter().any(|f| Arc::ptr_eq(f, img)) {
                            first.push(Arc::clone(img));
                        }
                    }
                }
            }
        }
        for r in join_all(first.iter().map(|img| self.pixels(img))).await {
            r?;
        }
        for wave in &wf.waves {
            // Each model step takes its place in its model's line as the run reaches it.
            let mut models = Vec::with_capacity(wave.len());
            for &i in wave {
                let step = &wf.steps[i];
                let ids = if matches!(step.block.kind, Kind::Model(..)) {
                    self.model_ids(&state, step)
                } else {
                    Vec::new()
                };
                for model in &ids {
                    self.engine
                        .take_place(tickets, model, self.arrived, self.deadline)
                        .map_err(|e| engine_error(step, e))?;
                }
                models.push(ids.into_iter().next());
            }
            let places = tickets.split(&models);
            let results = {
                let state = &state;
                join_all(wave.iter().zip(places).map(|(&i, ticket)| async move {
                    let started = Instant::now();
                    let r = self.run_step(state, i, ticket).await;
                    METRICS
                        .workflow_step_seconds
                        .with_label_values(&[&self.label, wf.steps[i].block.id])
                        .observe(started.elapsed().as_secs_f64());
                    r
                }))
                .await
            };
            for (&i, r) in wave.iter().zip(results) {
                let (data, stops) = r.map_err(|e| step_error(&wf.steps[i], e))?;
                for (target, idx) in stops {
                    state.stopped[target].insert(idx);
                }
                state.steps[i] = Some(data);
            }
            if Instant::now() >= self.deadline {
                return Err(past_deadline().into());
            }
        }
        for (_, t) in tickets.iter_mut() {
            t.served();
        }
        self.outputs(&state, batch, excluded).await
    }

    /// The models a model step will call (its `model_id` per element).
    fn model_ids(&self, state: &State<'_>, step: &Step) -> Vec<String> {
        let mut ids: Vec<String> = state
            .elements(step)
            .iter()
            .filter_map(|idx| {
                text(
                    &step
                        .fields
                        .get("model_id")
                        .and_then(|f| state.resolve(f, idx)),
                )
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    async fn run_step(
        &self,
        state: &State<'_>,
        i: usize,
        ticket: Option<&mut Ticket>,
    ) -> Result<(Data, Vec<(usize, Index)>), RunError> {
        let step = &state.wf.steps[i];
        let elements: Vec<Index> = state.elements(step);
        let live: Vec<Index> = elements
            .iter()
            .filter(|idx| {
                !state.is_stopped(i, idx)
                    && match reference_field(step.block.kind) {
                        Some(f) => get_field(step, state, f, idx).is_some_and(|v| !v.is_null()),
                        None => state.inputs_present(step, idx),
                    }
            })
            .cloned()
            .collect();
        let get =
            |name: &str, idx: &[usize]| step.fields.get(name).and_then(|f| state.resolve(f, idx));
        let mut data = Data::default();
        let mut stops = Vec::new();
        let mut results: HashMap<Index, Outputs> = HashMap::new();
        match step.block.kind {
            Kind::Model(task, _) => {
                results = self.model_step(state, step, task, &live, ticket).await?;
            }
            Kind::DynamicCrop => {
                for idx in &live {
                    let (Some(Value::Image(img)), Some(Value::Detections(dets))) =
                        (get("images", idx), get("predictions", idx))
                    else {
                        continue;
                    };
                    if dets.dets.len() > self.limits.max_crops {
                        return Err(WorkflowError::limit(413, format!(
                            "Step `{}` would make {} crops of one image; this server makes at most {} (WORKFLOW_MAX_CROPS)",
                            step.name, dets.dets.len(), self.limits.max_crops)).into());
                    }
                    let pixels = self.pixels(&img).await?;
                    for (j, d) in dets.dets.iter().enumerate() {
                        let mut child = idx.clone();
                        child.push(j);
                        let b = (d.x1 as f64, d.y1 as f64, d.x2 as f64, d.y2 as f64);
                        let Some((crop, x1, y1)) = pixels.crop(&d.detection_id, b) else {
                            data.push(
                                child,
                                Some(vec![
                                    ("crops".into(), Value::null()),
                                    ("predictions".into(), Value::null()),
                                ]),
                            );
                            continue;
                        };
                        let (w, h) = crop.size().unwrap_or_default();
                        let lineage = crop.lineage.clone();
                        let mut moved = d.clone();
                        moved.x1 -= x1 as f32;
                        moved.x2 -= x1 as f32;
                        moved.y1 -= y1 as f32;
                        moved.y2 -= y1 as f32;
                        moved.lineage = lineage.clone();
                        let own = Detections {
                            width: w,
                            height: h,
                            lineage,
                            dets: vec![moved],
                        };
                        data.push(
                            child,
                            Some(vec![
                                ("crops".into(), Value::Image(Arc::new(crop))),
                                ("predictions".into(), Value::Detections(Arc::new(own))),
                            ]),
                        );
                    }
                }
                return Ok((data, stops));
            }
            Kind::AbsoluteStaticCrop | Kind::RelativeStaticCrop => {
                for idx in &live {
                    let Some(Value::Image(img)) = get("images", idx) else {
                        continue;
                    };
                    let pixels = self.pixels(&img).await?;
                    let (pw, ph) = (pixels.width as f64, pixels.height as f64);
                    let v = |k: &str| {
                        num(&get(k, idx))
                            .ok_or_else(|| bad_field(step, k, format!("`{k}` must be a number")))
                    };
                    let (mut xc, mut yc, mut w, mut h) =
                        (v("x_center")?, v("y_center")?, v("width")?, v("height")?);
                    let relative = step.block.kind == Kind::RelativeStaticCrop;
                    if relative {
                        // Fractions become whole pixels first, as the reference rounds them
                        // (Python's round: halves to even).
                        (xc, yc, w, h) = (xc * pw, yc * ph, w * pw, h * ph);
                        (xc, yc, w, h) = (
                            xc.round_ties_even(),
                            yc.round_ties_even(),
                            w.round_ties_even(),
                            h.round_ties_even(),
                        );
                    }
                    let (x1, y1) = (
                        (xc - w / 2.0).round_ties_even(),
                        (yc - h / 2.0).round_ties_even(),
                    );
                    // The crop's id, its images' `video_identifier` and its detections'
                    // `parent_id`, named after its block as the reference names it.
                    let id = format!(
                        "{}.{}",
                        if relative {
                            "relative_static_crop"
                        } else {
                            "absolute_static_crop"
                        },
                        uuid::Uuid::new_v4()
                    );
                    let b = (x1, y1, x1 + w, y1 + h);
                    let Some((crop, _, _)) = pixels.crop(&id, b) else {
                        results.insert(idx.clone(), vec![("crops".into(), Value::null())]);
                        continue;
                    };
                    results.insert(
                        idx.clone(),
                        vec![("crops".into(), Value::Image(Arc::new(crop)))],
                    );
                }
            }
            Kind::DetectionsFilter | Kind::DetectionsTransformation => {
                for idx in &live {
                    let Some(preds) = get("predictions", idx) else {
                        continue;
                    };
                    let params = get("operations_parameters", idx);
                    let scope = |name: &str| dict_get(&params, name);
                    let out = uql::apply(&step.extra.ops, preds, &scope)?;
                    if !matches!(out, Value::Detections(_)) {
                        return Err(bad_field(
                            step,
                            "operations",
                            "the operations must give detections",
                        )
                        .into());
                    }
                    results.insert(idx.clone(), vec![("predictions".into(), out)]);
                }
            }
            Kind::DetectionOffset => {
                for idx in &live {
                    let Some(Value::Detections(d)) = get("predictions", idx) else {
                        continue;
                    };
                    let ow = num(&get("offset_width", idx)).ok_or_else(|| {
                        bad_field(
                            step,
                            "offset_width",
                            "`offset_width` must be a whole number",
                        )
                    })? as i64;
                    let oh = num(&get("offset_height", idx)).ok_or_else(|| {
                        bad_field(
                            step,
                            "offset_height",
                            "`offset_height` must be a whole number",
                        )
                    })? as i64;
                    let out = if text(&get("units", idx)).as_deref() == Some("Percent (%)") {
                        percent_offset(&d, ow, oh)
                    } else {
                        uql::offset_detections(&d, ow, oh, true)
                    };
                    results.insert(
                        idx.clone(),
                        vec![("predictions".into(), Value::Detections(Arc::new(out)))],
                    );
                }
            }
            Kind::PropertyDefinition => {
                for idx in &live {
                    let Some(v) = get("data", idx) else { continue };
                    let v = self.sized(v).await?;
                    let none = |_: &str| None;
                    let out = uql::apply(&step.extra.ops, v, &none)?;
                    results.insert(idx.clone(), vec![("output".into(), out)]);
                }
            }
            Kind::Expression => {
                for idx in &live {
                    let mut named = match get("data", idx) {
                        Some(Value::Dict(d)) => d,
                        _ => Vec::new(),
                    };
                    for (name, ops) in &step.extra.data_ops {
                        if let Some(entry) = named.iter_mut().find(|(n, _)| n == name) {
                            let none = |_: &str| None;
                            let v = self.sized(entry.1.clone()).await?;
                            entry.1 = uql::apply(ops, v, &none)?;
                        }
                    }
                    let named = Some(Value::Dict(named));
                    let scope = |name: &str| dict_get(&named, name);
                    let mut chosen = step.extra.default.as_ref();
                    for (cond, result) in &step.extra.cases {
                        if uql::eval_group(cond, &scope)? {
                            chosen = Some(result);
                            break;
                        }
                    }
                    let out = match chosen {
                        Some(CaseResult::Static(v)) => Value::Json(v.clone()),
                        Some(CaseResult::Dynamic { name, ops }) => {
                            let v = scope(name).ok_or_else(|| {
                                bad_field(
                                    step,
                                    "switch",
                                    format!("`{name}` is not among the expression's data"),
                                )
                            })?;
                            uql::apply(ops, v, &scope)?
                        }
                        None => Value::null(),
                    };
                    results.insert(idx.clone(), vec![("output".into(), out)]);
                }
            }
            Kind::ContinueIf => {
                let cond = step
                    .extra
                    .condition
                    .as_ref()
                    .ok_or_else(|| bad_field(step, "condition_statement", "missing"))?;
                for idx in &elements {
                    let go = live.contains(idx) && {
                        let params = get("evaluation_parameters", idx);
                        let scope = |name: &str| dict_get(&params, name);
                        uql::eval_group(cond, &scope)?
                    };
                    if !go {
                        stops.extend(step.extra.next_steps.iter().map(|&n| (n, idx.clone())));
                    }
                    results.insert(idx.clone(), Vec::new());
                }
            }
            Kind::DimensionCollapse => {
                // One list per parent element, in order, `null` where a child has none.
                let f = step
                    .fields
                    .get("data")
                    .ok_or_else(|| bad_field(step, "data", "missing"))?;
                let mut groups: Vec<(Index, Vec<Value>)> = Vec::new();
                for idx in &elements {
                    let parent = idx[..idx.len() - 1].to_vec();
                    let v = if state.is_stopped(i, idx) {
                        None
                    } else {
                        state.resolve(f, idx)
                    };
                    match groups.last_mut() {
                        Some((p, items)) if *p == parent => {
                            items.push(v.unwrap_or_else(Value::null))
                        }
                        _ => groups.push((parent, vec![v.unwrap_or_else(Value::null)])),
                    }
                }
                // Parents with no children at all collapse to an empty list.
                let parents = state.parent_elements(step);
                for p in parents {
                    let items = groups
                        .iter()
                        .find(|(g, _)| *g == p)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    data.push(p, Some(vec![("output".into(), Value::List(items))]));
                }
                return Ok((data, stops));
            }
            Kind::ImageSlicer(v2) => {
                for idx in &live {
                    let Some(Value::Image(img)) = get("image", idx) else {
                        continue;
                    };
                    let size = |k: &str| match num(&get(k, idx)) {
                        Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => {
                            Ok(x as u32)
                        }
                        _ => Err(bad_field(
                            step,
                            k,
                            format!("`{k}` must be a whole number of at least 1"),
                        )),
                    };
                    let ratio = |k: &str| match num(&get(k, idx)) {
                        Some(x) if (0.0..1.0).contains(&x) => Ok(x),
                        _ => Err(bad_field(
                            step,
                            k,
                            format!("`{k}` must be a number in [0, 1)"),
                        )),
                    };
                    let tile = (size("slice_width")?, size("slice_height")?);
                    let overlap = (
                        ratio("overlap_ratio_width")?,
                        ratio("overlap_ratio_height")?,
                    );
                    let pixels = self.pixels(&img).await?;
                    let whole = (pixels.width, pixels.height);
                    let n = fusion::slice_count(whole, tile, overlap, v2);
                    if n > self.limits.max_crops as u64 {
                        return Err(WorkflowError::limit(413, format!(
                            "Step `{}` would cut {n} tiles of one image; this server makes at most {} (WORKFLOW_MAX_CROPS)",
                            step.name, self.limits.max_crops)).into());
                    }
                    for (j, (x1, y1, x2, y2)) in fusion::slice_offsets(whole, tile, overlap, v2)
                        .into_iter()
                        .enumerate()
                    {
                        let mut child = idx.clone();
                        child.push(j);
                        let id = format!("image_slicer.{}", uuid::Uuid::new_v4());
                        let b = (x1 as f64, y1 as f64, x2 as f64, y2 as f64);
                        let slice = pixels
                            .crop(&id, b)
                            .map_or_else(Value::null, |(c, _, _)| Value::Image(Arc::new(c)));
                        data.push(child, Some(vec![("slices".into(), slice)]));
                    }
                }
                return Ok((data, stops));
            }
            Kind::DetectionsStitch => {
                for idx in &live {
                    let Some(Value::Image(img)) = get("reference_image", idx) else {
                        continue;
                    };
                    let how = text(&get("overlap_filtering_strategy", idx))
                        .as_deref()
                        .and_then(Overlap::parse)
                        .ok_or_else(|| {
                            bad_field(
                                step,
                                "overlap_filtering_strategy",
                                "`overlap_filtering_strategy` must be 'none', 'nms' or 'nmm'",
                            )
                        })?;
                    let thr = match num(&get("iou_threshold", idx)) {
                        None => 0.3,
                        Some(x) if (0.0..=1.0).contains(&x) => x as f32,
                        Some(_) => {
                            return Err(bad_field(
                                step,
                                "iou_threshold",
                                "`iou_threshold` must be a number in [0, 1]",
                            )
                            .into())
                        }
                    };
                    let pixels = self.pixels(&img).await?;
                    let into = Detections {
                        width: pixels.width,
                        height: pixels.height,
                        lineage: pixels.lineage.clone(),
                        dets: Vec::new(),
                    };
                    let Some(Field::Sel(sel)) = step.fields.get("predictions") else {
                        continue;
                    };
                    let mut tiles = Vec::new();
                    for (_, v) in state.children(sel, idx) {
                        match v {
                            Some(Value::Detections(d)) => {
                                // Each tile's detections move by the tile's place in its
                                // parent, the reference image.
                                let at = d.lineage.parent;
                                tiles.push(((*d).clone(), (at.x, at.y)));
                            }
                            None => {}
                            Some(other) => {
                                return Err(bad_field(
                                    step,
                                    "predictions",
                                    format!(
                                        "`predictions` must be detections, not {}",
                                        other.kind()
                                    ),
                                )
                                .into())
                            }
                        }
                    }
                    let deadline = self.deadline;
                    let out = self
                        .engine
                        .run_cpu(move || fusion::stitch(tiles, &into, how, thr, deadline))
                        .await
                        .map_err(|e| engine_error(step, e))?
                        .ok_or_else(past_deadline)?;
                    results.insert(
                        idx.clone(),
                        vec![("predictions".into(), Value::Detections(Arc::new(out)))],
                    );
                }
            }
            Kind::DetectionsConsensus => {
                for idx in &live {
                    let sources: Vec<Arc<Detections>> = match get("predictions_batches", idx) {
                        Some(Value::Dict(items)) => items
                            .into_iter()
                            .map(|(_, v)| match v {
                                Value::Detections(d) => Ok(d),
                                v if v.is_null() => Ok(Arc::new(fusion::empty())),
                                other => Err(bad_field(
                                    step,
                                    "predictions_batches",
                                    format!(
                                        "every source must be detections, not {}",
                                        other.kind()
                                    ),
                                )),
                            })
                            .collect::<Result<_, _>>()?,
                        _ => continue,
                    };
                    let c = consensus_settings(step, &|k| get(k, idx))?;
                    let deadline = self.deadline;
                    let r = self
                        .engine
                        .run_cpu(move || c.agree(&sources, deadline))
                        .await
                        .map_err(|e| engine_error(step, e))?
                        .ok_or_else(past_deadline)?;
                    let presence: Map<String, Json> =
                        r.presence.into_iter().map(|(k, v)| (k, json!(v))).collect();
                    results.insert(
                        idx.clone(),
                        vec![
                            (
                                "predictions".into(),
                                Value::Detections(Arc::new(r.predictions)),
                            ),
                            (
                                "object_present".into(),
                                Value::Json(json!(r.object_present)),
                            ),
                            (
                                "presence_confidence".into(),
                                Value::Json(Json::Object(presence)),
                            ),
                        ],
                    );
                }
            }
            Kind::ClassesReplacement => {
                for idx in &live {
                    let Some(Value::Detections(dets)) = get("object_detection_predictions", idx)
                    else {
                        continue;
                    };
                    let Some(Field::Sel(sel)) = step.fields.get("classification_predictions")
                    else {
                        continue;
                    };
                    let children = state.children(sel, idx);
                    let values: Vec<Option<Value>> = children.into_iter().map(|(_, v)| v).collect();
                    let classes: Vec<Replacement<'_>> = values
                        .iter()
                        .map(|v| match v {
                            Some(Value::Classification(c)) => Replacement::Classification(c),
                            Some(Value::Json(Json::String(t))) => Replacement::Text(t),
                            Some(Value::Json(Json::Array(a))) => a
                                .first()
                                .and_then(Json::as_str)
                                .map_or(Replacement::Missing, Replacement::Text),
                            _ => Replacement::Missing,
                        })
                        .collect();
                    let name = text(&get("fallback_class_name", idx)).filter(|n| !n.is_empty());
                    let id = num(&get("fallback_class_id", idx)).map_or(-1, |x| x as i64);
                    let out = if values.is_empty() {
                        fusion::empty()
                    } else {
                        fusion::replace_classes(&dets, &classes, name.as_deref().map(|n| (n, id)))
                    };
                    results.insert(
                        idx.clone(),
                        vec![("predictions".into(), Value::Detections(Arc::new(out)))],
                    );
                }
            }
            Kind::ClassificationLabel => {
                for idx in &live {
                    let (Some(Value::Image(img)), Some(Value::Classification(c))) =
                        (get("image", idx), get("predictions", idx))
                    else {
                        continue;
                    };
                    let opts = DrawSettings::of(step.block, &|k| get(k, idx));
                    let out = self
                        .drawn(step, &img, move |canvas| {
                            opts.draw_classification(canvas, &c)
                        })
                        .await?;
                    results.insert(idx.clone(), vec![("image".into(), out)]);
                }
            }
            Kind::BoundingBox
            | Kind::Label
            | Kind::Mask
            | Kind::Polygon
            | Kind::CropVisualization => {
                for idx in &live {
                    let (Some(Value::Image(img)), Some(Value::Detections(dets))) =
                        (get("image", idx), get("predictions", idx))
                    else {
                        continue;
                    };
                    let opts = DrawSettings::of(step.block, &|k| get(k, idx));
                    let out = self
                        .drawn(step, &img, move |canvas| opts.draw(canvas, &dets))
                        .await?;
                    results.insert(idx.clone(), vec![("image".into(), out)]);
                }
            }
        }
        for idx in elements {
            let out = results.remove(&idx);
            data.push(idx, out);
        }
        Ok((data, stops))
    }

    /// A copy of `img` drawn on by `paint`, on the CPU pool.
    async fn drawn(
        &self,
        step: &Step,
        img: &WfImage,
        paint: impl FnOnce(&mut RgbImage) + Send + 'static,
    ) -> Result<Value, RunError> {
        let pixels = self.pixels(img).await?;
        let lineage = img.lineage.clone();
        let drawn = self
            .engine
            .run_cpu(move || {
                let mut canvas = pixels.to_image();
                paint(&mut canvas);
                canvas
            })
            .await
            .map_err(|e| engine_error(step, e))?;
        let (w, h) = (drawn.width(), drawn.height());
        Ok(Value::Image(Arc::new(WfImage {
            pixels: Pixels::Window {
                image: Arc::new(drawn),
                x: 0,
                y: 0,
                width: w,
                height: h,
            },
            lineage,
            base64: None,
        })))
    }

    /// Runs a model step: every element's image through the model in one call (chunked to
    /// what the model takes at once), the elements grouped by their parameters.
    async fn model_step(
        &self,
        state: &State<'_>,
        step: &Step,
        task: TaskType,
        live: &[Index],
        mut ticket: Option<&mut Ticket>,
    ) -> Result<HashMap<Index, Outputs>, RunError> {
        let get =
            |name: &str, idx: &[usize]| step.fields.get(name).and_then(|f| state.resolve(f, idx));
        let mut groups: Vec<ModelGroup> = Vec::new();
        for idx in live {
            let Some(Value::Image(img)) = get("images", idx) else {
                continue;
            };
            let model_id = text(&get("model_id", idx))
                .ok_or_else(|| bad_field(step, "model_id", "`model_id` must be a string"))?;
            let params = self.task_params(step, task, &|k| get(k, idx))?;
            match groups
                .iter_mut()
                .find(|(m, p, _)| *m == model_id && *p == params)
            {
                Some(g) => g.2.push((idx.clone(), img)),
                None => groups.push((model_id, params, vec![(idx.clone(), img)])),
            }
        }
        let v2 = step.block.outputs.iter().any(|(n, _)| *n == "model_id");
        let mut results = HashMap::new();
        for (model_id, params, items) in groups {
            let started = Instant::now();
            let model = self
                .engine
                .model(&model_id, self.api_key.as_deref(), self.deadline)
                .await
                .map_err(|e| engine_error(step, e))?;
            Engine::check_task(&model, task).map_err(|e| engine_error(step, e))?;
            let chunk = self.engine.max_images(&model).max(1);
            for part in items.chunks(chunk) {
                let mut inputs = Vec::with_capacity(part.len());
                for (_, img) in part {
                    inputs.push(self.model_input(img)?);
                }
                let outputs = self
                    .engine
                    .infer(
                        &model,
                        inputs,
                        params.clone(),
                        Default::default(),
                        self.deadline,
                        ticket.as_deref_mut(),
                    )
                    .await
                    .map_err(|e| match (engine_error(step, e), &part[0].1.pixels) {
                        // An input image that does not decode is the input's fault.
                        (
                            RunError::Engine {
                                step,
                                block_type,
                                error: error @ EngineError::Decode(_),
                                ..
                            },
                            Pixels::Encoded { .. },
                        ) => RunError::Engine {
                            step,
                            block_type,
                            error,
                            input: Some(part[0].1.lineage.root_id.to_string()),
                        },
                        (other, _) => other,
                    })?;
                let time = started.elapsed().as_secs_f64();
                for ((idx, img), out) in part.iter().zip(outputs) {
                    let inference_id = uuid::Uuid::new_v4().to_string();
                    let predictions = to_value(out, img, &model_id, &inference_id, time);
                    let mut o: Outputs = vec![
                        ("inference_id".into(), Value::Json(json!(inference_id))),
                        ("predictions".into(), predictions),
                    ];
                    if v2 {
                        o.push(("model_id".into(), Value::Json(json!(model_id))));
                    }
                    results.insert(idx.clone(), o);
                }
            }
        }
        Ok(results)
    }

    fn task_params(
        &self,
        step: &Step,
        task: TaskType,
        get: &dyn Fn(&str) -> Option<Value>,
    ) -> Result<TaskParams, WorkflowError> {
        let d = DetectionParams::default();
        let unit = |k: &str, dflt: f32| -> Result<f32, WorkflowError> {
            match get(k) {
                None => Ok(dflt),
                Some(v) if v.is_null() => Ok(dflt),
                Some(v) => match v.as_json().and_then(Json::as_f64) {
                    Some(x) if (0.0..=1.0).contains(&x) => Ok(x as f32),
                    _ => Err(bad_field(
                        step,
                        k,
                        format!("`{k}` must be a number in [0, 1]"),
                    )),
                },
            }
        };
        let count = |k: &str, dflt: usize| -> Result<usize, WorkflowError> {
            match get(k)
                .as_ref()
                .and_then(|v| v.as_json())
                .and_then(Json::as_f64)
            {
                None => Ok(dflt),
                Some(x) if x >= 0.0 => Ok(x as usize),
                Some(_) => Err(bad_field(
                    step,
                    k,
                    format!("`{k}` must be a whole number of at least 0"),
                )),
            }
        };
        let confidence = if step.fields.contains_key("confidence_mode") {
            match text(&get("confidence_mode")).as_deref() {
                Some("custom") => unit("custom_confidence", d.confidence)?,
                // `best` and `default`: the model's default threshold (the cache holds no
                // recommended one).
                _ => d.confidence,
            }
        } else {
            unit("confidence", d.confidence)?
        };
        let class_filter = match get("class_filter") {
            Some(Value::Json(Json::Array(a))) => Some(
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        };
        let det = DetectionParams {
            confidence,
            iou_threshold: unit("iou_threshold", d.iou_threshold)?,
            class_agnostic_nms: matches!(
                get("class_agnostic_nms"),
                Some(Value::Json(Json::Bool(true)))
            ),
            max_detections: count("max_detections", d.max_detections)?,
            max_candidates: count("max_candidates", d.max_candidates)?,
            class_filter,
        };
        Ok(match task {
            TaskType::ObjectDetection => TaskParams::Detection(det),
            TaskType::InstanceSegmentation => TaskParams::Segmentation(SegmentationParams {
                detection: det,
                mode: match text(&get("mask_decode_mode")).as_deref().unwrap_or("accurate") {
                    "accurate" => MaskDecodeMode::Accurate,
                    "fast" => MaskDecodeMode::Fast,
                    "tradeoff" => MaskDecodeMode::Tradeoff(unit("tradeoff_factor", 0.0)?),
                    other => return Err(bad_field(step, "mask_decode_mode", format!("mask_decode_mode must be 'accurate', 'fast' or 'tradeoff', not '{other}'"))),
                },
                format: MaskFormat::Polygon,
                max_work_pixels: self.limits.max_mask_work_pixels,
            }),
            TaskType::Classification => TaskParams::Classification(ClassificationParams { confidence }),
            TaskType::KeypointDetection => TaskParams::Keypoints(KeypointsParams {
                detection: det,
                keypoint_confidence: unit("keypoint_confidence", 0.0)?,
            }),
        })
    }

    /// What the model's pipeline reads: an input image's own bytes (decoded straight into
    /// its ring slot), or a window of a decoded image (copied once, into the slot).
    fn model_input(&self, img: &WfImage) -> Result<ImageInput, WorkflowError> {
        Ok(match &img.pixels {
            // Decoded already (for a crop or a drawing): the pixels, not a second decode.
            Pixels::Encoded { decoded, .. } if decoded.get().is_some() => {
                let image = decoded.get().expect("decoded");
                ImageInput::Frame(Frame {
                    width: image.width(),
                    height: image.height(),
                    pixels: FramePixels::Window {
                        image: Arc::clone(image),
                        x: 0,
                        y: 0,
                    },
                })
            }
            Pixels::Encoded { input, .. } => input.clone(),
            Pixels::Window {
                image,
                x,
                y,
                width,
                height,
            } => ImageInput::Frame(Frame {
                width: *width,
                height: *height,
                pixels: FramePixels::Window {
                    image: Arc::clone(image),
                    x: *x,
                    y: *y,
                },
            }),
        })
    }

    /// An image's pixels, decoding an input image (once per request) when first needed.
    /// `v`, with an input image decoded if its size is not known yet (an image property
    /// asked of it).
    async fn sized(&self, v: Value) -> Result<Value, RunError> {
        if let Value::Image(img) = &v {
            if img.size().is_none() {
                self.pixels(img).await?;
            }
        }
        Ok(v)
    }

    async fn pixels(&self, img: &WfImage) -> Result<WindowRef, RunError> {
        match &img.pixels {
            Pixels::Window {
                image,
                x,
                y,
                width,
                height,
            } => Ok(WindowRef {
                image: Arc::clone(image),
                x: *x,
                y: *y,
                width: *width,
                height: *height,
                lineage: img.lineage.clone(),
            }),
            Pixels::Encoded { input, decoded } => {
                let image = decoded
                    .get_or_try_init(|| async {
                        self.engine
                            .picture(input.clone(), self.deadline)
                            .await
                            .map(Arc::new)
                            .map_err(|error| RunError::Engine {
                                step: String::new(),
                                block_type: "",
                                error,
                                input: Some(img.lineage.root_id.to_string()),
                            })
                    })
                    .await?;
                let (w, h) = (image.width(), image.height());
                Ok(WindowRef {
                    image: Arc::clone(image),
                    x: 0,
                    y: 0,
                    width: w,
                    height: h,
                    lineage: Lineage::root(&img.lineage.root_id, w, h),
                })
            }
        }
    }

    /// Builds `outputs`: one dict per input image (one in all without image inputs).
    async fn outputs(
        &self,
        state: &State<'_>,
        batch: usize,
        excluded: &[String],
    ) -> Result<Vec<Json>, RunError> {
        let wf = state.wf;
        let n = batch.max(1);
        // Images to encode: windows and decoded inputs become JPEG, on the CPU pool.
        let mut per: Vec<Vec<(String, Value, bool)>> = vec![Vec::new(); n];
        for o in &wf.outputs {
            if excluded.contains(&o.name) {
                continue;
            }
            for (i, row) in per.iter_mut().enumerate() {
                let v = match o.dim {
                    0 => state.select(&o.selector, &[]).unwrap_or_else(Value::null),
                    1 => state.select(&o.selector, &[i]).unwrap_or_else(Value::null),
                    _ => nested(state, &o.selector, vec![i], o.dim),
                };
                row.push((o.name.clone(), v, !o.own));
            }
        }
        let mut images = Vec::new();
        for row in &per {
            for (_, v, _) in row {
                collect_images(v, &mut images);
            }
        }
        let mut encoded: HashMap<usize, String> = HashMap::new();
        for img in images {
            let key = Arc::as_ptr(&img) as usize;
            if encoded.contains_key(&key) {
                continue;
            }
            let b64 = match &img.pixels {
                // The client's own image, unchanged: its own base64.
                Pixels::Encoded {
                    input: ImageInput::Base64(text),
                    ..
                } => text.clone(),
                Pixels::Encoded {
                    input: ImageInput::Bytes(b),
                    ..
                } => {
                    use base64::Engine as _;
                    let bytes = b.clone();
                    self.engine
                        .run_cpu(move || base64::engine::general_purpose::STANDARD.encode(&bytes))
                        .await
                        .map_err(|e| engine_error_named("output", e))?
                }
                _ => {
                    let window = self.pixels(&img).await?;
                    self.engine
                        .run_cpu(move || {
                            use base64::Engine as _;
                            crate::tasks::draw::encode_jpeg_quality(&window.to_image(), 95)
                                .map(|j| base64::engine::general_purpose::STANDARD.encode(j))
                        })
                        .await
                        .map_err(|e| engine_error_named("output", e))?
                        .map_err(|e| {
                            WorkflowError::short(
                                500,
                                "ExecutionEngineRuntimeError",
                                "workflow_execution | output_construction",
                                e,
                            )
                        })?
                }
            };
            encoded.insert(key, b64);
        }
        let mut size = 0usize;
        let mut out = Vec::with_capacity(n);
        for row in per {
            let mut o = Map::new();
            for (name, v, to_root) in row {
                let j = value::to_json(&v, to_root, &mut |img: &WfImage| {
                    let b64 = encoded
                        .get(&(img as *const WfImage as usize))
                        .cloned()
                        .unwrap_or_default();
                    value::image_json(img, b64)
                });
                size += approx_size(&j);
                o.insert(name, j);
            }
            if size > self.limits.max_answer_bytes {
                return Err(WorkflowError::limit(413, format!(
                    "The answer would exceed {} bytes (WORKFLOW_MAX_ANSWER_BYTES): ask for fewer outputs (excluded_fields) or fewer images",
                    self.limits.max_answer_bytes)).into());
            }
            out.push(Json::Object(o));
        }
        Ok(out)
    }
}

/// A nested output: for element `prefix`, a list over its children (lists of lists deeper).
fn nested(state: &State<'_>, s: &Selector, prefix: Index, dim: usize) -> Value {
    let Some(data) = state.sel_data(s) else {
        return Value::List(Vec::new());
    };
    let mut children: Vec<usize> = data
        .items
        .iter()
        .filter(|(idx, _)| idx.len() == dim && idx.starts_with(&prefix))
        .map(|(idx, _)| idx[prefix.len()])
        .collect();
    children.dedup();
    Value::List(
        children
            .into_iter()
            .map(|c| {
                let mut idx = prefix.clone();
                idx.push(c);
                if idx.len() == dim {
                    state.select(s, &idx).unwrap_or_else(Value::null)
                } else {
                    nested(state, s, idx, dim)
                }
            })
            .collect(),
    )
}

impl State<'_> {
    /// The elements one level above a step's run dimension (what dimension_collapse answers).
    fn parent_elements(&self, step: &Step) -> Vec<Index> {
        let mut parents: Vec<Index> = Vec::new();
        // The parents are the elements of the image input or step one level up in lineage:
        // every index of the deepest batch input's source at run_dim - 1.
        let mut sels = Vec::new();
        for f in step.fields.values() {
            collect_sels(f, &mut sels);
        }
        let want = step.run_dim - 1;
        let candidates = self
            .wf
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, x)| x.image && want == 1)
            .map(|(i, _)| Selector::Input(i))
            .chain(
                self.wf
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.dim == want && want > 0)
                    .map(|(i, _)| Selector::All(i)),
            );
        if want == 0 {
            return vec![Vec::new()];
        }
        for c in candidates {
            if let Some(d) = self.sel_data(&c) {
                parents = d.items.iter().map(|(i, _)| i.clone()).collect();
                break;
            }
        }
        parents
    }
}

fn collect_images(v: &Value, out: &mut Vec<Arc<WfImage>>) {
    match v {
        Value::Image(i) => out.push(Arc::clone(i)),
        Value::List(items) => items.iter().for_each(|i| collect_images(i, out)),
        Value::Dict(items) => items.iter().for_each(|(_, i)| collect_images(i, out)),
        _ => {}
    }
}

fn approx_size(j: &Json) -> usize {
    match j {
        Json::String(s) => s.len() + 2,
        Json::Array(a) => a.iter().map(approx_size).sum::<usize>() + 2,
        Json::Object(o) => {
            o.iter()
                .map(|(k, v)| k.len() + 4 + approx_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

fn dict_get(v: &Option<Value>, name: &str) -> Option<Value> {
    match v {
        Some(Value::Dict(items)) => items
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
        _ => None,
    }
}

/// A consensus step's settings, checked.
fn consensus_settings(
    step: &Step,
    get: &dyn Fn(&str) -> Option<Value>,
) -> Result<Consensus, WorkflowError> {
    let agg = |k: &str, d: &str| {
        let v = text(&get(k)).unwrap_or_else(|| d.to_owned());
        Agg::parse(&v).ok_or_else(|| {
            bad_field(
                step,
                k,
                format!("`{k}` must be 'average', 'max' or 'min', not '{v}'"),
            )
        })
    };
    let masks = text(&get("detections_merge_mask_aggregation")).unwrap_or_else(|| "union".into());
    let merge_masks = MaskAgg::parse(&masks).ok_or_else(|| {
        bad_field(step, "detections_merge_mask_aggregation", format!("`detections_merge_mask_aggregation` must be 'union', 'intersection', 'max' or 'min', not '{masks}'"))
    })?;
    let required_votes = match num(&get("required_votes")) {
        Some(x) if x >= 1.0 && x.fract() == 0.0 => x as usize,
        _ => {
            return Err(bad_field(
                step,
                "required_votes",
                "`required_votes` must be a whole number of at least 1",
            ))
        }
    };
    let unit = |k: &str, d: f64| match get(k) {
        Some(v) if !v.is_null() => match v.as_json().and_then(Json::as_f64) {
            Some(x) if (0.0..=1.0).contains(&x) => Ok(x as f32),
            _ => Err(bad_field(
                step,
                k,
                format!("`{k}` must be a number in [0, 1]"),
            )),
        },
        _ => Ok(d as f32),
    };
    let count = |v: &Json| v.as_u64().filter(|n| *n >= 1).map(|n| n as usize);
    let required_objects = match get("required_objects").as_ref().and_then(Value::as_json) {
        None | Some(Json::Null) => None,
        Some(Json::Object(o)) => Some(Required::PerClass(
            o.iter()
                .map(|(k, v)| count(v).map(|n| (k.clone(), n)))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    bad_field(
                        step,
                        "required_objects",
                        "`required_objects` per class are whole numbers of at least 1",
                    )
                })?,
        )),
        Some(v) => Some(Required::Count(count(v).ok_or_else(|| {
            bad_field(
                step,
                "required_objects",
                "`required_objects` must be a whole number of at least 1, or one per class",
            )
        })?)),
    };
    let classes_to_consider = match get("classes_to_consider") {
        Some(Value::Json(Json::Array(a))) => Some(
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect::<Vec<_>>(),
        )
        .filter(|c| !c.is_empty()),
        _ => None,
    };
    Ok(Consensus {
        required_votes,
        class_aware: !matches!(get("class_aware"), Some(Value::Json(Json::Bool(false)))),
        iou_threshold: unit("iou_threshold", 0.3)?,
        confidence: unit("confidence", 0.0)?,
        classes_to_consider,
        required_objects,
        presence: agg("presence_confidence_aggregation", "max")?,
        merge_confidence: agg("detections_merge_confidence_aggregation", "average")?,
        merge_boxes: agg("detections_merge_coordinates_aggregation", "average")?,
        merge_masks,
    })
}

/// `detection_offset` in percent: each side moves by `int(size x offset / 200)`, clamped at
/// 0 only (as the reference).
fn percent_offset(d: &Detections, ow: i64, oh: i64) -> Detections {
    let dets = d
        .dets
        .iter()
        .map(|x| {
            let mut n = x.clone();
            let dx = (x.width() as f64 * ow as f64 / 200.0) as i64 as f32;
            let dy = (x.height() as f64 * oh as f64 / 200.0) as i64 as f32;
            n.x1 = (x.x1 - dx).max(0.0);
            n.y1 = (x.y1 - dy).max(0.0);
            n.x2 = (x.x2 + dx).max(0.0);
            n.y2 = (x.y2 + dy).max(0.0);
            n.lineage.parent_id = x.detection_id.as_str().into();
            n.detection_id = uuid::Uuid::new_v4().to_string();
            n
        })
        .collect();
    Detections { dets, ..d.clone() }
}

/// A window of a decoded image, with the lineage of what it shows.
struct WindowRef {
    image: Arc<RgbImage>,
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    lineage: Lineage,
}

impl WindowRef {
    /// A crop of this window, the box in the window's coordinates (rounded, clamped to the
    /// window), as a window of the same decoded image (no pixel copied), its lineage a child
    /// of this one's; with the crop's offset in the window. None when nothing of it is inside.
    fn crop(
        &self,
        id: &str,
        (x1, y1, x2, y2): (f64, f64, f64, f64),
    ) -> Option<(WfImage, i64, i64)> {
        let clamp = |v: f64, max: u32| (v.round() as i64).clamp(0, max as i64);
        let (x1, x2) = (clamp(x1, self.width), clamp(x2, self.width));
        let (y1, y2) = (clamp(y1, self.height), clamp(y2, self.height));
        if x2 <= x1 || y2 <= y1 {
            return None;
        }
        let crop = WfImage {
            pixels: Pixels::Window {
                image: Arc::clone(&self.image),
                x: self.x + x1 as u32,
                y: self.y + y1 as u32,
                width: (x2 - x1) as u32,
                height: (y2 - y1) as u32,
            },
            lineage: self.lineage.child(id, x1, y1, self.width, self.height),
            base64: None,
        };
        Some((crop, x1, y1))
    }

    /// The window's pixels as an image of their own (for a drawing or an encoder).
    fn to_image(&self) -> RgbImage {
        if self.x == 0
            && self.y == 0
            && self.width == self.image.width()
            && self.height == self.image.height()
        {
            return (*self.image).clone();
        }
        image::imageops::crop_imm(&*self.image, self.x, self.y, self.width, self.height).to_image()
    }
}

/// A model's answer for one image as a workflow value.
fn to_value(
    out: ImageOutput,
    img: &WfImage,
    model_id: &str,
    inference_id: &str,
    time: f64,
) -> Value {
    let (w, h) = (out.width, out.height);
    let lineage = match &img.pixels {
        Pixels::Encoded { .. } => Lineage::root(&img.lineage.root_id, w, h),
        Pixels::Window { .. } => img.lineage.clone(),
    };
    let det = |p: &crate::tasks::detection::ObjectDetectionPrediction| Det {
        x1: p.x - p.width / 2.0,
        y1: p.y - p.height / 2.0,
        x2: p.x + p.width / 2.0,
        y2: p.y + p.height / 2.0,
        confidence: p.confidence,
        class_id: p.class_id as i64,
        class_name: p.class_name.clone(),
        detection_id: p.detection_id.clone(),
        lineage: lineage.clone(),
        polygon: None,
        keypoints: None,
    };
    let dets = match out.output {
        TaskOutput::Classification(output) => {
            return Value::Classification(Arc::new(Classification {
                output,
                inference_id: inference_id.to_owned(),
                time,
                model_id: model_id.to_owned(),
                width: w,
                height: h,
                lineage,
            }))
        }
        TaskOutput::Detection(preds) => preds.iter().map(det).collect(),
        TaskOutput::Segmentation(preds) => preds
            .iter()
            .filter_map(|p| match &p.mask {
                // An instance whose mask has no outline is left out (as the reference).
                MaskBody::Polygon { points, .. } if !points.is_empty() => {
                    let mut d = det(&p.detection);
                    let mut poly: Vec<(f32, f32)> = points.iter().map(|q| (q.x, q.y)).collect();
                    while poly.len() < 3 {
                        poly.push(*poly.last().expect("not empty"));
                    }
                    d.polygon = Some(poly);
                    Some(d)
                }
                _ => None,
            })
            .collect(),
        TaskOutput::Keypoints(preds) => preds
            .iter()
            .map(|p| {
                let mut d = det(&p.detection);
                d.keypoints = Some(
                    p.keypoints
                        .iter()
                        .map(|k| Keypoint {
                            class_id: k.class_id,
                            class_name: k.class_name.clone(),
                            confidence: k.confidence,
                            x: k.x,
                            y: k.y,
                        })
                        .collect(),
                );
                d
            })
            .collect(),
    };
    Value::Detections(Arc::new(Detections {
        width: w,
        height: h,
        lineage,
        dets,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(image: &Arc<RgbImage>, w: &WfImage) -> WindowRef {
        let Pixels::Window {
            x,
            y,
            width,
            height,
            ..
        } = w.pixels
        else {
            panic!("a window")
        };
        WindowRef {
            image: Arc::clone(image),
            x,
            y,
            width,
            height,
            lineage: w.lineage.clone(),
        }
    }

    /// A crop of a crop: a window of the same decoded image at the sum of the offsets, its
    /// parent the first crop (in the first crop's coordinates), its root the input image.
    #[test]
    fn crops_of_crops_sit_in_their_parent_and_the_root() {
        let image = Arc::new(RgbImage::new(200, 100));
        let top = WindowRef {
            image: Arc::clone(&image),
            x: 0,
            y: 0,
            width: 200,
            height: 100,
            lineage: Lineage::root("image", 200, 100),
        };
        let (a, ax, ay) = top.crop("a", (50.4, 20.0, 150.0, 90.0)).unwrap();
        assert_eq!((ax, ay), (50, 20));
        assert_eq!(a.size(), Some((100, 70)));
        // Past the window's edge: clamped to the first crop, not to the photo.
        let (b, bx, by) = window(&image, &a)
            .crop("b", (10.0, 5.0, 180.0, 30.0))
            .unwrap();
        assert_eq!((bx, by), (10, 5));
        assert_eq!(b.size(), Some((90, 25)));
        let Pixels::Window { x, y, .. } = b.pixels else {
            panic!()
        };
        assert_eq!((x, y), (60, 25));
        assert_eq!(&*b.lineage.parent_id, "b");
        assert_eq!(
            (
                b.lineage.parent.x,
                b.lineage.parent.y,
                b.lineage.parent.width
            ),
            (10, 5, 100)
        );
        assert_eq!(&*b.lineage.root_id, "image");
        assert_eq!(
            (b.lineage.root.x, b.lineage.root.y, b.lineage.root.width),
            (60, 25, 200)
        );
        assert!(top.crop("c", (210.0, 0.0, 250.0, 10.0)).is_none());
    }
}
