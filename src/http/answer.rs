//! What every handler answers with: its result as a response (the error mapped by
//! `ApiError`, the one place errors become statuses), the labels the request metrics need,
//! the request's id, and the error schemas of the OpenAPI document.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Full;
use serde::Serialize;

use super::error::ApiError;

/// The OpenAPI document, as JSON text, made once from the route table (`router`).
pub static DOCUMENT: OnceLock<String> = OnceLock::new();

pub fn openapi_document() -> &'static str {
    DOCUMENT.get().map_or("{}", String::as_str)
}

/// Every error answer: `{"message": "..."}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
}

/// The error answers every inference route may give.
#[derive(utoipa::IntoResponses)]
pub enum InferErrors {
    #[response(
        status = 400,
        description = "Bad image or value, or the wrong task for the route"
    )]
    BadRequest(ErrorBody),
    #[response(status = 404, description = "Unknown model")]
    NotFound(ErrorBody),
    #[response(
        status = 408,
        description = "The body did not arrive within the deadline"
    )]
    Timeout(ErrorBody),
    #[response(
        status = 413,
        description = "Body or image list larger than the server ever takes"
    )]
    TooLarge(ErrorBody),
    #[response(
        status = 422,
        description = "Body or parameter does not match the schema, or the masks would exceed MAX_MASK_WORK_PIXELS"
    )]
    Invalid(ErrorBody),
    #[response(
        status = 429,
        description = "Overloaded; retry after `Retry-After` seconds"
    )]
    Overloaded(ErrorBody),
    #[response(status = 500, description = "The model failed")]
    Failed(ErrorBody),
    #[response(status = 503, description = "Shutting down")]
    ShuttingDown(ErrorBody),
    #[response(status = 504, description = "Deadline exceeded")]
    DeadlineExceeded(ErrorBody),
}

/// The request's id (`X-Request-Id`, or a new UUID), for handlers that quote it.
#[derive(Clone)]
pub struct RequestId(pub String);

/// Set by an inference handler on its response: the labels of the request metrics.
#[derive(Clone)]
pub struct RouteLabels {
    /// The model, once known to be loaded (bounded label values).
    pub model: Option<String>,
    /// The route's path.
    pub route: &'static str,
}

/// A handler's answer as a response, its error mapped (the one place errors become
/// statuses is `ApiError`), labelled for the request metrics when `labels` is given.
pub fn finish(
    answer: Result<Response<Full<Bytes>>, ApiError>,
    labels: Option<RouteLabels>,
) -> Response {
    let mut resp = match answer {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    if let Some(labels) = labels {
        resp.extensions_mut().insert(labels);
    }
    resp
}
