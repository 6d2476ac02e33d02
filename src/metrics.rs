//! Prometheus metrics, served at `GET /metrics` in the text format. Stage histograms carry a
//! `model` label; request counters carry `model`, `route` and `status`; outcomes that never
//! reach inference (rejected, timed out, cancelled) and failures have their own counter.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_counter_vec_with_registry, register_histogram_vec_with_registry,
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, CounterVec, Encoder,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// End-to-end latency of inference requests, by model and route.
    pub request_seconds: HistogramVec,
    /// Time a job waited in its model's queue before preprocessing started.
    pub queue_wait_seconds: HistogramVec,
    pub decode_seconds: HistogramVec,
    pub decode_reduced: IntCounterVec,
    pub preprocess_seconds: HistogramVec,
    /// Time of one batch run on the back end.
    pub inference_seconds: HistogramVec,
    pub postprocess_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    /// Answered requests by model, route and HTTP status.
    pub requests_total: IntCounterVec,
    /// Images that did not get a normal answer: `rejected`, `timed_out`, `cancelled`, `failed`;
    /// `stage` says where it was noticed.
    pub outcomes_total: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    /// Batches run by each inference instance of a model (how evenly the instances share).
    pub instance_batches_total: IntCounterVec,
    /// Inference instances of each loaded model, by the execution provider and back end they
    /// run on.
    pub model_instances: IntGaugeVec,
    pub ring_slots_in_use: IntGauge,
    /// Inference requests admitted and not yet answered (what an autoscaler should watch).
    pub inflight_requests: IntGauge,
    /// Requests holding a place in a model's line (the waiting room's tickets), all models.
    pub requests_in_line: IntGauge,
    pub ring_slots_total: IntGauge,
    /// Connections closed at once because MAX_CONNECTIONS and the health reserve were full.
    pub connections_shed: IntCounter,
    /// Models unloaded to load another past MAX_ACTIVE_MODELS.
    pub models_evicted: IntCounter,
    /// Bytes of request bodies held (at most MAX_BODY_MEMORY_BYTES).
    pub body_bytes_held: IntGauge,
    /// Times free memory was returned to the OS after the server went quiet.
    pub memory_trims: IntCounter,
    /// Inference instances started on demand and stopped when idle, by model.
    pub instances_started: IntCounterVec,
    pub instances_stopped: IntCounterVec,
    /// Inference requests refused as soon as their headers were read: the predicted wait
    /// did not fit their deadline.
    pub admission_refused: IntCounter,
    /// Shared-memory registrations refused for what their file is (`reason`: foreign_owner,
    /// ring).
    pub shm_refused: IntCounterVec,
    /// Unregister calls that named no region (every region unregistered).
    pub shm_unregister_all: IntCounter,
    /// gRPC streams and connections the server ended (`reason`: unread_answers, idle,
    /// control_flood).
    pub grpc_closed: IntCounterVec,
    /// Loads, unloads and clears refused by MODEL_CONTROL (`reason`: no_token, off).
    pub model_control_refused: IntCounterVec,
    /// Workflow runs by workflow (`inline`, or a saved workflow's id) and status.
    pub workflow_requests: IntCounterVec,
    /// Time of one workflow run, and of each step in it (by block type).
    pub workflow_seconds: HistogramVec,
    pub workflow_step_seconds: HistogramVec,
    /// Compiled workflow definitions in the cache.
    pub workflow_definitions_cached: IntGauge,
    /// CPU time the threads of each pool ran (`pool`: http, decode, preprocess, inference,
    /// postprocess, batcher, other), from the kernel's per-thread accounting; brought up to
    /// date at every scrape.
    pub thread_cpu_seconds: CounterVec,
    pub stage_cpu_seconds: CounterVec,
}

