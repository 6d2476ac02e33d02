//! Routing and handlers: an HTTP request in, a JSON response out. Inference handlers read the
//! body (with a size limit), have it parsed off the reactor, build the task parameters, call
//! `Engine::infer` and serialise its answers; they never block a reactor thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tracing::Instrument;

use super::error::ApiError;
use super::images::fetch_url;
use super::request::{legacy_params, ImageSource, InferRequest, ModelIdScan};
use super::response::{json, ImageSize, InferResponse, ModelsDescriptions, ResolvedModel};
use super::{AppState, ConnectionClass};
use crate::engine::admission::Ticket;
use crate::engine::{Engine, ImageInput};
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::repository::TaskType;
use crate::tasks::segmentation::SegmentationParams;
use crate::tasks::TaskParams;

type HttpResponse = Response<Full<Bytes>>;

/// Entry point of every request: routes it, maps errors, tags the response with a request id.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    class: ConnectionClass,
) -> HttpResponse {
    let _in_flight = state.in_flight.enter();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let mut ctx = RequestContext {
        request_id,
        model: None,
        route: None,
        ticket: None,
    };
    // Every log line emitted while serving the request carries its id.
    let span = tracing::info_span!("request", request_id = %ctx.request_id);
    let routed = if class == ConnectionClass::Reserved && !HEALTH.contains(&path.as_str()) {
        Err(ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many connections (MAX_CONNECTIONS): this connection may only ask for health; retry shortly",
            )
        })
    } else {
        route(&state, req, &mut ctx).instrument(span).await
    };
    let mut resp = match routed {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if resp.status() == StatusCode::TOO_MANY_REQUESTS && state.cfg.overload_status == 503 {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(route) = ctx.route {
        let model = ctx.model.as_deref().unwrap_or("none");
        METRICS
            .requests_total
            .with_label_values(&[model, route, status.as_str()])
            .inc();
        METRICS
            .request_seconds
            .with_label_values(&[model, route])
            .observe(seconds);
    }
    let request_id = ctx.request_id.as_str();
    let ms = seconds * 1000.0;
    // A 503 from /readiness while models load is the expected answer, not a failure.
    if status.is_server_error() && path != "/readiness" {
        tracing::warn!(request_id, %method, path, status = status.as_u16(), ms, "request failed");
    } else {
        tracing::debug!(request_id, %method, path, status = status.as_u16(), ms, "request");
    }
    resp
}

/// What a handler learns about its request that the access log and metrics need.
struct RequestContext {
    request_id: String,
    /// The model, once known to be loaded (bounded label values).
    model: Option<String>,
    /// The inference route, for inference requests.
    route: Option<&'static str>,
    /// Its place in its model's line (the waiting room), once let in.
    ticket: Option<Ticket>,
}

/// What a connection over MAX_CONNECTIONS may still ask (cheap, no body).
const HEALTH: [&str; 3] = ["/healthz", "/readiness", "/info"];

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    // HEAD is GET without the body (hyper leaves the body out).
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let task = match path.as_str() {
        "/infer/object_detection" => Some(TaskType::ObjectDetection),
        "/infer/instance_segmentation" => Some(TaskType::InstanceSegmentation),
        "/infer/classification" => Some(TaskType::Classification),
        "/infer/keypoints_detection" => Some(TaskType::KeypointDetection),
        _ => None,
    };
    if task.is_some() && method != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method Not Allowed: {path} takes POST"),
        ));
    }
    // Fixed routes win over `/{dataset}/{version}` (so "model/registry" is not a model id).
    const FIXED: [&str; 11] = [
        "/docs",
        "/openapi.json",
        DOCS_SCRIPT,
        "/info",
        "/healthz",
        "/readiness",
        "/metrics",
        "/model/registry",
        "/model/add",
        "/model/remove",
        "/model/clear",
    ];
    let legacy = if task.is_none()
        && !FIXED.contains(&path.as_str())
        && !path.starts_with("/infer/")
        && matches!(method, Method::POST | Method::GET)
    {
        legacy_model_id(&path)
    } else {
        None
    };
    if task.is_some() || legacy.is_some() {
        ctx.route = Some(task.map_or("/{dataset}/{version}", TaskType::route));
        if state.draining.load(Ordering::Acquire) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The server is shutting down; send the request to another replica",
            ));
        }
        // The deadline starts now and covers reading the body and waiting for a turn.
        let now = Instant::now();
        let deadline = deadline(state, &req, now)?;
        // Counted in (MAX_INFLIGHT_REQUESTS), then let in or refused as soon as the model is
        // known (see `engine::admission`): from the path, or the body's first 64 KiB, so a
        // refused body is not buffered unless it names its model only after that.
        let Some(_presence) = state.engine.activity().enter() else {
            METRICS.outcome("none", Outcome::Rejected, Stage::Admission);
            discard_body(state, req);
            return Err(ApiError::overloaded(
                "Server overloaded: MAX_INFLIGHT_REQUESTS inference requests are in the server; retry shortly",
            ));
        };
        let answer = match (task, legacy) {
            (Some(task), _) => infer_json(state, req, task, now, deadline, ctx).await,
            (None, Some(model_id)) => match state.engine.admit(&model_id, now, deadline) {
                Ok(ticket) => {
                    ctx.ticket = ticket;
                    infer_legacy(state, req, model_id, deadline, ctx).await
                }
                Err(e) => {
                    discard_body(state, req);
                    Err(e.into())
                }
            },
            (None, None) => unreachable!("checked above"),
        };
        if let (Ok(_), Some(ticket)) = (&answer, ctx.ticket.as_mut()) {
            ticket.served();
        }
        return answer;
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/") => Ok(asset(INDEX_HTML, "text/html; charset=utf-8")),
        (&Method::GET, "/docs") => Ok(asset(DOCS_HTML, "text/html; charset=utf-8")),
        (&Method::GET, DOCS_SCRIPT) => Ok(asset(REDOC_JS, "application/javascript")),
        (&Method::GET, "/openapi.json") => {
            Ok(asset(super::openapi::document(), "application/json"))
        }
        (&Method::GET, "/info") => Ok(info(state)),
        (&Method::GET, "/healthz") => {
            let failed: serde_json::Map<String, serde_json::Value> = state
                .engine
                .models()
                .failed()
                .into_iter()
                .map(|(id, why)| (id, why.into()))
                .collect();
            let mut body = serde_json::json!({"status": "healthy"});
            if !failed.is_empty() {
                body["models_failed_to_load"] = failed.into();
            }
            Ok(json(StatusCode::OK, &body))
        }
        (&Method::GET, "/readiness") => Ok(readiness(state)),
        (&Method::GET, "/metrics") => Ok(metrics(state)),
        (&Method::GET, "/model/registry") => Ok(registry(state)),
        (&Method::POST, "/model/add") => model_add(state, req).await,
        (&Method::POST, "/model/remove") => model_remove(state, req).await,
        (&Method::POST, "/model/clear") => {
            state.engine.models().clear();
            Ok(registry(state))
        }
        _ => Err(ApiError::not_found(format!("Not Found: {method} {path}"))),
    }
}

