//! The dynamic batcher of one model: one batching thread in front of the model's inference
//! instances (Triton's instance group, see `instance.rs`). Jobs (decoded images in ring slots)
//! arrive on a bounded queue; the batching thread groups them, up to `max_batch`, and has the
//! preprocess pool resize each one straight into its row of the batch tensor *as it arrives*,
//! while the instances run earlier batches.
//!
//! Triton's semantics: a batch goes out when it is full, or when an instance is free and its
//! first job has waited `max_queue_delay`; while every instance is busy the batch keeps filling,
//! never beyond `max_batch`. The count of free instances belongs to the batching thread alone:
//! it goes down when a batch is handed over and up when an instance gives its tensor back, so
//! it cannot drift. There is one tensor per instance plus the one filling.
//!
//! Instances on demand: a model starts with one instance. When a batch is ready, every
//! instance is busy and a core of the shared budget is free, the batching thread has one more
//! session created and warmed up on a thread of its own (off the request path), up to
//! `InstancePolicy::max`; an instance beyond the first that gets no batch for
//! `InstancePolicy::idle_timeout` stops and frees its session. The last one never stops, and
//! waits without a timer: an idle model wakes no thread. The instance group lives in `group.rs`,
//! the filling of batches here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, unbounded, Receiver, Sender, TrySendError};

use super::job::{Batch, Done, LoneBackend, PreparedJob};
pub use super::job::{InstanceFactory, InstancePolicy, ModelRuntime};
use super::preprocess::preprocess_into;
use super::{Job, PipelineError, Pools};
use crate::geometry::Geometry;
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::backend::{Backend, BatchBuffer};

mod group;

/// Batching limits of one model.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_queue_delay: Duration,
    pub max_queue_size: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The model's queue is full: the caller answers 429 at once.
    #[error("Server overloaded: the model's queue is full (MAX_QUEUE_SIZE); retry shortly")]
    QueueFull,
    /// The model is being unloaded.
    #[error("The model was unloaded while the request waited")]
    Closed,
}

/// The sending side of a model's queue. Dropping the last clone stops the model's threads
/// once the queued work is done.
pub struct BatchQueue {
    tx: Sender<Job>,
    /// Instances running now.
    live: Arc<AtomicUsize>,
}

