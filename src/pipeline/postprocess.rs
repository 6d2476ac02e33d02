//! Postprocess: a batch's outputs in, each request's predictions out. Every image of the
//! batch is decoded as its own task on the postprocess pool (they share the outputs through
//! an `Arc`, no copy), and its answer goes straight to the waiting handler. A panic in a
//! decoder fails only that image's request.

use std::sync::Arc;

use super::job::{JobState, ModelRuntime, PreparedJob};
use super::{PipelineError, Pools};
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::backend::OutputTensor;
use crate::tasks::PostprocessError;

/// Hands every job of a finished batch to the postprocess pool.
pub fn dispatch(
    pools: &Pools,
    runtime: &Arc<ModelRuntime>,
    outputs: Vec<OutputTensor>,
    jobs: Vec<PreparedJob>,
) {
    let outputs = Arc::new(outputs);
    for (i, job) in jobs.into_iter().enumerate() {
        let JobState::Ready { geometry, reply } = job.state else {
            continue; // settled before inference: answered, or nobody to answer
        };
        if reply.is_closed() {
            count_dropped(&runtime.id, job.deadline, Stage::AfterInference);
            continue;
        }
        let (params, deadline) = (job.params, job.deadline);
        let outputs = Arc::clone(&outputs);
        let runtime = Arc::clone(runtime);
        pools.postprocess.spawn(move || {
            let started = std::time::Instant::now();
            // Past the deadline the handler has given up, and a client that hung up has
            // dropped its end: either way the costly steps stop.
            let cancelled = || reply.is_closed() || std::time::Instant::now() >= deadline;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::stage_cpu::span(crate::stage_cpu::Stage::Postprocess, || {
                    runtime.decoder.decode(
                        &outputs,
                        i,
                        (runtime.spec.height as usize, runtime.spec.width as usize),
                        &runtime.class_names,
                        &geometry,
                        &params,
                        &cancelled,
                    )
                })
            }));
            let answer = match result {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(PostprocessError::Model(e))) => Err(PipelineError::Postprocess(e)),
                Ok(Err(PostprocessError::OverBudget(e))) => Err(PipelineError::OverBudget(e)),
                Ok(Err(PostprocessError::Cancelled)) => {
                    count_dropped(&runtime.id, deadline, Stage::Postprocess);
                    return;
                }
                Err(_) => Err(PipelineError::Panicked("postprocess")),
            };
            METRICS
                .postprocess_seconds
                .with_label_values(&[&runtime.id])
                .observe(started.elapsed().as_secs_f64());
            if matches!(answer, Err(PipelineError::OverBudget(_))) {
                METRICS.outcome(&runtime.id, Outcome::Rejected, Stage::WorkBudget);
            } else if answer.is_err() {
                METRICS.outcome(&runtime.id, Outcome::Failed, Stage::Postprocess);
            }
            let _ = reply.send(answer);
        });
    }
}

/// Counts an image nobody waits for any more: timed out past its deadline, else cancelled
/// (the client hung up).
fn count_dropped(model: &str, deadline: std::time::Instant, stage: Stage) {
    let late = std::time::Instant::now() >= deadline;
    let outcome = if late {
        Outcome::TimedOut
    } else {
        Outcome::Cancelled
    };
    METRICS.outcome(model, outcome, stage);
}