/// The page to try models in a browser (no build step, no CDN: every asset is served here).
const INDEX_HTML: &str = include_str!("../../assets/index.html");

/// Redoc, from npm (`redoc` 2.5.4, MIT), rendering `/openapi.json` at `/docs`.
const REDOC_JS: &[u8] = include_bytes!("../../assets/redoc.standalone.js");
const DOCS_SCRIPT: &str = "/docs/redoc.standalone.js";
const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cvserve API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="openapi.json"></redoc>
<script src="docs/redoc.standalone.js"></script></body></html>"#;

fn asset(body: impl Into<Bytes>, content_type: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(body.into()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// 200 `{"status": "ready"}`, or 503 `{"status": "not ready", "reason": ...}` (with
/// `models_failed_to_load` when preloaded models failed).
fn readiness(state: &AppState) -> HttpResponse {
    use super::Readiness;
    let not_ready = |reason: &str| serde_json::json!({"status": "not ready", "reason": reason});
    match state.readiness() {
        Readiness::Ready => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Readiness::Loading => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &not_ready("loading the preloaded models"),
        ),
        Readiness::Draining => json(StatusCode::SERVICE_UNAVAILABLE, &not_ready("shutting down")),
        Readiness::Failed(failed) => {
            let mut body = not_ready("preloaded models failed to load");
            body["models_failed_to_load"] = failed
                .into_iter()
                .map(|(id, why)| (id, why.into()))
                .collect::<serde_json::Map<_, _>>()
                .into();
            json(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    }
}

/// Roboflow's `/info` (`name`, `version`, `uuid`), plus how each loaded model is served.
fn info(state: &AppState) -> HttpResponse {
    let models: Vec<serde_json::Value> = state
        .engine
        .models()
        .list()
        .iter()
        .map(|m| {
            serde_json::json!({
                "model_id": m.meta.id,
                "execution_provider": m.provider,
                "instances": m.queue.instances(),
                "max_instances": m.instances,
                "intra_threads": m.intra_threads,
                "lone_request_threads": m.lone_threads,
                "max_batch_size": m.max_batch,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "name": "cvserve",
            "version": env!("CARGO_PKG_VERSION"),
            "uuid": state.uuid,
            "models": models,
        }),
    )
}

fn metrics(state: &AppState) -> HttpResponse {
    METRICS
        .ring_slots_in_use
        .set(state.engine.ring().in_use() as i64);
    METRICS
        .inflight_requests
        .set(state.engine.activity().in_server() as i64);
    for m in state.engine.models().list() {
        METRICS
            .queue_depth
            .with_label_values(&[&m.meta.id])
            .set(m.queue.depth() as i64);
        METRICS
            .model_instances
            .with_label_values(&[&m.meta.id, &m.provider])
            .set(m.queue.instances() as i64);
    }
    let mut resp = Response::new(Full::new(Bytes::from(METRICS.render())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `/{dataset}/{version}` → `dataset/version` (two non-empty segments).
fn legacy_model_id(path: &str) -> Option<String> {
    let trimmed = path.strip_prefix('/')?.trim_end_matches('/');
    let mut parts = trimmed.split('/');
    let (a, b) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || a.is_empty() || b.is_empty() {
        return None;
    }
    Some(format!("{a}/{b}"))
}

fn registry(state: &AppState) -> HttpResponse {
    json(
        StatusCode::OK,
        &ModelsDescriptions::of(&state.engine.models().list()),
    )
}

/// A request body in memory, holding its share of MAX_BODY_MEMORY_BYTES until dropped.
struct Body {
    bytes: Bytes,
    lease: BodyLease,
}

/// The share of MAX_BODY_MEMORY_BYTES (KiB permits) a body holds.
#[derive(Default)]
struct BodyLease {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyLease {
    fn held(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Grows the lease to cover `total` bytes; `false` when the server holds too much.
    fn cover(&mut self, pool: &Arc<tokio::sync::Semaphore>, total: usize) -> bool {
        let needed = total.div_ceil(1024);
        let held = self.held();
        if needed <= held {
            return true;
        }
        let Some(more) = u32::try_from(needed - held)
            .ok()
            .and_then(|n| Arc::clone(pool).try_acquire_many_owned(n).ok())
        else {
            return false;
        };
        METRICS.body_bytes_held.add(((needed - held) * 1024) as i64);
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        true
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        METRICS.body_bytes_held.sub((self.held() * 1024) as i64);
    }
}

/// Called with a JSON body's `model_id` as soon as its first bytes name it; an error refuses
/// the request there.
type EarlyCheck<'a> = &'a mut (dyn FnMut(&str) -> Result<(), ApiError> + Send);

/// Reads a whole body of at most `limit` bytes (413 past it) before `deadline` (408 after
/// it), counting its bytes against MAX_BODY_MEMORY_BYTES as they arrive (429 when the
/// server holds too much). Shutdown cancels the read (503).
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
    limit: usize,
    setting: &'static str,
    deadline: Instant,
    mut early: Option<EarlyCheck<'_>>,
) -> Result<(hyper::http::request::Parts, Body), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than {setting} ({limit} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let (parts, mut body) = req.into_parts();
    let mut lease = BodyLease::default();
    // The declared length (up to BODY_UP_FRONT) is reserved before reading: under load the
    // excess is refused at once, before its upload, instead of mid-body; beyond that, bytes
    // are counted as they arrive, so a stalled body holds little.
    let up_front = declared.unwrap_or(0).min(BODY_UP_FRONT);
    let mut buf = bytes::BytesMut::new();
    // Once refused for memory, the rest of the body is read and dropped (so the client gets
    // its 429 instead of a reset connection), within the same deadline.
    let mut refused = !lease.cover(&state.body_memory, up_front);
    if !refused {
        buf.reserve(declared.unwrap_or(0));
    }
    // Refused by `early` (the waiting room) once it could tell from the first bytes.
    let mut turned_away: Option<ApiError> = None;
    let mut scan = super::request::ModelIdScanner::default();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if refused {
                continue;
            }
            let total = buf.len() + data.len();
            if total > limit {
                return Err(too_large());
            }
            if !lease.cover(&state.body_memory, total) {
                refused = true;
                buf = bytes::BytesMut::new();
                lease = BodyLease::default();
                continue;
            }
            buf.extend_from_slice(&data);
            if let Some(check) = early.as_mut() {
                match scan.feed(&buf) {
                    ModelIdScan::Found(id) => {
                        if let Err(e) = check(id) {
                            // Answered now; the rest of the body is dropped in the background.
                            turned_away = Some(e);
                            return Ok(());
                        }
                        early = None;
                    }
                    ModelIdScan::GaveUp => early = None,
                    ModelIdScan::NotYet => {}
                }
            }
        }
        Ok(())
    };
    let drain = state.drain_started.notified();
    if state.draining.load(Ordering::Acquire) {
        return Err(shutting_down());
    }
    tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), read) => match r {
            Ok(r) => r?,
            Err(_) => return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "The request body did not arrive within the request's deadline (REQUEST_TIMEOUT_S)",
            )),
        },
        _ = drain => return Err(shutting_down()),
    }
    if let Some(e) = turned_away {
        discard_rest(body, limit);
        return Err(e);
    }
    if refused {
        return Err(body_memory_full());
    }
    Ok((
        parts,
        Body {
            bytes: buf.freeze(),
            lease,
        },
    ))
}

/// Bytes of a body's declared length reserved before it is read.
const BODY_UP_FRONT: usize = 1 << 20;

/// Answers a refused request at once and reads its body in the background, dropping it as
/// it arrives (nothing is buffered), so the client, perhaps still sending, receives its
/// answer rather than a reset connection. Reading stops after MAX_BODY_BYTES or
/// [`DISCARD_TIME`] (the connection is then closed).
fn discard_body(state: &AppState, req: Request<Incoming>) {
    // A client waiting for `100 Continue` has not sent its body: nothing to read.
    let expects_continue = req
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        discard_rest(req.into_body(), state.cfg.max_body_bytes);
    }
}

