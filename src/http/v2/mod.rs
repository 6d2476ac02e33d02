//! The Open Inference Protocol (KServe v2) over HTTP, beside Roboflow's API on the same port,
//! under `/v2`: health, server and model metadata, Triton's model configuration and model
//! repository extensions, inference with the binary tensor extension, and the system
//! shared-memory extension. Every Roboflow model is a v2 model: `coco/1` is model `coco`,
//! version `1`. Errors are `{"error": "..."}`. The inference itself is `infer` (shared with
//! gRPC); this module is the HTTP framing.

mod codec;
pub mod grpc;
pub mod infer;
mod repository;
mod shm;

pub use codec::region_ref;
use codec::*;
pub use repository::*;
pub use shm::*;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::answer::{RequestId, RouteLabels};
use super::body::{discard_body, read_admin_body, read_body, Body, Peer, RemoteIp};
use super::call::{enter_http as enter, RequestContext};
use super::control::may_control_models_http;
use super::error::ApiError;
use super::state::{AppState, Readiness};
use crate::engine::models::LoadError;
use crate::engine::EngineError;
use infer::{
    region_error, resolve_model, Contents, InputTensor, RegionRef, RequestedOutput, V2Request,
    V2Response, INPUT_IMAGE, INPUT_PIXELS, OUTPUT_PREDICTIONS,
};

type HttpResponse = Response<Full<Bytes>>;

/// The extensions served (`GET /v2`).
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "parameters",
    "system_shared_memory",
];

/// The metrics label of the inference routes.
const INFER_ROUTE: &str = "/v2/models/{model_name}/infer";

/// A v2 answer: the value as JSON, or `{"error": ...}` with the error's status (Triton's
/// mapping: 404 unknown, 503 unavailable, 429 with Retry-After when overloaded, else 400,
/// 413, 500 or 504 as the Roboflow routes answer).
fn finish_v2(answer: Result<HttpResponse, ApiError>, labels: Option<RouteLabels>) -> Response {
    let mut resp = match answer {
        Ok(r) => r.into_response(),
        Err(e) => {
            let status = if e.status == StatusCode::UNPROCESSABLE_ENTITY {
                StatusCode::BAD_REQUEST
            } else {
                e.status
            };
            let mut message = e.message;
            if message.len() > 512 {
                let mut end = 512;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
            }
            let mut r = json_response(status, &json!({ "error": message })).into_response();
            if let Some(s) = e.retry_after_s {
                r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
            }
            r
        }
    };
    if let Some(labels) = labels {
        resp.extensions_mut().insert(labels);
    }
    resp
}

/// A JSON value as a 200, or the error.
fn json_answer(answer: Result<Value, ApiError>) -> Response {
    finish_v2(answer.map(|v| json_response(StatusCode::OK, &v)), None)
}

fn json_response(status: StatusCode, value: &Value) -> HttpResponse {
    super::response::json(status, value)
}

/// A status with an empty body (health and readiness answers).
fn status_only(status: StatusCode) -> Response {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r.into_response()
}

#[utoipa::path(get, path = "/v2", tag = "open inference protocol",
    responses((status = 200, description = "`name`, `version` and the `extensions` served", body = Value)))]
pub async fn server_metadata() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "cvserve",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": EXTENSIONS,
        }),
    )
    .into_response()
}

#[utoipa::path(get, path = "/v2/health/live", tag = "open inference protocol",
    responses((status = 200, description = "Alive (empty body)")))]
pub async fn live() -> Response {
    status_only(StatusCode::OK)
}

#[utoipa::path(get, path = "/v2/health/ready", tag = "open inference protocol",
    responses((status = 200, description = "Ready: every preloaded model is loaded (empty body)"),
              (status = 400, description = "Not ready (loading, shutting down, or a preloaded model failed)")))]
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    match st.readiness() {
        Readiness::Ready => status_only(StatusCode::OK),
        _ => status_only(StatusCode::BAD_REQUEST),
    }
}

