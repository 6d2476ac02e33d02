//! The staged pipeline a request walks after the engine hands it in:
//! decode (into a ring slot) → batcher (per model; preprocess into the batch tensor) →
//! inference instances (per model, one thread and session each) → postprocess pool → the
//! waiting handler. Between stages travel slot handles, tensors and replies, never copies of
//! pixels. Knows tensors and jobs; not HTTP, not model files.

pub mod batcher;
pub mod cores;
pub mod decode;
pub mod frame;
pub mod instance;
pub mod job;
pub mod postprocess;
pub mod preprocess;
pub mod ring;
pub mod threads;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::geometry::Steps;
use crate::tasks::{TaskOutput, TaskParams};
use decode::DecodedImage;

/// A failure inside the pipeline, after the request was accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PipelineError {
    #[error("Inference failed: {0}")]
    Backend(String),
    #[error("Preprocessing failed: {0}")]
    Preprocess(String),
    #[error("Postprocessing failed: {0}")]
    Postprocess(String),
    /// The answer would cost more than a work budget allows: the request's fault (422).
    #[error("The request is refused: {0}")]
    OverBudget(String),
    #[error("Internal error: the {0} stage panicked; the server goes on serving")]
    Panicked(&'static str),
    #[error("Deadline exceeded: the request could not be served within its deadline ({0}); it was dropped before inference")]
    DeadlineExceeded(&'static str),
}

/// What a request gets back from the pipeline.
pub type JobResult = Result<TaskOutput, PipelineError>;

/// One image of one request, queued for a model.
pub struct Job {
    pub image: DecodedImage,
    pub params: Arc<TaskParams>,
    /// The model's static-crop, contrast and grayscale steps this request keeps.
    pub steps: Arc<Steps>,
    pub reply: oneshot::Sender<JobResult>,
    pub enqueued: Instant,
    /// After this instant nobody waits for the answer: the job is dropped, not run.
    pub deadline: Instant,
}

/// The thread pools of the CPU stages, sized from the core count.
pub struct Pools {
    pub decode: rayon::ThreadPool,
    pub preprocess: rayon::ThreadPool,
    pub postprocess: rayon::ThreadPool,
}

impl Pools {
    /// Builds the three pools with named threads.
    pub fn new(decode: usize, preprocess: usize, postprocess: usize) -> anyhow::Result<Self> {
        let pool = |n: usize, name: &'static str| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .thread_name(move |i| format!("{name}-{i}"))
                // A panic in a task fails that task's request (its reply is dropped); it must
                // not abort the process, which is rayon's default.
                .panic_handler(move |_| tracing::error!(pool = name, "a task panicked"))
                .build()
        };
        Ok(Self {
            decode: pool(decode, "decode")?,
            preprocess: pool(preprocess, "preprocess")?,
            postprocess: pool(postprocess, "postprocess")?,
        })
    }
}