/// Reads what is left of `body` in the background and drops it (see [`discard_body`]).
fn discard_rest(mut body: Incoming, limit: usize) {
    tokio::spawn(async move {
        let read = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIME, read).await;
    });
}

/// Longest a refused body is read (and dropped) after its answer.
const DISCARD_TIME: Duration = Duration::from_secs(5);

fn body_memory_full() -> ApiError {
    ApiError::overloaded(
        "Server overloaded: it holds as many request bodies as it may (MAX_BODY_MEMORY_BYTES); retry shortly",
    )
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The server is shutting down; send the request to another replica",
    )
}

/// An admin route's body (ADMIN_MAX_BODY_BYTES).
async fn read_admin_body(state: &AppState, req: Request<Incoming>) -> Result<Body, ApiError> {
    let deadline = Instant::now() + Duration::from_secs_f64(state.cfg.request_timeout_s.max(0.0));
    let limit = state.cfg.admin_max_body_bytes;
    Ok(
        read_body(state, req, limit, "ADMIN_MAX_BODY_BYTES", deadline, None)
            .await?
            .1,
    )
}

#[derive(Deserialize)]
struct ModelRequest {
    model_id: Option<String>,
    api_key: Option<String>,
}

/// `model_id` and `api_key` of an admin body (`api_key` may also come as a query parameter).
fn model_request(body: &[u8]) -> Result<(String, Option<String>), ApiError> {
    let r: ModelRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}")))?;
    let id = r
        .model_id
        .ok_or_else(|| ApiError::invalid("Invalid request body: field 'model_id' is required"))?;
    Ok((id, r.api_key))
}