fn latency_buckets() -> Vec<f64> {
    // 0.1 ms .. ~52 s
    exponential_buckets(0.0001, 2.0, 20).expect("valid buckets")
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let hist = |name: &str, help: &str, labels: &[&str]| {
            register_histogram_vec_with_registry!(name, help, labels, latency_buckets(), r)
        };
        Ok(Self {
            request_seconds: hist(
                "cvserve_request_duration_seconds",
                "End-to-end latency of inference requests",
                &["model", "route"],
            )?,
            queue_wait_seconds: hist(
                "cvserve_queue_wait_seconds",
                "Time an image waited in its model's queue",
                &["model"],
            )?,
            decode_seconds: hist("cvserve_decode_seconds", "Image decode time", &["model"])?,
            decode_reduced: register_int_counter_vec_with_registry!(
                "cvserve_decode_reduced_total",
                "Images decoded smaller than sent: at reduced JPEG scale (DECODE_REDUCED_SCALE) or to fit a ring slot",
                &["model"],
                r
            )?,
            preprocess_seconds: hist(
                "cvserve_preprocess_seconds",
                "Resize and normalise one image into the batch tensor",
                &["model"],
            )?,
            inference_seconds: hist(
                "cvserve_inference_seconds",
                "Back-end time of one batch",
                &["model"],
            )?,
            postprocess_seconds: hist(
                "cvserve_postprocess_seconds",
                "Output decoding of one image",
                &["model"],
            )?,
            batch_size: register_histogram_vec_with_registry!(
                "cvserve_batch_size",
                "Images per batch run",
                &["model"],
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0],
                r
            )?,
            requests_total: register_int_counter_vec_with_registry!(
                "cvserve_requests_total",
                "Inference requests answered, by model, route and HTTP status",
                &["model", "route", "status"],
                r
            )?,
            outcomes_total: register_int_counter_vec_with_registry!(
                "cvserve_image_outcomes_total",
                "Images not answered normally: rejected, timed_out, cancelled, failed",
                &["model", "outcome", "stage"],
                r
            )?,
            queue_depth: register_int_gauge_vec_with_registry!(
                "cvserve_queue_depth",
                "Images waiting in a model's queue",
                &["model"],
                r
            )?,
            instance_batches_total: register_int_counter_vec_with_registry!(
                "cvserve_instance_batches_total",
                "Batches run, by model and inference instance",
                &["model", "instance"],
                r
            )?,
            model_instances: register_int_gauge_vec_with_registry!(
                "cvserve_model_instances",
                "Inference instances of a loaded model, by execution provider and back end",
                &["model", "execution_provider", "backend"],
                r
            )?,
            inflight_requests: register_int_gauge_with_registry!(
                "cvserve_inflight_requests",
                "Inference requests in the server, waiting or being served (at most MAX_INFLIGHT_REQUESTS)",
                r
            )?,
            requests_in_line: register_int_gauge_with_registry!(
                "cvserve_requests_in_line",
                "Requests let into their model's line by the waiting room and not yet answered, all models",
                r
            )?,
            ring_slots_in_use: register_int_gauge_with_registry!(
                "cvserve_ring_slots_in_use",
                "Ring slots holding a decoded image",
                r
            )?,
            ring_slots_total: register_int_gauge_with_registry!(
                "cvserve_ring_slots",
                "Ring slots",
                r
            )?,
            shm_refused: register_int_counter_vec_with_registry!(
                "cvserve_shm_refused_total",
                "Shared-memory registrations refused for their file: another user's (foreign_owner) or a cvserve ring (ring)",
                &["reason"],
                r
            )?,
            shm_unregister_all: register_int_counter_with_registry!(
                "cvserve_shm_unregister_all_total",
                "Shared-memory unregister calls that named no region (all were unregistered)",
                r
            )?,
            grpc_closed: register_int_counter_vec_with_registry!(
                "cvserve_grpc_closed_total",
                "gRPC streams or connections ended by the server: answers unread past the deadline (unread_answers), no request bytes for GRPC_IDLE_TIMEOUT_S (idle), control frames past their rate (control_flood)",
                &["reason"],
                r
            )?,
            workflow_requests: register_int_counter_vec_with_registry!(
                "cvserve_workflow_requests_total",
                "Workflow runs by workflow (`inline` for definitions sent with the request, else the saved workflow's id, at most 64 ids) and HTTP status",
                &["workflow", "status"],
                r
            )?,
            workflow_seconds: hist(
                "cvserve_workflow_duration_seconds",
                "Time of one workflow run",
                &["workflow"],
            )?,
            workflow_step_seconds: hist(
                "cvserve_workflow_step_seconds",
                "Time of one workflow step over all its elements, by block type",
                &["workflow", "block"],
            )?,
            thread_cpu_seconds: register_counter_vec_with_registry!(
                "cvserve_thread_cpu_seconds_total",
                "CPU time run by the server's threads, by pool (http, decode, preprocess, inference, postprocess, batcher, other)",
                &["pool"],
                r
            )?,
            stage_cpu_seconds: register_counter_vec_with_registry!(
                "cvserve_stage_cpu_seconds_total",
                "CPU time of the requests' stages, measured on the threads that ran them (http, json, base64, decode, preprocess, postprocess, answer)",
                &["stage"],
                r
            )?,
            workflow_definitions_cached: register_int_gauge_with_registry!(
                "cvserve_workflow_definitions_cached",
                "Compiled workflow definitions held (at most WORKFLOW_CACHE_SIZE)",
                r
            )?,
            model_control_refused: register_int_counter_vec_with_registry!(
                "cvserve_model_control_refused_total",
                "Loads, unloads and clears refused by MODEL_CONTROL: without the admin token (no_token) or with model control off (off)",
                &["reason"],
                r
            )?,
            connections_shed: register_int_counter_with_registry!(
                "cvserve_connections_shed_total",
                "Connections closed on accept: MAX_CONNECTIONS and the health reserve were full",
                r
            )?,
            models_evicted: register_int_counter_with_registry!(
                "cvserve_models_evicted_total",
                "Models unloaded (least recently used) to load another past MAX_ACTIVE_MODELS",
                r
            )?,
            body_bytes_held: register_int_gauge_with_registry!(
                "cvserve_request_body_bytes",
                "Bytes of request bodies and fetched URL images held (at most MAX_BODY_MEMORY_BYTES)",
                r
            )?,
            memory_trims: register_int_counter_with_registry!(
                "cvserve_memory_trims_total",
                "Times freed memory was returned to the OS once the server had been idle",
                r
            )?,
            instances_started: register_int_counter_vec_with_registry!(
                "cvserve_instances_started_total",
                "Inference instances started because the model's queue waited while every instance was busy",
                &["model"],
                r
            )?,
            instances_stopped: register_int_counter_vec_with_registry!(
                "cvserve_instances_stopped_total",
                "Inference instances stopped after being idle (INSTANCE_IDLE_TIMEOUT_S)",
                &["model"],
                r
            )?,
            admission_refused: register_int_counter_with_registry!(
                "cvserve_admission_refused_total",
                "Inference requests refused at their headers: the predicted wait did not fit their deadline",
                r
            )?,
            registry: r,
        })
    }

    /// Counts an image that did not get a normal answer.
    pub fn outcome(&self, model: &str, outcome: Outcome, stage: Stage) {
        self.outcomes_total
            .with_label_values(&[model, outcome.label(), stage.label()])
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        for (pool, seconds) in crate::thread_cpu::take_growth() {
            self.thread_cpu_seconds
                .with_label_values(&[pool])
                .inc_by(seconds);
        }
        for (stage, seconds) in crate::stage_cpu::take() {
            self.stage_cpu_seconds
                .with_label_values(&[stage])
                .inc_by(seconds);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new().expect("metric definitions are valid"));

/// How an image that got no normal answer ended (`outcome` label of
/// `cvserve_image_outcomes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Refused before it was worked on (429, 422).
    Rejected,
    /// Its deadline passed (504).
    TimedOut,
    /// Its client went away.
    Cancelled,
    /// A stage failed on it (500, 400).
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Rejected => "rejected",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Where it ended (`stage` label of `cvserve_image_outcomes_total`), in the order a request
/// meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// MAX_INFLIGHT_REQUESTS, on the headers.
    Admission,
    /// The model's line: its predicted wait does not fit the deadline.
    WaitingRoom,
    /// Waiting for ring slots.
    Waiting,
    Decode,
    /// The model's queue (MAX_QUEUE_SIZE).
    Queue,
    BeforePreprocess,
    Preprocess,
    BeforeInference,
    Inference,
    AfterInference,
    Postprocess,
    /// MAX_MASK_WORK_PIXELS.
    WorkBudget,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Admission => "admission",
            Stage::WaitingRoom => "waiting_room",
            Stage::Waiting => "waiting",
            Stage::Decode => "decode",
            Stage::Queue => "queue",
            Stage::BeforePreprocess => "before_preprocess",
            Stage::Preprocess => "preprocess",
            Stage::BeforeInference => "before_inference",
            Stage::Inference => "inference",
            Stage::AfterInference => "after_inference",
            Stage::Postprocess => "postprocess",
            Stage::WorkBudget => "work_budget",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_histograms_and_counters() {
        let m = Metrics::new().unwrap();
        m.batch_size.with_label_values(&["a/1"]).observe(4.0);
        m.outcome("a/1", Outcome::Cancelled, Stage::BeforeInference);
        m.requests_total
            .with_label_values(&["a/1", "/infer/object_detection", "200"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("cvserve_batch_size_bucket{model=\"a/1\",le=\"4\"} 1"),
            "{text}"
        );
        assert!(text.contains("cvserve_image_outcomes_total{model=\"a/1\",outcome=\"cancelled\",stage=\"before_inference\"} 1"));
        assert!(text.contains("status=\"200\""));
    }
}
