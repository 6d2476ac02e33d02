//! `cvserve ceiling`: the in-process ceiling of a model, i.e. the server's back end (ONNX
//! Runtime or tract, BACKEND) running batches of preprocessed (synthetic) input back to back: no HTTP, no
//! decode, no pre/postprocessing. It searches instances x intra-op threads x batch size
//! (instances run on their own threads at once, as the server's do) and reports the best
//! configuration, plus the batch-1 latency of a lone session per thread count (what a single
//! request costs the served configuration). The FPS table divides the server's throughput by
//! the best.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use cvserve::config::{available_cores, OrtSettings};
use cvserve::model::backend::{Backend, BackendChoice, BackendKind, BatchBuffer, BatchShape};
use cvserve::model::ort::{environment, BatchProfile, OrtBackend};
use cvserve::model::repository;
use cvserve::model::tract::{TractBackend, TractModel};

/// Settings of `cvserve ceiling`.
#[derive(Debug, Clone, Args)]
pub struct CeilingConfig {
    /// Model id (`dataset/version`).
    #[arg(long)]
    pub model: String,

    /// Model repository.
    #[arg(long, env = "MODEL_CACHE_DIR", default_value = "models")]
    pub model_cache_dir: PathBuf,

    /// Batch sizes to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batches: Vec<usize>,

    /// Instance counts to try (default: 1 to the number of cores).
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<usize>,

    /// Intra-op thread counts per instance to try (default: 1 to the number of cores).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,

    /// Cores the configurations may use: instances x threads above it are skipped
    /// (default: the cores of this process).
    #[arg(long)]
    pub cores: Option<usize>,

    /// Seconds measured per configuration (after one warm-up run per instance).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,

    /// ONNX Runtime settings, the same flags and variables as the server's.
    #[command(flatten)]
    pub ort: OrtSettings,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub instances: usize,
    pub intra_threads: usize,
    pub batch: usize,
    pub images_per_second: f64,
}

/// Median time of one batch-1 run of a lone session.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub intra_threads: usize,
    pub batch1_ms: f64,
}

/// Every configuration, the best, and batch-1 latencies.
#[derive(Debug, Serialize)]
pub struct CeilingReport {
    pub model: String,
    /// The back end (`onnxruntime` or `tract`) and execution provider the sessions ran on.
    pub backend: &'static str,
    pub provider: &'static str,
    pub configurations: Vec<Measured>,
    pub best: Measured,
    pub images_per_second: f64,
    pub latency: Vec<Latency>,
}