/// The API key a request carries outside its body: `?api_key=`, else `Authorization:
/// Bearer <key>` (Roboflow's order; the body's `api_key` comes after both).
fn query_api_key(req: &Request<Incoming>) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "api_key")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            req.headers()
                .get(hyper::header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(|k| k.trim().to_string())
        })
}

async fn model_add(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let query_key = query_api_key(&req);
    let body = read_admin_body(state, req).await?;
    let (id, body_key) = model_request(&body.bytes)?;
    state
        .engine
        .fetch(&id, query_key.or(body_key).as_deref())
        .await?;
    let manager = Arc::clone(state.engine.models());
    tokio::task::spawn_blocking(move || manager.add(&id))
        .await
        .map_err(|_| ApiError::internal("Internal error: model loading panicked"))?
        .map_err(ApiError::from)?;
    Ok(registry(state))
}

async fn model_remove(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body = read_admin_body(state, req).await?;
    let (id, _) = model_request(&body.bytes)?;
    if !state.engine.models().remove(&id) {
        return Err(ApiError::not_found(format!("Model '{id}' is not loaded")));
    }
    Ok(registry(state))
}

fn task_params(
    state: &AppState,
    task: TaskType,
    req: &InferRequest,
) -> Result<TaskParams, ApiError> {
    Ok(match task {
        TaskType::ObjectDetection => TaskParams::Detection(req.detection_params()?),
        TaskType::InstanceSegmentation => TaskParams::Segmentation(SegmentationParams {
            max_work_pixels: state.cfg.max_mask_work_pixels,
            ..req.segmentation_params()?
        }),
        TaskType::Classification => TaskParams::Classification(req.classification_params()?),
        TaskType::KeypointDetection => TaskParams::Keypoints(req.keypoints_params()?),
    })
}

