//! Wiring: configuration in, a running server out. Builds the pools, the ring and the model
//! manager, listens (so `/healthz` answers at once), preloads and warms up the models (then
//! `/readiness` turns 200), and serves until SIGTERM/SIGINT.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ServeConfig;
use crate::engine::admission::Activity;
use crate::engine::models::{LoadSettings, ModelManager};
use crate::engine::{DecodeSettings, Engine};
use crate::http::budget::BodyBudget;
use crate::http::images::{UrlFetcher, UrlPolicy};
use crate::http::{self, AppState};
use crate::metrics::METRICS;
use crate::model::backend::{BackendChoice, BackendKind, FaultInjection};
use crate::model::ort::{environment, library_offers, nvidia_gpu_present};
use crate::model::provider::{Provider, ProviderChoice};
use crate::pipeline::batcher::BatcherConfig;
use crate::pipeline::cores::CoreBudget;
use crate::pipeline::ring::Ring;
use crate::pipeline::Pools;

/// Runs the server until a shutdown signal; returns once drained.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let providers = cfg.ort.providers().map_err(anyhow::Error::msg)?;
    let backend = choose_backend(&cfg, &providers)?;
    let on_gpu = backend == BackendKind::Ort && runs_on_gpu(&cfg, &providers);
    let budget = cfg.cpu_budget(on_gpu);
    tracing::info!(?budget, "CPU budget");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(budget.http)
        .thread_name("http")
        // The workers' CPU by stage (stage_cpu.rs): hyper's and the handlers' between
        // wake-ups. Only the workers park and unpark: the blocking pool's threads (model
        // loads) are not metered.
        .on_thread_unpark(crate::stage_cpu::resume_http)
        .on_thread_park(crate::stage_cpu::pause)
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(cfg, on_gpu, backend));
    // Do not wait for a model still loading in the blocking pool: exit within the drain time.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

/// The back end every model runs on (BACKEND), said in the log; `auto` without a usable
/// ONNX Runtime library serves on tract and says why, loudly.
fn choose_backend(cfg: &ServeConfig, providers: &ProviderChoice) -> anyhow::Result<BackendKind> {
    let ort_usable = match cfg.ort.backend {
        BackendChoice::Tract => Ok(()), // not loaded at all
        _ => environment(&cfg.ort.dylib_path).map(drop),
    };
    let (kind, fell_back) = cfg.ort.backend.resolve(ort_usable, providers.wants_gpu());
    if kind == BackendKind::Tract && providers.wants_gpu() {
        anyhow::bail!(
            "BACKEND=tract runs on the CPU only, and the execution providers ask for a GPU \
             ({providers:?}): use BACKEND=ort (or auto) with the GPU build of ONNX Runtime"
        );
    }
    match fell_back {
        Some(why) => tracing::warn!(
            reason = %why,
            "ONNX Runtime is not usable: serving on tract (pure Rust, CPU only, slower; \
             BACKEND=ort to refuse instead)"
        ),
        None => tracing::info!(backend = kind.name(), "inference back end"),
    }
    Ok(kind)
}

