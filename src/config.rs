//! Every knob of the server in one struct: its environment variable (Roboflow's name where
//! Roboflow has one), its command-line flag, its default and why it exists.
//! `cvserve serve --help` prints this file's doc comments.

use std::path::PathBuf;

use clap::Args;

use crate::model::backend::BackendChoice;
use crate::model::ort::{SessionOptions, TensorRtOptions};
use crate::model::provider::ProviderChoice;

/// Number of logical cores this process may use; every pool size defaults from it.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Configuration of `cvserve serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// TCP port to listen on (0 picks a free port; the chosen address is printed on stdout).
    #[arg(long, env = "PORT", default_value_t = 9001)]
    pub port: u16,

    /// Model repository in Roboflow's local cache layout: <dataset>/<version>/{weights.onnx,
    /// environment.json, class_names.txt, model_type.json}.
    #[arg(long, env = "MODEL_CACHE_DIR", default_value = "models")]
    pub model_cache_dir: PathBuf,

    /// Models loaded at start, comma separated (`all` = every model in the repository,
    /// `none` = load each on its first request or `/model/add`).
    #[arg(long, env = "PRELOAD_MODELS", default_value = "all")]
    pub preload_models: String,

    /// Exit at start (status 1) when a model of PRELOAD_MODELS fails to load (Triton's
    /// `--exit-on-error`). Off by default: the process stays up, `/healthz` says why, and
    /// `/readiness` answers 503 until the model loads (`POST /model/add`), so an orchestrator
    /// sends it no traffic without restarting it in a loop over a broken file.
    #[arg(long, env = "EXIT_ON_LOAD_ERROR", default_value_t = false, action = clap::ArgAction::Set)]
    pub exit_on_load_error: bool,

    /// Most models loaded at once (Roboflow's MAX_ACTIVE_MODELS). Loading one more, on a
    /// request or a download, unloads the least recently used, so no client can fill memory
    /// with models. Default 16 (Roboflow's is 8): the bundled models all fit.
    #[arg(long, env = "MAX_ACTIVE_MODELS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_active_models: u32,

    /// Largest batch the dynamic batcher forms for a model with a dynamic batch dimension
    /// (Triton's `max_batch_size`). `auto`: 1 on CPU, where single-threaded instances gain
    /// nothing from larger batches and lose to cache misses (see docs/design.md), 8 on a GPU.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value = "auto", value_parser = parse_auto)]
    pub max_batch_size: Auto,

    /// Longest a request waits in the batcher for companions when a full batch cannot be formed
    /// (Triton's `max_queue_delay_microseconds`). A full batch is sent at once.
    #[arg(long, env = "MAX_QUEUE_DELAY_MICROSECONDS", default_value_t = 2000, value_parser = within(0u64, 10_000_000))]
    pub max_queue_delay_us: u64,

    /// Images that may wait in one model's queue; beyond it a request is rejected at once
    /// (Triton's `max_queue_size`).
    #[arg(long, env = "MAX_QUEUE_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue_size: u32,

    /// Status of an overload answer: 429 (Too Many Requests, with Retry-After) or 503 (Service
    /// Unavailable, with Retry-After), which some load balancers expect.
    #[arg(long, env = "OVERLOAD_STATUS", default_value_t = 429, value_parser = parse_overload_status)]
    pub overload_status: u16,

    /// Default deadline of an inference request, in seconds. A request that cannot be served
    /// in time is dropped before inference and answered 504. A client may shorten it (never
    /// lengthen it) with the `X-Request-Timeout-Ms` header.
    #[arg(long, env = "REQUEST_TIMEOUT_S", default_value_t = 10.0, value_parser = within(0.001, 86_400.0))]
    pub request_timeout_s: f64,

    /// Inference requests in the server at once, waiting for their turn or being served
    /// (their bodies in memory, within MAX_BODY_MEMORY_BYTES). A request comes in only if the
    /// predicted wait (requests ahead ÷ the measured rate) fits its deadline; beyond either
    /// it is answered 429 with Retry-After as soon as its headers are read, its body unread.
    #[arg(long, env = "MAX_INFLIGHT_REQUESTS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_requests: u32,

    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests (keep-alive); then it is closed. Bounds what idle or slow connections hold.
    #[arg(long, env = "HEADER_READ_TIMEOUT_S", default_value_t = 10.0, value_parser = within(0.001, 86_400.0))]
    pub header_read_timeout_s: f64,

    /// Open connections served at once (64 more get health routes only; beyond that they are
    /// closed on accept). With MAX_BODY_BYTES it bounds what request bodies can take.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Slots in the shared-memory ring of decoded images: the most images that can be between
    /// decode and preprocessing at once. No free slot means an immediate 429.
    #[arg(long, env = "RING_SLOTS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub ring_slots: u32,

    /// Pixels one ring slot holds (RGB, 3 bytes each). Larger JPEGs are decoded at 1/2, 1/4 or
    /// 1/8 scale to fit, larger images of other formats are shrunk to fit (either way far above
    /// any network input size); responses still report and map to the original size.
    #[arg(long, env = "RING_SLOT_PIXELS", default_value_t = 2048 * 2048, value_parser = within(64 * 64usize, 1 << 28))]
    pub ring_slot_pixels: usize,

    /// Share of the ring slots one model's requests may hold while other models are loaded
    /// (0.5: half). A model whose backlog reaches it gets 429 while the others are served.
    #[arg(long, env = "RING_MODEL_SHARE", default_value_t = 0.5, value_parser = within(0.01, 1.0))]
    pub ring_model_share: f64,

    /// Directory of the ring's backing file (tmpfs). In containers give /dev/shm enough room:
    /// RING_SLOTS x RING_SLOT_PIXELS x 3 bytes.
    #[arg(long, env = "RING_DIR", default_value = "/dev/shm")]
    pub ring_dir: PathBuf,

    /// Largest accepted request body in bytes; beyond it the answer is 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024, value_parser = within(1usize, 1 << 34))]
    pub max_body_bytes: usize,

    /// Bytes of request bodies the server holds at once, over every connection (bodies
    /// being received and bodies being parsed). Counted as bytes arrive, so a stalled body
    /// holds only what it sent; past it a request gets 429 with Retry-After.
    #[arg(long, env = "MAX_BODY_MEMORY_BYTES", default_value_t = 512 * 1024 * 1024, value_parser = within(1usize, 1 << 40))]
    pub max_body_memory_bytes: usize,

    /// Share of MAX_BODY_MEMORY_BYTES the bodies (and fetched URL images) of one client
    /// address may hold at once (never less than one MAX_BODY_BYTES body); past it that
    /// client gets 429 with Retry-After while others are still served. Behind a proxy every
    /// client is the proxy's address: raise it to 1.0 there.
    #[arg(long, env = "BODY_MEMORY_PEER_SHARE", default_value_t = 0.5, value_parser = within(0.01, 1.0))]
    pub body_memory_peer_share: f64,

    /// Slowest a request body may arrive, in bytes a second on average since the request
    /// began, once BODY_RATE_GRACE_S has passed (408 below it; 0 = any rate, bounded only
    /// by the request's deadline).
    #[arg(long, env = "MIN_BODY_RATE_BYTES_S", default_value_t = 1024, value_parser = within(0u64, 1 << 40))]
    pub min_body_rate_bytes_s: u64,

    /// Time a request body may take before MIN_BODY_RATE_BYTES_S applies.
    #[arg(long, env = "BODY_RATE_GRACE_S", default_value_t = 3.0, value_parser = within(1.0, 86400.0))]
    pub body_rate_grace_s: f64,

    /// Port of the Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`),
    /// on HOST; 0: no gRPC.
    #[arg(long, env = "GRPC_PORT", default_value_t = 9002)]
    pub grpc_port: u16,

    /// Longest a gRPC connection may send no request bytes (no call, no message; PINGs and
    /// other control frames do not count) before it is closed: what a silent connection
    /// holds is bounded, as HEADER_READ_TIMEOUT_S does over HTTP. Above REQUEST_TIMEOUT_S,
    /// so a call waiting for its answer is not cut.
    #[arg(long, env = "GRPC_IDLE_TIMEOUT_S", default_value_t = 60.0, value_parser = within(0.1, 86_400.0))]
    pub grpc_idle_timeout_s: f64,

    /// Who loads and unloads models: `open` (any client, and a request for a model not
    /// loaded loads it: Roboflow's behaviour), `explicit` (only PRELOAD_MODELS and what an
    /// administrator loads with ADMIN_TOKEN; requests never load), `none` (only
    /// PRELOAD_MODELS; no load or unload over any API).
    #[arg(long, env = "MODEL_CONTROL", default_value = "open", value_enum)]
    pub model_control: ModelControl,

    /// The administrator's token for loading, unloading and clearing models under
    /// MODEL_CONTROL=explicit (sent as `Authorization: Bearer <token>`). Never logged.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, value_parser = secret)]
    pub admin_token: Option<Secret>,

    /// A file holding ADMIN_TOKEN (a Kubernetes secret mounted as a file); read at start.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Who may register system shared-memory regions (the Open Inference Protocol's
    /// extension): `local` (clients on a loopback address), `off`, or `any`.
    #[arg(long, env = "ALLOW_CLIENT_SHM", default_value = "local", value_enum)]
    pub allow_client_shm: crate::regions::ClientShm,

    /// Users (uids, comma-separated) besides the server's own whose files in /dev/shm may be
    /// registered as shared-memory regions; another user's file is refused, whatever the
    /// server's privileges (docs/protocols.md, the trust model).
    #[arg(long, env = "SHM_ALLOWED_UIDS", value_delimiter = ',')]
    pub shm_allowed_uids: Vec<u32>,

    /// Most shared-memory regions registered at once (each holds a file descriptor).
    #[arg(long, env = "MAX_SHM_REGIONS", default_value_t = 256, value_parser = within(1usize, 1 << 16))]
    pub max_shm_regions: usize,

    /// Largest body of the admin routes (`/model/add`, `/model/remove`): they carry a model
    /// id, never an image.
    #[arg(long, env = "ADMIN_MAX_BODY_BYTES", default_value_t = 64 * 1024, value_parser = within(1usize, 1 << 30))]
    pub admin_max_body_bytes: usize,

    /// Work budget of one segmentation image: masks x pixels of the mask's output (the
    /// original image for RLE, the mask grid for polygons). A request past it is refused
    /// with 422 before any mask is computed.
    #[arg(long, env = "MAX_MASK_WORK_PIXELS", default_value_t = 2_000_000_000, value_parser = within(1u64, 1 << 50))]
    pub max_mask_work_pixels: u64,

    /// Most steps one workflow definition may have (413 beyond).
    #[arg(long, env = "WORKFLOW_MAX_STEPS", default_value_t = 64, value_parser = within(1usize, 10_000))]
    pub workflow_max_steps: usize,

    /// Most images one workflow request may send (413 beyond).
    #[arg(long, env = "WORKFLOW_MAX_IMAGES", default_value_t = 16, value_parser = within(1usize, 10_000))]
    pub workflow_max_images: usize,

    /// Most crops one workflow step may make of one image (413 beyond).
    #[arg(long, env = "WORKFLOW_MAX_CROPS", default_value_t = 256, value_parser = within(1usize, 100_000))]
    pub workflow_max_crops: usize,

    /// Largest workflow answer, in bytes of JSON (413 beyond: ask for fewer outputs).
    #[arg(long, env = "WORKFLOW_MAX_ANSWER_BYTES", default_value_t = 64 << 20, value_parser = within(1024usize, 1 << 34))]
    pub workflow_max_answer_bytes: usize,

    /// Compiled workflow definitions kept (least recently used dropped), and saved
    /// workflows' definitions fetched from Roboflow's API kept (each for 15 minutes).
    #[arg(long, env = "WORKFLOW_CACHE_SIZE", default_value_t = 128, value_parser = within(1usize, 100_000))]
    pub workflow_cache_size: usize,

    /// Largest image (width x height, from its header) accepted for decoding; beyond it 400.
    /// One decode may also allocate at most 4 bytes per allowed pixel beyond its output (413
    /// past it, before allocating).
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 100_000_000, value_parser = within(1u64, 1 << 34))]
    pub max_image_pixels: u64,

    /// Most scans a JPEG may have (progressive JPEGs have about 10); counted from its
    /// markers before decoding, 413 beyond.
    #[arg(long, env = "MAX_JPEG_SCANS", default_value_t = 100, value_parser = within(1u64, 1 << 20))]
    pub max_jpeg_scans: u64,

    /// Most work one decode may do, in pixels x passes (a JPEG's scans: each one runs over
    /// every coefficient, whatever the scale decoded at); 413 beyond, before decoding. The
    /// default is about a second of one core here.
    #[arg(long, env = "MAX_DECODE_WORK_PIXELS", default_value_t = 2_000_000_000, value_parser = within(1u64, 1 << 50))]
    pub max_decode_work_pixels: u64,

    /// Decode JPEGs much larger than the network input at 1/2, 1/4 or 1/8 scale in the DCT
    /// domain, never below what the input needs: faster, but pixels differ from a full decode
    /// followed by a bilinear shrink, so scores of small objects move by a few hundredths.
    /// Off by default: every JPEG is decoded whole, as Roboflow does.
    #[arg(long, env = "DECODE_REDUCED_SCALE", default_value_t = false, action = clap::ArgAction::Set)]
    pub decode_reduced_scale: bool,

    /// Ignore EXIF orientation for every request (Roboflow's `DISABLE_PREPROC_AUTO_ORIENT`).
    #[arg(long, env = "DISABLE_PREPROC_AUTO_ORIENT", default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_preproc_auto_orient: bool,

    /// Roboflow's API, where models missing from MODEL_CACHE_DIR are downloaded from when a
    /// request gives an API key (Roboflow's `API_BASE_URL`).
    #[arg(long, env = "API_BASE_URL", default_value = crate::model::download::DEFAULT_API_BASE_URL)]
    pub api_base_url: String,

    /// Never download models: only MODEL_CACHE_DIR serves (Roboflow's `OFFLINE_MODE`).
    #[arg(long, env = "OFFLINE_MODE", default_value_t = false, action = clap::ArgAction::Set)]
    pub offline_mode: bool,

    /// API key for downloads when a request carries none (Roboflow's `ROBOFLOW_API_KEY`).
    #[arg(long, env = "ROBOFLOW_API_KEY", hide_env_values = true)]
    pub roboflow_api_key: Option<String>,

    /// Largest model weights file a download accepts; beyond it the download is refused (502)
    /// and nothing is stored.
    #[arg(long, env = "MODEL_DOWNLOAD_MAX_BYTES", default_value_t = 2 << 30, value_parser = within(1u64, 1 << 44))]
    pub model_download_max_bytes: u64,

    /// Deadline of one model's whole download (description, environment and weights).
    #[arg(long, env = "MODEL_DOWNLOAD_TIMEOUT_S", default_value_t = 300, value_parser = within(1u64, 86_400))]
    pub model_download_timeout_s: u64,

    /// Skip every model's static crop for every request (Roboflow's `DISABLE_PREPROC_STATIC_CROP`).
    #[arg(long, env = "DISABLE_PREPROC_STATIC_CROP", default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_preproc_static_crop: bool,

    /// Skip every model's contrast step for every request (Roboflow's `DISABLE_PREPROC_CONTRAST`).
    #[arg(long, env = "DISABLE_PREPROC_CONTRAST", default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_preproc_contrast: bool,

    /// Skip every model's grayscale step for every request (Roboflow's `DISABLE_PREPROC_GRAYSCALE`).
    #[arg(long, env = "DISABLE_PREPROC_GRAYSCALE", default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_preproc_grayscale: bool,

    /// Accept images given by URL (`type: url`, legacy `?image=`). Off by default: a server
    /// that fetches arbitrary URLs is a server-side request forgery risk.
    #[arg(long, env = "ALLOW_URL_INPUT", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_url_input: bool,

    /// Refuse URL images on loopback, private, link-local (cloud metadata), multicast and
    /// other special addresses, checked on the resolved address and on every redirect.
    #[arg(long, env = "URL_DENY_PRIVATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub url_deny_private: bool,

    /// Comma-separated host names or IP addresses that URL images may come from even when
    /// special (e.g. an image store on the private network).
    #[arg(long, env = "URL_ALLOW_HOSTS", default_value = "")]
    pub url_allow_hosts: String,

    /// Largest image fetched from a URL, in bytes.
    #[arg(long, env = "URL_MAX_BYTES", default_value_t = 20 * 1024 * 1024, value_parser = within(1usize, 1 << 34))]
    pub url_max_bytes: usize,

    /// Time limit for fetching one URL image, in milliseconds.
    #[arg(long, env = "URL_TIMEOUT_MS", default_value_t = 5000, value_parser = within(1u64, 3_600_000))]
    pub url_timeout_ms: u64,

    /// Threads of the async HTTP front end (0 = the CPU budget's share, see `CpuBudget`).
    #[arg(long, env = "HTTP_THREADS", default_value_t = 0, value_parser = within(0usize, 1024))]
    pub http_threads: usize,

    /// Threads of the decode pool, which also parses large request bodies
    /// (0 = the CPU budget's share).
    #[arg(long, env = "DECODE_THREADS", default_value_t = 0, value_parser = within(0usize, 1024))]
    pub decode_threads: usize,

    /// Threads of the preprocess pool (0 = the CPU budget's share).
    #[arg(long, env = "PREPROCESS_THREADS", default_value_t = 0, value_parser = within(0usize, 1024))]
    pub preprocess_threads: usize,

    /// Threads of the postprocess pool (0 = the CPU budget's share).
    #[arg(long, env = "POSTPROCESS_THREADS", default_value_t = 0, value_parser = within(0usize, 1024))]
    pub postprocess_threads: usize,

    /// Inference instances per model (Triton's instance group `count`): each runs its own
    /// session on its own thread, and the batcher hands each batch to whichever is free.
    /// `auto`: on CPU, enough instances of ORT_INTRA_THREADS threads to use every core.
    #[arg(long, env = "INSTANCES_PER_MODEL", default_value = "auto", value_parser = parse_auto)]
    pub instances_per_model: Auto,

    /// Intra-op threads of each inference instance's session (`auto`: 1 when several
    /// instances run, every core for a single instance). Spinning is always off so an idle
    /// server uses no CPU.
    #[arg(
        long = "ort-intra-threads",
        env = "ORT_INTRA_THREADS",
        default_value = "auto",
        value_parser = parse_auto
    )]
    pub intra_threads: Auto,

    /// Intra-op threads for a batch that runs while the model's other instances are idle and
    /// nothing waits (a lone request): `auto` = every core on CPU when the instances are
    /// single-threaded, so a lone request gets the latency of one wide session and a loaded
    /// server the throughput of many narrow ones (one more session per model); `1` = off.
    #[arg(long, env = "LONE_REQUEST_THREADS", default_value = "auto", value_parser = parse_auto)]
    pub lone_request_threads: Auto,

    /// ONNX Runtime settings (shared with `cvserve ceiling`).
    #[command(flatten)]
    pub ort: OrtSettings,

    /// Seconds the server must be idle (no inference request in it) before freed memory is
    /// returned to the OS, once (0: never). While busy, freed memory is kept for reuse.
    #[arg(long, env = "IDLE_TRIM_S", default_value_t = 1.0, value_parser = within(0.0, 86_400.0))]
    pub idle_trim_s: f64,

    /// Seconds an inference instance beyond a model's first may stay idle before it stops
    /// and its session is freed. Instances start when a model's queue waits while every
    /// instance is busy and a core is free, up to INSTANCES_PER_MODEL.
    #[arg(long, env = "INSTANCE_IDLE_TIMEOUT_S", default_value_t = 10.0, value_parser = within(0.001, 86_400.0))]
    pub instance_idle_timeout_s: f64,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before the process exits.
    #[arg(long, env = "DRAIN_TIMEOUT_S", default_value_t = 30.0, value_parser = within(0.0, 86_400.0))]
    pub drain_timeout_s: f64,

    /// Log format: `text` or `json` (one JSON object per line). The level comes from LOG_LEVEL.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Fault injection for tests: every batch run sleeps this long first (a slow model).
    #[arg(
        long,
        env = "CVSERVE_INJECT_DELAY_MS",
        default_value_t = 0,
        hide = true
    , value_parser = within(0u64, 600_000))]
    pub inject_delay_ms: u64,

    /// Fault injection for tests: every model load sleeps this long first (a slow load).
    #[arg(
        long,
        env = "CVSERVE_INJECT_LOAD_DELAY_MS",
        default_value_t = 0,
        hide = true
    , value_parser = within(0u64, 600_000))]
    pub inject_load_delay_ms: u64,

    /// Fault injection for tests: the model the injected faults apply to (default: every
    /// model).
    #[arg(long, env = "CVSERVE_INJECT_MODEL", hide = true)]
    pub inject_model: Option<String>,

    /// Fault injection for tests: the N-th batch run of each model (1-based) fails.
    #[arg(long, env = "CVSERVE_INJECT_FAIL_BATCH", hide = true)]
    pub inject_fail_batch: Option<u64>,

    /// Fault injection for tests: the N-th batch run of each model (1-based) panics.
    #[arg(long, env = "CVSERVE_INJECT_PANIC_BATCH", hide = true)]
    pub inject_panic_batch: Option<u64>,
}

