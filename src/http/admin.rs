//! The service routes: health, readiness, `/info`, metrics, the model registry and its admin
//! routes (`/model/add`, `/model/remove`, `/model/clear`), and the pages (`/`, `/docs` with
//! its OpenAPI document). Cheap and bodiless, except the admin routes' small JSON bodies.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::HeaderMap;
use hyper::StatusCode;
use serde::Deserialize;

use super::answer::{finish, ErrorBody};
use super::body::read_admin_body;
use super::control::may_control_models_http;
use super::error::ApiError;
use super::request::query_api_key;
use super::response::{json, ModelsDescriptions};
use super::state::{AppState, Readiness};
use crate::metrics::METRICS;

type HttpResponse = Response<Full<Bytes>>;

/// `{"model_id": "dataset/version", "api_key": "..."}` for `/model/add` and `/model/remove`
/// (`api_key` may also come as a query parameter or a bearer token).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct ModelRequest {
    #[schema(example = "coco/1", required = true)]
    pub model_id: Option<String>,
    pub api_key: Option<String>,
}

/// `model_id` and `api_key` of an admin body.
fn model_request(body: &[u8]) -> Result<(String, Option<String>), ApiError> {
    let r: ModelRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}")))?;
    let id = r
        .model_id
        .ok_or_else(|| ApiError::invalid("Invalid request body: field 'model_id' is required"))?;
    Ok((id, r.api_key))
}

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "Alive; lists `models_failed_to_load` with why", body = serde_json::Value)))]
pub async fn healthz(State(st): State<Arc<AppState>>) -> HttpResponse {
    let failed: serde_json::Map<String, serde_json::Value> = st
        .engine
        .failed_models()
        .into_iter()
        .map(|(id, why)| (id, why.into()))
        .collect();
    let mut body = serde_json::json!({"status": "healthy"});
    if !failed.is_empty() {
        body["models_failed_to_load"] = failed.into();
    }
    json(StatusCode::OK, &body)
}

#[utoipa::path(get, path = "/readiness", tag = "service",
    responses(
        (status = 200, description = "Every preloaded model is loaded and warmed up", body = serde_json::Value),
        (status = 503, description = "Loading, shutting down, or a preloaded model failed to load (`reason`, `models_failed_to_load`)", body = serde_json::Value)))]
pub async fn readiness(State(st): State<Arc<AppState>>) -> HttpResponse {
    let not_ready = |reason: &str| serde_json::json!({"status": "not ready", "reason": reason});
    match st.readiness() {
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

#[utoipa::path(get, path = "/info", tag = "service",
    responses((status = 200, description = "`name`, `version`, `uuid`, and how each model is served", body = serde_json::Value)))]
pub async fn info(State(st): State<Arc<AppState>>) -> HttpResponse {
    let models: Vec<serde_json::Value> = st
        .engine
        .served_models()
        .iter()
        .map(|m| {
            serde_json::json!({
                "model_id": m.id,
                "backend": m.backend,
                "execution_provider": m.provider,
                "instances": m.instances,
                "max_instances": m.max_instances,
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
            "uuid": st.uuid,
            "models": models,
        }),
    )
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> HttpResponse {
    st.engine.update_gauges();
    let mut resp = Response::new(Full::new(Bytes::from(METRICS.render())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn registry_of(st: &AppState) -> HttpResponse {
    json(
        StatusCode::OK,
        &ModelsDescriptions::of(&st.engine.served_models()),
    )
}

#[utoipa::path(get, path = "/model/registry", tag = "models",
    responses((status = 200, description = "The loaded models", body = ModelsDescriptions)))]
pub async fn registry(State(st): State<Arc<AppState>>) -> HttpResponse {
    registry_of(&st)
}

#[utoipa::path(post, path = "/model/add", tag = "models", request_body = ModelRequest,
    responses(
        (status = 200, description = "Loaded; the registry", body = ModelsDescriptions),
        (status = 404, description = "Not in the model cache", body = ErrorBody),
        (status = 401, description = "MODEL_CONTROL=explicit without the admin token (Authorization: Bearer)", body = ErrorBody),
        (status = 403, description = "MODEL_CONTROL=none", body = ErrorBody),
        (status = 413, description = "Body over ADMIN_MAX_BODY_BYTES", body = ErrorBody),
        (status = 500, description = "The model failed to load", body = ErrorBody),
        (status = 503, description = "MAX_ACTIVE_MODELS models are loaded and all were preloaded", body = ErrorBody)))]
pub async fn model_add(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let answer = async {
        may_control_models_http(&st, req.headers())?;
        let query_key = query_api_key(&req);
        let body = read_admin_body(&st, req).await?;
        let (id, body_key) = model_request(&body.bytes)?;
        st.engine
            .add_model(&id, query_key.or(body_key).as_deref())
            .await?;
        Ok(registry_of(&st))
    }
    .await;
    finish(answer, None)
}

#[utoipa::path(post, path = "/model/remove", tag = "models", request_body = ModelRequest,
    responses(
        (status = 200, description = "Unloaded; the registry", body = ModelsDescriptions),
        (status = 404, description = "Not loaded", body = ErrorBody),
        (status = 401, description = "MODEL_CONTROL=explicit without the admin token (Authorization: Bearer)", body = ErrorBody),
        (status = 403, description = "MODEL_CONTROL=none", body = ErrorBody)))]
pub async fn model_remove(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let answer = async {
        may_control_models_http(&st, req.headers())?;
        let body = read_admin_body(&st, req).await?;
        let (id, _) = model_request(&body.bytes)?;
        if !st.engine.remove_model(&id) {
            return Err(ApiError::not_found(format!("Model '{id}' is not loaded")));
        }
        Ok(registry_of(&st))
    }
    .await;
    finish(answer, None)
}

#[utoipa::path(post, path = "/model/clear", tag = "models",
    responses((status = 200, description = "Every model unloaded; the registry", body = ModelsDescriptions),
        (status = 401, description = "MODEL_CONTROL=explicit without the admin token (Authorization: Bearer)", body = ErrorBody),
        (status = 403, description = "MODEL_CONTROL=none", body = ErrorBody)))]
pub async fn model_clear(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let answer = may_control_models_http(&st, &headers).map(|()| {
        st.engine.clear_models();
        registry_of(&st)
    });
    finish(answer, None)
}

/// The page to try models in a browser (no build step, no CDN: every asset is served here).
const INDEX_HTML: &str = include_str!("../../assets/index.html");

/// Redoc, from npm (`redoc` 2.5.4, MIT), rendering `/openapi.json` at `/docs`.
const REDOC_JS: &[u8] = include_bytes!("../../assets/redoc.standalone.js");
const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cvserve API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="openapi.json"></redoc>
<script src="docs/redoc.standalone.js"></script></body></html>"#;

#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "A page to try the models in a browser", body = String, content_type = "text/html")))]
pub async fn page() -> HttpResponse {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

#[utoipa::path(get, path = "/docs", tag = "service",
    responses((status = 200, description = "This document, rendered", body = String, content_type = "text/html")))]
pub async fn docs() -> HttpResponse {
    asset(DOCS_HTML, "text/html; charset=utf-8")
}

/// Redoc's script for `/docs` (not in the document: an asset of the page).
pub async fn redoc_js() -> HttpResponse {
    asset(REDOC_JS, "application/javascript")
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
pub async fn openapi_json() -> HttpResponse {
    asset(super::answer::openapi_document(), "application/json")
}

fn asset(body: impl Into<Bytes>, content_type: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(body.into()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
