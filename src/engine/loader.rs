//! Loading one model: reads its metadata (`model::repository`), opens its back end's
//! instances (ONNX Runtime sessions, `model::ort`, or tract plans, `model::tract`; more
//! instances start on demand), runs probe batches to learn the
//! output layout (`tasks`), warms up every batch size it will see, and starts its pipeline
//! threads (`pipeline::batcher`). The registry (`models`) calls it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::geometry::{InputSpec, Normalization};
use crate::model::backend::{Backend, BackendKind, BatchShape, FaultInjection, FaultyBackend};
use crate::model::ort::{environment, BatchProfile, OrtBackend, SessionOptions};
use crate::model::provider::Provider;
use crate::model::repository::{ModelMetadata, RepositoryError, TaskType};
use crate::model::tract::{TractBackend, TractModel};
use crate::pipeline::batcher::{self, BatchQueue, BatcherConfig, InstancePolicy, ModelRuntime};
use crate::pipeline::cores::CoreBudget;
use crate::pipeline::Pools;
use crate::tasks::{heads, DecoderHints, OutputDecoder};

/// A model ready to take jobs.
pub struct LoadedModel {
    pub meta: ModelMetadata,
    pub runtime: Arc<ModelRuntime>,
    pub queue: BatchQueue,
    /// Largest batch the batcher forms for it.
    pub max_batch: usize,
    /// Most inference instances (sessions) serving it; `queue.instances()` run now.
    pub instances: usize,
    /// Intra-op threads of each instance's session.
    pub intra_threads: usize,
    /// Intra-op threads of the wide session that runs lone requests (1: none).
    pub lone_threads: usize,
    /// The execution provider its sessions run on (ONNX Runtime's name for it).
    pub provider: String,
    /// The back end: `onnxruntime` or `tract`.
    pub backend: &'static str,
    /// Ring slots its requests hold (decoded, waiting for preprocessing).
    pub ring_held: Arc<std::sync::atomic::AtomicUsize>,
    /// When a request last asked for it (a use counter, for MAX_ACTIVE_MODELS' LRU).
    pub last_used: std::sync::atomic::AtomicU64,
    /// Its requests take their turn for ring slots here, in arrival order.
    pub slot_line: tokio::sync::Mutex<()>,
    /// Its requests in the server and the rate it answers them: the waiting room's prediction.
    pub line: Arc<crate::engine::admission::Line>,
}

/// Why a model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("Model '{id}' failed to load: {reason}")]
    Failed { id: String, reason: String },
    /// MAX_ACTIVE_MODELS are loaded and none may be unloaded for another (all preloaded).
    #[error("Model '{id}' cannot be loaded: MAX_ACTIVE_MODELS ({max}) models are loaded and all were preloaded (PRELOAD_MODELS), which are never unloaded to make room")]
    NoRoom { id: String, max: usize },
}

/// How models are loaded: the settings every model shares.
#[derive(Clone)]
pub struct LoadSettings {
    pub repository: PathBuf,
    pub ort_dylib: PathBuf,
    /// The back end every model runs on.
    pub backend: BackendKind,
    /// Most inference instances per model (one starts with the model, the rest on demand).
    pub instances: usize,
    /// An instance beyond a model's last stops after this long without work.
    pub instance_idle_timeout: std::time::Duration,
    /// The cores every model's CPU inference runs share.
    pub cores: Arc<CoreBudget>,
    /// Intra-op threads of the extra session that runs lone requests (1: none).
    pub lone_threads: usize,
    /// How each instance's session runs.
    pub session: SessionOptions,
    pub batcher: BatcherConfig,
    pub faults: FaultInjection,
    /// The one model the faults apply to (`None`: every model).
    pub fault_model: Option<String>,
    /// Most models loaded at once (MAX_ACTIVE_MODELS); loading one more unloads the least
    /// recently used that was not preloaded.
    pub max_active: usize,
    /// Fault injection for tests: every load (of `fault_model`, or any) sleeps this long
    /// first (a slow load, like a TensorRT engine build).
    pub load_delay: std::time::Duration,
    /// Who loads models (MODEL_CONTROL): under `open` a request for a model not loaded
    /// loads it.
    pub control: crate::config::ModelControl,
}

