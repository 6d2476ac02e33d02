//! The dynamic batcher of one model: a dedicated batching thread and a dedicated inference
//! thread. Jobs (decoded images in ring slots) arrive on a bounded queue; the batching thread
//! groups them, up to `max_batch`, and has the preprocess pool resize each one straight into
//! its row of the batch tensor *as it arrives*, while the inference thread runs the previous
//! batch. A batch goes out when it is full, or when the inference thread is free and its first
//! job has waited `max_queue_delay` (Triton's semantics). Two tensors alternate between the
//! threads, so memory is fixed. Jobs whose client went away are skipped before preprocessing
//! and before inference.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use super::preprocess::{preprocess_into, Geometry, InputSpec};
use super::{postprocess, Job, JobResult, PipelineError, Pools};
use crate::metrics::METRICS;
use crate::model::backend::Backend;
use crate::tasks::{OutputDecoder, TaskParams};

/// Batching limits of one model.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_queue_delay: Duration,
    pub max_queue_size: usize,
}

/// What the pipeline threads of a model share: how to feed it and read it.
pub struct ModelRuntime {
    pub id: String,
    pub spec: InputSpec,
    pub decoder: OutputDecoder,
    pub class_names: Vec<String>,
    /// Batch size the network needs every run (`None`: any size up to `max_batch`).
    pub fixed_batch: Option<usize>,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq)]
pub enum SubmitError {
    /// The model's queue is full: the caller answers 429 at once.
    QueueFull,
    /// The model is being unloaded.
    Closed,
}

/// The sending side of a model's queue. Dropping the last clone stops the model's threads
/// once the queued work is done.
pub struct BatchQueue {
    tx: Sender<Job>,
    depth: Arc<AtomicUsize>,
}

impl BatchQueue {
    /// Queues a job, or gives it back at once when the queue is full (never blocks).
    pub fn try_submit(&self, job: Job) -> Result<(), (SubmitError, Job)> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(job)) => Err((SubmitError::QueueFull, job)),
            Err(TrySendError::Disconnected(job)) => Err((SubmitError::Closed, job)),
        }
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

/// A job whose image is in the batch tensor (its ring slot is free again).
pub struct PreparedJob {
    pub params: Arc<TaskParams>,
    pub reply: oneshot::Sender<JobResult>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// `Err` when preprocessing failed; its tensor row is then ignored.
    pub geometry: Result<Geometry, String>,
}

struct Batch {
    tensor: Vec<f32>,
    jobs: Vec<PreparedJob>,
}

/// Starts the batching and inference threads of one model.
pub fn start(
    runtime: Arc<ModelRuntime>,
    backend: Box<dyn Backend>,
    cfg: BatcherConfig,
    pools: Arc<Pools>,
) -> std::io::Result<BatchQueue> {
    let max_batch = match runtime.fixed_batch {
        Some(fixed) => cfg.max_batch.min(fixed).max(1),
        None => cfg.max_batch.max(1),
    };
    let rows = runtime.fixed_batch.unwrap_or(max_batch).max(max_batch);
    let (tx, rx) = bounded::<Job>(cfg.max_queue_size);
    let (batch_tx, batch_rx) = bounded::<Batch>(1);
    let (free_tx, free_rx) = bounded::<Vec<f32>>(2);
    let (idle_tx, idle_rx) = bounded::<()>(1);
    for _ in 0..2 {
        let _ = free_tx.send(vec![0f32; rows * runtime.spec.image_len()]);
    }
    let busy = Arc::new(AtomicBool::new(false));
    let depth = Arc::new(AtomicUsize::new(0));

    let batcher = Batcher {
        runtime: Arc::clone(&runtime),
        cfg: BatcherConfig { max_batch, ..cfg },
        pools: Arc::clone(&pools),
        rx,
        batch_tx,
        free_rx,
        idle_rx,
        busy: Arc::clone(&busy),
        depth: Arc::clone(&depth),
    };
    std::thread::Builder::new()
        .name(format!("batcher-{}", runtime.id))
        .spawn(move || batcher.run())?;

    let inference = Inference {
        runtime: Arc::clone(&runtime),
        backend,
        pools,
        batch_rx,
        free_tx,
        idle_tx,
        busy,
    };
    std::thread::Builder::new()
        .name(format!("infer-{}", runtime.id))
        .spawn(move || inference.run())?;

    Ok(BatchQueue { tx, depth })
}

