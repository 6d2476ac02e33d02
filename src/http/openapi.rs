//! The OpenAPI 3 document of every route (`GET /openapi.json`), generated with `utoipa` from
//! the request and response types the handlers use, and rendered at `GET /docs` by Redoc
//! (served by cvserve itself: no CDN). The functions below carry the route descriptions
//! only; the handlers are in `routes`.

#![allow(dead_code)]

use serde::Serialize;
use utoipa::OpenApi;

use super::request::{InferRequest, OneOrMany, RequestImage};
use super::response::{InferResponse, ModelsDescriptions};

/// Every error answer: `{"message": "..."}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
}

/// `{"model_id": "dataset/version"}` for `/model/add` and `/model/remove`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelRequest {
    #[schema(example = "coco/1")]
    pub model_id: String,
}

/// The error answers every inference route may give.
#[derive(utoipa::IntoResponses)]
enum InferErrors {
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

#[utoipa::path(
    post,
    path = "/infer/object_detection",
    tag = "inference",
    request_body = InferRequest,
    responses(
        (status = 200, description = "One response per image (a list when `image` was a list)", body = InferResponse),
        InferErrors
    )
)]
fn object_detection() {}

#[utoipa::path(
    post,
    path = "/infer/instance_segmentation",
    tag = "inference",
    request_body = InferRequest,
    responses(
        (status = 200, description = "Instances with polygon or RLE masks", body = InferResponse),
        InferErrors
    )
)]
fn instance_segmentation() {}

#[utoipa::path(
    post,
    path = "/infer/classification",
    tag = "inference",
    request_body = InferRequest,
    responses(
        (status = 200, description = "Single-label (`predictions`, `top`, `confidence`) or multi-label (`predictions` map, `predicted_classes`)", body = InferResponse),
        InferErrors
    )
)]
fn classification() {}

#[utoipa::path(
    post,
    path = "/infer/keypoints_detection",
    tag = "inference",
    request_body = InferRequest,
    responses(
        (status = 200, description = "Detections, each with its `keypoints` (x, y, confidence, class_id, class)", body = InferResponse),
        InferErrors
    )
)]
fn keypoints_detection() {}

#[utoipa::path(
    post,
    path = "/{dataset_id}/{version_id}",
    tag = "inference",
    description = "Roboflow's legacy route: the image as a multipart `file`, or base64 text as the body (`image_type=base64`), or `image=<url>`.",
    params(
        ("dataset_id" = String, Path, description = "Dataset of the model", example = "coco"),
        ("version_id" = String, Path, description = "Version of the model", example = "1"),
        ("confidence" = Option<f64>, Query, description = "Lowest score; 1 or more is a percentage (default 40)"),
        ("overlap" = Option<f64>, Query, description = "NMS IoU; 1 or more is a percentage (default 30)"),
        ("max_detections" = Option<i64>, Query, description = "Default 300"),
        ("class_agnostic_nms" = Option<bool>, Query, description = "Default false"),
        ("format" = Option<String>, Query, description = "`json` (default), `image` (the drawn JPEG) or `image_and_json` (JSON with `visualization`)"),
        ("labels" = Option<bool>, Query, description = "Label the drawn boxes (default false)"),
        ("stroke" = Option<i64>, Query, description = "Line width of the drawing (default 1)"),
        ("image" = Option<String>, Query, description = "Image URL (ALLOW_URL_INPUT)"),
        ("image_type" = Option<String>, Query, description = "`base64` (default) for a text body"),
        ("mask_decode_mode" = Option<String>, Query, description = "`accurate` (default), `fast`, `tradeoff`"),
        ("tradeoff_factor" = Option<f64>, Query, description = "Default 0"),
        ("response_mask_format" = Option<String>, Query, description = "`polygon` (default) or `rle`"),
        ("disable_preproc_auto_orient" = Option<bool>, Query, description = "Default false"),
        ("disable_preproc_static_crop" = Option<bool>, Query, description = "Default false"),
        ("disable_preproc_contrast" = Option<bool>, Query, description = "Default false"),
        ("disable_preproc_grayscale" = Option<bool>, Query, description = "Default false"),
        ("keypoint_confidence" = Option<f64>, Query, description = "Keypoint models: lowest keypoint score reported (default 0)"),
    ),
    request_body(content = String, description = "multipart/form-data with a `file` part, or base64 text", content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The predictions (JSON), or with `format=image` the drawn picture", body = InferResponse, content_type = "application/json"),
        InferErrors
    )
)]
fn legacy() {}

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "Alive; lists `models_failed_to_load` with why", body = serde_json::Value)))]
fn healthz() {}

#[utoipa::path(get, path = "/readiness", tag = "service",
    responses(
        (status = 200, description = "Every preloaded model is loaded and warmed up", body = serde_json::Value),
        (status = 503, description = "Loading, shutting down, or a preloaded model failed to load (`reason`, `models_failed_to_load`)", body = serde_json::Value)))]
fn readiness() {}

#[utoipa::path(get, path = "/info", tag = "service",
    responses((status = 200, description = "`name`, `version`, `uuid`, and how each model is served", body = serde_json::Value)))]
fn info() {}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
fn metrics() {}

#[utoipa::path(get, path = "/model/registry", tag = "models",
    responses((status = 200, description = "The loaded models", body = ModelsDescriptions)))]
fn registry() {}

#[utoipa::path(post, path = "/model/add", tag = "models", request_body = ModelRequest,
    responses(
        (status = 200, description = "Loaded; the registry", body = ModelsDescriptions),
        (status = 404, description = "Not in the model cache", body = ErrorBody),
        (status = 413, description = "Body over ADMIN_MAX_BODY_BYTES", body = ErrorBody),
        (status = 500, description = "The model failed to load", body = ErrorBody)))]
fn model_add() {}

#[utoipa::path(post, path = "/model/remove", tag = "models", request_body = ModelRequest,
    responses(
        (status = 200, description = "Unloaded; the registry", body = ModelsDescriptions),
        (status = 404, description = "Not loaded", body = ErrorBody)))]
fn model_remove() {}

#[utoipa::path(post, path = "/model/clear", tag = "models",
    responses((status = 200, description = "Every model unloaded; the registry", body = ModelsDescriptions)))]
fn model_clear() {}

#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "A page to try the models in a browser", body = String, content_type = "text/html")))]
fn page() {}

#[utoipa::path(get, path = "/docs", tag = "service",
    responses((status = 200, description = "This document, rendered", body = String, content_type = "text/html")))]
fn docs() {}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
fn openapi_json() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cvserve",
        description = "A drop-in, single-process replacement for Roboflow Inference's HTTP server: object detection, instance segmentation, classification and keypoint detection of Roboflow-trained ONNX models."
    ),
    paths(
        object_detection,
        instance_segmentation,
        classification,
        keypoints_detection,
        legacy,
        healthz,
        readiness,
        info,
        metrics,
        registry,
        model_add,
        model_remove,
        model_clear,
        page,
        docs,
        openapi_json
    ),
    components(schemas(OneOrMany, RequestImage, ErrorBody, ModelRequest))
)]
struct ApiDoc;

/// The document, as JSON text.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!(r#"{{"error": "{e}"}}"#))
}