/// The versions of dataset `name`: loaded, and in the repository.
fn versions_of(st: &AppState, name: &str) -> (Vec<String>, Vec<String>) {
    let pick = |ids: Vec<String>| -> Vec<String> {
        let mut v: Vec<String> = ids
            .into_iter()
            .filter_map(|id| {
                let (d, v) = id.split_once('/')?;
                (d == name).then(|| v.to_owned())
            })
            .collect();
        v.sort_by_key(|v| (v.parse::<u64>().unwrap_or(0), v.clone()));
        v
    };
    let loaded = pick(
        st.engine
            .served_models()
            .into_iter()
            .map(|m| m.id)
            .collect(),
    );
    let available = pick(st.engine.models().available());
    (loaded, available)
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> Value {
    json!({ "name": name, "datatype": datatype, "shape": shape })
}

fn model_metadata_of(st: &AppState, name: &str, version: Option<&str>) -> Result<Value, ApiError> {
    let (model_id, _) = resolve_model(st, name, version)?;
    let (loaded, available) = versions_of(st, name);
    let mut versions = available;
    versions.extend(loaded);
    versions.sort_by_key(|v| (v.parse::<u64>().unwrap_or(0), v.clone()));
    versions.dedup();
    let (_, v) = model_id
        .split_once('/')
        .expect("resolved ids have a version");
    if !versions.iter().any(|x| x == v) {
        return Err(ApiError::not_found(format!(
            "Request for unknown model: '{name}' version {v} is not found"
        )));
    }
    Ok(json!({
        "name": name,
        "versions": versions,
        "platform": "cvserve",
        "inputs": [
            tensor(INPUT_IMAGE, "BYTES", &[-1]),
            tensor(INPUT_PIXELS, "UINT8", &[-1, -1, -1, 3]),
        ],
        "outputs": [tensor(OUTPUT_PREDICTIONS, "BYTES", &[-1])],
    }))
}

#[utoipa::path(get, path = "/v2/models/{model_name}", tag = "open inference protocol",
    params(("model_name" = String, Path, description = "The dataset: `coco` for `coco/1`")),
    responses((status = 200, description = "Inputs `image` (BYTES [-1], encoded images) or `pixels` (UINT8 [-1, -1, -1, 3], RGB); output `predictions` (BYTES [-1]: per image, the JSON `/infer/<task>` answers)", body = Value),
              (status = 404, description = "Unknown model", body = Value)))]
pub async fn model_metadata(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    json_answer(model_metadata_of(&st, &name, None))
}

#[utoipa::path(get, path = "/v2/models/{model_name}/versions/{model_version}", tag = "open inference protocol",
    params(("model_name" = String, Path), ("model_version" = String, Path, description = "`1` for `coco/1`")),
    responses((status = 200, description = "As `/v2/models/{model_name}`", body = Value),
              (status = 404, description = "Unknown model or version", body = Value)))]
pub async fn model_version_metadata(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    json_answer(model_metadata_of(&st, &name, Some(&version)))
}

fn model_ready_of(st: &AppState, name: &str, version: Option<&str>) -> Response {
    match resolve_model(st, name, version) {
        Ok((id, _)) if st.engine.models().get(&id).is_some() => status_only(StatusCode::OK),
        Ok(_) => status_only(StatusCode::BAD_REQUEST),
        Err(_) => status_only(StatusCode::NOT_FOUND),
    }
}

#[utoipa::path(get, path = "/v2/models/{model_name}/ready", tag = "open inference protocol",
    params(("model_name" = String, Path)),
    responses((status = 200, description = "Loaded (empty body)"), (status = 400, description = "Not loaded"), (status = 404, description = "Unknown")))]
pub async fn model_ready(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    model_ready_of(&st, &name, None)
}

#[utoipa::path(get, path = "/v2/models/{model_name}/versions/{model_version}/ready", tag = "open inference protocol",
    params(("model_name" = String, Path), ("model_version" = String, Path)),
    responses((status = 200, description = "Loaded (empty body)"), (status = 400, description = "Not loaded"), (status = 404, description = "Unknown")))]
pub async fn model_version_ready(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    model_ready_of(&st, &name, Some(&version))
}

/// Triton's model configuration of a loaded model, from the server's settings.
pub fn model_config_of(
    st: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Value, ApiError> {
    let (id, _) = resolve_model(st, name, version)?;
    let served = st
        .engine
        .served_models()
        .into_iter()
        .find(|m| m.id == id)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "model '{id}' is not loaded: load it (POST /v2/repository/models/{name}/load) or send it a request"
            ))
        })?;
    let kind = if served.provider.contains("CPU") {
        "KIND_CPU"
    } else {
        "KIND_GPU"
    };
    let cfg = &st.cfg;
    Ok(json!({
        "name": name,
        "platform": "cvserve",
        "backend": "onnxruntime",
        "max_batch_size": served.max_batch,
        "input": [
            {"name": INPUT_IMAGE, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
            {"name": INPUT_PIXELS, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]},
        ],
        "output": [
            {"name": OUTPUT_PREDICTIONS, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        ],
        "instance_group": [{"name": id, "count": served.max_instances, "kind": kind}],
        "dynamic_batching": {
            "max_queue_delay_microseconds": cfg.max_queue_delay_us,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": (cfg.request_timeout_s * 1e6) as u64,
                "allow_timeout_override": true,
                "max_queue_size": cfg.max_queue_size,
            },
        },
        "parameters": {
            "task": {"string_value": served.task.as_str()},
            "execution_provider": {"string_value": served.provider},
            "input_width": {"string_value": served.input_width.to_string()},
            "input_height": {"string_value": served.input_height.to_string()},
        },
    }))
}