pub(super) fn load(
    meta: ModelMetadata,
    settings: &LoadSettings,
    pools: &Arc<Pools>,
) -> Result<LoadedModel, LoadError> {
    let failed = |reason: String| LoadError::Failed {
        id: meta.id.clone(),
        reason,
    };
    let instances = settings.instances.max(1);
    let (rw, rh) = meta.resize_size.unwrap_or((640, 640));
    let profile = BatchProfile {
        max_batch: settings.batcher.max_batch.max(1),
        height: rh,
        width: rw,
    };
    let started = std::time::Instant::now();
    // How to make one instance of `threads` intra-op threads on this back end. The instances
    // of one model share their weights: ONNX Runtime's pre-packed weights, or tract's plans.
    // One instance starts with the model; the rest start on demand (`InstancePolicy`).
    type Make = Arc<dyn Fn(usize) -> Result<Box<dyn Backend>, String> + Send + Sync>;
    let make: Make = match settings.backend {
        BackendKind::Ort => {
            let env = environment(&settings.ort_dylib).map_err(failed)?;
            let prepacked = ort::session::builder::PrepackedWeights::new();
            let weights = meta.weights.clone();
            let session = settings.session.clone();
            Arc::new(move |threads| {
                let opts = SessionOptions {
                    intra_threads: threads,
                    ..session.clone()
                };
                let b = OrtBackend::load(env, &weights, &opts, &prepacked, Some(&profile))?;
                Ok(Box::new(b) as Box<dyn Backend>)
            })
        }
        BackendKind::Tract => {
            let model =
                TractModel::load(&meta.weights, profile.max_batch, (rw, rh)).map_err(failed)?;
            let model = Arc::new(model);
            Arc::new(move |threads| {
                let b = TractBackend::new(Arc::clone(&model), threads)?;
                Ok(Box::new(b) as Box<dyn Backend>)
            })
        }
    };
    let mut backends: Vec<Box<dyn Backend>> =
        vec![make(settings.session.intra_threads).map_err(failed)?];
    let provider = backends[0].provider().to_string();
    let backend_name = backends[0].backend();
    // One wide instance for lone requests, on the CPU only (on a GPU the network does not use
    // the cores).
    let mut lone: Option<Box<dyn Backend>> = None;
    if settings.lone_threads > settings.session.intra_threads
        && provider == Provider::Cpu.ort_name()
    {
        lone = Some(make(settings.lone_threads).map_err(failed)?);
    }
    let sessions_ms = started.elapsed().as_millis() as u64;
    let input = backends[0].input().clone();
    let spec = InputSpec {
        width: input.width.unwrap_or(rw),
        height: input.height.unwrap_or(rh),
        resize: meta.resize,
        normalization: match meta.task {
            TaskType::Classification => Normalization::MinusOneToOne,
            _ if heads::Family::from_model_type(&meta.model_type)
                == Some(heads::Family::RfDetr) =>
            {
                Normalization::ImageNet
            }
            _ => Normalization::ZeroToOne,
        },
    };
    let fixed_batch = input.fixed_batch.map(|b| b as usize);
    let max_batch = batcher::effective_max_batch(settings.batcher.max_batch, fixed_batch);

    // Warm-up of every instance at the batch sizes the batcher will use, before the model
    // serves (and before /readiness): on a GPU the one shape every batch runs at (the largest,
    // `OrtBackend::run`), so no cuDNN algorithm search or TensorRT engine build ever happens
    // on a live request; on the CPU the smallest and the largest. The first run also tells
    // the output layout.
    let on_gpu = provider != "CPUExecutionProvider";
    let warm_sizes: Vec<usize> = match fixed_batch {
        Some(b) => vec![b],
        None if on_gpu => vec![max_batch],
        None if max_batch > 1 => vec![1, max_batch],
        None => vec![1],
    };
    // Probe runs tell the output layout and, for classification, whether the graph ends in
    // its own Softmax/Sigmoid: a black image and a ramp, decided once here, never per image.
    let probe_rows = fixed_batch.unwrap_or(1);
    let mut probes = Vec::new();
    if let Some(backend) = backends.first_mut() {
        for pattern in [0.0f32, 1.0] {
            let mut input = backend.alloc_batch(probe_rows * spec.image_len());
            for (i, v) in input.iter_mut().enumerate() {
                *v = pattern * ((i % 251) as f32 / 125.0 - 1.0);
            }
            probes.push(
                backend
                    .run(&mut input, BatchShape::of(probe_rows, &spec))
                    .map_err(|e| failed(format!("probe inference failed: {e}")))?,
            );
        }
    }
    // Some RF-DETR exports list a background class in class_names.txt: its column is
    // skipped and the name is not served (as Roboflow does).
    let mut class_names = meta.class_names.clone();
    let background = class_names
        .iter()
        .position(|n| n == heads::RFDETR_BACKGROUND)
        .filter(|_| spec.normalization == Normalization::ImageNet);
    if let Some(i) = background {
        class_names.remove(i);
    }
    let hints = DecoderHints {
        task: meta.task,
        model_type: &meta.model_type,
        num_classes: class_names.len(),
        multi_label: meta.multiclass,
        background,
        keypoints: &meta.keypoints,
    };
    let decoder = OutputDecoder::infer(hints, &probes).map_err(failed)?;
    drop(probes);
    if let OutputDecoder::Classification { activation, .. } = &decoder {
        tracing::info!(model = %meta.id, ?activation, "classification outputs: activation decided at load");
    }
    let warm_started = std::time::Instant::now();
    // The largest warm-up batch's best time: the model's rate before any request measured
    // it (the waiting room's first prediction). Its first run pays one-time costs, so the
    // first instance runs it twice.
    let largest = warm_sizes.iter().copied().max().unwrap_or(1);
    let mut best_largest = f64::INFINITY;
    for (i, backend) in backends.iter_mut().chain(lone.iter_mut()).enumerate() {
        let mut runs: Vec<usize> = warm_sizes.clone();
        if i == 0 {
            runs.push(largest);
        }
        for rows in runs {
            let mut zeros = backend.alloc_batch(rows * spec.image_len());
            let t = std::time::Instant::now();
            backend
                .run(&mut zeros, BatchShape::of(rows, &spec))
                .map_err(|e| failed(format!("warm-up inference failed: {e}")))?;
            if rows == largest {
                best_largest = best_largest.min(t.elapsed().as_secs_f64());
            }
        }
    }
    let warm_rate = (best_largest > 0.0 && best_largest.is_finite())
        .then(|| (backends.len() * largest) as f64 / best_largest);
    tracing::info!(
        model = %meta.id,
        %provider,
        sessions_ms,
        warm_up_ms = warm_started.elapsed().as_millis() as u64,
        warm_rate = warm_rate.map(|r| (r * 10.0).round() / 10.0),
        batch_sizes = ?warm_sizes,
        "sessions created and warmed up (TensorRT engines are built or loaded from the cache here)"
    );
    let faults = (settings.faults.is_active()
        && settings.fault_model.as_ref().is_none_or(|m| *m == meta.id))
    .then(|| (settings.faults, Arc::default()));
    let faulty = {
        let faults = faults.clone();
        move |b: Box<dyn Backend>| match &faults {
            Some((f, runs)) => {
                Box::new(FaultyBackend::new(b, *f, Arc::clone(runs))) as Box<dyn Backend>
            }
            None => b,
        }
    };
    backends = backends.into_iter().map(&faulty).collect();
    lone = lone.map(&faulty);
    // More instances of the same session settings, warmed up at the same batch sizes, made
    // on the batcher's request on a thread of their own.
    let factory: batcher::InstanceFactory = {
        let make = Arc::clone(&make);
        let intra = settings.session.intra_threads;
        let warm_sizes = warm_sizes.clone();
        Arc::new(move || {
            let mut b = make(intra)?;
            for &rows in &warm_sizes {
                let mut zeros = b.alloc_batch(rows * spec.image_len());
                b.run(&mut zeros, BatchShape::of(rows, &spec))
                    .map_err(|e| format!("warm-up inference failed: {e}"))?;
            }
            Ok(faulty(b))
        })
    };
    let on_cpu = provider == Provider::Cpu.ort_name();
    let policy = InstancePolicy {
        max: instances,
        factory: (instances > 1).then_some(factory),
        idle_timeout: settings.instance_idle_timeout,
        cores: if on_cpu {
            Arc::clone(&settings.cores)
        } else {
            // A GPU session does not compute on the cores.
            Arc::new(CoreBudget::unlimited())
        },
        intra_threads: settings.session.intra_threads,
        lone_threads: settings.lone_threads,
    };
    let runtime = Arc::new(ModelRuntime {
        id: meta.id.clone(),
        spec,
        decoder,
        class_names,
        fixed_batch,
    });
    let has_lone = lone.is_some();
    let queue = batcher::start(
        Arc::clone(&runtime),
        backends,
        lone,
        BatcherConfig {
            max_batch,
            ..settings.batcher
        },
        Arc::clone(pools),
        policy,
    )
    .map_err(|e| failed(format!("cannot start the model's threads: {e}")))?;
    Ok(LoadedModel {
        meta,
        runtime,
        queue,
        max_batch,
        instances,
        intra_threads: settings.session.intra_threads,
        lone_threads: if has_lone { settings.lone_threads } else { 1 },
        provider,
        backend: backend_name,
        ring_held: Arc::default(),
        last_used: Default::default(),
        slot_line: Default::default(),
        line: Arc::new(crate::engine::admission::Line::starting_at(warm_rate)),
    })
}
