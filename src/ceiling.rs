//! `cvserve ceiling`: the in-process ceiling of a model, i.e. the same ONNX Runtime back-end
//! with the same threads as the server, running batches of preprocessed (synthetic) input
//! back to back: no HTTP, no decode, no pre/postprocessing. The FPS table divides the
//! server's throughput by this.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::config::OrtSettings;
use crate::model::backend::Backend;
use crate::model::ort::{environment, OrtBackend};
use crate::model::repository;

/// Settings of `cvserve ceiling`.
#[derive(Debug, Clone, Args)]
pub struct CeilingConfig {
    /// Model id (`dataset/version`).
    #[arg(long)]
    pub model: String,

    /// Model repository.
    #[arg(long, env = "MODEL_CACHE_DIR", default_value = "models")]
    pub model_cache_dir: PathBuf,

    /// Batch sizes to try; the best one is the ceiling.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batches: Vec<usize>,

    /// Seconds measured per batch size (after one warm-up run).
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,

    /// ONNX Runtime settings, the same flags and variables as the server's.
    #[command(flatten)]
    pub ort: OrtSettings,
}

/// Images per second at each batch size, and the best.
#[derive(Debug, Serialize)]
pub struct CeilingReport {
    pub model: String,
    pub per_batch: Vec<(usize, f64)>,
    pub best_batch: usize,
    pub images_per_second: f64,
}

/// Measures and prints the ceiling as JSON.
pub fn run(cfg: CeilingConfig) -> anyhow::Result<CeilingReport> {
    let threads = cfg.ort.intra_threads();
    let meta = repository::read(&cfg.model_cache_dir, &cfg.model)?;
    let env = environment(&cfg.ort.dylib_path, threads).map_err(anyhow::Error::msg)?;
    let mut backend =
        OrtBackend::load(env, &meta.weights, cfg.ort.cpu_arena).map_err(anyhow::Error::msg)?;
    let (rw, rh) = meta.resize_size.unwrap_or((640, 640));
    let (h, w) = (
        backend.input().height.unwrap_or(rh),
        backend.input().width.unwrap_or(rw),
    );
    let fixed = backend.input().fixed_batch.map(|b| b as usize);
    let mut per_batch = Vec::new();
    for &b in &cfg.batches {
        if fixed.is_some_and(|f| f != b) {
            continue;
        }
        // Mid-grey input: a realistic, not degenerate, activation pattern.
        let input = vec![0.5f32; b * 3 * h as usize * w as usize];
        backend
            .run(&input, b, h, w)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let mut images = 0usize;
        while started.elapsed() < Duration::from_secs_f64(cfg.seconds) {
            backend
                .run(&input, b, h, w)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            images += b;
        }
        per_batch.push((b, images as f64 / started.elapsed().as_secs_f64()));
    }
    let (best_batch, images_per_second) = per_batch
        .iter()
        .cloned()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or_else(|| anyhow::anyhow!("no batch size could run"))?;
    let report = CeilingReport {
        model: cfg.model,
        per_batch,
        best_batch,
        images_per_second,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}
