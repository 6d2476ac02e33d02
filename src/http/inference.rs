//! The inference routes: Roboflow's `/infer/<task>` (a JSON body) and its legacy
//! `/{dataset_id}/{version_id}` (a multipart file, base64 text or an image URL). Each handler
//! reads its body within the request's deadline and the body budget, has it parsed off the
//! reactor, builds the task parameters, calls the engine and serialises its answers.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::StatusCode;

use super::answer::{InferErrors, RequestId};
use super::body::{discard_body, read_body, Body, Peer};
use super::budget::BodyLease;
use super::call;
use super::call::RequestContext;
use super::error::ApiError;
use super::images::fetch_url;
use super::request::{legacy_params, query_api_key, ImageSource, InferRequest};
use super::response::{json, task_path, ImageSize, InferResponse, ResolvedModel, TaskBody};
use super::state::AppState;
use crate::engine::{Engine, ImageInput};
use crate::model::repository::TaskType;
use crate::tasks::segmentation::SegmentationParams;
use crate::tasks::TaskParams;

type HttpResponse = Response<Full<Bytes>>;

/// One `/infer/<task>` route: its handler, and its OpenAPI entry saying what a 200 holds.
/// The path is the task's (`response::task_path`, checked by a test).
macro_rules! task_route {
    ($name:ident, $path:literal, $task:expr, $ok:literal) => {
        #[utoipa::path(
                    post,
                    path = $path,
                    tag = "inference",
                    request_body = InferRequest,
                    responses((status = 200, description = $ok, body = InferResponse), InferErrors)
                )]
        pub async fn $name(
            State(st): State<Arc<AppState>>,
            Extension(id): Extension<RequestId>,
            req: Request,
        ) -> Response {
            task_route(st, id, req, $task).await
        }
    };
}

task_route!(
    object_detection,
    "/infer/object_detection",
    TaskType::ObjectDetection,
    "One response per image (a list when `image` was a list)"
);
task_route!(
    instance_segmentation,
    "/infer/instance_segmentation",
    TaskType::InstanceSegmentation,
    "Instances with polygon or RLE masks"
);
task_route!(
    classification,
    "/infer/classification",
    TaskType::Classification,
    "Single-label (`predictions`, `top`, `confidence`) or multi-label (`predictions` map, `predicted_classes`)"
);
task_route!(
    keypoints_detection,
    "/infer/keypoints_detection",
    TaskType::KeypointDetection,
    "Detections, each with its `keypoints` (x, y, confidence, class_id, class)"
);

/// The legacy route's metrics label (as before the route table: dashboards match it).
const LEGACY_PATH: &str = "/{dataset}/{version}";

/// `/{dataset}/{version}` (a trailing slash allowed) → `dataset/version`; `None` for
/// `/infer/...`, which is never a model.
fn legacy_model_id(path: &str) -> Option<String> {
    let trimmed = path.strip_prefix('/')?.trim_end_matches('/');
    let mut parts = trimmed.split('/');
    let (a, b) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || a.is_empty() || b.is_empty() || a == "infer" {
        return None;
    }
    Some(format!("{a}/{b}"))
}

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
pub async fn legacy(
    State(st): State<Arc<AppState>>,
    Extension(id): Extension<RequestId>,
    req: Request,
) -> Response {
    let mut ctx = RequestContext::new(id, LEGACY_PATH);
    // The model id as the client wrote it (not percent-decoded: the repository refuses what
    // is not a plain `dataset/version`, with a JSON 400).
    let Some(model_id) = legacy_model_id(req.uri().path()) else {
        // `/infer/<anything else>` is not a model.
        ctx.route = None;
        let e = ApiError::not_found(format!("Not Found: {} {}", req.method(), req.uri().path()));
        return ctx.finish(Err(e));
    };
    let answer = async {
        let (req, now, deadline, _presence) = call::enter_http(&st, req)?;
        // The model is known from the path: let in or refused before the body is read.
        if let Err(e) = ctx.admit(&st, &model_id, now, deadline) {
            discard_body(&st, req);
            return Err(e);
        }
        let answer = infer_legacy(&st, req, model_id, deadline, &mut ctx).await;
        ctx.served(&answer);
        answer
    }
    .await;
    ctx.finish(answer)
}

