//! The instance group of one model, as its batching thread keeps it: instances added (each
//! with a tensor of its own), their words counted (a batch done and its tensor back, or a
//! stop), one more started on demand when every instance is busy and a core of the budget is
//! idle, and the wait for a free one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::select;

use super::super::instance::Instance;
use super::super::job::Done;
use super::Batcher;
use crate::metrics::METRICS;
use crate::model::backend::Backend;

impl Batcher {
    /// Starts an instance's thread on `backend`, with a tensor of its own.
    pub(super) fn add_instance(&mut self, backend: Box<dyn Backend>) -> std::io::Result<()> {
        let tensor = backend.alloc_batch(self.rows * self.runtime.spec.image_len());
        // Counted before the thread starts, so it never sees itself as the last one wrongly.
        self.live.fetch_add(1, Ordering::AcqRel);
        let spawned = Instance {
            index: self.next_index,
            runtime: Arc::clone(&self.runtime),
            backend,
            lone: self.lone.clone(),
            pools: Arc::clone(&self.pools),
            work: self.work_rx.clone(),
            done: self.done_tx.clone(),
            live: Arc::clone(&self.live),
            policy: self.policy.clone(),
        }
        .spawn();
        if let Err(e) = spawned {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        self.next_index += 1;
        self.instances += 1;
        self.free_instances += 1;
        self.tensors.push(tensor);
        Ok(())
    }

    /// A word from an instance: it finished a batch (and gave its tensor back) or stopped.
    pub(super) fn instance_done(&mut self, done: Done) {
        match done {
            Done::Free(tensor) => {
                self.free_instances += 1;
                self.tensors.push(tensor);
            }
            Done::Retired => {
                self.free_instances -= 1;
                self.instances -= 1;
            }
        }
        // One tensor per instance and the filling one; the rest of a shrunk group is freed.
        while self.tensors.len() > self.instances + 1 {
            self.tensors.pop();
        }
    }

    /// A session created on demand is ready (or failed to start).
    pub(super) fn grown(&mut self, backend: Result<Box<dyn Backend>, String>) {
        self.starting = false;
        let runtime = Arc::clone(&self.runtime);
        let model = runtime.id.as_str();
        match backend
            .map_err(|e| e.to_string())
            .and_then(|b| self.add_instance(b).map_err(|e| e.to_string()))
        {
            Ok(()) => {
                METRICS.instances_started.with_label_values(&[model]).inc();
                tracing::info!(
                    model,
                    instances = self.instances,
                    "inference instance started: its queue waited while every instance was busy"
                );
            }
            Err(e) => {
                // Not retried before the idle timeout: a session that cannot be created (out
                // of memory, say) must not be rebuilt continuously while the model is busy.
                self.grow_failed_at = Some(Instant::now());
                tracing::error!(model, error = %e, "could not start one more inference instance");
            }
        }
    }

    /// Every instance busy with work waiting: start one more when the policy allows it, the
    /// budget could run one more at once, and a core of it is idle now (otherwise another
    /// instance would only wait for one).
    pub(super) fn maybe_grow(&mut self) {
        let Some(factory) = &self.policy.factory else {
            return;
        };
        let cores = &self.policy.cores;
        let per_run = self.policy.intra_threads.clamp(1, cores.total());
        // More instances than the budget can run at once would only wait for cores.
        let most = self.policy.max.min(cores.total() / per_run).max(1);
        let failed_lately = self
            .grow_failed_at
            .is_some_and(|t| t.elapsed() < self.policy.idle_timeout);
        if self.starting
            || failed_lately
            || self.free_instances > 0
            || self.instances >= most
            || cores.available() < per_run
        {
            return;
        }
        self.starting = true;
        let factory = Arc::clone(factory);
        let tx = self.grown_tx.clone();
        let started =
            crate::pipeline::threads::spawn(format!("start-{}", self.runtime.id), move || {
                let backend = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory()))
                    .unwrap_or_else(|_| Err("creating the session panicked".into()));
                let _ = tx.send(backend);
            });
        if started.is_err() {
            self.starting = false;
        }
    }

    /// Blocks until an instance is free; `false` if none will ever be.
    pub(super) fn wait_for_instance(&mut self) -> bool {
        while self.free_instances <= 0 {
            self.maybe_grow();
            select! {
                recv(self.done_rx) -> msg => match msg {
                    Ok(d) => self.instance_done(d),
                    Err(_) => return false,
                },
                recv(self.grown_rx) -> msg => if let Ok(b) = msg { self.grown(b) },
            }
        }
        true
    }
}
