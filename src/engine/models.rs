//! The models that are loaded and serving. A model id in, a [`LoadedModel`] (its metadata
//! and the queue of its batcher) out; loading reads the repository (`model::repository`),
//! opens one ONNX Runtime session per inference instance (`model::ort`), runs warm-up batches
//! to learn the output layout (`tasks`), and starts the model's pipeline threads
//! (`pipeline::batcher`). Unloading drops the queue: the threads finish the queued work and
//! exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::geometry::{InputSpec, Normalization};
use crate::metrics::METRICS;
use crate::model::backend::{Backend, FaultInjection, FaultyBackend};
use crate::model::ort::{environment, BatchProfile, OrtBackend, SessionOptions};
use crate::model::provider::Provider;
use crate::model::repository::{self, ModelMetadata, RepositoryError, TaskType};
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
}

/// How models are loaded: the settings every model shares.
#[derive(Clone)]
pub struct LoadSettings {
    pub repository: PathBuf,
    pub ort_dylib: PathBuf,
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
    /// recently used.
    pub max_active: usize,
}

/// The loaded models, by id.
pub struct ModelManager {
    settings: LoadSettings,
    pools: Arc<Pools>,
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// Models that failed to load, with why; not retried until `/model/add` asks again.
    failed: RwLock<HashMap<String, String>>,
    /// Serialises loads so two concurrent requests for a cold model load it once.
    loading: Mutex<()>,
    /// Ticks once per model lookup: the clock of `LoadedModel::last_used`.
    uses: std::sync::atomic::AtomicU64,
}

impl ModelManager {
    pub fn new(settings: LoadSettings, pools: Arc<Pools>) -> Self {
        Self {
            settings,
            pools,
            models: RwLock::new(HashMap::new()),
            failed: RwLock::new(HashMap::new()),
            loading: Mutex::new(()),
            uses: Default::default(),
        }
    }

    /// The settings models are loaded with.
    pub fn settings(&self) -> &LoadSettings {
        &self.settings
    }

    /// The model if it is loaded (and marks it used now).
    pub fn get(&self, id: &str) -> Option<Arc<LoadedModel>> {
        let m = self.models.read().get(id).cloned()?;
        let now = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        m.last_used.store(now, Ordering::Relaxed);
        Some(m)
    }

    /// The model, loading it from the repository first if needed. Blocks while loading:
    /// call it off the async reactor.
    pub fn get_or_load(&self, id: &str) -> Result<Arc<LoadedModel>, LoadError> {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        if let Some(reason) = self.failed.read().get(id) {
            return Err(LoadError::Failed {
                id: id.to_string(),
                reason: reason.clone(),
            });
        }
        self.load_now(id)
    }

    /// Loads a model, retrying one that failed before (`/model/add`).
    pub fn add(&self, id: &str) -> Result<Arc<LoadedModel>, LoadError> {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        self.failed.write().remove(id);
        self.load_now(id)
    }

    fn load_now(&self, id: &str) -> Result<Arc<LoadedModel>, LoadError> {
        repository::validate_id(id)?;
        let _guard = self.loading.lock();
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let meta = match repository::read(&self.settings.repository, id) {
            Ok(meta) => meta,
            Err(e) => {
                // Broken metadata is a failed load too (`/healthz` lists it); a model that
                // is simply absent is not.
                if matches!(e, RepositoryError::Broken { .. }) {
                    self.failed.write().insert(id.to_string(), e.to_string());
                }
                return Err(e.into());
            }
        };
        let started = std::time::Instant::now();
        let model = match load(meta, &self.settings, &self.pools) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                if let LoadError::Failed { reason, .. } = &e {
                    self.failed.write().insert(id.to_string(), reason.clone());
                }
                return Err(e);
            }
        };
        tracing::info!(
            model = id,
            task = model.meta.task.as_str(),
            model_type = %model.meta.model_type,
            steps = ?model.meta.steps,
            input = %format!("{}x{}", model.runtime.spec.width, model.runtime.spec.height),
            max_batch = model.max_batch,
            instances = model.instances,
            intra_threads = self.settings.session.intra_threads,
            provider = %model.provider,
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        METRICS
            .model_instances
            .with_label_values(&[id, &model.provider])
            .set(model.instances as i64);
        let now = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        model.last_used.store(now, Ordering::Relaxed);
        let evicted = {
            let mut models = self.models.write();
            let mut evicted = Vec::new();
            while models.len() >= self.settings.max_active.max(1) {
                let Some(lru) = models
                    .values()
                    .min_by_key(|m| m.last_used.load(Ordering::Relaxed))
                    .map(|m| m.meta.id.clone())
                else {
                    break;
                };
                evicted.extend(models.remove(&lru));
            }
            models.insert(id.to_string(), Arc::clone(&model));
            evicted
        };
        // Requests already holding an evicted model finish on it; its sessions are freed
        // when the last one answers.
        for m in evicted {
            let _ = METRICS
                .model_instances
                .remove_label_values(&[&m.meta.id, &m.provider]);
            METRICS.models_evicted.inc();
            tracing::info!(
                model = %m.meta.id,
                loading = id,
                max_active_models = self.settings.max_active,
                "model unloaded: least recently used of MAX_ACTIVE_MODELS"
            );
        }
        Ok(model)
    }

    /// Models that failed to load, with why.
    pub fn failed(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .failed
            .read()
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        v.sort();
        v
    }

    /// Unloads a model; `false` if it was not loaded.
    pub fn remove(&self, id: &str) -> bool {
        let removed = self.models.write().remove(id);
        if let Some(m) = &removed {
            let _ = METRICS
                .model_instances
                .remove_label_values(&[id, &m.provider]);
        }
        removed.is_some()
    }

    /// Unloads every model.
    pub fn clear(&self) {
        let ids: Vec<String> = self.models.read().keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
    }

    /// How many models are loaded (cheap: no list is built).
    pub fn count(&self) -> usize {
        self.models.read().len()
    }

    /// The loaded models, sorted by id.
    pub fn list(&self) -> Vec<Arc<LoadedModel>> {
        let mut v: Vec<_> = self.models.read().values().cloned().collect();
        v.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
        v
    }

    /// Ids of every model in the repository.
    pub fn available(&self) -> Vec<String> {
        repository::list(&self.settings.repository)
    }
}

