//! Inference instances (Triton's instance group): each is a thread with its own back end (an
//! ONNX Runtime session). Every instance of a model takes batches from the same channel, so a
//! batch goes to whichever is free; the instance answers the jobs that can no longer be
//! served, takes its cores from the budget every model shares, runs the batch, gives the
//! tensor back to the batcher (which counts it free again) and hands the outputs to the
//! postprocess pool. An instance that is not the model's last stops after its idle timeout.

use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::job::{Batch, Done, InstancePolicy, JobState, LoneBackend, ModelRuntime, PreparedJob};
use super::{postprocess, PipelineError, Pools};
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::backend::{Backend, BackendError, BatchBuffer, BatchShape};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// One inference instance of a model, before its thread starts.
pub(super) struct Instance {
    /// The instance's number (the metrics' `instance` label).
    pub index: usize,
    pub runtime: Arc<ModelRuntime>,
    pub backend: Box<dyn Backend>,
    pub lone: Option<LoneBackend>,
    pub pools: Arc<Pools>,
    pub work: Receiver<Batch>,
    pub done: Sender<Done>,
    /// Instances of the model running now (this one included).
    pub live: Arc<AtomicUsize>,
    pub policy: InstancePolicy,
}

impl Instance {
    /// Starts the instance's thread.
    pub(super) fn spawn(self) -> std::io::Result<()> {
        super::threads::spawn(
            format!("infer-{}-{}", self.runtime.id, self.index),
            move || {
                lower_priority();
                self.run()
            },
        )?;
        Ok(())
    }
}

/// How much less CPU priority an inference instance's thread has than the front end and the
/// other stages (a nice value; it is the thread that computes for single-threaded sessions,
/// the default on CPU; the intra-op threads of wider sessions are ONNX Runtime's and keep
/// their priority): under overload the HTTP threads still read requests and send
/// answers, refusals included, at once, and decode and postprocessing keep flowing; when
/// they are idle inference still gets every core.
pub const INFERENCE_NICE: i32 = 5;

/// Lowers the calling thread's priority by [`INFERENCE_NICE`].
fn lower_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, now + INFERENCE_NICE);
    }
}

impl Instance {
    /// The next batch; `None` when the model is unloaded or this instance stops: idle for the
    /// policy's timeout while another instance of the model still runs. The last instance
    /// waits without a timer.
    fn next_batch(&self) -> Option<Batch> {
        loop {
            if self.live.load(Ordering::Acquire) <= 1 {
                return self.work.recv().ok();
            }
            match self.work.recv_timeout(self.policy.idle_timeout) {
                Ok(batch) => return Some(batch),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    let last = self
                        .live
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n > 1).then(|| n - 1)
                        })
                        .is_err();
                    if !last {
                        let model = self.runtime.id.as_str();
                        METRICS.instances_stopped.with_label_values(&[model]).inc();
                        tracing::info!(
                            model,
                            instance = self.index,
                            "inference instance stopped: idle (INSTANCE_IDLE_TIMEOUT_S)"
                        );
                        let _ = self.done.send(Done::Retired);
                        return None;
                    }
                }
            }
        }
    }

    fn run(mut self) {
        while let Some(Batch { tensor, jobs, lone }) = self.next_batch() {
            // The tensor stays here while the batch is served: a panic anywhere in serving
            // it still gives it back (the batcher would otherwise wait for it for ever), and
            // the batch's jobs, dropped unanswered, answer their clients with a 500.
            let mut held = Some(tensor);
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.serve(&mut held, jobs, lone)
            }));
            if let Err(panic) = &served {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(model = %self.runtime.id, panic = %why, "an inference instance panicked serving a batch; its requests are answered with 500");
            }
            if let Some(tensor) = held.take() {
                if self.done.send(Done::Free(tensor)).is_err() {
                    return;
                }
            }
            if matches!(served, Ok(false)) {
                return;
            }
        }
    }

    /// Serves one batch: settles the jobs nobody waits for, runs the rest, gives the tensor
    /// back (taking it out of `held`) and hands the outputs on. `false` when the batcher is
    /// gone.
    fn serve(
        &mut self,
        held: &mut Option<BatchBuffer>,
        mut jobs: Vec<PreparedJob>,
        lone: bool,
    ) -> bool {
        let spec = self.runtime.spec;
        let label = self.index.to_string();
        let model = self.runtime.id.as_str();
        // Jobs whose client left, or whose deadline passed, are settled (answered or
        // dropped) now; their rows are ignored.
        let now = Instant::now();
        for job in jobs.iter_mut() {
            job.settle_before_inference(model, now);
        }
        let result = if jobs.iter().any(|j| j.is_ready()) {
            let tensor = held
                .as_mut()
                .expect("the batch's tensor is held until given back");
            let rows = self.runtime.fixed_batch.unwrap_or(jobs.len());
            // A lone batch takes the wide session, unless another instance still has it.
            let mut wide = match (&self.lone, lone) {
                (Some(l), true) => l.try_lock(),
                _ => None,
            };
            // Its cores first: the wide session only when they are all idle.
            let cores = &self.policy.cores;
            let wide_cores = wide
                .is_some()
                .then(|| cores.try_acquire(self.policy.lone_threads))
                .flatten();
            if wide_cores.is_none() {
                wide = None;
            }
            let _cores = wide_cores.unwrap_or_else(|| cores.acquire(self.policy.intra_threads));
            let backend: &mut Box<dyn Backend> = match wide.as_deref_mut() {
                Some(w) => w,
                None => &mut self.backend,
            };
            let started = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backend.run(tensor, BatchShape::of(rows, &spec))
            }))
            .unwrap_or_else(|_| Err(BackendError("the inference stage panicked".into())));
            METRICS
                .inference_seconds
                .with_label_values(&[model])
                .observe(started.elapsed().as_secs_f64());
            METRICS
                .batch_size
                .with_label_values(&[model])
                .observe(rows as f64);
            METRICS
                .instance_batches_total
                .with_label_values(&[model, &label])
                .inc();
            Some(r)
        } else {
            None // every client went away: skipped before inference
        };
        // Free again: the batcher may hand this instance the next batch at once.
        if let Some(tensor) = held.take() {
            if self.done.send(Done::Free(tensor)).is_err() {
                return false;
            }
        }
        match result {
            None => {}
            Some(Ok(outputs)) => postprocess::dispatch(&self.pools, &self.runtime, outputs, jobs),
            Some(Err(e)) => {
                tracing::error!(model, error = %e, "batch failed");
                for job in jobs.iter_mut().filter(|j| j.is_ready()) {
                    METRICS.outcome(model, Outcome::Failed, Stage::Inference);
                    job.fail(PipelineError::Backend(e.0.clone()), JobState::Failed);
                }
            }
        }
        true
    }
}
