//! The batcher against a fake back end.

use std::collections::HashSet;

use crossbeam_channel::{unbounded, Receiver, Sender};

use tokio::sync::oneshot;

use super::*;
use crate::geometry::{InputSpec, Normalization, ResizeMode};
use crate::model::backend::{BatchShape, NetworkInput, OutputTensor, RunResult};
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

    fn run(&mut self, input: &mut BatchBuffer, shape: BatchShape) -> RunResult {
        let (batch, h, w) = (shape.batch, shape.height, shape.width);
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
