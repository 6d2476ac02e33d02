//! Roboflow's Workflows routes: run a definition sent inline (`/workflows/run`) or saved
//! (`/{workspace}/workflows/{id}`: the `local` workspace from MODEL_CACHE_DIR, others from
//! Roboflow's API), validate and describe one, and describe the blocks. A run enters the
//! call guard as every inference door does (draining, MAX_INFLIGHT_REQUESTS, the deadline,
//! the body budget); each model step takes its place in its model's line as the run reaches
//! it (`workflows::exec`). Errors have the reference's bodies (`workflows::error`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::StatusCode;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};

use super::answer::RequestId;
use super::body::{read_body, Body, Peer};
use super::call::{self, RequestContext};
use super::error::ApiError;
use super::images::fetch_url;
use super::request::query_api_key;
use super::response::json;
use super::state::AppState;
use crate::engine::ImageInput;
use crate::metrics::METRICS;
use crate::workflows::blocks::{self, BLOCKS};
use crate::workflows::error::{RunError, WorkflowError};
use crate::workflows::exec::{RunInputs, RunLimits, Runner};
use crate::workflows::spec::{Selector, Workflow, ENGINE_VERSION};

type HttpResponse = Response<Full<Bytes>>;

/// A workflow error as its response (with Retry-After when the server's load caused it).
fn error_response(e: &WorkflowError) -> HttpResponse {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json(status, &e.body());
    if let Some(s) = e.retry_after_s {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// A failed run as the reference answers it. An engine error in a model step is a 500
/// `StepExecutionError`, except where the client or the server's load is the cause: those
/// keep the status the model routes give (4xx; 429 and 503 with Retry-After; 504), so that
/// a client backs off instead of treating overload as a bug (docs/workflows.md).
fn run_error(e: RunError) -> WorkflowError {
    match e {
        RunError::Workflow(w) => w,
        RunError::Engine {
            input: Some(name),
            error: error @ crate::engine::EngineError::Decode(_),
            ..
        } => WorkflowError::input(format!(
            "Failed to assemble `{name}`. Could not successfully use any deserializer for declared kinds. Details: {error}"
        )),
        RunError::Engine {
            step,
            block_type,
            error,
            ..
        } => {
            let api = ApiError::from(error);
            let status = api.status.as_u16();
            let inner = match status {
                404 => "ModelNotFoundError",
                413 => "PayloadTooLargeError",
                429 => "ServerOverloadedError",
                503 => "ServiceUnavailableError",
                504 => "DeadlineExceededError",
                s if s < 500 => "InvalidInputError",
                _ => "ModelExecutionError",
            };
            // A model that is not there is a step failure, as in the reference.
            let status = if status == 404 { 500 } else { status };
            let mut w = WorkflowError::step(&step, block_type, status, inner, api.message);
            w.retry_after_s = api.retry_after_s;
            w
        }
    }
}

/// FastAPI's 422 for a body field missing, as the reference answers it.
fn missing_field(field: &str, input: &Json) -> HttpResponse {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({"detail": [{"type": "missing", "loc": ["body", field], "msg": "Field required", "input": input}]}),
    )
}

/// Reads a JSON body within the deadline and the body budget, parsed on the CPU pool.
async fn json_body(
    st: &Arc<AppState>,
    req: Request,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<Json, ApiError> {
    ctx.peer = req.extensions().get::<Peer>().map(|p| p.0);
    let (_, Body { bytes, lease }) = read_body(
        st,
        req,
        st.cfg.max_body_bytes,
        "MAX_BODY_BYTES",
        deadline,
        None,
    )
    .await?;
    ctx.hold(lease);
    st.engine
        .run_cpu(move || serde_json::from_slice::<Json>(&bytes))
        .await?
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}")))
}

/// What one run needs besides the definition.
struct RunCall {
    arrived: Instant,
    deadline: Instant,
    api_key: Option<String>,
    label: String,
}

/// Runs `def` on the request `body` (its `inputs`, `excluded_fields`).
async fn run(
    st: &Arc<AppState>,
    def: &Json,
    mut body: Map<String, Json>,
    call: RunCall,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let label = call.label.clone();
    let answer = run_inner(st, def, &mut body, call, ctx).await;
    let resp = match answer {
        Ok(r) => r,
        Err(Ok(e)) => error_response(&e),
        Err(Err(e)) => return Err(e),
    };
    METRICS
        .workflow_requests
        .with_label_values(&[&label, resp.status().as_str()])
        .inc();
    METRICS
        .workflow_seconds
        .with_label_values(&[&label])
        .observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

async fn run_inner(
    st: &Arc<AppState>,
    def: &Json,
    body: &mut Map<String, Json>,
    call: RunCall,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, Result<WorkflowError, ApiError>> {
    let wf = st.workflows.compile(def).map_err(Ok)?;
    let Some(Json::Object(inputs)) = body.remove("inputs") else {
        return Ok(missing_field("inputs", &Json::Object(body.clone())));
    };
    let excluded: Vec<String> = body
        .get("excluded_fields")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let inputs = run_inputs(st, &wf, inputs, call.deadline, ctx).await?;
    let runner = Runner {
        engine: &st.engine,
        api_key: call.api_key,
        arrived: call.arrived,
        deadline: call.deadline,
        limits: RunLimits {
            max_images: st.cfg.workflow_max_images,
            max_crops: st.cfg.workflow_max_crops,
            max_answer_bytes: st.cfg.workflow_max_answer_bytes,
            max_image_pixels: st.cfg.max_image_pixels,
            max_mask_work_pixels: st.cfg.max_mask_work_pixels,
        },
        label: call.label,
    };
    let outputs = runner
        .run(&wf, inputs, &mut ctx.tickets, &excluded)
        .await
        .map_err(|e| Ok(run_error(e)))?;
    // Megabytes of base64 images: serialised on the CPU pool.
    st.engine
        .run_cpu(move || {
            json(
                StatusCode::OK,
                &json!({"outputs": outputs, "profiler_trace": []}),
            )
        })
        .await
        .map_err(|e| Err(e.into()))
}

/// The request's image inputs as the engine takes them (URLs fetched within the deadline
/// and the body budget), and its parameters.
async fn run_inputs(
    st: &Arc<AppState>,
    wf: &Workflow,
    mut inputs: Map<String, Json>,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<RunInputs, Result<WorkflowError, ApiError>> {
    let mut images = HashMap::new();
    for input in wf.inputs.iter().filter(|i| i.image) {
        let Some(v) = inputs.remove(&input.name) else {
            continue;
        };
        let (values, list) = match v {
            Json::Array(items) => (items, true),
            Json::Null => continue,
            one => (vec![one], false),
        };
        if values.len() > st.cfg.workflow_max_images {
            return Err(Ok(WorkflowError::limit(413, format!(
                "The request has {} images; this server takes at most {} per workflow request (WORKFLOW_MAX_IMAGES)",
                values.len(), st.cfg.workflow_max_images))));
        }
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            out.push(image_input(st, &input.name, v, deadline, ctx).await?);
        }
        images.insert(input.name.clone(), (out, list));
    }
    Ok(RunInputs {
        images,
        params: inputs,
    })
}

fn bad_image(name: &str, why: &str) -> Result<WorkflowError, ApiError> {
    Ok(WorkflowError::input(format!(
        "Failed to assemble `{name}`. Could not successfully use any deserializer for declared kinds. Details: {why}"
    )))
}

/// One image value: `{"type": "base64" | "url", "value": ...}` (a bare string is base64).
async fn image_input(
    st: &Arc<AppState>,
    name: &str,
    v: Json,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<ImageInput, Result<WorkflowError, ApiError>> {
    let (ty, value) = match v {
        Json::String(s) => ("base64".to_owned(), s),
        Json::Object(mut o) => {
            let ty = o
                .get("type")
                .and_then(Json::as_str)
                .unwrap_or("base64")
                .to_owned();
            match o.remove("value") {
                Some(Json::String(s)) => (ty, s),
                _ => return Err(bad_image(name, "the image's `value` must be a string")),
            }
        }
        _ => {
            return Err(bad_image(
                name,
                "an image is {\"type\": \"base64\" | \"url\", \"value\": ...}",
            ))
        }
    };
    match ty.as_str() {
        "base64" => Ok(ImageInput::Base64(value)),
        "url" => {
            let held = std::sync::atomic::AtomicUsize::new(ctx.held_bytes());
            let fetched = tokio::time::timeout_at(
                deadline.into(),
                fetch_url(&st.urls, &value, st.body_memory.lease(ctx.peer), &held),
            )
            .await
            .map_err(|_| {
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Deadline exceeded while fetching the image URLs",
                ))
            })?;
            let (bytes, lease) = fetched.map_err(|e| bad_image(name, &e.message))?;
            ctx.hold(lease);
            Ok(ImageInput::Bytes(bytes))
        }
        other => Err(bad_image(
            name,
            &format!("image type `{other}` is not accepted by this server (use base64 or url)"),
        )),
    }
}

/// A run's request entered through the call guard (draining, MAX_INFLIGHT_REQUESTS, the
/// deadline), its body read within the body budget: the parts a run needs.
struct Entered {
    arrived: Instant,
    deadline: Instant,
    outer_key: Option<String>,
    body: Map<String, Json>,
}

async fn enter<'a>(
    st: &'a Arc<AppState>,
    req: Request,
    ctx: &mut RequestContext,
) -> Result<(Entered, crate::engine::admission::Presence<'a>), ApiError> {
    let (req, arrived, deadline, presence) = call::enter_http(st, req)?;
    let outer_key = query_api_key(&req);
    let Json::Object(body) = json_body(st, req, deadline, ctx).await? else {
        return Err(ApiError::invalid("The body must be a JSON object"));
    };
    Ok((
        Entered {
            arrived,
            deadline,
            outer_key,
            body,
        },
        presence,
    ))
}

fn api_key_of(outer: Option<String>, body: &Map<String, Json>) -> Option<String> {
    outer.or_else(|| {
        body.get("api_key")
            .and_then(Json::as_str)
            .map(str::to_owned)
    })
}

/// Runs a workflow definition sent with the request.
#[utoipa::path(
    post,
    path = "/workflows/run",
    tag = "workflows",
    description = "Runs the workflow definition in `specification` on `inputs` (Roboflow's `WorkflowSpecificationInferenceRequest`). Also at `/infer/workflows`.",
    request_body(content = Object, description = "`{specification, inputs, api_key?, excluded_fields?}`"),
    responses(
        (status = 200, description = "`{outputs: [one dict per input image], profiler_trace: []}`"),
        (status = 400, description = "The definition or an input is invalid (`error_type`, `context`, `blocks_errors`)"),
        (status = 413, description = "Over a WORKFLOW_* limit"),
        (status = 422, description = "No `specification` or `inputs`"),
        (status = 429, description = "Overloaded; Retry-After says when to retry"),
        (status = 500, description = "A step failed (`StepExecutionError`)"),
    )
)]
pub async fn run_inline(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    req: Request,
) -> Response {
    let mut ctx = RequestContext::new(id, "/workflows/run");
    let answer = async {
        let (
            Entered {
                arrived,
                deadline,
                outer_key,
                mut body,
            },
            _presence,
        ) = enter(&st, req, &mut ctx).await?;
        let Some(def) = body.remove("specification").filter(|d| !d.is_null()) else {
            return Ok(missing_field("specification", &Json::Object(body)));
        };
        let call = RunCall {
            arrived,
            deadline,
            api_key: api_key_of(outer_key, &body),
            label: st.workflows.label(None),
        };
        let answer = run(&st, &def, body, call, &mut ctx).await;
        ctx.served(&answer);
        answer
    }
    .await;
    ctx.finish(answer)
}