async fn infer_json(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    task: TaskType,
    arrived: Instant,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let limit = state.cfg.max_body_bytes;
    let outer_key = query_api_key(&req);
    // The waiting room decides as soon as the body's first bytes name the model; the rest of
    // a refused body is read and dropped.
    let mut admitted: Option<(String, Option<Ticket>)> = None;
    let mut early = |id: &str| -> Result<(), ApiError> {
        let ticket = state.engine.admit(id, arrived, deadline)?;
        admitted = Some((id.to_owned(), ticket));
        Ok(())
    };
    // The body's lease is held until the answer: its parsed copies count under it.
    let (
        _,
        Body {
            bytes,
            lease: _lease,
        },
    ) = read_body(
        state,
        req,
        limit,
        "MAX_BODY_BYTES",
        deadline,
        Some(&mut early),
    )
    .await?;
    // A JSON body of megabytes (base64 images) is parsed on the CPU pool.
    let mut request = state
        .engine
        .run_cpu(move || InferRequest::parse(&bytes))
        .await??;
    request.api_key = outer_key.or(request.api_key.take());
    let model_id = request.model_id()?;
    // Not named in the first bytes (or named otherwise than parsed): decided now.
    match admitted {
        Some((id, ticket)) if id == model_id => ctx.ticket = ticket,
        other => {
            // A place taken in another model's line (a `model_id` key nested elsewhere in
            // the first bytes) is given up first.
            drop(other);
            ctx.ticket = state.engine.admit(&model_id, arrived, deadline)?;
        }
    }
    let (images, is_list) = request.take_images()?;
    let inference_id = request.id.clone().unwrap_or_else(|| ctx.request_id.clone());
    let call = InferCall {
        model_id: &model_id,
        expected: Some(task),
        inference_id: &inference_id,
        started,
        deadline,
    };
    let (mut responses, pictures) = infer(state, call, &request, images, ctx).await?;
    // Thousands of RLE masks make megabytes of JSON: encoded on the CPU pool too.
    Ok(state
        .engine
        .run_cpu(move || {
            attach_pictures(&mut responses, pictures);
            if is_list {
                json(StatusCode::OK, &responses)
            } else {
                json(StatusCode::OK, &responses[0])
            }
        })
        .await?)
}