/// How ONNX Runtime runs: the server and `cvserve ceiling` share these, so the ceiling is
/// measured with the server's back-end settings (the ceiling searches instances and threads
/// itself).
#[derive(Debug, Clone, Args)]
pub struct OrtSettings {
    /// ONNX Runtime's CPU arena allocator. With it each model's session keeps the peak memory
    /// of its largest batch for good; without it memory is returned after each run, so a
    /// server with several models needs far less (measured in docs/production.md).
    #[arg(long = "ort-cpu-arena", env = "ORT_CPU_ARENA", default_value_t = false, action = clap::ArgAction::Set)]
    pub cpu_arena: bool,

    /// Execution providers, in priority order: `auto` (the best the loaded ONNX Runtime
    /// library offers: TensorRT, then CUDA, then CPU, each fallback logged with its reason), or
    /// a list of `tensorrt`, `cuda`, `cpu` (ONNX Runtime's names and Roboflow's bracketed list
    /// are accepted too). A listed provider that cannot start fails the model's load with the
    /// reason. When unset, Roboflow's ONNXRUNTIME_EXECUTION_PROVIDERS is read.
    #[arg(long, env = "EXECUTION_PROVIDERS", value_parser = ProviderChoice::parse)]
    pub execution_providers: Option<ProviderChoice>,