/// `/infer/workflows`: the legacy path of `/workflows/run`.
pub async fn run_inline_legacy(
    st: State<Arc<AppState>>,
    id: Extension<RequestId>,
    req: Request,
) -> Response {
    run_inline(st, id, req).await
}

/// Runs a saved workflow.
#[utoipa::path(
    post,
    path = "/{workspace_name}/workflows/{workflow_id}",
    tag = "workflows",
    description = "Runs a saved workflow: the `local` workspace reads MODEL_CACHE_DIR/workflow/local/<sha256(id)>.json; another workspace's definition comes from Roboflow's API (kept 15 minutes; `use_cache: false` fetches again), 503 when it cannot be reached. Also at `/infer/workflows/{workspace_name}/{workflow_id}`.",
    params(
        ("workspace_name" = String, Path, description = "Workspace, or `local`"),
        ("workflow_id" = String, Path, description = "The workflow's id"),
    ),
    request_body(content = Object, description = "`{inputs, api_key?, excluded_fields?, use_cache?, workflow_version_id?}`"),
    responses(
        (status = 200, description = "`{outputs, profiler_trace}`"),
        (status = 404, description = "No such workflow in the `local` workspace"),
        (status = 503, description = "Roboflow's API could not be reached"),
    )
)]
pub async fn run_saved(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    Path((workspace, workflow)): Path<(String, String)>,
    req: Request,
) -> Response {
    let mut ctx = RequestContext::new(id, "/{workspace_name}/workflows/{workflow_id}");
    let answer = async {
        let (
            Entered {
                arrived,
                deadline,
                outer_key,
                body,
            },
            _presence,
        ) = enter(&st, req, &mut ctx).await?;
        let api_key = api_key_of(outer_key, &body);
        let use_cache = body
            .get("use_cache")
            .and_then(Json::as_bool)
            .unwrap_or(true);
        let version = body
            .get("workflow_version_id")
            .and_then(Json::as_str)
            .map(str::to_owned);
        let def = saved_definition(
            &st,
            &workspace,
            &workflow,
            api_key.as_deref(),
            use_cache,
            version.as_deref(),
            deadline,
        )
        .await?;
        let call = RunCall {
            arrived,
            deadline,
            api_key,
            label: st.workflows.label(Some(&format!("{workspace}/{workflow}"))),
        };
        let answer = run(&st, &def, body, call, &mut ctx).await;
        ctx.served(&answer);
        answer
    }
    .await;
    ctx.finish(answer)
}