impl BatchQueue {
    /// Queues a job, or gives it back at once when the queue is full (never blocks).
    pub fn try_submit(&self, job: Job) -> Result<(), (SubmitError, Job)> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) => (SubmitError::QueueFull, job),
            TrySendError::Disconnected(job) => (SubmitError::Closed, job),
        })
    }

    /// Most jobs the queue holds.
    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }

    /// Jobs waiting in the queue (the channel's own count: exact, never negative).
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Inference instances running now.
    pub fn instances(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

/// Largest batch the batcher forms for a model: `max_batch`, capped by a fixed batch axis.
pub fn effective_max_batch(max_batch: usize, fixed_batch: Option<usize>) -> usize {
    match fixed_batch {
        Some(fixed) => max_batch.min(fixed).max(1),
        None => max_batch.max(1),
    }
}

/// Starts the batching thread of one model and one inference thread per back end given
/// (instance); more start on demand (see [`InstancePolicy`]). `lone`: a wider session the
/// instances share for lone batches (sent while every other instance is idle and nothing
/// waits), so a single request gets every core.
pub fn start(
    runtime: Arc<ModelRuntime>,
    backends: Vec<Box<dyn Backend>>,
    lone: Option<Box<dyn Backend>>,
    cfg: BatcherConfig,
    pools: Arc<Pools>,
    policy: InstancePolicy,
) -> std::io::Result<BatchQueue> {
    let max_instances = policy.max.max(backends.len()).max(1);
    let max_batch = effective_max_batch(cfg.max_batch, runtime.fixed_batch);
    let rows = runtime.fixed_batch.unwrap_or(max_batch).max(max_batch);
    let (tx, rx) = bounded::<Job>(cfg.max_queue_size);
    // A batch is only sent when an instance is free, so `max_instances` places never fill up.
    let (work_tx, work_rx) = bounded::<Batch>(max_instances);
    let (done_tx, done_rx) = unbounded::<Done>();
    let (grown_tx, grown_rx) = unbounded();
    let live = Arc::new(AtomicUsize::new(0));
    let mut batcher = Batcher {
        runtime: Arc::clone(&runtime),
        cfg: BatcherConfig { max_batch, ..cfg },
        pools,
        rx,
        work_tx,
        work_rx,
        done_tx,
        done_rx,
        grown_tx,
        grown_rx,
        free_instances: 0,
        instances: 0,
        tensors: Vec::new(),
        rows,
        lone: lone.map(|b| Arc::new(parking_lot::Mutex::new(b))),
        live: Arc::clone(&live),
        policy: InstancePolicy {
            max: max_instances,
            ..policy
        },
        next_index: 0,
        starting: false,
        grow_failed_at: None,
    };
    // The tensor that fills while every instance runs, in the memory the back end reads
    // fastest (pinned for a GPU), like each instance's own.
    let filling = backends
        .first()
        .map(|b| b.alloc_batch(rows * runtime.spec.image_len()));
    for backend in backends {
        batcher.add_instance(backend)?;
    }
    batcher.tensors.extend(filling);
    crate::pipeline::threads::spawn(format!("batcher-{}", runtime.id), move || batcher.run())?;
    Ok(BatchQueue { tx, live })
}

/// The batching thread's state; it alone owns the free-instance count and the idle tensors.
struct Batcher {
    runtime: Arc<ModelRuntime>,
    cfg: BatcherConfig,
    pools: Arc<Pools>,
    rx: Receiver<Job>,
    work_tx: Sender<Batch>,
    /// Handed to each new instance.
    work_rx: Receiver<Batch>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Sessions created on demand arrive here.
    grown_tx: Sender<Result<Box<dyn Backend>, String>>,
    grown_rx: Receiver<Result<Box<dyn Backend>, String>>,
    /// Instances not running a batch, as this thread counts them. It may dip below zero for a
    /// moment: an instance that stops is counted out when its word arrives, possibly after a
    /// batch was handed to the channel that another instance then takes.
    free_instances: isize,
    instances: usize,
    tensors: Vec<BatchBuffer>,
    /// Rows of each batch tensor.
    rows: usize,
    lone: Option<LoneBackend>,
    live: Arc<AtomicUsize>,
    policy: InstancePolicy,
    next_index: usize,
    /// A session is being created.
    starting: bool,
    /// When creating one last failed.
    grow_failed_at: Option<Instant>,
}

/// What ended the filling of a batch besides it being full.
enum Fill {
    Continue,
    /// The queue is closed (model unloaded) or every instance is gone: stop after this batch.
    Closed,
}

impl Batcher {
    fn run(mut self) {
        loop {
            // Idle: block (no polling) until a job arrives, counting instances that finish.
            let first = loop {
                select! {
                    recv(self.rx) -> msg => match msg {
                        Ok(job) => break job,
                        Err(_) => return,
                    },
                    recv(self.done_rx) -> msg => match msg {
                        Ok(d) => self.instance_done(d),
                        Err(_) => return,
                    },
                    recv(self.grown_rx) -> msg => if let Ok(b) = msg { self.grown(b) },
                }
            };
            let mut tensor = loop {
                if let Some(t) = self.tensors.pop() {
                    break t;
                }
                select! {
                    recv(self.done_rx) -> msg => match msg {
                        Ok(d) => self.instance_done(d),
                        Err(_) => return,
                    },
                    recv(self.grown_rx) -> msg => if let Ok(b) = msg { self.grown(b) },
                }
            };
            let (jobs, fill) = self.fill(first, &mut tensor);
            if jobs.is_empty() {
                self.tensors.push(tensor);
            } else {
                // Full (or closing) with every instance busy: hand over to the first to finish.
                if !self.wait_for_instance() {
                    return;
                }
                // Alone: every other instance idle and nothing waiting.
                let lone = self.free_instances == self.instances as isize && self.rx.is_empty();
                self.free_instances -= 1;
                if self.work_tx.send(Batch { tensor, jobs, lone }).is_err() {
                    return;
                }
            }
            if let Fill::Closed = fill {
                return;
            }
        }
    }
    /// Fills one batch, starting with `first`: each admitted job is preprocessed into its row
    /// of `tensor` on the preprocess pool while more jobs are awaited.
    fn fill(&mut self, first: Job, tensor: &mut [f32]) -> (Vec<PreparedJob>, Fill) {
        let image_len = self.runtime.spec.image_len();
        let spec = self.runtime.spec;
        let max_batch = self.cfg.max_batch;
        let deadline = first.enqueued + self.cfg.max_queue_delay;
        let mut jobs: Vec<PreparedJob> = Vec::with_capacity(max_batch);
        let mut geometries: Vec<Option<Result<Geometry, String>>> =
            (0..max_batch).map(|_| None).collect();
        let mut fill = Fill::Continue;
        let pools = Arc::clone(&self.pools);
        let runtime = Arc::clone(&self.runtime);
        {
            let mut rows = tensor.chunks_mut(image_len);
            let mut results = geometries.iter_mut();
            pools.preprocess.in_place_scope(|scope| {
                let model = runtime.id.as_str();
                let mut admit = |job: Job, jobs: &mut Vec<PreparedJob>| {
                    let now = Instant::now();
                    if now >= job.deadline {
                        METRICS.outcome(model, Outcome::TimedOut, Stage::BeforePreprocess);
                        let _ = job
                            .reply
                            .send(Err(PipelineError::DeadlineExceeded("expired in the queue")));
                        return;
                    }
                    if job.reply.is_closed() {
                        // The client went away: skipped before preprocessing.
                        METRICS.outcome(model, Outcome::Cancelled, Stage::BeforePreprocess);
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
                        steps,
                        reply,
                        enqueued,
                        deadline,
                    } = job;
                    jobs.push(PreparedJob::waiting(params, enqueued, deadline, reply));
                    let histogram = METRICS.preprocess_seconds.with_label_values(&[model]);
                    scope.spawn(move |_| {
                        let started = Instant::now();
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            crate::stage_cpu::span(crate::stage_cpu::Stage::Preprocess, || {
                                preprocess_into(
                                    image.pixels(),
                                    image.width,
                                    image.height,
                                    image.orig_width,
                                    image.orig_height,
                                    &steps,
                                    &spec,
                                    row,
                                )
                            })
                        }));
                        *result =
                            Some(r.unwrap_or_else(|_| Err("the preprocess stage panicked".into())));
                        drop(image); // the ring slot is free as soon as its pixels are in the tensor
                        histogram.observe(started.elapsed().as_secs_f64());
                    });
                };
                admit(first, &mut jobs);
                while jobs.len() < max_batch {
                    let now = Instant::now();
                    if self.free_instances > 0 && now >= deadline {
                        break;
                    }
                    // An instance is free: wait only until the first job's delay runs out.
                    // Every instance busy: keep growing the batch until one is free.
                    if self.free_instances <= 0 {
                        self.maybe_grow();
                    }
                    let timer = if self.free_instances > 0 {
                        after(deadline - now)
                    } else {
                        never()
                    };
                    select! {
                        recv(self.rx) -> msg => match msg {
                            Ok(job) => admit(job, &mut jobs),
                            Err(_) => { fill = Fill::Closed; break; }
                        },
                        recv(self.done_rx) -> msg => match msg {
                            Ok(d) => self.instance_done(d),
                            Err(_) => { fill = Fill::Closed; break; }
                        },
                        recv(self.grown_rx) -> msg => if let Ok(b) = msg { self.grown(b) },
                        recv(timer) -> _ => {}
                    }
                }
            });
        }
        for (job, geo) in jobs.iter_mut().zip(geometries) {
            job.preprocessed(
                &runtime.id,
                geo.unwrap_or_else(|| Err("not preprocessed".into())),
            );
        }
        (jobs, fill)
    }
}

#[cfg(test)]
mod tests;