/// Measures and prints the ceiling as JSON.
pub fn run(cfg: CeilingConfig) -> anyhow::Result<CeilingReport> {
    let cores = cfg.cores.unwrap_or_else(available_cores).max(1);
    let or_range = |v: &Vec<usize>| {
        if v.is_empty() {
            (1..=cores).collect()
        } else {
            v.clone()
        }
    };
    let (instance_counts, thread_counts) = (or_range(&cfg.instances), or_range(&cfg.threads));
    let meta = repository::read(&cfg.model_cache_dir, &cfg.model)?;
    let providers = cfg.ort.providers().map_err(anyhow::Error::msg)?;
    let ort_usable = match cfg.ort.backend {
        BackendChoice::Tract => Ok(()), // not loaded at all
        _ => environment(&cfg.ort.dylib_path).map(drop),
    };
    let (kind, fell_back) = cfg.ort.backend.resolve(ort_usable, providers.wants_gpu());
    if kind == BackendKind::Tract && providers.wants_gpu() {
        anyhow::bail!("tract runs on the CPU only, and the execution providers ask for a GPU");
    }
    if let Some(why) = fell_back {
        eprintln!("ONNX Runtime is not usable ({why}): measuring tract");
    }
    let (rw, rh) = meta.resize_size.unwrap_or((640, 640));
    let max_batch = cfg.batches.iter().copied().max().unwrap_or(1);
    // tract's plans (one per batch size) are made once and shared by every instance.
    let tract = match kind {
        BackendKind::Tract => Some(Arc::new(
            TractModel::load(&meta.weights, max_batch, (rw, rh)).map_err(anyhow::Error::msg)?,
        )),
        BackendKind::Ort => None,
    };
    let mut configurations = Vec::new();
    let mut latency = Vec::new();
    let mut provider = "";
    for &threads in &thread_counts {
        let opts = cfg.ort.session(threads).map_err(anyhow::Error::msg)?;
        let profile = BatchProfile {
            max_batch,
            height: rh,
            width: rw,
        };
        let prepacked = ort::session::builder::PrepackedWeights::new();
        let max_instances = instance_counts
            .iter()
            .copied()
            .filter(|i| i * threads <= cores)
            .max()
            .unwrap_or(0);
        if max_instances == 0 {
            continue;
        }
        let mut sessions: Vec<Box<dyn Backend>> = (0..max_instances)
            .map(|_| -> Result<Box<dyn Backend>, String> {
                match &tract {
                    Some(model) => Ok(Box::new(TractBackend::new(Arc::clone(model), threads)?)),
                    None => {
                        let env = environment(&cfg.ort.dylib_path)?;
                        Ok(Box::new(OrtBackend::load(
                            env,
                            &meta.weights,
                            &opts,
                            &prepacked,
                            Some(&profile),
                        )?))
                    }
                }
            })
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        provider = sessions[0].provider();
        let input = sessions[0].input().clone();
        let (h, w) = (input.height.unwrap_or(rh), input.width.unwrap_or(rw));
        let fixed = input.fixed_batch.map(|b| b as usize);
        let shape = |batch| BatchShape {
            batch,
            height: h,
            width: w,
        };
        latency.push(Latency {
            intra_threads: threads,
            batch1_ms: batch1_latency(&mut sessions[0], shape(fixed.unwrap_or(1)))?,
        });
        for &instances in instance_counts.iter().filter(|&&i| i <= max_instances) {
            for &batch in &cfg.batches {
                if fixed.is_some_and(|f| f != batch) {
                    continue;
                }
                let ips = measure(&mut sessions[..instances], shape(batch), cfg.seconds)?;
                eprintln!(
                    "{}: {instances} instance(s) x {threads} thread(s), batch {batch}: {ips:.1} img/s",
                    cfg.model
                );
                configurations.push(Measured {
                    instances,
                    intra_threads: threads,
                    batch,
                    images_per_second: ips,
                });
            }
        }
    }
    let best = configurations
        .iter()
        .max_by(|a, b| a.images_per_second.total_cmp(&b.images_per_second))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no configuration could run"))?;
    let report = CeilingReport {
        model: cfg.model,
        backend: kind.name(),
        provider,
        images_per_second: best.images_per_second,
        best,
        configurations,
        latency,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

/// Mid-grey input: a realistic, not degenerate, activation pattern.
fn grey(session: &dyn Backend, shape: BatchShape) -> BatchBuffer {
    let mut input =
        session.alloc_batch(shape.batch * 3 * shape.height as usize * shape.width as usize);
    input.fill(0.5);
    input
}

/// Median of 15 batch-1 runs of one session alone (after a warm-up run).
fn batch1_latency(session: &mut Box<dyn Backend>, shape: BatchShape) -> anyhow::Result<f64> {
    let mut input = grey(session.as_ref(), shape);
    let mut times = Vec::new();
    for i in 0..16 {
        let started = Instant::now();
        session
            .run(&mut input, shape)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if i > 0 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Images per second of `sessions` running `batch`-image batches at once, each on its own
/// thread, for `seconds`.
fn measure(
    sessions: &mut [Box<dyn Backend>],
    shape: BatchShape,
    seconds: f64,
) -> anyhow::Result<f64> {
    let images = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Barrier::new(sessions.len() + 1);
    let failed: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let elapsed = std::thread::scope(|s| {
        for session in sessions.iter_mut() {
            let (images, stop, start, failed) = (&images, &stop, &start, Arc::clone(&failed));
            s.spawn(move || {
                let mut input = grey(session.as_ref(), shape);
                let warm = session.run(&mut input, shape);
                start.wait();
                if let Err(e) = warm {
                    *failed.lock() = Some(e.to_string());
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = session.run(&mut input, shape) {
                        *failed.lock() = Some(e.to_string());
                        return;
                    }
                    images.fetch_add(shape.batch, Ordering::Relaxed);
                }
            });
        }
        start.wait();
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        started
    });
    // Runs that finish after `stop` are counted, and so is their time.
    let secs = elapsed.elapsed().as_secs_f64();
    if let Some(e) = failed.lock().take() {
        anyhow::bail!("{e}");
    }
    Ok(images.load(Ordering::Relaxed) as f64 / secs)
}
