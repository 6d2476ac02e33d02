//! The one route table: every route's path, method, handler and OpenAPI entry are declared
//! once, here (axum's router, with `utoipa-axum` collecting each handler's `#[utoipa::path]`
//! into `/openapi.json`). Around it, [`handle`] gives every request its id, its access-log
//! line and its metrics, and connections over MAX_CONNECTIONS get the health routes only.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body as AxumBody;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use tower::ServiceExt;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::answer::{finish, ErrorBody, RequestId, RouteLabels};
use super::error::ApiError;
use super::request::{OneOrMany, RequestImage};
use super::state::{AppState, ConnectionClass};
use super::{admin, inference, v2, workflows};
use crate::metrics::METRICS;

/// The routes a connection over MAX_CONNECTIONS may still ask for (cheap, no body).
fn health_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(admin::healthz))
        .routes(routes!(admin::readiness))
        .routes(routes!(admin::info))
        .routes(routes!(v2::live))
        .routes(routes!(v2::ready))
}

/// Every route. Static paths win over `/{dataset_id}/{version_id}` (so `/model/add` is not a
/// model), whatever the order here.
fn all_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(inference::object_detection))
        .routes(routes!(inference::instance_segmentation))
        .routes(routes!(inference::classification))
        .routes(routes!(inference::keypoints_detection))
        .routes(routes!(inference::legacy))
        // Roboflow's clients send the legacy route's URL-image form as a GET.
        .route("/{dataset_id}/{version_id}", get(inference::legacy))
        .route(
            "/{dataset_id}/{version_id}/",
            post(inference::legacy).get(inference::legacy),
        )
        .merge(health_routes())
        .routes(routes!(admin::metrics))
        .routes(routes!(admin::registry))
        .routes(routes!(admin::model_add))
        .routes(routes!(admin::model_remove))
        .routes(routes!(admin::model_clear))
        .routes(routes!(admin::page))
        .routes(routes!(admin::docs))
        .route("/docs/redoc.standalone.js", get(admin::redoc_js))
        .routes(routes!(admin::openapi_json))
        // Roboflow's Workflows.
        .routes(routes!(workflows::run_inline))
        .route("/infer/workflows", post(workflows::run_inline_legacy))
        .routes(routes!(workflows::run_saved))
        .route(
            "/infer/workflows/{workspace_name}/{workflow_id}",
            post(workflows::run_saved_legacy),
        )
        .routes(routes!(workflows::validate))
        .routes(routes!(workflows::describe_interface))
        .routes(routes!(workflows::blocks_describe))
        .route(
            "/workflows/blocks/describe",
            post(workflows::blocks_describe_post),
        )
        .routes(routes!(workflows::definition_schema))
        .routes(routes!(workflows::engine_versions))
        // The Open Inference Protocol (KServe v2), with Triton's extensions.
        .routes(routes!(v2::server_metadata))
        .routes(routes!(v2::model_metadata))
        .routes(routes!(v2::model_version_metadata))
        .routes(routes!(v2::model_ready))
        .routes(routes!(v2::model_version_ready))
        .routes(routes!(v2::model_config))
        .routes(routes!(v2::model_version_config))
        .routes(routes!(v2::model_infer))
        .routes(routes!(v2::model_version_infer))
        .routes(routes!(v2::repository_index))
        .routes(routes!(v2::repository_load))
        .routes(routes!(v2::repository_unload))
        .routes(routes!(v2::shm_status))
        .routes(routes!(v2::shm_region_status))
        .routes(routes!(v2::shm_register))
        .routes(routes!(v2::shm_unregister_all))
        .routes(routes!(v2::shm_unregister))
}

/// The routers a connection is served by: every route, and the health routes alone.
#[derive(Clone)]
pub struct Routers {
    full: Router,
    health: Router,
}

impl Routers {
    pub fn new(state: Arc<AppState>) -> Self {
        let (full, doc) = all_routes().split_for_parts();
        let _ = super::answer::DOCUMENT.set(document_text(doc));
        let full = full
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(Arc::clone(&state));
        let (health, _) = health_routes().split_for_parts();
        let health = health
            .fallback(health_only)
            .method_not_allowed_fallback(health_only)
            .with_state(state);
        Self { full, health }
    }
}

fn document_text(mut doc: utoipa::openapi::OpenApi) -> String {
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!(r#"{{"error": "{e}"}}"#))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cvserve",
        description = "A drop-in, single-process replacement for Roboflow Inference's HTTP server: object detection, instance segmentation, classification and keypoint detection of Roboflow-trained ONNX models."
    ),
    components(schemas(
        OneOrMany,
        RequestImage,
        ErrorBody,
        admin::ModelRequest,
        v2::RegisterRequest
    ))
)]
struct ApiDoc;

async fn not_found(method: Method, uri: hyper::Uri) -> Response {
    refuse(StatusCode::NOT_FOUND, "Not Found", method, uri)
}

async fn method_not_allowed(method: Method, uri: hyper::Uri) -> Response {
    refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        method,
        uri,
    )
}

/// A JSON error naming the request (axum's own answers are plain text).
fn refuse(status: StatusCode, what: &str, method: Method, uri: hyper::Uri) -> Response {
    let message = format!("{what}: {method} {}", uri.path());
    finish(Err(ApiError::new(status, message)), None)
}

async fn health_only() -> Response {
    finish(
        Err(ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many connections (MAX_CONNECTIONS): this connection may only ask for health; retry shortly",
            )
        }),
        None,
    )
}

/// Entry point of every request: routes it, maps errors, tags the response with a request id.
pub async fn handle(
    state: Arc<AppState>,
    routers: Routers,
    mut req: hyper::Request<hyper::body::Incoming>,
    class: ConnectionClass,
) -> Response {
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
    let span = tracing::info_span!("request", %request_id);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    if let Some(coding) = unsupported_transfer_coding(req.headers()) {
        // The body's framing is hyper's (chunked), but what it frames is compressed in a way
        // this server does not undo: refused, and the connection closed (its body unread).
        let mut resp = finish(
            Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "Transfer-Encoding '{coding}' is not supported; send the body plain or chunked"
                ),
            )),
            None,
        );
        resp.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let router = match class {
        ConnectionClass::Full => routers.full,
        ConnectionClass::Reserved => routers.health,
    };
    let routed = router
        .oneshot(req.map(AxumBody::new))
        .instrument(span)
        .await;
    let mut resp = match routed {
        Ok(r) => r,
        Err(e) => match e {},
    };
    if resp.status() == StatusCode::TOO_MANY_REQUESTS && state.cfg.overload_status == 503 {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(RouteLabels { model, route }) = resp.extensions_mut().remove::<RouteLabels>() {
        let model = model.as_deref().unwrap_or("none");
        METRICS
            .requests_total
            .with_label_values(&[model, route, status.as_str()])
            .inc();
        METRICS
            .request_seconds
            .with_label_values(&[model, route])
            .observe(seconds);
    }
    let request_id = request_id.as_str();
    let ms = seconds * 1000.0;
    // A 503 from /readiness while models load is the expected answer, not a failure.
    if status.is_server_error() && path != "/readiness" {
        tracing::warn!(request_id, %method, path, status = status.as_u16(), ms, "request failed");
    } else {
        tracing::debug!(request_id, %method, path, status = status.as_u16(), ms, "request");
    }
    resp
}

/// The first transfer coding of a request other than `chunked` (which hyper undoes), if any.
fn unsupported_transfer_coding(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all(hyper::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .find(|c| c != "chunked")
}