/// `/infer/workflows/{workspace_name}/{workflow_id}`.
pub async fn run_saved_legacy(
    st: State<Arc<AppState>>,
    id: Extension<RequestId>,
    path: Path<(String, String)>,
    req: Request,
) -> Response {
    run_saved(st, id, path, req).await
}

/// Fetches Roboflow's API (loopback stand-ins in the tests): one client for the server.
static API_CLIENT: LazyLock<Option<reqwest::Client>> = LazyLock::new(|| {
    crate::model::download::http_client()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .ok()
});

fn unreachable_api() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Internal error. Could not connect to Roboflow API.",
    )
}

/// A saved workflow's definition.
async fn saved_definition(
    st: &Arc<AppState>,
    workspace: &str,
    id: &str,
    api_key: Option<&str>,
    use_cache: bool,
    version: Option<&str>,
    deadline: Instant,
) -> Result<Json, ApiError> {
    if workspace == "local" {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::bad_request("Invalid workflow id"));
        }
        let hash = format!("{:x}", Sha256::digest(id.as_bytes()));
        let path = st
            .cfg
            .model_cache_dir
            .join("workflow")
            .join("local")
            .join(format!("{hash}.json"));
        let text = tokio::fs::read(&path)
            .await
            .map_err(|_| ApiError::not_found(format!("Workflow '{id}' is not in the local workspace (MODEL_CACHE_DIR/workflow/local/{hash}.json)")))?;
        let file: Json = serde_json::from_slice(&text).map_err(|e| {
            ApiError::internal(format!(
                "The local workflow file of '{id}' is not JSON: {e}"
            ))
        })?;
        return specification_of(&json!({"workflow": file}));
    }
    let key_hash = format!("{:x}", Sha256::digest(api_key.unwrap_or("").as_bytes()));
    let cache_key = format!("{workspace}/{id}/{}/{key_hash}", version.unwrap_or(""));
    if use_cache {
        if let Some(def) = st.workflows.saved(&cache_key) {
            return Ok((*def).clone());
        }
    }
    if st.cfg.offline_mode {
        return Err(unreachable_api());
    }
    let client = API_CLIENT.as_ref().ok_or_else(unreachable_api)?;
    let mut url = reqwest::Url::parse(&format!("{}/", st.cfg.api_base_url.trim_end_matches('/')))
        .map_err(|_| unreachable_api())?;
    url.path_segments_mut()
        .map_err(|_| unreachable_api())?
        .pop_if_empty()
        .extend([workspace, "workflows", id]);
    if let Some(k) = api_key.or(st.cfg.roboflow_api_key.as_deref()) {
        url.query_pairs_mut().append_pair("api_key", k);
    }
    if let Some(v) = version {
        url.query_pairs_mut().append_pair("workflow_version", v);
    }
    let fetched = tokio::time::timeout_at(deadline.into(), async {
        let resp = client.get(url).send().await.map_err(|_| unreachable_api())?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized access to Roboflow API - check API key and make sure the key is valid for workspace you use."));
        }
        if status == StatusCode::NOT_FOUND {
            return Err(ApiError::not_found(format!("Workflow '{workspace}/{id}' was not found in Roboflow's API")));
        }
        if !status.is_success() {
            return Err(unreachable_api());
        }
        let bytes = resp.bytes().await.map_err(|_| unreachable_api())?;
        if bytes.len() > st.cfg.max_body_bytes {
            return Err(ApiError::new(StatusCode::BAD_GATEWAY, "Roboflow API's workflow answer is larger than MAX_BODY_BYTES"));
        }
        serde_json::from_slice::<Json>(&bytes).map_err(|_| ApiError::new(StatusCode::BAD_GATEWAY, "Could not find workflow specification in API response"))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "Deadline exceeded while fetching the workflow from Roboflow's API"))??;
    let def = specification_of(&fetched)?;
    st.workflows.keep_saved(cache_key, Arc::new(def.clone()));
    Ok(def)
}