    /// The GPU to run on (CUDA device ordinal).
    #[arg(long, env = "DEVICE_ID", default_value_t = 0, value_parser = within(0i32, 1024))]
    pub device_id: i32,

    /// Where TensorRT keeps its engine and timing caches (default: `tensorrt-cache/` beside
    /// each model's weights), so engines are built once per GPU and model, not at every start.
    #[arg(long, env = "TENSORRT_CACHE_PATH")]
    pub tensorrt_cache_path: Option<PathBuf>,

    /// Build TensorRT engines in FP16 (boxes move by a fraction of a pixel; about twice the
    /// speed on a T4).
    #[arg(long, env = "TENSORRT_FP16", default_value_t = true, action = clap::ArgAction::Set)]
    pub tensorrt_fp16: bool,

    /// The inference back end: `auto` (ONNX Runtime when its library loads, otherwise tract,
    /// logged with the reason), `ort` (ONNX Runtime: CPU, CUDA or TensorRT) or `tract` (pure
    /// Rust, CPU only, no native library).
    #[arg(long, env = "BACKEND", default_value = "auto", value_parser = BackendChoice::parse)]
    pub backend: BackendChoice,

    /// Path of libonnxruntime.so (build.sh fetches it from the `onnxruntime` PyPI wheel).
    #[arg(
        long = "ort-dylib-path",
        env = "ORT_DYLIB_PATH",
        default_value = "vendor/onnxruntime/libonnxruntime.so.1.31.1"
    )]
    pub dylib_path: PathBuf,
}