async fn task_route(st: Arc<AppState>, id: RequestId, req: Request, task: TaskType) -> Response {
    let mut ctx = RequestContext::new(id, task_path(task));
    let answer = async {
        let (req, now, deadline, _presence) = call::enter_http(&st, req)?;
        let answer = infer_json(&st, req, task, now, deadline, &mut ctx).await;
        ctx.served(&answer);
        answer
    }
    .await;
    ctx.finish(answer)
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
    req: Request,
    task: TaskType,
    arrived: Instant,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    ctx.peer = req.extensions().get::<Peer>().map(|p| p.0);
    let limit = state.cfg.max_body_bytes;
    let outer_key = query_api_key(&req);
    // The waiting room decides as soon as the body's first bytes name the model; the rest of
    // a refused body is read and dropped.
    let mut early = |id: &str| ctx.admit(state, id, arrived, deadline);
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
    ctx.hold(_lease);
    // A JSON body of megabytes (base64 images) is parsed on the CPU pool; a small one here
    // when the server is not busy, where it costs less than the two thread hand-offs.
    let mut request = if parse_here(state, bytes.len()) {
        InferRequest::parse(&bytes)?
    } else {
        state
            .engine
            .run_cpu(move || InferRequest::parse(&bytes))
            .await??
    };
    request.api_key = outer_key.or(request.api_key.take());
    let model_id = request.model_id()?;
    // Not named in the first bytes (or named otherwise than parsed): decided now. A place
    // taken in another model's line (a `model_id` key nested elsewhere in the first bytes)
    // is given up first.
    ctx.keep_line_of(&model_id);
    ctx.admit(state, &model_id, arrived, deadline)?;
    let (images, is_list) = request.take_images()?;
    let inference_id = request.id.clone().unwrap_or_else(|| ctx.request_id.clone());
    let call = InferCall {
        model_id: &model_id,
        expected: Some(task),
        inference_id: &inference_id,
        started,
        deadline,
    };
    let (responses, pictures) = infer(state, call, &request, images, ctx).await?;
    encode_answer(state, responses, pictures, is_list).await
}

/// Bodies up to this size (a JPEG of about 190 KB in base64) may be parsed on the HTTP
/// thread: 0.1 to 0.3 ms on the 2-core test box, against two thread hand-offs to the CPU
/// pool and back; larger ones are parsed there.
const INLINE_PARSE_BYTES: usize = 256 * 1024;

/// ... while at most this many requests are in the server (and small answers are encoded
/// there). Under load the HTTP threads keep to reading bodies and sending answers: with 1,000
/// requests at once, parsing and encoding there delayed the answers the admission rate is
/// learnt from (up to 30 % refused instead of 6-12 %).
const INLINE_MAX_IN_SERVER: usize = 4;

/// Whether a body of `len` bytes is parsed on the HTTP thread (else on the CPU pool).
fn parse_here(state: &AppState, len: usize) -> bool {
    len <= INLINE_PARSE_BYTES && state.engine.activity().in_server() <= INLINE_MAX_IN_SERVER
}

/// Answers of at most this many predictions and keypoints are encoded on the HTTP thread.
const INLINE_ANSWER_ITEMS: usize = 600;