/// Whether the models will run on a GPU, for sizing the CPU budget and the batch: asked for
/// by name, or `auto` with a GPU build of ONNX Runtime on a machine with an NVIDIA GPU. Says
/// once in the log what the loaded library offers.
fn runs_on_gpu(cfg: &ServeConfig, providers: &ProviderChoice) -> bool {
    if let Err(e) = environment(&cfg.ort.dylib_path) {
        // Every model will fail to load with this reason; the server still answers health.
        tracing::error!(error = %e, "ONNX Runtime is not usable");
        return false;
    }
    let offered: Vec<&str> = [Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        .into_iter()
        .filter(|p| library_offers(*p).is_ok())
        .map(Provider::ort_name)
        .collect();
    let gpu_present = nvidia_gpu_present();
    tracing::info!(
        library = %cfg.ort.dylib_path.display(),
        offers = ?offered,
        nvidia_gpu = gpu_present,
        execution_providers = ?providers,
        device_id = cfg.ort.device_id,
        "ONNX Runtime"
    );
    if let ProviderChoice::Listed { ignored, .. } = providers {
        if !ignored.is_empty() {
            tracing::warn!(
                ?ignored,
                "execution providers this build does not offer are skipped"
            );
        }
    }
    match providers {
        ProviderChoice::Listed { .. } => providers.wants_gpu(),
        ProviderChoice::Auto => gpu_present && library_offers(Provider::Cuda).is_ok(),
    }
}

fn build_state(
    cfg: ServeConfig,
    on_gpu: bool,
    backend: BackendKind,
) -> anyhow::Result<Arc<AppState>> {
    let budget = cfg.cpu_budget(on_gpu);
    let pools = Arc::new(Pools::new(
        budget.decode,
        budget.preprocess,
        budget.postprocess,
    )?);
    let ring = Ring::create_fitting(
        &cfg.ring_dir,
        cfg.ring_slots as usize,
        cfg.ring_slot_pixels.saturating_mul(3),
    )?;
    let manager = Arc::new(ModelManager::new(
        LoadSettings {
            repository: cfg.model_cache_dir.clone(),
            ort_dylib: cfg.ort.dylib_path.clone(),
            backend,
            instances: budget.instances,
            instance_idle_timeout: Duration::try_from_secs_f64(cfg.instance_idle_timeout_s)
                .map_err(|e| anyhow::anyhow!("INSTANCE_IDLE_TIMEOUT_S: {e}"))?,
            cores: Arc::new(CoreBudget::new(budget.cores)),
            lone_threads: budget.lone_threads,
            session: cfg
                .ort
                .session(budget.intra_threads)
                .map_err(anyhow::Error::msg)?,
            batcher: BatcherConfig {
                max_batch: cfg.max_batch(on_gpu),
                max_queue_delay: Duration::from_micros(cfg.max_queue_delay_us),
                max_queue_size: cfg.max_queue_size as usize,
            },
            faults: FaultInjection {
                delay: Duration::from_millis(cfg.inject_delay_ms),
                fail_batch: cfg.inject_fail_batch,
                panic_batch: cfg.inject_panic_batch,
            },
            fault_model: cfg.inject_model.clone(),
            max_active: cfg.max_active_models as usize,
            load_delay: Duration::from_millis(cfg.inject_load_delay_ms),
            control: cfg.model_control,
        },
        Arc::clone(&pools),
    ));
    let downloader =
        crate::model::download::Downloader::new(crate::model::download::DownloadSettings {
            api_base_url: cfg.api_base_url.clone(),
            offline: cfg.offline_mode,
            max_bytes: cfg.model_download_max_bytes,
            timeout: std::time::Duration::from_secs(cfg.model_download_timeout_s.max(1)),
            default_api_key: cfg.roboflow_api_key.clone().filter(|k| !k.is_empty()),
        })
        .map_err(anyhow::Error::msg)?;
    // Leftovers of a download a killed process left half done.
    let _ = std::fs::remove_dir_all(crate::model::download::partial_dir(&cfg.model_cache_dir));
    // Once the server has been quiet for IDLE_TRIM_S, freed memory goes back to the OS: every
    // pool thread's mimalloc heap, then glibc's heaps (ONNX Runtime's buffers).
    let idle_trim = Duration::try_from_secs_f64(cfg.idle_trim_s)
        .map_err(|e| anyhow::anyhow!("IDLE_TRIM_S: {e}"))?;
    let trimmer = (!idle_trim.is_zero())
        .then(|| {
            let pools = Arc::clone(&pools);
            crate::memory::IdleTrimmer::start(idle_trim, move || {
                for pool in [&pools.decode, &pools.preprocess, &pools.postprocess] {
                    pool.broadcast(|_| crate::memory::return_free_memory());
                }
                crate::memory::return_free_memory();
            })
        })
        .transpose()?;
    let activity = Activity::new(cfg.max_inflight_requests as usize, trimmer);
    let engine = Engine::new(
        manager,
        downloader,
        ring,
        pools,
        activity,
        DecodeSettings {
            max_image_pixels: cfg.max_image_pixels,
            max_jpeg_scans: cfg.max_jpeg_scans,
            max_decode_work: cfg.max_decode_work_pixels,
            reduced_scale: cfg.decode_reduced_scale,
            disabled: crate::geometry::DisabledSteps {
                auto_orient: cfg.disable_preproc_auto_orient,
                static_crop: cfg.disable_preproc_static_crop,
                contrast: cfg.disable_preproc_contrast,
                grayscale: cfg.disable_preproc_grayscale,
            },
            ring_model_share: cfg.ring_model_share,
        },
    );
    let policy = || UrlPolicy::new(cfg.url_deny_private, &cfg.url_allow_hosts);
    let urls = UrlFetcher {
        client: if cfg.allow_url_input {
            Some(policy().client(Duration::from_millis(cfg.url_timeout_ms))?)
        } else {
            None
        },
        policy: policy(),
        max_bytes: cfg.url_max_bytes,
    };
    let ring_path = engine.ring().path().to_owned();
    let admin_token = http::control::admin_token(&cfg)?;
    Ok(Arc::new(AppState {
        workflows: crate::workflows::Workflows::new(
            cfg.workflow_cache_size,
            crate::workflows::spec::DefinitionLimits {
                max_steps: cfg.workflow_max_steps,
            },
        ),
        admin_token,
        urls,
        engine,
        uuid: uuid::Uuid::new_v4().simple().to_string()[..6].to_string(),
        ready: Default::default(),
        preload_failed: Default::default(),
        draining: Default::default(),
        drain_started: Default::default(),
        // At least one body of the largest size, from any one client, or such a request
        // could never pass.
        body_memory: BodyBudget::new(
            cfg.max_body_memory_bytes.max(cfg.max_body_bytes),
            cfg.body_memory_peer_share,
            cfg.max_body_bytes,
        ),
        in_flight: Default::default(),
        regions: crate::regions::Regions::new(
            "/dev/shm".into(),
            cfg.allow_client_shm,
            cfg.max_shm_regions,
        )
        .owned_by(&cfg.shm_allowed_uids)
        .protect(&ring_path),
        cfg,
    }))
}

async fn serve(cfg: ServeConfig, on_gpu: bool, backend: BackendKind) -> anyhow::Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let drain = Duration::from_secs_f64(cfg.drain_timeout_s.max(0.0));
    let max_connections = cfg.max_connections as usize;
    let state = build_state(cfg, on_gpu, backend)?;
    METRICS
        .ring_slots_total
        .set(state.engine.ring().slots() as i64);
    if state.engine.models().settings().faults.is_active() {
        tracing::warn!(faults = ?state.engine.models().settings().faults, "FAULT INJECTION IS ON (test setting)");
    }
    let listener = http::listen(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(cap) = somaxconn.filter(|&cap| cap < max_connections) {
        tracing::warn!(
            max_connections,
            somaxconn = cap,
            "the kernel's accept backlog (net.core.somaxconn) is below MAX_CONNECTIONS: a burst of connections larger than it may be dropped or reset before cvserve sees it; raise net.core.somaxconn"
        );
    }
    tracing::info!(
        %local,
        ring_slots = state.engine.ring().slots(),
        ring_slot_mib = state.engine.ring().slot_bytes() >> 20,
        "listening"
    );
    let mut grpc_server = None;
    if state.cfg.grpc_port != 0 {
        let grpc_addr = format!("{}:{}", state.cfg.host, state.cfg.grpc_port);
        let grpc = http::listen(&grpc_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {grpc_addr} (GRPC_PORT): {e}"))?;
        let grpc_local = grpc.local_addr()?;
        tracing::info!(%grpc_local, "gRPC (Open Inference Protocol) listening");
        println!("cvserve grpc listening on {grpc_local}");
        grpc_server = Some(tokio::spawn(http::v2::grpc::serve(
            grpc,
            Arc::clone(&state),
        )));
    }
    // Tests and scripts read this line to find the port.
    println!("cvserve listening on http://{local}");

    let preload = Arc::clone(&state);
    tokio::task::spawn_blocking(move || preload_models(&preload));

    let draining_since = http::serve(
        listener,
        Arc::clone(&state),
        shutdown_signal(),
        drain,
        max_connections,
    )
    .await;
    // gRPC calls are answered too (its server stops once its last call has answered and
    // its connections have closed), within what is left of the drain timeout.
    if let Some(grpc) = grpc_server {
        let left = drain.saturating_sub(draining_since.elapsed());
        if tokio::time::timeout(left, grpc).await.is_err() {
            tracing::warn!("gRPC calls still running at the end of the drain timeout");
        }
    }
    // Every model's queue closes: its batcher and instances finish what they hold and end.
    // They are waited for before `main` returns, so that no session runs, with its tensors
    // alive, while ONNX Runtime's and CUDA's static destructors run; past the limit the
    // process ends without running them (inside Kubernetes' 30 s grace period).
    state.engine.clear_models();
    if !crate::pipeline::threads::wait_all(SHUTDOWN_JOIN_LIMIT) {
        tracing::warn!(
            running = crate::pipeline::threads::running(),
            limit_s = SHUTDOWN_JOIN_LIMIT.as_secs(),
            "pipeline threads still running at shutdown: exiting without library destructors"
        );
        let _ = std::fs::remove_file(state.engine.ring().path());
        // SAFETY: ends the process at once; nothing after this runs.
        unsafe { libc::_exit(0) };
    }
    tracing::info!("bye");
    Ok(())
}

/// Longest shutdown waits for the pipeline's threads after the drain.
const SHUTDOWN_JOIN_LIMIT: Duration = Duration::from_secs(3);

fn preload_models(state: &AppState) {
    let wanted: Vec<String> = match state.cfg.preload_models.trim() {
        "all" => state.engine.models().available(),
        "none" | "" => vec![],
        list => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let max_active = state.cfg.max_active_models as usize;
    if wanted.len() > max_active {
        // Loading more would only unload the first ones again.
        tracing::warn!(
            wanted = wanted.len(),
            max_active_models = max_active,
            skipped = ?&wanted[max_active..],
            "more models to preload than MAX_ACTIVE_MODELS: the rest load on their first request"
        );
    }
    let mut failed = Vec::new();
    for id in wanted.into_iter().take(max_active) {
        // Never unloaded to make room for a model a client names.
        state.engine.models().pin(&id);
        if let Err(e) = state.engine.models().add(&id) {
            // One broken or missing model does not keep the others from serving, but the
            // replica is not ready (it cannot serve what it was asked to) until it loads,
            // unless EXIT_ON_LOAD_ERROR ends it.
            tracing::error!(model = id, error = %e, "model failed to load");
            failed.push((id, e.to_string()));
        }
    }
    if !failed.is_empty() && state.cfg.exit_on_load_error {
        tracing::error!(
            failed = failed.len(),
            "EXIT_ON_LOAD_ERROR: preloaded models failed to load; exiting"
        );
        // No destructor runs on this path: the ring's file is removed here.
        let _ = std::fs::remove_file(state.engine.ring().path());
        std::process::exit(1);
    }
    *state.preload_failed.lock() = failed;
    state.ready.store(true, Ordering::Release);
    match state.readiness() {
        http::Readiness::Ready => {
            tracing::info!(models = state.engine.models().list().len(), "ready")
        }
        other => tracing::error!(
            readiness = ?other,
            "NOT READY: /readiness answers 503 until the failed models load (POST /model/add)"
        ),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