/// A count that may be left to the server (`auto`, or `0` as older settings wrote it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auto {
    Auto,
    Count(usize),
}

impl Auto {
    /// The count, or `default` when left to the server.
    pub fn count_or(self, default: usize) -> usize {
        match self {
            Auto::Auto => default,
            Auto::Count(n) => n.max(1),
        }
    }
}

/// Inference instances per model on a GPU when left to the server.
pub const GPU_INSTANCES: usize = 2;

fn parse_auto(s: &str) -> Result<Auto, String> {
    match s.trim() {
        "auto" | "0" | "" => Ok(Auto::Auto),
        n => match n.parse::<usize>() {
            Ok(c) if c <= MAX_COUNT => Ok(Auto::Count(c)),
            _ => Err(format!(
                "must be `auto` or a whole number from 1 to {MAX_COUNT}, not {n}"
            )),
        },
    }
}

/// Largest count an `auto` setting takes (threads, instances, batch).
const MAX_COUNT: usize = 1024;

/// A value parser that accepts a number from `lo` to `hi` (inclusive; NaN and infinities
/// never). Every numeric setting is checked once, at start: an out-of-range one stops the
/// start with its name and the accepted range, instead of failing requests later (a
/// REQUEST_TIMEOUT_S of 1e20 once made every request's deadline panic).
fn within<T>(lo: T, hi: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(v) if v >= lo && v <= hi => Ok(v),
        _ => Err(format!("must be a number from {lo} to {hi}")),
    }
}