struct Batcher {
    runtime: Arc<ModelRuntime>,
    cfg: BatcherConfig,
    pools: Arc<Pools>,
    rx: Receiver<Job>,
    batch_tx: Sender<Batch>,
    free_rx: Receiver<Vec<f32>>,
    idle_rx: Receiver<()>,
    busy: Arc<AtomicBool>,
    depth: Arc<AtomicUsize>,
}

impl Batcher {
    fn run(self) {
        let image_len = self.runtime.spec.image_len();
        let mut spare: Option<Vec<f32>> = None;
        loop {
            // Block (no polling) until a job arrives.
            let Ok(first) = self.rx.recv() else { return };
            self.depth.fetch_sub(1, Ordering::Relaxed);
            let mut tensor = match spare.take() {
                Some(t) => t,
                None => match self.free_rx.recv() {
                    Ok(t) => t,
                    Err(_) => return,
                },
            };
            let deadline = first.enqueued + self.cfg.max_queue_delay;
            let mut jobs: Vec<PreparedJob> = Vec::with_capacity(self.cfg.max_batch);
            let mut geometries: Vec<Option<Result<Geometry, String>>> =
                (0..self.cfg.max_batch).map(|_| None).collect();
            let mut closed = false;
            {
                let mut rows = tensor.chunks_mut(image_len);
                let mut results = geometries.iter_mut();
                let spec = self.runtime.spec;
                self.pools.preprocess.in_place_scope(|scope| {
                    let model = self.runtime.id.as_str();
                    let mut admit = |job: Job, jobs: &mut Vec<PreparedJob>| {
                        let now = Instant::now();
                        if now >= job.deadline {
                            METRICS.outcome(model, "timed_out", "before_preprocess");
                            let _ = job
                                .reply
                                .send(Err(PipelineError::DeadlineExceeded("expired in the queue")));
                            return;
                        }
                        if job.reply.is_closed() {
                            // The client went away: skipped before preprocessing.
                            METRICS.outcome(model, "cancelled", "before_preprocess");
                            return;
                        }
                        METRICS
                            .queue_wait_seconds
                            .with_label_values(&[model])
                            .observe((now - job.enqueued).as_secs_f64());
                        let (Some(row), Some(result)) = (rows.next(), results.next()) else {
                            return;
                        };
                        let Job {
                            image,
                            params,
                            reply,
                            enqueued,
                            deadline,
                        } = job;
                        jobs.push(PreparedJob {
                            params,
                            reply,
                            enqueued,
                            deadline,
                            geometry: Err(String::new()),
                        });
                        let histogram = METRICS.preprocess_seconds.with_label_values(&[model]);
                        scope.spawn(move |_| {
                            let started = Instant::now();
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                preprocess_into(
                                    image.pixels(),
                                    image.width,
                                    image.height,
                                    image.orig_width,
                                    image.orig_height,
                                    &spec,
                                    row,
                                )
                            }));
                            *result =
                                Some(r.unwrap_or_else(|_| {
                                    Err("the preprocess stage panicked".into())
                                }));
                            drop(image); // the ring slot is free as soon as its pixels are in the tensor
                            histogram.observe(started.elapsed().as_secs_f64());
                        });
                    };
                    admit(first, &mut jobs);
                    while jobs.len() < self.cfg.max_batch {
                        let busy = self.busy.load(Ordering::Acquire);
                        let now = Instant::now();
                        if !busy && now >= deadline {
                            break;
                        }
                        // While inference is busy keep growing the batch; once it is free,
                        // wait only until the first job's delay runs out.
                        let timeout = if busy {
                            Duration::from_secs(60)
                        } else {
                            deadline - now
                        };
                        select! {
                            recv(self.rx) -> msg => match msg {
                                Ok(job) => {
                                    self.depth.fetch_sub(1, Ordering::Relaxed);
                                    admit(job, &mut jobs);
                                }
                                Err(_) => { closed = true; break; }
                            },
                            recv(self.idle_rx) -> _ => {}
                            default(timeout) => {}
                        }
                    }
                });
            }
            for (job, geo) in jobs.iter_mut().zip(geometries) {
                job.geometry = geo.unwrap_or_else(|| Err("not preprocessed".into()));
            }
            if jobs.is_empty() {
                spare = Some(tensor);
            } else {
                self.busy.store(true, Ordering::Release);
                if self.batch_tx.send(Batch { tensor, jobs }).is_err() {
                    return;
                }
            }
            if closed {
                return;
            }
        }
    }
}

