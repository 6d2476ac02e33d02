//! Routing and handlers: an HTTP request in, a JSON response out. Inference handlers take an
//! image slot per image, have it decoded, queue a job per image on the model's batcher and
//! await the answers; they never block a reactor thread.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::try_join_all;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::images::decode_image;
use super::request::{legacy_params, ImageSource, InferRequest};
use super::response::{json, ImageSize, InferResponse, ModelsDescriptions, ResolvedModel};
use super::AppState;
use crate::model::manager::LoadedModel;
use crate::model::repository::TaskType;
use crate::pipeline::decode::DecodeOptions;
use crate::pipeline::Job;
use crate::tasks::TaskParams;

type HttpResponse = Response<Full<Bytes>>;

/// Entry point of every request: routes it, maps errors, tags the response with a request id.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> HttpResponse {
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
    let mut resp = match route(&state, req, &request_id).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = resp.status();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(request_id, %method, path, status = status.as_u16(), ms, "request failed");
    } else {
        tracing::debug!(request_id, %method, path, status = status.as_u16(), ms, "request");
    }
    resp
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/info") => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "name": "cvserve",
                "version": env!("CARGO_PKG_VERSION"),
                "uuid": state.uuid,
            }),
        )),
        (&Method::GET, "/healthz") => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "healthy"}),
        )),
        (&Method::GET, "/readiness") => Ok(if state.is_ready() {
            json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "not ready"}),
            )
        }),
        (&Method::GET, "/model/registry") => Ok(registry(state)),
        (&Method::POST, "/model/add") => model_add(state, req).await,
        (&Method::POST, "/model/remove") => model_remove(state, req).await,
        (&Method::POST, "/model/clear") => {
            state.manager.clear();
            Ok(registry(state))
        }
        (&Method::POST, "/infer/object_detection") => {
            infer_json(state, req, TaskType::ObjectDetection, request_id).await
        }
        (&Method::POST, "/infer/instance_segmentation") => {
            infer_json(state, req, TaskType::InstanceSegmentation, request_id).await
        }
        (&Method::POST, "/infer/classification") => {
            infer_json(state, req, TaskType::Classification, request_id).await
        }
        (&Method::POST | &Method::GET, p) if legacy_model_id(p).is_some() => {
            let model_id = legacy_model_id(p).unwrap_or_default();
            infer_legacy(state, req, model_id, request_id).await
        }
        _ => Err(ApiError::not_found(format!("Not Found: {method} {path}"))),
    }
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
        &ModelsDescriptions::of(&state.manager.list()),
    )
}

/// Reads a whole body, refusing more than MAX_BODY_BYTES with 413.
async fn read_body(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes), ApiError> {
    let limit = state.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than MAX_BODY_BYTES ({limit} bytes)"),
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
    let (parts, body) = req.into_parts();
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            }
        })?
        .to_bytes();
    Ok((parts, bytes))
}

#[derive(Deserialize)]
struct ModelRequest {
    model_id: Option<String>,
}

fn model_request(body: &[u8]) -> Result<String, ApiError> {
    let r: ModelRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid request body: {e}")))?;
    r.model_id
        .ok_or_else(|| ApiError::invalid("Invalid request body: field 'model_id' is required"))
}

async fn model_add(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let (_, body) = read_body(state, req).await?;
    let id = model_request(&body)?;
    load_model(state, &id).await?;
    Ok(registry(state))
}

async fn model_remove(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let (_, body) = read_body(state, req).await?;
    let id = model_request(&body)?;
    if !state.manager.remove(&id) {
        return Err(ApiError::not_found(format!("Model '{id}' is not loaded")));
    }
    Ok(registry(state))
}

/// The loaded model, loading it (off the reactor) on first use.
async fn load_model(state: &Arc<AppState>, id: &str) -> Result<Arc<LoadedModel>, ApiError> {
    if let Some(m) = state.manager.get(id) {
        return Ok(m);
    }
    let manager = Arc::clone(&state.manager);
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || manager.get_or_load(&id))
        .await
        .map_err(|_| ApiError::internal("Internal error: model loading panicked"))?
        .map_err(ApiError::from)
}