/// How the machine's cores are shared between the stages: one policy, so that under full
/// load the pools do not fight over the same cores.
///
/// * Inference: `instances x intra_threads = cores` (by default `cores` instances of one
///   thread each: two sessions of one thread beat one session of two threads on every bundled
///   model, because ORT's parallel-for waits at a barrier for its slowest thread). On a GPU,
///   two instances of one thread: the cores are left to decode and preprocessing.
/// * Helpers: the decode, preprocess and postprocess pools are each half the cores (at least
///   one thread): their work per image is small next to the network's, and they run between
///   inference runs rather than beside them.
/// * HTTP: one async thread per four cores (at least one): it only parses headers and moves
///   bytes; bodies of megabytes are parsed on the decode pool.
///
/// An explicit setting of any of them wins over its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuBudget {
    pub cores: usize,
    pub instances: usize,
    pub intra_threads: usize,
    /// Intra-op threads of the session that runs lone requests (1: no such session).
    pub lone_threads: usize,
    pub http: usize,
    pub decode: usize,
    pub preprocess: usize,
    pub postprocess: usize,
}

impl CpuBudget {
    /// The budget for `cores` cores, with explicit settings where given.
    pub fn new(cores: usize, instances: Auto, intra_threads: Auto, on_gpu: bool) -> Self {
        let cores = cores.max(1);
        let (instances, intra_threads) = match (instances, intra_threads) {
            // On a GPU the network does not run on the cores: two instances overlap the
            // upload, compute and download of consecutive batches.
            (Auto::Auto, t) if on_gpu => (GPU_INSTANCES, t.count_or(1)),
            (Auto::Count(i), Auto::Count(t)) => (i.max(1), t.max(1)),
            (Auto::Count(1), Auto::Auto) => (1, cores),
            (Auto::Count(i), Auto::Auto) => (i, 1),
            (Auto::Auto, Auto::Count(t)) => ((cores / t.max(1)).max(1), t.max(1)),
            (Auto::Auto, Auto::Auto) => (cores, 1),
        };
        let half = (cores / 2).max(1);
        // A lone request may use every core when each instance uses one of them.
        let lone_threads = if !on_gpu && instances > 1 && intra_threads == 1 {
            cores
        } else {
            1
        };
        Self {
            cores,
            instances,
            intra_threads,
            lone_threads,
            http: (cores / 4).max(1),
            decode: half,
            preprocess: half,
            postprocess: half,
        }
    }
}

