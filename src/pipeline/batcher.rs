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
//! waits without a timer: an idle model wakes no thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, unbounded, Receiver, Sender, TrySendError};

use super::instance::Instance;
use super::job::{Batch, Done, LoneBackend, PreparedJob};
pub use super::job::{InstanceFactory, InstancePolicy, ModelRuntime};
use super::preprocess::preprocess_into;
use super::{Job, PipelineError, Pools};
use crate::geometry::Geometry;
use crate::metrics::{Outcome, Stage, METRICS};
use crate::model::backend::{Backend, BatchBuffer};

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
    std::thread::Builder::new()
        .name(format!("batcher-{}", runtime.id))
        .spawn(move || batcher.run())?;
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
    /// Starts an instance's thread on `backend`, with a tensor of its own.
    fn add_instance(&mut self, backend: Box<dyn Backend>) -> std::io::Result<()> {
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
    fn instance_done(&mut self, done: Done) {
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
    fn grown(&mut self, backend: Result<Box<dyn Backend>, String>) {
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
    fn maybe_grow(&mut self) {
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
        let started = std::thread::Builder::new()
            .name(format!("start-{}", self.runtime.id))
            .spawn(move || {
                let backend = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory()))
                    .unwrap_or_else(|_| Err("creating the session panicked".into()));
                let _ = tx.send(backend);
            });
        if started.is_err() {
            self.starting = false;
        }
    }

    /// Blocks until an instance is free; `false` if none will ever be.
    fn wait_for_instance(&mut self) -> bool {
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
mod tests {
    use std::collections::HashSet;

    use crossbeam_channel::{unbounded, Receiver, Sender};

    use tokio::sync::oneshot;

    use super::*;
    use crate::geometry::{InputSpec, Normalization, ResizeMode};
    use crate::model::backend::{BackendError, NetworkInput, OutputTensor};
    use crate::pipeline::cores::CoreBudget;
    use crate::pipeline::decode::DecodedImage;
    use crate::pipeline::ring::Ring;
    use crate::pipeline::JobResult;
    use crate::tasks::classification::{ClassificationOutput, ClassificationParams};
    use crate::tasks::TaskOutput;
    use crate::tasks::{OutputDecoder, TaskParams};
    use std::sync::atomic::AtomicUsize;

    const SIDE: u32 = 4;

    /// A back end that reports each run (instance, batch size) and, when gated, waits for a
    /// permit before answering. Its output for each row is the logits `[mean, -mean]` of that
    /// row's input, so a white image answers class "a" and a black one class "b".
    struct FakeBackend {
        index: usize,
        input: NetworkInput,
        runs: Sender<(usize, usize)>,
        gate: Option<Receiver<()>>,
    }

    impl Backend for FakeBackend {
        fn input(&self) -> &NetworkInput {
            &self.input
        }

        fn run(
            &mut self,
            input: &mut BatchBuffer,
            batch: usize,
            h: u32,
            w: u32,
        ) -> Result<Vec<OutputTensor>, BackendError> {
            let _ = self.runs.send((self.index, batch));
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            let len = 3 * h as usize * w as usize;
            let data = input[..batch * len]
                .chunks(len)
                .flat_map(|row| {
                    let mean = row.iter().sum::<f32>() / len as f32;
                    [mean, -mean]
                })
                .collect();
            Ok(vec![OutputTensor {
                name: "logits".into(),
                shape: vec![batch, 2],
                data: Vec::<f32>::into(data),
            }])
        }
    }

    struct Harness {
        queue: BatchQueue,
        ring: Arc<Ring>,
        runs: Receiver<(usize, usize)>,
        gate: Sender<()>,
    }

    /// The index the fake reports for the model's wide (lone-request) session.
    const LONE: usize = 99;

    fn harness(instances: usize, gated: bool, max_batch: usize, delay: Duration) -> Harness {
        harness_with(Setup {
            instances,
            gated,
            max_batch,
            delay,
            ..Setup::default()
        })
    }

    fn harness_with_lone(
        instances: usize,
        gated: bool,
        max_batch: usize,
        delay: Duration,
        with_lone: bool,
    ) -> Harness {
        harness_with(Setup {
            instances,
            gated,
            max_batch,
            delay,
            with_lone,
            ..Setup::default()
        })
    }

    /// How a test's model is set up.
    struct Setup {
        instances: usize,
        gated: bool,
        max_batch: usize,
        delay: Duration,
        with_lone: bool,
        /// Instances on demand: (most, idle timeout).
        on_demand: Option<(usize, Duration)>,
        cores: usize,
    }

    impl Default for Setup {
        fn default() -> Self {
            Self {
                instances: 1,
                gated: false,
                max_batch: 1,
                delay: Duration::from_millis(1),
                with_lone: false,
                on_demand: None,
                cores: 8,
            }
        }
    }

    fn harness_with(setup: Setup) -> Harness {
        let (runs_tx, runs) = unbounded();
        let (gate, gate_rx) = unbounded();
        let gated = setup.gated;
        let fake = move |index: usize| {
            Box::new(FakeBackend {
                index,
                input: NetworkInput {
                    height: Some(SIDE),
                    width: Some(SIDE),
                    fixed_batch: None,
                },
                runs: runs_tx.clone(),
                gate: gated.then(|| gate_rx.clone()),
            }) as Box<dyn Backend>
        };
        let lone = setup.with_lone.then(|| fake(LONE));
        let backends = (0..setup.instances).map(&fake).collect();
        let made = Arc::new(AtomicUsize::new(setup.instances));
        let factory: Option<InstanceFactory> = setup.on_demand.map(|_| {
            Arc::new(move || Ok(fake(made.fetch_add(1, Ordering::SeqCst)))) as InstanceFactory
        });
        let runtime = Arc::new(ModelRuntime {
            id: "test/1".into(),
            spec: InputSpec {
                width: SIDE,
                height: SIDE,
                resize: ResizeMode::Stretch,
                normalization: Normalization::MinusOneToOne,
            },
            decoder: OutputDecoder::Classification {
                multi_label: false,
                activation: crate::tasks::classification::Activation::Softmax,
            },
            class_names: vec!["a".into(), "b".into()],
            fixed_batch: None,
        });
        let cfg = BatcherConfig {
            max_batch: setup.max_batch,
            max_queue_delay: setup.delay,
            max_queue_size: 64,
        };
        let pools = Arc::new(Pools::new(1, 1, 1).unwrap());
        let (max, idle_timeout) = setup
            .on_demand
            .unwrap_or((setup.instances, Duration::from_secs(600)));
        let policy = InstancePolicy {
            max,
            factory,
            idle_timeout,
            cores: Arc::new(CoreBudget::new(setup.cores)),
            intra_threads: 1,
            lone_threads: 2,
        };
        let queue = start(runtime, backends, lone, cfg, pools, policy).unwrap();
        let ring = Ring::create(&std::env::temp_dir(), 16, (SIDE * SIDE * 3) as usize).unwrap();
        Harness {
            queue,
            ring,
            runs,
            gate,
        }
    }

    impl Harness {
        /// Queues a uniformly `white` or black image; the receiver gets its answer.
        fn submit(&self, white: bool) -> oneshot::Receiver<JobResult> {
            let mut slot = self.ring.try_acquire().expect("a free slot");
            slot.bytes_mut().fill(if white { 255 } else { 0 });
            let (reply, answer) = oneshot::channel();
            let job = Job {
                image: DecodedImage {
                    slot,
                    width: SIDE,
                    height: SIDE,
                    orig_width: SIDE,
                    orig_height: SIDE,
                },
                params: Arc::new(TaskParams::Classification(ClassificationParams {
                    confidence: 0.0,
                })),
                steps: Default::default(),
                reply,
                enqueued: Instant::now(),
                deadline: Instant::now() + Duration::from_secs(60),
            };
            assert!(self.queue.try_submit(job).is_ok());
            answer
        }

        /// The next run, waiting at most `within`.
        fn next_run(&self, within: Duration) -> Option<(usize, usize)> {
            self.runs.recv_timeout(within).ok()
        }
    }

    fn top(answer: oneshot::Receiver<JobResult>) -> String {
        match answer
            .blocking_recv()
            .expect("an answer")
            .expect("a result")
        {
            TaskOutput::Classification(ClassificationOutput::SingleLabel { top, .. }) => top,
            other => panic!("unexpected output {other:?}"),
        }
    }

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn a_full_batch_goes_out_without_waiting_for_the_delay() {
        // The delay is far longer than the test waits: only a full batch can go out.
        let h = harness(1, false, 4, Duration::from_secs(60));
        let answers: Vec<_> = (0..4).map(|i| h.submit(i % 2 == 0)).collect();
        assert_eq!(h.next_run(LONG), Some((0, 4)));
        // Each job gets its own row's answer.
        let tops: Vec<String> = answers.into_iter().map(top).collect();
        assert_eq!(tops, ["a", "b", "a", "b"]);
    }

    #[test]
    fn a_partial_batch_goes_out_after_the_delay_when_an_instance_is_free() {
        let h = harness(1, false, 8, Duration::from_millis(20));
        let answer = h.submit(true);
        assert_eq!(h.next_run(LONG), Some((0, 1)));
        assert_eq!(top(answer), "a");
    }

    #[test]
    fn nothing_is_sent_while_every_instance_is_busy_and_the_batch_keeps_filling() {
        let h = harness(1, true, 2, Duration::from_millis(1));
        let first = h.submit(true);
        assert_eq!(h.next_run(LONG), Some((0, 1)));
        // The only instance is busy: three more jobs wait, far past the queue delay.
        let rest: Vec<_> = (0..3).map(|_| h.submit(false)).collect();
        assert_eq!(h.next_run(Duration::from_millis(300)), None);
        // Once it is free, the full batch of two goes first, then the last job alone.
        h.gate.send(()).unwrap();
        assert_eq!(h.next_run(LONG), Some((0, 2)));
        h.gate.send(()).unwrap();
        assert_eq!(h.next_run(LONG), Some((0, 1)));
        h.gate.send(()).unwrap();
        assert_eq!(top(first), "a");
        for answer in rest {
            assert_eq!(top(answer), "b");
        }
    }

    #[test]
    fn batches_spread_over_the_free_instances() {
        let h = harness(2, true, 1, Duration::from_millis(1));
        let answers: Vec<_> = (0..4).map(|_| h.submit(true)).collect();
        // Both instances take a batch while neither has finished.
        let busy: HashSet<usize> = (0..2)
            .filter_map(|_| h.next_run(LONG))
            .map(|r| r.0)
            .collect();
        assert_eq!(busy, HashSet::from([0, 1]));
        assert_eq!(h.next_run(Duration::from_millis(200)), None);
        for _ in 0..4 {
            h.gate.send(()).unwrap();
        }
        for answer in answers {
            assert_eq!(top(answer), "a");
        }
    }

    #[test]
    fn a_freed_instance_is_counted_once_so_no_early_small_batches_follow() {
        // One instance, long delay: after a run finishes, the next batch must still wait for
        // its delay or fill up; it is not sent early because a stale "free" was counted twice.
        let h = harness(1, false, 3, Duration::from_secs(60));
        let first: Vec<_> = (0..3).map(|_| h.submit(true)).collect();
        assert_eq!(h.next_run(LONG), Some((0, 3)));
        for a in first {
            assert_eq!(top(a), "a");
        }
        let _pending = h.submit(true);
        assert_eq!(h.next_run(Duration::from_millis(300)), None);
        let _more: Vec<_> = (0..2).map(|_| h.submit(true)).collect();
        assert_eq!(h.next_run(LONG), Some((0, 3)));
    }

    #[test]
    fn a_lone_request_runs_on_the_wide_session_and_a_concurrent_one_on_an_instance() {
        let h = harness_with_lone(2, true, 1, Duration::from_millis(1), true);
        let first = h.submit(true);
        // Every instance idle and nothing waiting: the wide session takes it.
        assert_eq!(h.next_run(LONE_WAIT), Some((LONE, 1)));
        // While it runs, another request goes to an ordinary instance.
        let second = h.submit(false);
        let (index, batch) = h.next_run(LONE_WAIT).expect("a second run");
        assert!(index < 2 && batch == 1, "ran on {index}");
        h.gate.send(()).unwrap();
        h.gate.send(()).unwrap();
        assert_eq!(top(first), "a");
        assert_eq!(top(second), "b");
    }

    const LONE_WAIT: Duration = Duration::from_secs(10);

    /// Waits until `queue.instances()` is `n`.
    fn instances_become(h: &Harness, n: usize) -> bool {
        let until = Instant::now() + LONG;
        while Instant::now() < until {
            if h.queue.instances() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn instances_start_while_work_waits_and_every_instance_is_busy_then_stop_when_idle() {
        let h = harness_with(Setup {
            gated: true,
            on_demand: Some((3, Duration::from_millis(300))),
            ..Setup::default()
        });
        assert_eq!(h.queue.instances(), 1);
        let answers: Vec<_> = (0..4).map(|_| h.submit(true)).collect();
        // The first instance is busy and work waits: more start, up to the most allowed.
        let mut busy = HashSet::new();
        for _ in 0..3 {
            busy.insert(h.next_run(LONG).expect("a run").0);
        }
        assert_eq!(busy, HashSet::from([0, 1, 2]));
        assert_eq!(h.queue.instances(), 3);
        for _ in 0..4 {
            h.gate.send(()).unwrap();
        }
        for answer in answers {
            assert_eq!(top(answer), "a");
        }
        // Idle: the extra instances stop; the last one stays, and still serves.
        assert!(instances_become(&h, 1), "{} instances", h.queue.instances());
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(h.queue.instances(), 1);
        let answer = h.submit(false);
        h.gate.send(()).unwrap();
        assert!(h.next_run(LONG).is_some());
        assert_eq!(top(answer), "b");
    }

    #[test]
    fn no_instance_starts_when_every_core_of_the_budget_is_taken() {
        // One core: the busy instance holds it, so another instance could only wait for it.
        let h = harness_with(Setup {
            gated: true,
            on_demand: Some((3, Duration::from_secs(60))),
            cores: 1,
            ..Setup::default()
        });
        let answers: Vec<_> = (0..3).map(|_| h.submit(true)).collect();
        assert_eq!(h.next_run(LONG), Some((0, 1)));
        assert_eq!(h.next_run(Duration::from_millis(300)), None);
        assert_eq!(h.queue.instances(), 1);
        for _ in 0..3 {
            h.gate.send(()).unwrap();
        }
        for answer in answers {
            assert_eq!(top(answer), "a");
        }
    }
}