fn task_params(task: TaskType, req: &InferRequest) -> Result<TaskParams, ApiError> {
    Ok(match task {
        TaskType::ObjectDetection => TaskParams::Detection(req.detection_params()?),
        TaskType::InstanceSegmentation => TaskParams::Segmentation(req.segmentation_params()?),
        TaskType::Classification => TaskParams::Classification(req.classification_params()?),
    })
}

async fn infer_json(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    task: TaskType,
    request_id: &str,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let (_, body) = read_body(state, req).await?;
    let mut request = InferRequest::parse(&body)?;
    drop(body);
    let model_id = request.model_id()?;
    let (images, is_list) = request.take_images()?;
    let inference_id = request.id.clone().unwrap_or_else(|| request_id.to_owned());
    let responses = infer(
        state,
        &model_id,
        Some(task),
        &request,
        images,
        &inference_id,
        started,
    )
    .await?;
    Ok(if is_list {
        json(StatusCode::OK, &responses)
    } else {
        json(StatusCode::OK, &responses[0])
    })
}

async fn infer_legacy(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    model_id: String,
    request_id: &str,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let query = req.uri().query().unwrap_or("").to_owned();
    let (request, opts) = legacy_params(&query)?;
    if opts.format != "json" {
        return Err(ApiError::not_implemented(format!(
            "format={} (server-side visualisation) is not supported by cvserve; use format=json",
            opts.format
        )));
    }
    let source = if let Some(url) = opts.image_url.clone() {
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
        let (_, body) = read_body(state, req).await?;
        if content_type.starts_with("multipart/form-data") {
            ImageSource::Bytes(multipart_file(&content_type, body).await?)
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
    let responses = infer(
        state,
        &model_id,
        None,
        &request,
        vec![source],
        request_id,
        started,
    )
    .await?;
    Ok(json(StatusCode::OK, &responses[0]))
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

/// Runs images through a model and renders one response per image, in order.
async fn infer(
    state: &Arc<AppState>,
    model_id: &str,
    expected: Option<TaskType>,
    request: &InferRequest,
    images: Vec<ImageSource>,
    inference_id: &str,
    started: Instant,
) -> Result<Vec<InferResponse>, ApiError> {
    if request.visualize_predictions == Some(true) {
        return Err(ApiError::not_implemented(
            "visualize_predictions (server-side drawing) is not supported by cvserve",
        ));
    }
    let model = load_model(state, model_id).await?;
    let task = model.meta.task;
    if let Some(expected) = expected {
        if expected != task {
            return Err(ApiError::bad_request(format!(
                "Model '{model_id}' is a {} model; send it to {} instead of {}",
                task.as_str(),
                task.route(),
                expected.route()
            )));
        }
    }
    let params = Arc::new(task_params(task, request)?);
    let opts = DecodeOptions {
        auto_orient: model.meta.auto_orient
            && !state.cfg.disable_preproc_auto_orient
            && !request.disable_preproc_auto_orient.unwrap_or(false),
        max_image_pixels: state.cfg.max_image_pixels,
    };
    let decoded =
        try_join_all(images.into_iter().map(|src| decode_image(state, src, opts))).await?;
    let mut pending = Vec::with_capacity(decoded.len());
    for image in decoded {
        let size = ImageSize {
            width: image.orig_width,
            height: image.orig_height,
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            image,
            params: Arc::clone(&params),
            reply,
            enqueued: Instant::now(),
        };
        model
            .queue
            .try_submit(job)
            .map_err(|(e, _)| ApiError::from(e))?;
        pending.push((answer, size));
    }
    let mut responses = Vec::with_capacity(pending.len());
    for (answer, image) in pending {
        let output = answer.await.map_err(|_| {
            ApiError::internal("Internal error: the pipeline dropped the request")
        })??;
        responses.push(InferResponse {
            inference_id: inference_id.to_owned(),
            time: 0.0,
            image,
            body: output.into(),
            resolved_model: ResolvedModel {
                model_id: model_id.to_owned(),
            },
        });
    }
    let time = started.elapsed().as_secs_f64();
    for r in &mut responses {
        r.time = time;
    }
    Ok(responses)
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