impl OrtSettings {
    /// The provider choice: EXECUTION_PROVIDERS, else Roboflow's
    /// ONNXRUNTIME_EXECUTION_PROVIDERS, else `auto`.
    pub fn providers(&self) -> Result<ProviderChoice, String> {
        if let Some(p) = &self.execution_providers {
            return Ok(p.clone());
        }
        match std::env::var("ONNXRUNTIME_EXECUTION_PROVIDERS") {
            Ok(v) => ProviderChoice::parse(&v)
                .map_err(|e| format!("ONNXRUNTIME_EXECUTION_PROVIDERS: {e}")),
            Err(_) => Ok(ProviderChoice::Auto),
        }
    }

    /// Session options with `intra_threads` threads per session.
    pub fn session(&self, intra_threads: usize) -> Result<SessionOptions, String> {
        Ok(SessionOptions {
            intra_threads,
            cpu_arena: self.cpu_arena,
            providers: self.providers()?,
            device_id: self.device_id,
            tensorrt: TensorRtOptions {
                cache_dir: self.tensorrt_cache_path.clone(),
                fp16: self.tensorrt_fp16,
            },
        })
    }
}

fn parse_overload_status(s: &str) -> Result<u16, String> {
    match s {
        "429" => Ok(429),
        "503" => Ok(503),
        _ => Err(format!("must be 429 or 503, not {s}")),
    }
}

