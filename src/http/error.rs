//! The one place where errors become HTTP statuses. Every error body is Roboflow's
//! `{"message": "..."}`; overload answers carry `Retry-After`.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::StatusCode;

use crate::engine::models::LoadError;
use crate::engine::EngineError;
use crate::model::download::DownloadError;
use crate::model::repository::RepositoryError;
use crate::pipeline::batcher::SubmitError;
use crate::pipeline::decode::DecodeError;
use crate::pipeline::PipelineError;

/// Longest error message sent back.
const MAX_MESSAGE_BYTES: usize = 512;

/// An error answer: status, message, and for overload how long to wait.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400: the request is understood but its content is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 422: the body does not match the request schema (FastAPI's status in Roboflow).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 429 with `Retry-After`: the server is full right now; try again shortly.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            retry_after_s: Some(1),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 501: a documented Roboflow feature cvserve does not offer.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, message)
    }
}

impl IntoResponse for ApiError {
    /// The HTTP response: `{"message": ...}`, with `Retry-After` for overload.
    fn into_response(mut self) -> Response {
        // Messages quote what the client sent (a model id, a field): never echo megabytes.
        if self.message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            self.message.truncate(end);
            self.message.push_str("… (truncated)");
        }
        let body = serde_json::json!({ "message": self.message }).to_string();
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

fn decode_error(e: DecodeError) -> ApiError {
    match e {
        DecodeError::DeadlineExceeded => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        DecodeError::TooManyScans { .. }
        | DecodeError::FrameTooLarge { .. }
        | DecodeError::TooMuchWork { .. }
        | DecodeError::TooMuchMemory { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        // Nobody reads this answer (the client went away); 499 as nginx logs it.
        DecodeError::Cancelled => ApiError::new(
            StatusCode::from_u16(499).expect("499 is a valid status"),
            e.to_string(),
        ),
        _ => ApiError::bad_request(e.to_string()),
    }
}

fn pipeline_error(e: PipelineError) -> ApiError {
    match e {
        PipelineError::DeadlineExceeded(_) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        PipelineError::OverBudget(_) => ApiError::invalid(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull => ApiError::overloaded(e.to_string()),
        SubmitError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Load(e) => load_error(e),
            EngineError::Download(e) => download_error(e),
            EngineError::WrongTask { model, task, asked } => ApiError::bad_request(format!(
                "Model '{model}' is a {} model; send it to {} instead of {}",
                task.as_str(),
                super::response::task_path(task),
                super::response::task_path(asked)
            )),
            EngineError::Decode(e) => decode_error(e),
            EngineError::WaitedPastDeadline { .. } => ApiError::overloaded(e.to_string()),
            EngineError::Overloaded { retry_after, .. } => ApiError {
                retry_after_s: Some(retry_after.as_secs().clamp(1, u32::MAX as u64) as u32),
                ..ApiError::overloaded(e.to_string())
            },
            EngineError::TooManyImages { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            EngineError::Submit(e) => submit_error(e),
            EngineError::Pipeline(e) => pipeline_error(e),
            EngineError::Internal(_) => ApiError::internal(e.to_string()),
            // Roboflow blocks until the model is loaded; here the request's deadline bounds
            // the wait (docs/differences.md).
            EngineError::Loading { retry_after, .. } => ApiError {
                retry_after_s: Some(retry_after.as_secs().clamp(1, u32::MAX as u64) as u32),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            EngineError::NotLoaded { .. } => ApiError::not_found(e.to_string()),
        }
    }
}

fn download_error(e: DownloadError) -> ApiError {
    let status = match e {
        DownloadError::NotAuthorized => StatusCode::UNAUTHORIZED,
        DownloadError::Forbidden => StatusCode::FORBIDDEN,
        DownloadError::NotFound => StatusCode::NOT_FOUND,
        DownloadError::Connection(_) => StatusCode::SERVICE_UNAVAILABLE,
        DownloadError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        DownloadError::TooLarge { .. } | DownloadError::Malformed(_) => StatusCode::BAD_GATEWAY,
        DownloadError::Storage(_) => StatusCode::INSUFFICIENT_STORAGE,
    };
    ApiError::new(status, e.to_string())
}

fn load_error(e: LoadError) -> ApiError {
    match e {
        LoadError::Repository(RepositoryError::InvalidId(_)) => {
            ApiError::bad_request(e.to_string())
        }
        LoadError::Repository(RepositoryError::NotFound(_)) => ApiError::not_found(e.to_string()),
        LoadError::Repository(RepositoryError::Broken { .. }) | LoadError::Failed { .. } => {
            ApiError::internal(e.to_string())
        }
        // Not a retry's matter (no Retry-After): an administrator unloads a model first.
        LoadError::NoRoom { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_carries_retry_after_and_a_json_message() {
        let resp = ApiError::from(EngineError::Submit(SubmitError::QueueFull)).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn messages_quoting_huge_input_are_truncated() {
        let e = ApiError::bad_request(format!("Invalid model id '{}'", "é".repeat(100_000)));
        let resp = e.into_response();
        let body = resp.into_body();
        let bytes = futures_executor::block_on(http_body_util::BodyExt::collect(body))
            .unwrap()
            .to_bytes();
        assert!(bytes.len() < 700, "{} bytes", bytes.len());
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v["message"].as_str().unwrap().ends_with("(truncated)"));
    }

    #[test]
    fn client_errors_are_4xx_and_server_errors_5xx() {
        assert_eq!(
            ApiError::from(EngineError::Decode(DecodeError::Empty)).status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::from(EngineError::Load(LoadError::Repository(
                RepositoryError::NotFound("a/1".into())
            )))
            .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::from(EngineError::Load(LoadError::Repository(
                RepositoryError::InvalidId("..".into())
            )))
            .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::from(EngineError::Pipeline(PipelineError::Backend("x".into()))).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
