//! `cvserve bench`: a load generator for any Roboflow-compatible server (cvserve or Roboflow
//! Inference). Closed loop (N requests always outstanding) or open loop (a fixed request
//! rate), warm-up first, then a request count or a duration; reports throughput, latency
//! percentiles, answers by status, and its own CPU cost per request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// Settings of `cvserve bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchConfig {
    /// Server to load.
    #[arg(long, default_value = "http://127.0.0.1:9001")]
    pub url: String,

    /// Model id (`dataset/version`).
    #[arg(long, default_value = "coco/1")]
    pub model: String,

    /// `infer`: POST /infer/<task> with a JSON body (the task from /model/registry, or --task);
    /// `legacy`: POST /<dataset>/<version> with a base64 body; `workflow`: POST
    /// /workflows/run with --workflow's definition (default: one object detection step of
    /// --model), the image as its input `image`.
    #[arg(long, default_value = "infer", value_parser = ["infer", "legacy", "workflow"])]
    pub route: String,

    /// A workflow definition (JSON file) for `--route workflow`.
    #[arg(long)]
    pub workflow: Option<PathBuf>,

    /// Task route for `infer` (object_detection, instance_segmentation, classification) when the
    /// server's registry cannot say (Roboflow's parallel server lists no models).
    #[arg(long)]
    pub task: Option<String>,

    /// Directory of images to send, cycled (JPEG/PNG files).
    #[arg(long, default_value = "tests/fixtures/images")]
    pub images: PathBuf,

    /// Closed loop: requests kept outstanding at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,

    /// Open loop instead: requests started per second, whatever the answers.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Requests sent (one at a time) before measuring.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,

    /// Requests measured (ignored with --duration).
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,

    /// Measure for this many seconds instead of a request count.
    #[arg(long)]
    pub duration: Option<f64>,

    /// Per-request timeout in seconds (a timeout counts as a transport error).
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,

    /// API key to send (Roboflow servers accept any for local models).
    #[arg(long, default_value = "x")]
    pub api_key: String,

    /// Extra JSON fields merged into every /infer body, e.g. '{"confidence": 0.5}'.
    #[arg(long)]
    pub extra: Option<String>,

    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Behave like a polite client: after a 429/503 with Retry-After, wait that long before
    /// this client's next request (otherwise it retries at once).
    #[arg(long, default_value_t = false)]
    pub respect_retry_after: bool,

    /// Client threads (0 = number of cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// `roboflow`: Roboflow's routes (--route); `v2-http`: the Open Inference Protocol over
    /// HTTP (binary tensors); `v2-grpc`: over gRPC (--grpc-url).
    #[arg(long, default_value = "roboflow", value_parser = ["roboflow", "v2-http", "v2-grpc"])]
    pub protocol: String,

    /// v2 only: send raw RGB frames through a shared-memory region per client (the server
    /// must be on this machine) instead of encoded images. Closed loop only.
    #[arg(long, default_value_t = false)]
    pub shm: bool,

    /// The server's gRPC address (v2-grpc).
    #[arg(long, default_value = "http://127.0.0.1:9002")]
    pub grpc_url: String,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub model: String,
    pub route: String,
    pub mode: String,
    pub requests: usize,
    pub seconds: f64,
    /// Answers with status 200 per second (each carries one image).
    pub images_per_second: f64,
    pub requests_per_second: f64,
    /// Latency of 200 answers, milliseconds.
    pub latency_ms: Percentiles,
    /// Latency of overload answers (429 and 503), milliseconds: how fast a refusal comes.
    pub refused_latency_ms: Percentiles,
    /// Overload answers that carried a Retry-After header.
    pub refused_with_retry_after: usize,
    /// Answers by HTTP status; `transport` counts connection errors and timeouts.
    pub by_status: std::collections::BTreeMap<String, usize>,
    pub error_rate: f64,
    /// The load generator's own CPU time per request, microseconds.
    pub client_cpu_us_per_request: f64,
    /// The server's CPU time per 200 answer, milliseconds, by pool (`total` included): the
    /// growth of cvserve's `cvserve_thread_cpu_seconds_total` over the measurement (absent
    /// for a server without it, such as Roboflow's).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub server_cpu_ms_per_image: std::collections::BTreeMap<String, f64>,
    /// The server's CPU time per 200 answer, milliseconds, by stage of the request, measured
    /// on the threads that ran each (`cvserve_stage_cpu_seconds_total`), and `front_end`,
    /// their sum: everything outside the network and the batcher.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub stage_cpu_ms_per_image: std::collections::BTreeMap<String, f64>,
}

/// What the server's /metrics counts of its CPU, in seconds: by pool (threads) and by stage.
#[derive(Default)]
struct ServerCpu {
    pools: std::collections::BTreeMap<String, f64>,
    stages: std::collections::BTreeMap<String, f64>,
}

