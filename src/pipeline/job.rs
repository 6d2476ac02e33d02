//! The types the pipeline's stages share, in the one file every stage imports (the batcher,
//! the instances and postprocessing import it, not each other): what a model's threads know
//! of it, a job's state as it walks the stages, and the messages between the batcher and its
//! instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::cores::CoreBudget;
use super::JobResult;
use super::PipelineError;
use crate::geometry::{Geometry, InputSpec};
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::backend::{Backend, BatchBuffer};
use crate::tasks::{OutputDecoder, TaskParams};

/// What the pipeline threads of a model share: how to feed it and read it.
pub struct ModelRuntime {
    pub id: String,
    pub spec: InputSpec,
    pub decoder: OutputDecoder,
    pub class_names: Vec<String>,
    /// Batch size the network needs every run (`None`: any size up to `max_batch`).
    pub fixed_batch: Option<usize>,
}

/// Creates one more inference session of a model, warmed up (it runs on a thread of its own).
pub type InstanceFactory = Arc<dyn Fn() -> Result<Box<dyn Backend>, String> + Send + Sync>;

/// How a model's instances come and go, and the cores they run on.
#[derive(Clone)]
pub struct InstancePolicy {
    /// Most instances (INSTANCES_PER_MODEL).
    pub max: usize,
    /// Makes more instances; `None`: the instances the model started with are all it gets.
    pub factory: Option<InstanceFactory>,
    /// An instance beyond the last one stops after this long without a batch.
    pub idle_timeout: Duration,
    /// The cores every model's inference runs share.
    pub cores: Arc<CoreBudget>,
    /// Cores one run of an instance takes (its session's intra-op threads).
    pub intra_threads: usize,
    /// Cores one run of the wide session takes.
    pub lone_threads: usize,
}

/// The wide session of a model, shared by its instances for lone batches.
pub type LoneBackend = Arc<Mutex<Box<dyn Backend>>>;

/// A preprocessed batch on its way to an instance.
pub struct Batch {
    pub tensor: BatchBuffer,
    pub jobs: Vec<PreparedJob>,
    /// Sent while every other instance was idle and nothing waited: it may run on the
    /// model's wide session.
    pub lone: bool,
}

/// What an instance tells the batcher.
pub enum Done {
    /// It finished a batch: free again, and here is the tensor back.
    Free(BatchBuffer),
    /// It stopped after its idle timeout (its session is freed).
    Retired,
}

/// One image in a batch: its row of the tensor and what became of it.
pub struct PreparedJob {
    pub params: Arc<TaskParams>,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub state: JobState,
}

/// Where a job of a batch stands. Only a job that still has someone to answer holds the
/// reply, so a job is answered at most once and a settled job cannot be run by mistake.
pub enum JobState {
    /// Its image is being preprocessed into its row.
    Waiting(oneshot::Sender<JobResult>),
    /// In its row, to be run and answered.
    Ready {
        geometry: Geometry,
        reply: oneshot::Sender<JobResult>,
    },
    /// Preprocessing failed; answered with why. Its row is ignored.
    Failed,
    /// Its deadline passed before inference; answered 504. Its row is ignored.
    PastDeadline,
    /// Its client went away; nobody to answer. Its row is ignored.
    Cancelled,
}

impl PreparedJob {
    /// A job whose image is being preprocessed.
    pub fn waiting(
        params: Arc<TaskParams>,
        enqueued: Instant,
        deadline: Instant,
        reply: oneshot::Sender<JobResult>,
    ) -> Self {
        Self {
            params,
            enqueued,
            deadline,
            state: JobState::Waiting(reply),
        }
    }

    /// Whether the job is to be run.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, JobState::Ready { .. })
    }

    /// Preprocessing is over: ready with its geometry, or failed and answered with why.
    pub fn preprocessed(&mut self, model: &str, result: Result<Geometry, String>) {
        if !matches!(self.state, JobState::Waiting(_)) {
            return;
        }
        match result {
            Ok(geometry) => {
                let JobState::Waiting(reply) = std::mem::replace(&mut self.state, JobState::Failed)
                else {
                    unreachable!("checked above")
                };
                self.state = JobState::Ready { geometry, reply };
            }
            Err(e) => {
                METRICS.outcome(model, Outcome::Failed, Stage::Preprocess);
                self.fail(PipelineError::Preprocess(e), JobState::Failed);
            }
        }
    }

    /// Just before inference: a ready job whose deadline has passed is answered 504, one
    /// whose client went away is cancelled; either way it is not run.
    pub fn settle_before_inference(&mut self, model: &str, now: Instant) {
        let JobState::Ready { reply, .. } = &self.state else {
            return;
        };
        if now >= self.deadline {
            METRICS.outcome(model, Outcome::TimedOut, Stage::BeforeInference);
            self.fail(
                PipelineError::DeadlineExceeded("expired before inference"),
                JobState::PastDeadline,
            );
        } else if reply.is_closed() {
            METRICS.outcome(model, Outcome::Cancelled, Stage::BeforeInference);
            self.state = JobState::Cancelled;
        }
    }

    /// Answers a job still waiting for its answer with `error`, leaving it in `state`.
    pub fn fail(&mut self, error: PipelineError, state: JobState) {
        match std::mem::replace(&mut self.state, state) {
            JobState::Waiting(reply) | JobState::Ready { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}