fn load(
    meta: ModelMetadata,
    settings: &LoadSettings,
    pools: &Arc<Pools>,
) -> Result<LoadedModel, LoadError> {
    let failed = |reason: String| LoadError::Failed {
        id: meta.id.clone(),
        reason,
    };
    let env = environment(&settings.ort_dylib).map_err(failed)?;
    let instances = settings.instances.max(1);
    let (rw, rh) = meta.resize_size.unwrap_or((640, 640));
    let profile = BatchProfile {
        max_batch: settings.batcher.max_batch.max(1),
        height: rh,
        width: rw,
    };
    // The instances of one model share their pre-packed weights. One instance starts with
    // the model; the rest start on demand (`InstancePolicy`).
    let prepacked = ort::session::builder::PrepackedWeights::new();
    let started = std::time::Instant::now();
    let first = OrtBackend::load(
        env,
        &meta.weights,
        &settings.session,
        &prepacked,
        Some(&profile),
    )
    .map_err(failed)?;
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(first)];
    let provider = backends[0].provider().to_string();
    // One wide session for lone requests, on the CPU only (on a GPU the network does not use
    // the cores).
    let mut lone: Option<Box<dyn Backend>> = None;
    if settings.lone_threads > settings.session.intra_threads
        && provider == Provider::Cpu.ort_name()
    {
        let opts = SessionOptions {
            intra_threads: settings.lone_threads,
            ..settings.session.clone()
        };
        let wide = OrtBackend::load(env, &meta.weights, &opts, &prepacked, Some(&profile))
            .map_err(failed)?;
        lone = Some(Box::new(wide));
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
    // serves (and before /readiness): on a GPU every size from 1 to max_batch, so no cuDNN
    // algorithm search or TensorRT engine build ever happens on a live request; on the CPU
    // the smallest and the largest. The first run also tells the output layout.
    let on_gpu = provider != "CPUExecutionProvider";
    let warm_sizes: Vec<usize> = match fixed_batch {
        Some(b) => vec![b],
        None if on_gpu => (1..=max_batch).collect(),
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
                    .run(&mut input, probe_rows, spec.height, spec.width)
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
    for backend in backends.iter_mut().chain(lone.iter_mut()) {
        for &rows in &warm_sizes {
            let mut zeros = backend.alloc_batch(rows * spec.image_len());
            backend
                .run(&mut zeros, rows, spec.height, spec.width)
                .map_err(|e| failed(format!("warm-up inference failed: {e}")))?;
        }
    }
    tracing::info!(
        model = %meta.id,
        %provider,
        sessions_ms,
        warm_up_ms = warm_started.elapsed().as_millis() as u64,
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
        let weights = meta.weights.clone();
        let session = settings.session.clone();
        let prepacked = prepacked.clone();
        let warm_sizes = warm_sizes.clone();
        Arc::new(move || {
            let mut b: Box<dyn Backend> = Box::new(OrtBackend::load(
                env,
                &weights,
                &session,
                &prepacked,
                Some(&profile),
            )?);
            for &rows in &warm_sizes {
                let mut zeros = b.alloc_batch(rows * spec.image_len());
                b.run(&mut zeros, rows, spec.height, spec.width)
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
        ring_held: Arc::default(),
        last_used: Default::default(),
        slot_line: Default::default(),
        line: Arc::default(),
    })
}