async fn infer_legacy(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    model_id: String,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let query = req.uri().query().unwrap_or("").to_owned();
    let (mut request, opts) = legacy_params(&query)?;
    request.api_key = query_api_key(&req);
    // The body's lease, held until the answer is ready.
    let held;
    let source = if let Some(url) = opts.image_url.clone() {
        held = None;
        ImageSource::Url(url)
    } else {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::bad_request("Content-Type header not provided with request.")
            })?;
        let limit = state.cfg.max_body_bytes;
        let (_, Body { bytes: body, lease }) =
            read_body(state, req, limit, "MAX_BODY_BYTES", deadline, None).await?;
        held = Some(lease);
        if content_type.starts_with("multipart/form-data") {
            // The body is in memory: parsing it never waits, so it runs on the CPU pool.
            let file = state
                .engine
                .run_cpu(move || futures_executor::block_on(multipart_file(&content_type, body)))
                .await??;
            ImageSource::Bytes(file)
        } else if opts.image_type != "base64" {
            return Err(ApiError::bad_request(format!(
                "image_type '{}' is not accepted; send base64 text or a multipart 'file'",
                opts.image_type
            )));
        } else {
            let text = String::from_utf8(body.to_vec()).map_err(|_| {
                ApiError::bad_request(
                    "Could not load input image. Cause: Malformed base64 input image.",
                )
            })?;
            ImageSource::Base64(text)
        }
    };
    let inference_id = ctx.request_id.clone();
    let call = InferCall {
        model_id: &model_id,
        expected: None,
        inference_id: &inference_id,
        started,
        deadline,
    };
    let (mut responses, mut pictures) = infer(state, call, &request, vec![source], ctx).await?;
    let resp = if opts.format == "image" {
        // The picture itself (Roboflow's `format=image`).
        let mut resp = Response::new(Full::new(Bytes::from(pictures.remove(0))));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
        resp
    } else {
        state
            .engine
            .run_cpu(move || {
                attach_pictures(&mut responses, pictures);
                json(StatusCode::OK, &responses[0])
            })
            .await?
    };
    drop(held);
    Ok(resp)
}

/// The request's deadline: REQUEST_TIMEOUT_S after arrival, or sooner if the client asks with
/// `X-Request-Timeout-Ms`.
fn deadline(
    state: &AppState,
    req: &Request<Incoming>,
    started: Instant,
) -> Result<Instant, ApiError> {
    let default = Duration::from_secs_f64(state.cfg.request_timeout_s.max(0.0));
    let asked = match req.headers().get("x-request-timeout-ms") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "X-Request-Timeout-Ms must be a whole number of milliseconds",
                    )
                })?,
        ),
    };
    Ok(started + asked.map_or(default, |a| a.min(default)))
}

/// The bytes of the multipart part named `file` (Roboflow's legacy upload).
async fn multipart_file(content_type: &str, body: Bytes) -> Result<Bytes, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("Invalid multipart request: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("Invalid multipart request: {e}")))?
    {
        if field.name() == Some("file") {
            return field
                .bytes()
                .await
                .map_err(|e| ApiError::bad_request(format!("Invalid multipart request: {e}")));
        }
    }
    Err(ApiError::bad_request(
        "Multipart request has no part named 'file'",
    ))
}

