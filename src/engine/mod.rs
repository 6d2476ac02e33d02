//! The engine: owns the loaded models, the ring and the CPU pools, and runs one inference call
//! from start to end: image bytes and task parameters in, one task output per image (or a
//! typed [`EngineError`]) out. It takes a ring slot per image, has the decode pool decode into
//! it, queues a job per image on the model's batcher and awaits the answers within the
//! request's deadline. The HTTP front end calls it and knows nothing of the pipeline.

pub mod admission;
mod loader;
pub mod models;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::try_join_all;
use tokio::sync::oneshot;

use crate::config::ModelControl;
use crate::geometry::{DisabledSteps, ResizeMode};
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::download::{DownloadError, Downloader};
use crate::model::repository::TaskType;
use crate::pipeline::batcher::SubmitError;
use crate::pipeline::decode::{
    base64_bytes, decode_full, decode_into, DecodeError, DecodeOptions, NeededSize,
};
use crate::pipeline::frame::Frame;
use crate::pipeline::ring::{Ring, SlotHandle};
use crate::pipeline::{Job, PipelineError, Pools};
use crate::stage_cpu::{span, Stage as CpuStage};
use crate::tasks::draw::{self, DrawOptions};
use crate::tasks::{TaskOutput, TaskParams};
use admission::{Activity, Ticket, Tickets};
use models::{Asked, LoadError, LoadedModel, ModelManager};

/// Why an inference call got no answer. `http::error` maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// The route's task is not the model's (HTTP names the routes in its answer).
    #[error("Model '{model}' is a {} model, not a {} model", .task.as_str(), .asked.as_str())]
    WrongTask {
        model: String,
        task: TaskType,
        asked: TaskType,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The request waited for its turn (ring slots of its model) until its deadline.
    #[error("Server overloaded: the request waited for model '{model}' until its deadline (REQUEST_TIMEOUT_S) without its turn coming; retry later")]
    WaitedPastDeadline { model: String },
    /// Refused when its headers were read: the predicted wait did not fit its deadline.
    #[error("Server overloaded: {ahead} requests are ahead and the predicted wait ({:.1} s) does not fit the request's deadline; retry after {} s", .predicted.as_secs_f64(), .retry_after.as_secs())]
    Overloaded {
        ahead: usize,
        predicted: std::time::Duration,
        retry_after: std::time::Duration,
    },
    /// More images than the server can ever hold at once: retrying cannot help.
    #[error("The request has {count} images; this server takes at most {limit} per request ({setting}): send them in several requests")]
    TooManyImages {
        count: usize,
        limit: usize,
        setting: &'static str,
    },
    #[error("{0}")]
    Submit(SubmitError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("Internal error: {0}")]
    Internal(&'static str),
    /// The model is still loading at the request's deadline (the load goes on).
    #[error("Model '{model}' is loading ({:.1} s so far) and was not ready by the request's deadline; retry after {} s", .loading_for.as_secs_f64(), .retry_after.as_secs())]
    Loading {
        model: String,
        loading_for: std::time::Duration,
        retry_after: std::time::Duration,
    },
    /// Requests do not load models (MODEL_CONTROL explicit or none).
    #[error("Model '{model}' is not loaded, and requests do not load models on this server (MODEL_CONTROL={control}){}", if *.control == "explicit" { ": an administrator loads it (POST /model/add with the admin token)" } else { "" })]
    NotLoaded {
        model: String,
        control: &'static str,
    },
}

/// How one loaded model is served: what `/info` and the model registry report.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub id: String,
    pub task: TaskType,
    /// Batch size the network needs every run (`None`: dynamic).
    pub fixed_batch: Option<usize>,
    pub input_height: u32,
    pub input_width: u32,
    /// The execution provider (ONNX Runtime's name).
    pub provider: String,
    /// The back end: `onnxruntime` or `tract`.
    pub backend: &'static str,
    /// Inference instances running now, and the most that may.
    pub instances: usize,
    pub max_instances: usize,
    pub intra_threads: usize,
    pub lone_threads: usize,
    pub max_batch: usize,
}

/// An image as the client sent it.
#[derive(Clone)]
pub enum ImageInput {
    /// Base64 text (a `data:` prefix and line breaks are accepted).
    Base64(String),
    /// The file's bytes.
    Bytes(Bytes),
    /// Raw RGB pixels: nothing to decode.
    Frame(Frame),
}