/// MAX_BATCH_SIZE when left to the server, on CPU.
pub const CPU_MAX_BATCH: usize = 1;
/// MAX_BATCH_SIZE when left to the server, on a GPU.
pub const GPU_MAX_BATCH: usize = 8;

impl ServeConfig {
    /// The largest batch, `auto` resolved for the device the models run on.
    pub fn max_batch(&self, on_gpu: bool) -> usize {
        match self.max_batch_size {
            Auto::Count(n) => n.clamp(1, 256),
            Auto::Auto if on_gpu => GPU_MAX_BATCH,
            Auto::Auto => CPU_MAX_BATCH,
        }
    }

    /// The CPU budget of this configuration on this machine, explicit pool sizes applied.
    pub fn cpu_budget(&self, on_gpu: bool) -> CpuBudget {
        let mut b = CpuBudget::new(
            available_cores(),
            self.instances_per_model,
            self.intra_threads,
            on_gpu,
        );
        let set = |n: usize, share: &mut usize| {
            if n > 0 {
                *share = n;
            }
        };
        if let Auto::Count(n) = self.lone_request_threads {
            b.lone_threads = n.max(1);
        }
        set(self.http_threads, &mut b.http);
        set(self.decode_threads, &mut b.decode);
        set(self.preprocess_threads, &mut b.preprocess);
        set(self.postprocess_threads, &mut b.postprocess);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_fills_the_cores_with_single_threaded_instances_by_default() {
        let b = CpuBudget::new(8, Auto::Auto, Auto::Auto, false);
        assert_eq!((b.instances, b.intra_threads), (8, 1));
        assert_eq!(
            (b.http, b.decode, b.preprocess, b.postprocess),
            (2, 4, 4, 4)
        );
        let b = CpuBudget::new(2, Auto::Auto, Auto::Auto, false);
        assert_eq!((b.instances, b.intra_threads), (2, 1));
        assert_eq!(
            (b.http, b.decode, b.preprocess, b.postprocess),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn budget_honours_explicit_instances_and_threads() {
        // One instance: it gets every core.
        let b = CpuBudget::new(8, Auto::Count(1), Auto::Auto, false);
        assert_eq!((b.instances, b.intra_threads, b.lone_threads), (1, 8, 1));
        // Threads given: as many instances as fit.
        let b = CpuBudget::new(8, Auto::Auto, Auto::Count(2), false);
        assert_eq!((b.instances, b.intra_threads), (4, 2));
        let b = CpuBudget::new(2, Auto::Count(3), Auto::Auto, false);
        assert_eq!((b.instances, b.intra_threads), (3, 1));
        let b = CpuBudget::new(2, Auto::Count(2), Auto::Count(2), false);
        assert_eq!((b.instances, b.intra_threads), (2, 2));
    }

    #[test]
    fn on_a_gpu_two_single_threaded_instances_leave_the_cores_to_the_helpers() {
        let b = CpuBudget::new(8, Auto::Auto, Auto::Auto, true);
        assert_eq!((b.instances, b.intra_threads, b.lone_threads), (2, 1, 1));
        assert_eq!(b.decode, 4);
        let b = CpuBudget::new(8, Auto::Count(3), Auto::Auto, true);
        assert_eq!((b.instances, b.intra_threads), (3, 1));
    }

    #[test]
    fn auto_counts_parse() {
        assert_eq!(parse_auto("auto"), Ok(Auto::Auto));
        assert_eq!(parse_auto("0"), Ok(Auto::Auto));
        assert_eq!(parse_auto("3"), Ok(Auto::Count(3)));
        assert!(parse_auto("many").is_err());
    }
}

/// Who loads and unloads models (MODEL_CONTROL), as Triton's `--model-control-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelControl {
    /// Any client; a request for a model not loaded loads it (Roboflow's behaviour).
    Open,
    /// Only an administrator with ADMIN_TOKEN; requests never load a model.
    Explicit,
    /// Nobody: only PRELOAD_MODELS are served.
    None,
}

impl ModelControl {
    pub fn name(self) -> &'static str {
        match self {
            ModelControl::Open => "open",
            ModelControl::Explicit => "explicit",
            ModelControl::None => "none",
        }
    }
}

/// A value never printed (`Debug` shows `***`): the admin token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

fn secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_owned()))
}