/// What one inference call is about.
struct InferCall<'a> {
    model_id: &'a str,
    /// The task of the route, or `None` for the legacy route (any task).
    expected: Option<TaskType>,
    inference_id: &'a str,
    started: Instant,
    deadline: Instant,
}

/// Runs images through a model and renders one response per image, in order; with
/// `visualize_predictions`, also each image with its predictions drawn (JPEG), drawn on the
/// postprocess pool.
async fn infer(
    state: &Arc<AppState>,
    call: InferCall<'_>,
    request: &InferRequest,
    images: Vec<ImageSource>,
    ctx: &mut RequestContext,
) -> Result<(Vec<InferResponse>, Vec<Vec<u8>>), ApiError> {
    let InferCall {
        model_id,
        expected,
        inference_id,
        started,
        deadline,
    } = call;
    let draw = request.draw_options()?;
    let model = state
        .engine
        .model(model_id, request.api_key.as_deref())
        .await?;
    ctx.model = Some(model.meta.id.clone());
    if let Some(expected) = expected {
        Engine::check_task(&model, expected)?;
    }
    let params = task_params(state, model.meta.task, request)?;
    let mut inputs = Vec::with_capacity(images.len());
    for image in images {
        inputs.push(match image {
            ImageSource::Base64(s) => ImageInput::Base64(s),
            ImageSource::Bytes(b) => ImageInput::Bytes(b),
            ImageSource::Url(u) => ImageInput::Bytes(fetch_url(state, &u).await?),
        });
    }
    // Drawing needs the image again: a refcount for bytes, a copy of base64 text.
    let originals = draw.is_some().then(|| inputs.clone());
    let disabled = request.disabled_steps();
    let disable_orient = disabled.auto_orient;
    let outputs = state
        .engine
        .infer(
            &model,
            inputs,
            params,
            disabled,
            deadline,
            ctx.ticket.as_mut(),
        )
        .await?;
    let mut pictures = Vec::new();
    if let (Some(opts), Some(originals)) = (draw, originals) {
        for (image, out) in originals.into_iter().zip(&outputs) {
            let picture =
                state
                    .engine
                    .visualize(&model, image, &out.output, opts, disable_orient, deadline);
            let picture = tokio::time::timeout_at(deadline.into(), picture)
                .await
                .map_err(|_| {
                    ApiError::from(crate::pipeline::PipelineError::DeadlineExceeded(
                        "while drawing",
                    ))
                })??;
            pictures.push(picture);
        }
    }
    let time = started.elapsed().as_secs_f64();
    let responses = outputs
        .into_iter()
        .map(|o| InferResponse {
            inference_id: inference_id.to_owned(),
            time,
            image: ImageSize {
                width: o.width,
                height: o.height,
            },
            body: o.output.into(),
            visualization: None,
            resolved_model: ResolvedModel {
                model_id: model_id.to_owned(),
            },
        })
        .collect();
    Ok((responses, pictures))
}

/// Puts each picture, base64, in its response's `visualization`.
fn attach_pictures(responses: &mut [InferResponse], pictures: Vec<Vec<u8>>) {
    use base64::Engine as _;
    for (r, p) in responses.iter_mut().zip(pictures) {
        r.visualization = Some(base64::engine::general_purpose::STANDARD.encode(p));
    }
}

#[cfg(test)]
mod tests {
    use super::legacy_model_id;

    #[test]
    fn legacy_paths_are_two_segments() {
        assert_eq!(legacy_model_id("/coco/1").as_deref(), Some("coco/1"));
        assert_eq!(legacy_model_id("/coco/1/").as_deref(), Some("coco/1"));
        assert_eq!(legacy_model_id("/coco"), None);
        assert_eq!(legacy_model_id("/a/b/c"), None);
        assert_eq!(legacy_model_id("//1"), None);
    }
}