impl ServerCpu {
    /// Growth per image since `before`, in milliseconds, with a `total` (or `front_end`).
    fn per_image(
        now: &std::collections::BTreeMap<String, f64>,
        before: &std::collections::BTreeMap<String, f64>,
        images: usize,
        sum: &str,
    ) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        if images == 0 || now.is_empty() {
            return out;
        }
        let mut total = 0.0;
        for (k, after) in now {
            let ms = (after - before.get(k).copied().unwrap_or(0.0)) * 1000.0 / images as f64;
            total += ms;
            out.insert(k.clone(), ms);
        }
        out.insert(sum.into(), total);
        out
    }
}

/// The server's thread CPU by pool and by stage (seconds), read from its /metrics; empty
/// when it has none.
async fn server_cpu(url: &str) -> ServerCpu {
    let mut out = ServerCpu::default();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = format!("{url}/metrics").parse::<hyper::Uri>() else {
        return out;
    };
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await else {
        return out;
    };
    let Ok(body) = resp.into_body().collect().await else {
        return out;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    for line in text.lines() {
        let (map, rest) =
            if let Some(r) = line.strip_prefix("cvserve_thread_cpu_seconds_total{pool=\"") {
                (&mut out.pools, r)
            } else if let Some(r) = line.strip_prefix("cvserve_stage_cpu_seconds_total{stage=\"") {
                (&mut out.stages, r)
            } else {
                continue;
            };
        let Some((key, value)) = rest.split_once("\"}") else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            map.insert(key.to_owned(), v);
        }
    }
    out
}

/// Latency summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p75: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
        Self {
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: q(0.5),
            p75: q(0.75),
            p90: q(0.9),
            p99: q(0.99),
            max: ms[ms.len() - 1],
        }
    }
}

/// What a client sends: Roboflow's routes, or the Open Inference Protocol.
enum Load {
    Roboflow(Box<Target>),
    V2(crate::bench_v2::V2Target),
}

impl Load {
    /// Sends image `i` from closed-loop client `client` (open loop: any), then waits out a
    /// Retry-After when asked to; returns (status or 0, latency, refused with Retry-After).
    async fn send(&self, i: usize, client: usize) -> (u16, Duration, bool) {
        match self {
            Load::Roboflow(t) => t.send(i).await,
            Load::V2(t) => {
                let (status, latency, _) = t.send_once(i, client).await;
                (status, latency, false)
            }
        }
    }
}

struct Target {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: hyper::Uri,
    content_type: &'static str,
    bodies: Vec<Bytes>,
    timeout: Duration,
    respect_retry_after: bool,
}

impl Target {
    /// Sends body `i % n`; returns (status or 0 for transport errors, latency), and waits out
    /// a Retry-After when asked to.
    async fn send(&self, i: usize) -> (u16, Duration, bool) {
        let (status, latency, retry_after) = self.send_once(i).await;
        if self.respect_retry_after {
            if let Some(wait) = retry_after {
                tokio::time::sleep(wait).await;
            }
        }
        (status, latency, retry_after.is_some())
    }