/// The definition in Roboflow's answer `{"workflow": {"config": "<JSON text>", "id"}}`.
fn specification_of(resp: &Json) -> Result<Json, ApiError> {
    let malformed = || {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "Could not find workflow specification in API response",
        )
    };
    let config = resp
        .get("workflow")
        .and_then(|w| w.get("config"))
        .ok_or_else(malformed)?;
    let config: Json = match config {
        Json::String(s) => serde_json::from_str(s).map_err(|_| malformed())?,
        other => other.clone(),
    };
    match config.get("specification") {
        Some(s @ Json::Object(_)) => Ok(s.clone()),
        _ => Err(malformed()),
    }
}

/// Checks a definition (the bare definition is the body).
#[utoipa::path(
    post,
    path = "/workflows/validate",
    tag = "workflows",
    request_body(content = Object, description = "The workflow definition itself"),
    responses((status = 200, description = "`{\"status\": \"ok\"}`"), (status = 400, description = "What is wrong, as a run would answer it"))
)]
pub async fn validate(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    req: Request,
) -> Response {
    admin_json(st, id, "/workflows/validate", req, async |st, body| {
        Ok(match st.workflows.compile(&body) {
            Ok(_) => json(StatusCode::OK, &json!({"status": "ok"})),
            Err(e) => error_response(&e),
        })
    })
    .await
}