struct Inference {
    runtime: Arc<ModelRuntime>,
    backend: Box<dyn Backend>,
    pools: Arc<Pools>,
    batch_rx: Receiver<Batch>,
    free_tx: Sender<Vec<f32>>,
    idle_tx: Sender<()>,
    busy: Arc<AtomicBool>,
}

impl Inference {
    fn run(mut self) {
        let spec = self.runtime.spec;
        while let Ok(Batch { tensor, jobs }) = self.batch_rx.recv() {
            let mut jobs: Vec<PreparedJob> = jobs;
            // Preprocessing failures are answered now; their rows are ignored.
            for job in jobs.iter_mut() {
                if let Err(e) = &job.geometry {
                    let (tx, _) = oneshot::channel();
                    let reply = std::mem::replace(&mut job.reply, tx);
                    METRICS.outcome(&self.runtime.id, "failed", "preprocess");
                    let _ = reply.send(Err(PipelineError::Preprocess(e.clone())));
                }
            }
            // Jobs whose client left, or whose deadline passed, are answered (or dropped) now.
            let model = self.runtime.id.as_str();
            let now = Instant::now();
            for job in jobs.iter_mut().filter(|j| j.geometry.is_ok()) {
                if now >= job.deadline {
                    METRICS.outcome(model, "timed_out", "before_inference");
                    let (tx, _) = oneshot::channel();
                    let reply = std::mem::replace(&mut job.reply, tx);
                    let _ = reply.send(Err(PipelineError::DeadlineExceeded(
                        "expired before inference",
                    )));
                    job.geometry = Err("deadline exceeded".into());
                } else if job.reply.is_closed() {
                    METRICS.outcome(model, "cancelled", "before_inference");
                    job.geometry = Err("client gone".into());
                }
            }
            let live = jobs.iter().any(|j| j.geometry.is_ok());
            let result = if live {
                let rows = self.runtime.fixed_batch.unwrap_or(jobs.len());
                let backend = &mut self.backend;
                let started = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    backend.run(&tensor, rows, spec.height, spec.width)
                }))
                .unwrap_or_else(|_| {
                    Err(crate::model::backend::BackendError(
                        "the inference stage panicked".into(),
                    ))
                });
                METRICS
                    .inference_seconds
                    .with_label_values(&[model])
                    .observe(started.elapsed().as_secs_f64());
                METRICS
                    .batch_size
                    .with_label_values(&[model])
                    .observe(rows as f64);
                Some(r)
            } else {
                None // every client went away: skipped before inference
            };
            let _ = self.free_tx.send(tensor);
            self.busy.store(false, Ordering::Release);
            let _ = self.idle_tx.try_send(());
            match result {
                None => {}
                Some(Ok(outputs)) => {
                    postprocess::dispatch(&self.pools, &self.runtime, outputs, jobs)
                }
                Some(Err(e)) => {
                    tracing::error!(model = %self.runtime.id, error = %e, "batch failed");
                    for job in jobs.into_iter().filter(|j| j.geometry.is_ok()) {
                        METRICS.outcome(model, "failed", "inference");
                        let _ = job.reply.send(Err(PipelineError::Backend(e.0.clone())));
                    }
                }
            }
        }
    }
}