    async fn send_once(&self, i: usize) -> (u16, Duration, Option<Duration>) {
        let body = self.bodies[i % self.bodies.len()].clone();
        let req = Request::post(self.uri.clone())
            .header("content-type", self.content_type)
            .body(Full::new(body));
        let Ok(req) = req else {
            return (0, Duration::ZERO, None);
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                .map(Duration::from_secs_f64);
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e:?}"))?;
            Ok::<_, String>((status, retry_after))
        })
        .await;
        let latency = started.elapsed();
        let (status, retry_after) = match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                if std::env::var_os("CVSERVE_BENCH_DEBUG").is_some() {
                    eprintln!("transport error: {e}");
                }
                (0, None)
            }
            Err(_) => (0, None),
        };
        (status, latency, retry_after)
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass, which lives through the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Runs the benchmark and prints (and optionally writes) the report.
pub fn run(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    let threads = if cfg.threads == 0 {
        cvserve::config::available_cores()
    } else {
        cfg.threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_async(cfg.clone()))?;
    print_report(&report);
    if let Some(path) = &cfg.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

async fn route_for(
    client: &Client<HttpConnector, Full<Bytes>>,
    cfg: &BenchConfig,
) -> anyhow::Result<String> {
    if let Some(task) = &cfg.task {
        return Ok(format!("/infer/{task}"));
    }
    let get = |path: String| async move {
        let uri: hyper::Uri = format!("{}{path}", cfg.url).parse()?;
        let resp = client.get(uri).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
    };
    // The route the registry lists for the model (keypoints: `/infer/keypoints_detection`,
    // not the task type's spelling), else the task type's.
    let find = |registry: &serde_json::Value| {
        registry["models"].as_array().and_then(|models| {
            let m = models
                .iter()
                .find(|m| m["model_id"] == cfg.model.as_str())?;
            m["request_paths"][0]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    m["task_type"]
                        .as_str()
                        .map(|t| format!("/infer/{}", t.replace('-', "_")))
                })
        })
    };
    let mut task = find(&get(format!("/model/registry?api_key={}", cfg.api_key)).await?);
    if task.is_none() {
        // As inference_sdk does: ask the server to load it.
        let uri: hyper::Uri = format!("{}/model/add", cfg.url).parse()?;
        let body = serde_json::json!({"model_id": cfg.model, "api_key": cfg.api_key}).to_string();
        let req = Request::post(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = client.request(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        task = find(&serde_json::from_slice(&body).unwrap_or_default());
    }
    let task = task.ok_or_else(|| {
        anyhow::anyhow!(
            "the server's registry does not list {}; pass --task",
            cfg.model
        )
    })?;
    Ok(task)
}

/// Roboflow's route and bodies (base64 JSON, or the legacy route's base64 text).
async fn roboflow_target(
    cfg: &BenchConfig,
    files: &[PathBuf],
    extra: &serde_json::Value,
) -> anyhow::Result<(String, Target)> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cfg.concurrency.max(1))
        .build(connector);

    let (path, content_type) = if cfg.route == "legacy" {
        (
            format!("/{}?api_key={}", cfg.model, cfg.api_key),
            "application/x-www-form-urlencoded",
        )
    } else if cfg.route == "workflow" {
        ("/workflows/run".to_owned(), "application/json")
    } else {
        (route_for(&client, cfg).await?, "application/json")
    };
    let mut bodies = Vec::new();
    for f in files {
        let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(f)?);
        bodies.push(Bytes::from(if cfg.route == "legacy" {
            b64
        } else if cfg.route == "workflow" {
            serde_json::json!({
                "api_key": cfg.api_key,
                "specification": workflow_definition(cfg)?,
                "inputs": {"image": {"type": "base64", "value": b64}},
            })
            .to_string()
        } else {
            let mut body = serde_json::json!({
                "api_key": cfg.api_key,
                "image": {"type": "base64", "value": b64},
            });
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            // `model_id` first, as inference_sdk sends it: a server may decide on the request
            // before the image has arrived.
            let rest = body.to_string();
            format!(
                "{{\"model_id\":{},{}",
                serde_json::to_string(&cfg.model)?,
                &rest[1..]
            )
        }));
    }
    let target = Target {
        client,
        uri: format!("{}{path}", cfg.url).parse()?,
        content_type,
        bodies,
        timeout: Duration::from_secs_f64(cfg.timeout),
        respect_retry_after: cfg.respect_retry_after,
    };
    Ok((path, target))
}