/// A cheap route with a JSON body (no inference): read within REQUEST_TIMEOUT_S.
async fn admin_json<F>(
    st: Arc<AppState>,
    id: RequestId,
    route: &'static str,
    req: Request,
    go: F,
) -> Response
where
    F: AsyncFnOnce(&Arc<AppState>, Json) -> Result<HttpResponse, ApiError>,
{
    let mut ctx = RequestContext::new(id, route);
    ctx.route = None;
    let answer = async {
        let deadline = call::deadline(&st, Instant::now(), None);
        let body = json_body(&st, req, deadline, &mut ctx).await?;
        go(&st, body).await
    }
    .await;
    ctx.finish(answer)
}

/// The inputs and outputs of a definition, with their kinds.
#[utoipa::path(
    post,
    path = "/workflows/describe_interface",
    tag = "workflows",
    request_body(content = Object, description = "`{specification, api_key}` (the key is required, as the reference requires it; any string offline)"),
    responses((status = 200, description = "`{inputs, outputs, typing_hints, kinds_schemas}`"), (status = 400, description = "No API key, or an invalid definition"))
)]
pub async fn describe_interface(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    req: Request,
) -> Response {
    admin_json(st, id, "/workflows/describe_interface", req, async |st, body| {
        if body.get("api_key").and_then(Json::as_str).is_none_or(str::is_empty) {
            return Err(ApiError::bad_request("Required Roboflow API key is missing. Visit https://docs.roboflow.com/api-reference/authentication#retrieve-an-api-key to learn how to retrieve one."));
        }
        let Some(def) = body.get("specification") else {
            return Ok(missing_field("specification", &body));
        };
        Ok(match st.workflows.compile(def) {
            Ok(wf) => json(StatusCode::OK, &interface(&wf)),
            Err(e) => error_response(&e),
        })
    })
    .await
}