#[utoipa::path(get, path = "/v2/models/{model_name}/config", tag = "open inference protocol",
    params(("model_name" = String, Path)),
    responses((status = 200, description = "Triton-style configuration: max_batch_size, instance_group, dynamic_batching", body = Value),
              (status = 400, description = "Not loaded", body = Value)))]
pub async fn model_config(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    json_answer(model_config_of(&st, &name, None))
}

#[utoipa::path(get, path = "/v2/models/{model_name}/versions/{model_version}/config", tag = "open inference protocol",
    params(("model_name" = String, Path), ("model_version" = String, Path)),
    responses((status = 200, description = "As `/v2/models/{model_name}/config`", body = Value)))]
pub async fn model_version_config(
    State(st): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    json_answer(model_config_of(&st, &name, Some(&version)))
}

#[utoipa::path(post, path = "/v2/models/{model_name}/infer", tag = "open inference protocol",
    params(("model_name" = String, Path, description = "The dataset; its highest loaded version serves")),
    request_body(content = Value, description = "`inputs`: one of `image` (BYTES [B]) or `pixels` (UINT8 [B, H, W, 3]), in `data`, after the JSON (`Inference-Header-Content-Length`, `binary_data_size`) or in a registered region (`shared_memory_region`); `parameters`: Roboflow's request fields"),
    responses((status = 200, description = "`outputs`: `predictions` (BYTES [B]), each the JSON `/infer/<task>` answers", body = Value),
              (status = 400, description = "Bad tensor, parameter or image", body = Value),
              (status = 404, description = "Unknown model or region", body = Value),
              (status = 429, description = "Overloaded; retry after `Retry-After` seconds", body = Value)))]
pub async fn model_infer(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    infer_route(st, id, name, None, req).await
}

#[utoipa::path(post, path = "/v2/models/{model_name}/versions/{model_version}/infer", tag = "open inference protocol",
    params(("model_name" = String, Path), ("model_version" = String, Path)),
    request_body(content = Value, description = "As `/v2/models/{model_name}/infer`"),
    responses((status = 200, description = "As `/v2/models/{model_name}/infer`", body = Value)))]
pub async fn model_version_infer(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    Path((name, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    infer_route(st, id, name, Some(version), req).await
}

async fn infer_route(
    st: Arc<AppState>,
    id: RequestId,
    name: String,
    version: Option<String>,
    req: Request,
) -> Response {
    let mut ctx = RequestContext::new(id, INFER_ROUTE);
    let answer = async {
        let (req, now, deadline, _presence) = enter(&st, req)?;
        ctx.peer = req.extensions().get::<Peer>().map(|p| p.0);
        ctx.remote = req.extensions().get::<RemoteIp>().map(|p| p.0);
        let admitted = resolve_model(&st, &name, version.as_deref()).and_then(|(m, v)| {
            ctx.admit(&st, &m, now, deadline)?;
            Ok((m, v))
        });
        let (model_id, version) = match admitted {
            Ok(mv) => mv,
            Err(e) => {
                discard_body(&st, req);
                return Err(e);
            }
        };
        let header_len = match req.headers().get("inference-header-content-length") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request("Inference-Header-Content-Length is not a number")
                    })?,
            ),
        };
        let limit = st.cfg.max_body_bytes;
        let (_, Body { bytes, lease }) =
            read_body(&st, req, limit, "MAX_BODY_BYTES", deadline, None).await?;
        ctx.hold(lease);
        let request = st
            .engine
            .run_cpu(move || parse_request(bytes, header_len))
            .await??;
        let answer = infer::run(&st, &model_id, &version, request, now, deadline, &mut ctx).await;
        ctx.served(&answer);
        let answer = answer?;
        st.engine.run_cpu(move || http_answer(answer)).await?
    }
    .await;
    finish_v2(answer, ctx.labels())
}