/// The definition `--route workflow` runs: `--workflow`'s file, or detection with `--model`.
fn workflow_definition(cfg: &BenchConfig) -> anyhow::Result<serde_json::Value> {
    if let Some(path) = &cfg.workflow {
        let text = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        return Ok(serde_json::from_slice(&text)?);
    }
    Ok(serde_json::json!({"version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [{"type": "roboflow_core/roboflow_object_detection_model@v1", "name": "det",
                   "images": "$inputs.image", "model_id": cfg.model}],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.det.predictions"}]}))
}

async fn run_async(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cfg.images)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cfg.images.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some("jpg" | "jpeg" | "png")
            )
        })
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "no .jpg/.png images in {}",
        cfg.images.display()
    );
    let extra: serde_json::Value = match &cfg.extra {
        Some(e) => serde_json::from_str(e)?,
        None => serde_json::json!({}),
    };

    let (path, target) = if cfg.protocol == "roboflow" {
        anyhow::ensure!(!cfg.shm, "--shm needs --protocol v2-http or v2-grpc");
        let (path, target) = roboflow_target(&cfg, &files, &extra).await?;
        (path, Load::Roboflow(Box::new(target)))
    } else {
        anyhow::ensure!(
            !(cfg.shm && cfg.rate.is_some()),
            "--shm gives each closed-loop client its own region: not with --rate"
        );
        let target = crate::bench_v2::V2Target::new(
            &cfg.protocol,
            &cfg.url,
            &cfg.grpc_url,
            &cfg.model,
            &files,
            cfg.shm,
            cfg.concurrency,
            Duration::from_secs_f64(cfg.timeout),
        )
        .await?;
        (target.label(), Load::V2(target))
    };
    let target = Arc::new(target);

    for i in 0..cfg.warmup {
        target.send(i, 0).await;
    }

    let server0 = server_cpu(&cfg.url).await;
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let stop_at = cfg.duration.map(|d| started + Duration::from_secs_f64(d));
    let total = if cfg.duration.is_some() {
        usize::MAX
    } else {
        cfg.requests
    };
    let issued = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mode;
    if let Some(rate) = cfg.rate {
        mode = format!("open loop, {rate} req/s");
        let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            ticker.tick().await;
            let i = issued.fetch_add(1, Ordering::Relaxed);
            if i >= total || stop_at.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let target = Arc::clone(&target);
            tasks.push(tokio::spawn(async move { vec![target.send(i, i).await] }));
        }
    } else {
        mode = format!("closed loop, concurrency {}", cfg.concurrency);
        for client in 0..cfg.concurrency.max(1) {
            let target = Arc::clone(&target);
            let issued = Arc::clone(&issued);
            tasks.push(tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let i = issued.fetch_add(1, Ordering::Relaxed);
                    if i >= total || stop_at.is_some_and(|t| Instant::now() >= t) {
                        break;
                    }
                    results.push(target.send(i, client).await);
                }
                results
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    if let Load::V2(t) = &*target {
        t.finish(&cfg.url).await;
    }

    let mut by_status = std::collections::BTreeMap::new();
    let mut ok_ms = Vec::new();
    let mut refused_ms = Vec::new();
    let mut refused_with_retry_after = 0;
    for (status, latency, retry_after) in &results {
        if matches!(status, 429 | 503) {
            refused_ms.push(latency.as_secs_f64() * 1000.0);
            refused_with_retry_after += usize::from(*retry_after);
        }
        let key = if *status == 0 {
            "transport".to_string()
        } else {
            status.to_string()
        };
        *by_status.entry(key).or_insert(0) += 1;
        if *status == 200 {
            ok_ms.push(latency.as_secs_f64() * 1000.0);
        }
    }
    let n = results.len();
    let ok = ok_ms.len();
    let server1 = server_cpu(&cfg.url).await;
    let server_cpu_ms_per_image = ServerCpu::per_image(&server1.pools, &server0.pools, ok, "total");
    let stage_cpu_ms_per_image =
        ServerCpu::per_image(&server1.stages, &server0.stages, ok, "front_end");
    Ok(BenchReport {
        url: cfg.url,
        model: cfg.model,
        route: path,
        mode,
        requests: n,
        seconds,
        images_per_second: ok as f64 / seconds,
        requests_per_second: n as f64 / seconds,
        latency_ms: Percentiles::of(ok_ms),
        refused_latency_ms: Percentiles::of(refused_ms),
        refused_with_retry_after,
        by_status,
        error_rate: if n == 0 {
            0.0
        } else {
            (n - ok) as f64 / n as f64
        },
        client_cpu_us_per_request: if n == 0 { 0.0 } else { cpu * 1e6 / n as f64 },
        server_cpu_ms_per_image,
        stage_cpu_ms_per_image,
    })
}

fn print_report(r: &BenchReport) {
    println!("{} {} ({}) — {}", r.url, r.route, r.model, r.mode);
    println!(
        "  {} requests in {:.2} s: {:.1} images/s ({:.1} req/s), error rate {:.2}%",
        r.requests,
        r.seconds,
        r.images_per_second,
        r.requests_per_second,
        r.error_rate * 100.0
    );
    let l = &r.latency_ms;
    println!(
        "  latency ms (200s): mean {:.1}  p50 {:.1}  p75 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        l.mean, l.p50, l.p75, l.p90, l.p99, l.max
    );
    println!("  by status: {:?}", r.by_status);
    let refused: usize = ["429", "503"]
        .iter()
        .filter_map(|k| r.by_status.get(*k))
        .sum();
    if refused > 0 {
        let l = &r.refused_latency_ms;
        println!(
            "  overload answers: {refused} ({} with Retry-After), latency ms p50 {:.1}  p99 {:.1}  max {:.1}",
            r.refused_with_retry_after, l.p50, l.p99, l.max
        );
    }
    println!(
        "  client CPU per request: {:.0} µs",
        r.client_cpu_us_per_request
    );
    if !r.server_cpu_ms_per_image.is_empty() {
        let by: Vec<String> = r
            .server_cpu_ms_per_image
            .iter()
            .filter(|(k, _)| *k != "total")
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        println!(
            "  server CPU per image, ms: {:.2} ({})",
            r.server_cpu_ms_per_image["total"],
            by.join(", ")
        );
    }
    if !r.stage_cpu_ms_per_image.is_empty() {
        let by: Vec<String> = cvserve::stage_cpu::Stage::ALL
            .iter()
            .filter_map(|s| {
                let ms = r.stage_cpu_ms_per_image.get(s.name())?;
                Some(format!("{} {ms:.2}", s.name()))
            })
            .collect();
        println!(
            "  front-end CPU per image, ms: {:.2} ({})",
            r.stage_cpu_ms_per_image["front_end"],
            by.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (51.0, 90.0, 99.0, 100.0));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(vec![]).max, 0.0);
    }
}