/// The answer's JSON (a list when the request sent one), with its pictures. Thousands of
/// masks or a picture make megabytes of JSON: those are encoded on the CPU pool; boxes,
/// keypoints and classes are a few kilobytes, encoded here without a thread hand-off.
async fn encode_answer(
    state: &Arc<AppState>,
    mut responses: Vec<InferResponse>,
    pictures: Vec<Vec<u8>>,
    is_list: bool,
) -> Result<HttpResponse, ApiError> {
    // Items of JSON the answer holds (a segmentation's masks are many points: never here).
    let items = |r: &InferResponse| match &r.body {
        TaskBody::Detection { predictions } => Some(predictions.len()),
        TaskBody::Keypoints { predictions } => {
            Some(predictions.iter().map(|p| 1 + p.keypoints.len()).sum())
        }
        TaskBody::Classification(c) => Some(c.class_count()),
        TaskBody::Segmentation { .. } => None,
    };
    let total: Option<usize> = responses.iter().map(items).sum();
    let inline = pictures.is_empty()
        && total.is_some_and(|n| n <= INLINE_ANSWER_ITEMS)
        && state.engine.activity().in_server() <= INLINE_MAX_IN_SERVER;
    let encode = move || {
        attach_pictures(&mut responses, pictures);
        if is_list {
            json(StatusCode::OK, &responses)
        } else {
            json(StatusCode::OK, &responses[0])
        }
    };
    if inline {
        Ok(encode())
    } else {
        Ok(state.engine.run_cpu(encode).await?)
    }
}