/// Settings of decoding that hold for every request.
#[derive(Debug, Clone, Copy)]
pub struct DecodeSettings {
    pub max_image_pixels: u64,
    /// MAX_JPEG_SCANS, MAX_DECODE_WORK_PIXELS.
    pub max_jpeg_scans: u64,
    pub max_decode_work: u64,
    /// Decode large JPEGs at reduced DCT scale (DECODE_REDUCED_SCALE).
    pub reduced_scale: bool,
    /// Steps off for every request (DISABLE_PREPROC_AUTO_ORIENT, _STATIC_CROP, _CONTRAST,
    /// _GRAYSCALE).
    pub disabled: DisabledSteps,
    /// Share of the ring one model may hold while others are loaded (RING_MODEL_SHARE).
    pub ring_model_share: f64,
}

/// One image's answer.
#[derive(Debug)]
pub struct ImageOutput {
    pub output: TaskOutput,
    /// The size of the image as the client sent it.
    pub width: u32,
    pub height: u32,
}

/// Everything an inference call needs.
pub struct Engine {
    models: Arc<ModelManager>,
    /// Fetches models missing from the repository from Roboflow's API.
    downloader: Downloader,
    ring: Arc<Ring>,
    pools: Arc<Pools>,
    /// Every inference request in the server (MAX_INFLIGHT_REQUESTS; the idle trimmer).
    activity: Activity,
    decode: DecodeSettings,
}

impl Engine {
    pub fn new(
        models: Arc<ModelManager>,
        downloader: Downloader,
        ring: Arc<Ring>,
        pools: Arc<Pools>,
        activity: Activity,
        decode: DecodeSettings,
    ) -> Self {
        Self {
            models,
            downloader,
            ring,
            pools,
            activity,
            decode,
        }
    }

    /// The model manager (registry, add, remove), for the server's wiring (preloading).
    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    /// How each loaded model is served, sorted by id.
    pub fn served_models(&self) -> Vec<ServedModel> {
        self.models
            .list()
            .iter()
            .map(|m| ServedModel {
                id: m.meta.id.clone(),
                task: m.meta.task,
                fixed_batch: m.runtime.fixed_batch,
                input_height: m.runtime.spec.height,
                input_width: m.runtime.spec.width,
                provider: m.provider.clone(),
                backend: m.backend,
                instances: m.queue.instances(),
                max_instances: m.instances,
                intra_threads: m.intra_threads,
                lone_threads: m.lone_threads,
                max_batch: m.max_batch,
            })
            .collect()
    }

    /// Models that failed to load, with why.
    pub fn failed_models(&self) -> Vec<(String, String)> {
        self.models.failed()
    }