fn typing_hint(kind: &str) -> &'static str {
    match kind {
        "string" | "roboflow_model_id" | "inference_id" | "roboflow_project" => "str",
        "integer" => "int",
        "float" | "float_zero_to_one" => "float",
        "boolean" => "bool",
        "list_of_values" => "list",
        "*" => "Any",
        _ => "dict",
    }
}

fn interface(wf: &Workflow) -> Json {
    let inputs: Map<String, Json> = wf
        .inputs
        .iter()
        .map(|i| (i.name.clone(), json!(i.kinds)))
        .collect();
    let outputs: Map<String, Json> = wf
        .outputs
        .iter()
        .map(|o| {
            let kinds: Vec<&str> = match &o.selector {
                Selector::Input(i) => wf.inputs[*i].kinds.iter().map(String::as_str).collect(),
                Selector::Output { step, name } => wf.steps[*step]
                    .block
                    .outputs
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, k)| *k)
                    .collect(),
                Selector::All(_) => vec!["*"],
            };
            (o.name.clone(), json!(kinds))
        })
        .collect();
    let mut hints = Map::new();
    for kinds in inputs.values().chain(outputs.values()) {
        for k in kinds
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Json::as_str)
        {
            hints.insert(k.to_owned(), json!(typing_hint(k)));
        }
    }
    let mut schemas = Map::new();
    if hints.contains_key("image") {
        schemas.insert("image".into(), json!({"properties": {"type": {"const": "url", "title": "Type", "type": "string"},
            "value": {"description": "Value depends on `type` - for url, one should provide URL to the file, for `base64` - base64 string.", "title": "Value"}},
            "required": ["type", "value"], "title": "ImageSchema", "type": "object"}));
    }
    json!({"inputs": inputs, "outputs": outputs, "typing_hints": hints, "kinds_schemas": schemas})
}

/// The blocks this server has, in the reference's shape (what Roboflow's builder reads).
#[utoipa::path(get, path = "/workflows/blocks/describe", tag = "workflows",
    responses((status = 200, description = "`{blocks, declared_kinds, kinds_connections, primitives_connections, universal_query_language_description, dynamic_block_definition_schema}`")))]
pub async fn blocks_describe() -> HttpResponse {
    json(StatusCode::OK, &*BLOCKS_DESCRIPTION)
}

