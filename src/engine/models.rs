//! The registry of the models that are loaded and serving: a model id in, a [`LoadedModel`]
//! (its metadata and the queue of its batcher) out, at most MAX_ACTIVE_MODELS of them (the
//! least recently used is unloaded to make room), with the models that failed to load and
//! why. Loading one is `loader`'s job. Unloading drops the queue: the threads finish the
//! queued work and exit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::metrics::METRICS;
use crate::model::repository::{self, RepositoryError};
use crate::pipeline::Pools;

use super::loader::load;
pub use super::loader::{LoadError, LoadSettings, LoadedModel};

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
            backend = model.backend,
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        METRICS
            .model_instances
            .with_label_values(&[id, &model.provider, model.backend])
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
            let _ =
                METRICS
                    .model_instances
                    .remove_label_values(&[&m.meta.id, &m.provider, m.backend]);
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
                .remove_label_values(&[id, &m.provider, m.backend]);
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