async fn infer_legacy(
    state: &Arc<AppState>,
    req: Request,
    model_id: String,
    deadline: Instant,
    ctx: &mut RequestContext,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    ctx.peer = req.extensions().get::<Peer>().map(|p| p.0);
    let query = req.uri().query().unwrap_or("").to_owned();
    let (mut request, opts) = legacy_params(&query)?;
    request.api_key = query_api_key(&req);
    // The body's lease is held until the answer is ready.
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
        let limit = state.cfg.max_body_bytes;
        let (_, Body { bytes: body, lease }) =
            read_body(state, req, limit, "MAX_BODY_BYTES", deadline, None).await?;
        ctx.hold(lease);
        if content_type.starts_with("multipart/form-data") {
            // The body is in memory: parsing it never waits, so it runs on the CPU pool, or
            // here when small and the server is not busy (cheaper than the hand-off).
            let file = if parse_here(state, body.len()) {
                multipart_file(&content_type, body).await?
            } else {
                state
                    .engine
                    .run_cpu(move || {
                        futures_executor::block_on(multipart_file(&content_type, body))
                    })
                    .await??
            };
            ImageSource::Bytes(file)
        } else if opts.image_type != "base64" {
            return Err(ApiError::bad_request(format!(
                "image_type '{}' is not accepted; send base64 text or a multipart 'file'",
                opts.image_type
            )));
        } else {
            // The body as it arrived (no copy when it is the only reference, as here).
            let text = String::from_utf8(Vec::from(body)).map_err(|_| {
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
    let (responses, mut pictures) = infer(state, call, &request, vec![source], ctx).await?;
    if opts.format == "image" {
        // The picture itself (Roboflow's `format=image`).
        let mut resp = Response::new(Full::new(Bytes::from(pictures.remove(0))));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
        Ok(resp)
    } else {
        encode_answer(state, responses, pictures, false).await
    }
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
pub(super) struct InferCall<'a> {
    pub(super) model_id: &'a str,
    /// The task of the route, or `None` for the legacy route (any task).
    pub(super) expected: Option<TaskType>,
    pub(super) inference_id: &'a str,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
}

/// Runs images through a model and renders one response per image, in order; with
/// `visualize_predictions`, also each image with its predictions drawn (JPEG), drawn on the
/// postprocess pool.
pub(super) async fn infer(
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
        .model(model_id, request.api_key.as_deref(), deadline)
        .await?;
    ctx.model = Some(model.meta.id.clone());
    if let Some(expected) = expected {
        Engine::check_task(&model, expected)?;
    }
    let params = task_params(state, model.meta.task, request)?;
    state.engine.check_image_count(&model, images.len())?;
    // Fetched image bytes hold their share of the body budget until the answer.
    let (inputs, _fetched) = fetch_images(state, images, deadline, ctx).await?;
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
            ctx.ticket(model_id),
        )
        .await?;
    let mut pictures = Vec::new();
    if let (Some(opts), Some(originals)) = (draw, originals) {
        for (image, out) in originals.into_iter().zip(&outputs) {
            let picture = state
                .engine
                .visualize(&model, image, &out.output, opts, disable_orient, deadline)
                .await?;
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

/// Images given by URL fetched at most [`URL_FETCHES_AT_ONCE`] at a time, all within the
/// request's deadline, their bytes counted against MAX_BODY_MEMORY_BYTES as they arrive;
/// the others passed on as they are. Returns the images in order and the fetched bytes'
/// leases.
async fn fetch_images(
    state: &Arc<AppState>,
    images: Vec<ImageSource>,
    deadline: Instant,
    ctx: &RequestContext,
) -> Result<(Vec<ImageInput>, Vec<BodyLease>), ApiError> {
    use futures_util::{StreamExt, TryStreamExt};
    let peer = ctx.peer;
    let request_held = std::sync::atomic::AtomicUsize::new(ctx.held_bytes());
    let request_held = &request_held;
    let fetches = futures_util::stream::iter(images)
        .map(|image| async move {
            Ok::<_, ApiError>(match image {
                ImageSource::Base64(s) => (ImageInput::Base64(s), None),
                ImageSource::Bytes(b) => (ImageInput::Bytes(b), None),
                ImageSource::Frame(f) => (ImageInput::Frame(f), None),
                ImageSource::Url(u) => {
                    let (bytes, lease) =
                        fetch_url(&state.urls, &u, state.body_memory.lease(peer), request_held)
                            .await?;
                    (ImageInput::Bytes(bytes), Some(lease))
                }
            })
        })
        .buffered(URL_FETCHES_AT_ONCE)
        .try_collect::<Vec<_>>();
    let fetched = tokio::time::timeout_at(deadline.into(), fetches)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Deadline exceeded while fetching the image URLs (REQUEST_TIMEOUT_S or X-Request-Timeout-Ms)",
            )
        })??;
    let mut inputs = Vec::with_capacity(fetched.len());
    let mut leases = Vec::new();
    for (input, lease) in fetched {
        inputs.push(input);
        leases.extend(lease);
    }
    Ok((inputs, leases))
}

/// URLs of one request fetched at once.
const URL_FETCHES_AT_ONCE: usize = 4;

/// Puts each picture, base64, in its response's `visualization`.
pub(super) fn attach_pictures(responses: &mut [InferResponse], pictures: Vec<Vec<u8>>) {
    use base64::Engine as _;
    for (r, p) in responses.iter_mut().zip(pictures) {
        r.visualization = Some(base64::engine::general_purpose::STANDARD.encode(p));
    }
}

#[cfg(test)]
mod tests {
    use super::legacy_model_id;

    #[test]
    fn legacy_paths_are_two_segments_and_never_infer() {
        assert_eq!(legacy_model_id("/coco/1").as_deref(), Some("coco/1"));
        assert_eq!(legacy_model_id("/coco/1/").as_deref(), Some("coco/1"));
        assert_eq!(legacy_model_id("/c%6Fco/1").as_deref(), Some("c%6Fco/1"));
        assert_eq!(legacy_model_id("/coco"), None);
        assert_eq!(legacy_model_id("/a/b/c"), None);
        assert_eq!(legacy_model_id("//1"), None);
        assert_eq!(legacy_model_id("/infer/foo"), None);
    }

    /// Each task's route is declared at the path `task_path` names (metrics labels, the
    /// registry's `request_paths` and the wrong-task message quote it).
    #[test]
    fn every_task_route_is_declared_at_its_task_path() {
        use crate::http::response::task_path;
        use crate::model::repository::TaskType;
        use utoipa::Path;
        for (task, path) in [
            (
                TaskType::ObjectDetection,
                super::__path_object_detection::path(),
            ),
            (
                TaskType::InstanceSegmentation,
                super::__path_instance_segmentation::path(),
            ),
            (
                TaskType::Classification,
                super::__path_classification::path(),
            ),
            (
                TaskType::KeypointDetection,
                super::__path_keypoints_detection::path(),
            ),
        ] {
            assert_eq!(task_path(task), path);
        }
    }
}