/// `POST /workflows/blocks/describe`: the same (dynamic blocks are refused: this server runs
/// no client-supplied code).
pub async fn blocks_describe_post(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    req: Request,
) -> Response {
    admin_json(st, id, "/workflows/blocks/describe", req, async |_, body| {
        if body.get("dynamic_blocks_definitions").and_then(Json::as_array).is_some_and(|a| !a.is_empty()) {
            return Ok(error_response(&WorkflowError::short(400, "DynamicBlockError", "workflow_compilation | blocks_loading",
                "Dynamic blocks are not available on this server: it runs no client-supplied code")));
        }
        Ok(json(StatusCode::OK, &*BLOCKS_DESCRIPTION))
    })
    .await
}

static BLOCKS_DESCRIPTION: LazyLock<Json> = LazyLock::new(|| {
    let kinds = blocks::kinds();
    let mut connections: Map<String, Json> = Map::new();
    for b in BLOCKS {
        for f in b.fields.iter().filter(|f| f.selector) {
            for k in f.kinds {
                let entry = connections
                    .entry((*k).to_owned())
                    .or_insert_with(|| json!([]));
                if let Json::Array(a) = entry {
                    a.push(
                        json!({"manifest_type_identifier": b.id, "property_name": f.name,
                        "property_description": "", "compatible_element": "any_data",
                        "is_list_element": false, "is_dict_element": false}),
                    );
                }
            }
        }
    }
    json!({
        "blocks": BLOCKS.iter().map(blocks::describe).collect::<Vec<_>>(),
        "declared_kinds": kinds.iter().map(|k| json!({"name": k, "description": null, "docs": null, "serialised_data_type": null, "internal_data_type": null})).collect::<Vec<_>>(),
        "kinds_connections": connections,
        "primitives_connections": [],
        "universal_query_language_description": {
            "operations_description": crate::workflows::uql::OPERATIONS.iter().map(|o| json!({"operation_type": o})).collect::<Vec<_>>(),
            "operators_descriptions": crate::workflows::uql::BINARY.iter().chain(crate::workflows::uql::UNARY).map(|o| json!({"operator_type": o})).collect::<Vec<_>>(),
        },
        "dynamic_block_definition_schema": {},
    })
});

/// The JSON schema of a workflow definition on this server.
#[utoipa::path(get, path = "/workflows/definition/schema", tag = "workflows",
    responses((status = 200, description = "`{schema: <JSON schema of WorkflowSpecificationV1>}`")))]
pub async fn definition_schema() -> HttpResponse {
    json(StatusCode::OK, &*SCHEMA)
}

static SCHEMA: LazyLock<Json> = LazyLock::new(|| {
    let defs: Map<String, Json> = BLOCKS
        .iter()
        .map(|b| (b.id.replace(['/', '@'], "__"), blocks::block_schema(b)))
        .collect();
    let refs: Vec<Json> = defs
        .keys()
        .map(|k| json!({"$ref": format!("#/$defs/{k}")}))
        .collect();
    json!({"schema": {
        "$defs": defs,
        "properties": {
            "version": {"title": "Version", "type": "string"},
            "inputs": {"title": "Inputs", "type": "array", "items": {"type": "object", "properties": {
                "type": {"enum": ["WorkflowImage", "InferenceImage", "WorkflowParameter", "InferenceParameter"]},
                "name": {"type": "string"}, "default_value": {}}, "required": ["type", "name"]}},
            "steps": {"title": "Steps", "type": "array", "items": {"anyOf": refs}},
            "outputs": {"title": "Outputs", "type": "array", "items": {"type": "object", "properties": {
                "type": {"const": "JsonField"}, "name": {"type": "string"}, "selector": {"type": "string"},
                "coordinates_system": {"enum": ["own", "parent"], "default": "parent"}}, "required": ["type", "name", "selector"]}},
        },
        "required": ["version", "inputs", "steps", "outputs"],
        "title": "WorkflowSpecificationV1",
        "type": "object",
    }})
});

/// The execution engine versions this server runs.
#[utoipa::path(get, path = "/workflows/execution_engine/versions", tag = "workflows",
    responses((status = 200, description = "`{\"versions\": [\"1.17.0\"]}`")))]
pub async fn engine_versions() -> HttpResponse {
    json(StatusCode::OK, &json!({"versions": [ENGINE_VERSION]}))
}