    /// Loads a model (downloading it first when it is not in the repository and an API key
    /// allows), retrying one that failed before; off the reactor.
    pub async fn add_model(&self, id: &str, api_key: Option<&str>) -> Result<(), EngineError> {
        self.fetch(id, api_key).await?;
        let manager = Arc::clone(&self.models);
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || manager.add(&id))
            .await
            .map_err(|_| EngineError::Internal("model loading panicked"))??;
        Ok(())
    }

    /// Unloads a model; `false` when it was not loaded. Its queued work is answered first.
    pub fn remove_model(&self, id: &str) -> bool {
        self.models.remove(id)
    }

    /// Unloads every model.
    pub fn clear_models(&self) {
        self.models.clear()
    }

    /// Brings the gauges that are read rather than counted up to date (before `/metrics`).
    pub fn update_gauges(&self) {
        METRICS.ring_slots_in_use.set(self.ring.in_use() as i64);
        METRICS
            .inflight_requests
            .set(self.activity.in_server() as i64);
        for m in self.models.list() {
            METRICS
                .queue_depth
                .with_label_values(&[&m.meta.id])
                .set(m.queue.depth() as i64);
            METRICS
                .model_instances
                .with_label_values(&[&m.meta.id, &m.provider, m.backend])
                .set(m.queue.instances() as i64);
        }
    }

    /// Every inference request in the server.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// The waiting room: lets a request for `model_id` in if, by its model's measured rate,
    /// it can be answered before `deadline` (see `admission`). A model not loaded yet has no
    /// rate: the request comes in with no ticket.
    pub fn admit(
        &self,
        model_id: &str,
        now: Instant,
        deadline: Instant,
    ) -> Result<Option<Ticket>, EngineError> {
        let Some(model) = self.models.get(model_id) else {
            return Ok(None);
        };
        match model.line.enter(now, deadline) {
            Ok(ticket) => Ok(Some(ticket)),
            Err(refusal) => {
                METRICS.admission_refused.inc();
                METRICS.outcome(model_id, Outcome::Rejected, Stage::Admission);
                Err(EngineError::Overloaded {
                    ahead: refusal.ahead,
                    predicted: refusal.predicted,
                    retry_after: refusal.retry_after,
                })
            }
        }
    }

    /// Takes a place in `model_id`'s line for a call that holds `tickets` (see [`Self::admit`]);
    /// a call already in that line keeps its place.
    pub fn take_place(
        &self,
        tickets: &mut Tickets,
        model_id: &str,
        now: Instant,
        deadline: Instant,
    ) -> Result<(), EngineError> {
        if !tickets.holds(model_id) {
            if let Some(t) = self.admit(model_id, now, deadline)? {
                tickets.keep(model_id, t);
            }
        }
        Ok(())
    }

    /// The ring of decoded images.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Runs CPU work of the front end (parsing a body of megabytes) on the decode pool, off
    /// the async reactor threads.
    pub async fn run_cpu<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.pools.decode.spawn(move || {
            let _ = tx.send(work());
        });
        rx.await
            .map_err(|_| EngineError::Internal("a CPU task of the front end panicked"))
    }

    /// The model, loading it on first use (its load runs on a thread of its own, shared
    /// with every request for it meanwhile); one missing from the repository is downloaded
    /// first when an API key is given. Waits for a load at most until `deadline`: a model
    /// still loading then answers [`EngineError::Loading`] (the load goes on). Under
    /// MODEL_CONTROL explicit or none, a model not loaded is [`EngineError::NotLoaded`].
    pub async fn model(
        &self,
        id: &str,
        api_key: Option<&str>,
        deadline: Instant,
    ) -> Result<Arc<LoadedModel>, EngineError> {
        if let Some(m) = self.models.get(id) {
            return Ok(m);
        }
        let control = self.models.settings().control;
        let pending = if control != ModelControl::Open {
            // Requests never start a load here; one under way (a preload, an
            // administrator's) is waited for as under `open`.
            self.models
                .pending(id)
                .ok_or_else(|| EngineError::NotLoaded {
                    model: id.to_owned(),
                    control: control.name(),
                })?
        } else {
            self.fetch(id, api_key).await?;
            let models = Arc::clone(&self.models);
            let owned = id.to_owned();
            let span = tracing::Span::current();
            let asked =
                tokio::task::spawn_blocking(move || span.in_scope(|| models.ask(&owned, false)))
                    .await
                    .map_err(|_| EngineError::Internal("model loading panicked"))??;
            match asked {
                Asked::Loaded(m) => return Ok(m),
                Asked::Loading(p) => p,
            }
        };
        match pending.wait_until(deadline).await {
            Some(loaded) => Ok(loaded?),
            None => {
                let loading_for = pending.elapsed();
                METRICS.outcome(id, Outcome::Rejected, Stage::Admission);
                Err(EngineError::Loading {
                    model: id.to_owned(),
                    loading_for,
                    // A load takes about as long again as it has so far (at least 1 s).
                    retry_after: Duration::from_secs(loading_for.as_secs().clamp(1, 60)),
                })
            }
        }
    }

    /// Downloads `id` into the repository if it is missing there and a key is given.
    pub async fn fetch(&self, id: &str, api_key: Option<&str>) -> Result<(), EngineError> {
        let root = &self.models.settings().repository;
        if self.downloader.ensure(root, id, api_key).await? {
            tracing::info!(model = id, "model downloaded from Roboflow's API");
        }
        Ok(())
    }

    /// Checks that `model` serves the task of the route it was asked on.
    pub fn check_task(model: &LoadedModel, asked: TaskType) -> Result<(), EngineError> {
        if model.meta.task == asked {
            Ok(())
        } else {
            Err(EngineError::WrongTask {
                model: model.meta.id.clone(),
                task: model.meta.task,
                asked,
            })
        }
    }

    /// Runs `images` through `model`, answering one output per image, in order, or the first
    /// error. Nothing is awaited past `deadline`: the pipeline drops what is still queued.
    pub async fn infer(
        &self,
        model: &LoadedModel,
        images: Vec<ImageInput>,
        params: TaskParams,
        disabled: DisabledSteps,
        deadline: Instant,
        ticket: Option<&mut Ticket>,
    ) -> Result<Vec<ImageOutput>, EngineError> {
        let disabled = disabled.or(self.decode.disabled);
        let steps = Arc::new(model.meta.steps.without(disabled));
        let model_id = model.meta.id.as_str();
        self.check_image_count(model, images.len())?;
        let spec = model.runtime.spec;
        let opts = DecodeOptions {
            auto_orient: model.meta.auto_orient && !disabled.auto_orient,
            max_image_pixels: self.decode.max_image_pixels,
            max_jpeg_scans: self.decode.max_jpeg_scans,
            max_decode_work: self.decode.max_decode_work,
            needed: self.decode.reduced_scale.then_some(NeededSize {
                width: spec.width,
                height: spec.height,
                keep_aspect: matches!(spec.resize, ResizeMode::Letterbox { .. }),
            }),
            deadline: Some(deadline),
        };
        let count = images.len();
        // The waiting room: in arrival order, each request waits for ring slots of its model
        // (its share of them), at most until its deadline.
        let slots = self.acquire_slots(model, count, deadline, ticket).await?;
        let decode_started = Instant::now();
        let decoded = try_join_all(
            images
                .into_iter()
                .zip(slots)
                .map(|(img, slot)| self.decode(model_id, slot, img, opts)),
        )
        .await
        .inspect_err(|e| {
            if matches!(e, EngineError::Decode(DecodeError::DeadlineExceeded)) {
                METRICS.outcome(model_id, Outcome::TimedOut, Stage::Decode);
            }
        })?;
        METRICS
            .decode_seconds
            .with_label_values(&[model_id])
            .observe(decode_started.elapsed().as_secs_f64() / count.max(1) as f64);
        let smaller = decoded
            .iter()
            .filter(|d| d.width < d.orig_width || d.height < d.orig_height)
            .count();
        if smaller > 0 {
            METRICS
                .decode_reduced
                .with_label_values(&[model_id])
                .inc_by(smaller as u64);
        }
        let params = Arc::new(params);
        let mut pending = Vec::with_capacity(decoded.len());
        for image in decoded {
            let (width, height) = (image.orig_width, image.orig_height);
            let (reply, answer) = oneshot::channel();
            let job = Job {
                image,
                params: Arc::clone(&params),
                steps: Arc::clone(&steps),
                reply,
                enqueued: Instant::now(),
                deadline,
            };
            model.queue.try_submit(job).map_err(|(e, _)| {
                METRICS.outcome(model_id, Outcome::Rejected, Stage::Queue);
                EngineError::Submit(e)
            })?;
            pending.push((answer, width, height));
        }
        let mut outputs = Vec::with_capacity(pending.len());
        for (answer, width, height) in pending {
            let output = match tokio::time::timeout_at(deadline.into(), answer).await {
                Ok(answer) => answer
                    .map_err(|_| EngineError::Internal("the pipeline dropped the request"))??,
                // Nobody waits any more: the pipeline drops the job (or discards its late result).
                Err(_) => {
                    METRICS.outcome(model_id, Outcome::TimedOut, Stage::Waiting);
                    return Err(PipelineError::DeadlineExceeded("still in the pipeline").into());
                }
            };
            outputs.push(ImageOutput {
                output,
                width,
                height,
            });
        }
        Ok(outputs)
    }

    /// Refuses a request of `count` images that could never fit, as such (413), not with a
    /// 429 that a client obeying Retry-After would retry forever. Callers that fetch images
    /// (URLs) check before fetching any.
    pub fn check_image_count(&self, model: &LoadedModel, count: usize) -> Result<(), EngineError> {
        for (limit, setting) in self.image_limits(model) {
            if count > limit {
                return Err(EngineError::TooManyImages {
                    count,
                    limit,
                    setting,
                });
            }
        }
        Ok(())
    }

    /// The most images one call to [`Self::infer`] may give `model`.
    pub fn max_images(&self, model: &LoadedModel) -> usize {
        self.image_limits(model)
            .into_iter()
            .map(|(l, _)| l)
            .min()
            .unwrap_or(1)
    }

    fn image_limits(&self, model: &LoadedModel) -> [(usize, &'static str); 3] {
        [
            (self.ring.slots(), "RING_SLOTS"),
            (self.ring_share(), "RING_MODEL_SHARE of RING_SLOTS"),
            (model.queue.capacity(), "MAX_QUEUE_SIZE"),
        ]
    }

    /// The image as the client sent it, decoded whole and oriented (EXIF, unless
    /// DISABLE_PREPROC_AUTO_ORIENT), on the decode pool: what workflows crop and draw on.
    pub async fn picture(
        &self,
        image: ImageInput,
        deadline: Instant,
    ) -> Result<image::RgbImage, EngineError> {
        let decode = self.full_decode(!self.decode.disabled.auto_orient, deadline);
        let (tx, rx) = oneshot::channel();
        self.pools.decode.spawn(move || {
            let result = (Instant::now() < deadline)
                .then_some(())
                .ok_or(DecodeError::DeadlineExceeded)
                .and_then(|()| picture_of(image, &decode, &|| tx.is_closed()));
            let _ = tx.send(result);
        });
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(PipelineError::DeadlineExceeded("while decoding").into()),
            Ok(r) => r
                .map_err(|_| EngineError::Internal("decoding panicked"))?
                .map_err(EngineError::from),
        }
    }

    fn full_decode(&self, auto_orient: bool, deadline: Instant) -> DecodeOptions {
        DecodeOptions {
            auto_orient,
            max_image_pixels: self.decode.max_image_pixels,
            max_jpeg_scans: self.decode.max_jpeg_scans,
            max_decode_work: self.decode.max_decode_work,
            needed: None,
            deadline: Some(deadline),
        }
    }

    /// Draws `output` on the image as the client sent it (decoded again, full size, oriented
    /// like the model saw it) and encodes it as JPEG, on the postprocess pool.
    pub async fn visualize(
        &self,
        model: &LoadedModel,
        image: ImageInput,
        output: &TaskOutput,
        opts: DrawOptions,
        disable_auto_orient: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, EngineError> {
        let auto_orient =
            model.meta.auto_orient && !self.decode.disabled.auto_orient && !disable_auto_orient;
        let decode = self.full_decode(auto_orient, deadline);
        let colors = model.meta.colors.clone();
        let output = output.clone();
        let (tx, rx) = oneshot::channel();
        self.pools.postprocess.spawn(move || {
            // Nothing more is done for a request whose deadline has passed.
            let in_time = || {
                (Instant::now() < deadline)
                    .then_some(())
                    .ok_or(DecodeError::DeadlineExceeded)
            };
            let result = (|| {
                in_time()?;
                let mut img = picture_of(image, &decode, &|| tx.is_closed())?;
                in_time()?;
                draw::draw(&mut img, &output, &colors, opts);
                draw::encode_jpeg(&img).map_err(DecodeError::Undecodable)
            })();
            let _ = tx.send(result);
        });
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(PipelineError::DeadlineExceeded("while drawing").into()),
            Ok(r) => r
                .map_err(|_| EngineError::Internal("drawing panicked"))?
                .map_err(EngineError::from),
        }
    }

    /// Slots one model may hold: all of them while it is the only model loaded, else its
    /// RING_MODEL_SHARE (at least one).
    fn ring_share(&self) -> usize {
        let slots = self.ring.slots();
        if self.models.count() <= 1 {
            return slots;
        }
        ((slots as f64 * self.decode.ring_model_share).ceil() as usize).clamp(1, slots)
    }

    /// Waits, in arrival order among the requests of `model`, until `count` ring slots
    /// within the model's share are free, and takes them. Past `deadline` the request is
    /// refused as overload (it never started: a retry can succeed).
    async fn acquire_slots(
        &self,
        model: &LoadedModel,
        count: usize,
        deadline: Instant,
        mut ticket: Option<&mut Ticket>,
    ) -> Result<Vec<SlotHandle>, EngineError> {
        // The request is whole: from here it waits only for the model.
        if let Some(t) = ticket.as_deref_mut() {
            t.ready();
        }
        let waiting = self.wait_for_slots(model, count, deadline);
        // While it waits, the request's line may learn that it can no longer make it.
        let turned_away = async {
            match ticket.as_deref() {
                Some(t) => t.turned_away().await,
                None => std::future::pending().await,
            }
        };
        let slots = tokio::select! {
            slots = waiting => slots?,
            refusal = turned_away => {
                METRICS.outcome(&model.meta.id, Outcome::Rejected, Stage::WaitingRoom);
                return Err(EngineError::Overloaded {
                    ahead: refusal.ahead,
                    predicted: refusal.predicted,
                    retry_after: refusal.retry_after,
                });
            }
        };
        if let Some(t) = ticket {
            t.start();
        }
        Ok(slots)
    }

    async fn wait_for_slots(
        &self,
        model: &LoadedModel,
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<SlotHandle>, EngineError> {
        let too_late = || {
            METRICS.outcome(&model.meta.id, Outcome::Rejected, Stage::WaitingRoom);
            EngineError::WaitedPastDeadline {
                model: model.meta.id.clone(),
            }
        };
        let _turn = tokio::time::timeout_at(deadline.into(), model.slot_line.lock())
            .await
            .map_err(|_| too_late())?;
        let mut taken = Vec::with_capacity(count);
        loop {
            // Registered before looking, so a slot freed in between wakes this wait.
            let released = self.ring.released().notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let share = self.ring_share();
            if count > share {
                // The share shrank (another model loaded) below what this request needs
                // since it was let in: no retry could be served, so it is not a 429.
                return Err(EngineError::TooManyImages {
                    count,
                    limit: share,
                    setting: "RING_MODEL_SHARE of RING_SLOTS",
                });
            }
            let missing = count - taken.len();
            let room = self.ring.slots().saturating_sub(self.ring.in_use());
            let model_room = share.saturating_sub(model.ring_held.load(Ordering::Acquire));
            if room >= missing && model_room >= missing {
                while taken.len() < count {
                    match self.ring.try_acquire_shared(&model.ring_held, share) {
                        Some(slot) => taken.push(slot),
                        None => break,
                    }
                }
                if taken.len() == count {
                    return Ok(taken);
                }
                // Another model took one first: all or none, so that two models' requests
                // never each hold part of what they need while waiting for the rest.
                taken.clear();
            }
            tokio::time::timeout_at(deadline.into(), released)
                .await
                .map_err(|_| too_late())?;
        }
    }

    /// Decodes the image into its ring slot on the decode pool.
    async fn decode(
        &self,
        model_id: &str,
        slot: SlotHandle,
        image: ImageInput,
        opts: DecodeOptions,
    ) -> Result<crate::pipeline::decode::DecodedImage, EngineError> {
        let (tx, rx) = oneshot::channel();
        let model_id = model_id.to_owned();
        self.pools.decode.spawn(move || {
            // Nobody waits: the client went away, or another image of the request failed.
            let gone = || tx.is_closed();
            let result = match image {
                ImageInput::Base64(text) => span(CpuStage::Base64, || base64_bytes(&text))
                    .and_then(|bytes| {
                        span(CpuStage::Decode, || decode_into(&bytes, slot, &opts, &gone))
                    }),
                ImageInput::Bytes(bytes) => {
                    span(CpuStage::Decode, || decode_into(&bytes, slot, &opts, &gone))
                }
                ImageInput::Frame(frame) => {
                    if opts.deadline.is_some_and(|d| Instant::now() >= d) {
                        Err(DecodeError::DeadlineExceeded)
                    } else {
                        frame.copy_into(slot, opts.max_image_pixels)
                    }
                }
            };
            match &result {
                Err(DecodeError::Cancelled) => {
                    METRICS.outcome(&model_id, Outcome::Cancelled, Stage::Decode);
                }
                Err(DecodeError::DeadlineExceeded) if tx.is_closed() => {
                    METRICS.outcome(&model_id, Outcome::TimedOut, Stage::Decode);
                }
                _ => {}
            }
            let _ = tx.send(result);
        });
        rx.await
            .map_err(|_| EngineError::Internal("the decode stage failed"))?
            .map_err(EngineError::from)
    }
}

/// A raw frame as a picture to draw on (its own copy, within MAX_IMAGE_PIXELS).
/// An image decoded whole (a frame copied out).
fn picture_of(
    image: ImageInput,
    decode: &DecodeOptions,
    gone: &dyn Fn() -> bool,
) -> Result<image::RgbImage, DecodeError> {
    match image {
        ImageInput::Base64(text) => decode_full(&base64_bytes(&text)?, decode, gone),
        ImageInput::Bytes(b) => decode_full(&b, decode, gone),
        ImageInput::Frame(f) => frame_picture(f, decode.max_image_pixels),
    }
}

fn frame_picture(frame: Frame, max_image_pixels: u64) -> Result<image::RgbImage, DecodeError> {
    let (w, h) = (frame.width, frame.height);
    if w as u64 * h as u64 > max_image_pixels {
        return Err(DecodeError::TooManyPixels {
            width: w as u64,
            height: h as u64,
            max: max_image_pixels,
        });
    }
    let mut out = vec![0u8; frame.len()];
    frame.read_into(&mut out)?;
    image::RgbImage::from_raw(w, h, out)
        .ok_or_else(|| DecodeError::Undecodable("the frame has the wrong size.".into()))
}
