//! The registry of the models that are loaded and serving: a model id in, a [`LoadedModel`]
//! (its metadata and the queue of its batcher) out, at most MAX_ACTIVE_MODELS of them (the
//! least recently used that was not preloaded is unloaded to make room), with the models
//! that failed to load and why. Each load runs on a thread of its own, shared by everyone
//! who asks for that model meanwhile and holding no lock: other models' requests never wait
//! on it. Loading one is `loader`'s job. Unloading drops the queue: the threads finish the
//! queued work and exit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::metrics::METRICS;
use crate::model::repository::{self, ModelMetadata, RepositoryError};
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
    /// Loads under way, by model: the requests for one model share its load, and loads of
    /// different models run at once (no lock is held while a model loads).
    loading: Mutex<HashMap<String, Arc<PendingLoad>>>,
    /// Models never unloaded to make room for another (PRELOAD_MODELS).
    pinned: RwLock<HashSet<String>>,
    /// Loads building their sessions now (at most LOADS_AT_ONCE).
    loads_running: Mutex<usize>,
    load_ended: Condvar,
    /// Ticks once per model lookup: the clock of `LoadedModel::last_used`.
    uses: std::sync::atomic::AtomicU64,
}

/// Models that build their sessions at once; more loads wait for a turn.
const LOADS_AT_ONCE: usize = 2;

/// One of the LOADS_AT_ONCE turns, given back when dropped.
struct LoadSlot<'a>(&'a ModelManager);

impl Drop for LoadSlot<'_> {
    fn drop(&mut self) {
        *self.0.loads_running.lock() -= 1;
        self.0.load_ended.notify_one();
    }
}

/// A model being loaded on a thread of its own, whoever waits for it.
pub struct PendingLoad {
    started: Instant,
    /// The load's end: the model, or why it failed.
    done: Mutex<Option<Result<Arc<LoadedModel>, String>>>,
    ended: Condvar,
    ended_async: tokio::sync::Notify,
    id: String,
}

/// A model asked for: loaded already, or being loaded.
pub enum Asked {
    Loaded(Arc<LoadedModel>),
    Loading(Arc<PendingLoad>),
}

impl PendingLoad {
    fn new(id: &str) -> Self {
        Self {
            started: Instant::now(),
            done: Mutex::new(None),
            ended: Condvar::new(),
            ended_async: tokio::sync::Notify::new(),
            id: id.to_owned(),
        }
    }

    fn finish(&self, result: Result<Arc<LoadedModel>, String>) {
        *self.done.lock() = Some(result);
        self.ended.notify_all();
        self.ended_async.notify_waiters();
    }

    fn result(&self) -> Option<Result<Arc<LoadedModel>, LoadError>> {
        self.done.lock().as_ref().map(|r| {
            r.clone().map_err(|reason| LoadError::Failed {
                id: self.id.clone(),
                reason,
            })
        })
    }

    /// Waits for the load's end (blocking: off the reactor).
    pub fn wait(&self) -> Result<Arc<LoadedModel>, LoadError> {
        let mut done = self.done.lock();
        while done.is_none() {
            self.ended.wait(&mut done);
        }
        drop(done);
        self.result().expect("the load has ended")
    }

    /// Waits for the load's end until `deadline`; `None` when it is still loading then (the
    /// load goes on).
    pub async fn wait_until(
        &self,
        deadline: Instant,
    ) -> Option<Result<Arc<LoadedModel>, LoadError>> {
        let waiting = async {
            loop {
                let ended = self.ended_async.notified();
                if let Some(r) = self.result() {
                    return r;
                }
                ended.await;
            }
        };
        tokio::time::timeout_at(deadline.into(), waiting).await.ok()
    }

    /// How long it has been loading.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl ModelManager {
    pub fn new(settings: LoadSettings, pools: Arc<Pools>) -> Self {
        Self {
            settings,
            pools,
            models: RwLock::new(HashMap::new()),
            failed: RwLock::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            pinned: RwLock::new(HashSet::new()),
            loads_running: Mutex::new(0),
            load_ended: Condvar::new(),
            uses: Default::default(),
        }
    }

    /// The settings models are loaded with.
    pub fn settings(&self) -> &LoadSettings {
        &self.settings
    }

    /// Keeps `id` loaded whatever other models are asked for (a preloaded model).
    pub fn pin(&self, id: &str) {
        self.pinned.write().insert(id.to_owned());
    }

    /// The model if it is loaded (and marks it used now).
    pub fn get(&self, id: &str) -> Option<Arc<LoadedModel>> {
        let m = self.models.read().get(id).cloned()?;
        let now = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        m.last_used.store(now, Ordering::Relaxed);
        Some(m)
    }

    /// The model if it is loaded, else its load: started now on a thread of its own, or
    /// the one under way. A model that failed before is not retried unless `retry`
    /// (`/model/add`). Reads the model's metadata (small files): call it off the reactor.
    pub fn ask(self: &Arc<Self>, id: &str, retry: bool) -> Result<Asked, LoadError> {
        if let Some(m) = self.get(id) {
            return Ok(Asked::Loaded(m));
        }
        if retry {
            self.failed.write().remove(id);
        } else if let Some(reason) = self.failed.read().get(id) {
            return Err(LoadError::Failed {
                id: id.to_string(),
                reason: reason.clone(),
            });
        }
        repository::validate_id(id)?;
        if let Some(pending) = self.pending(id) {
            return Ok(Asked::Loading(pending));
        }
        // Read before taking the lock: cold lookups of different models never wait on each
        // other's reads.
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
        let mut loading = self.loading.lock();
        if let Some(pending) = loading.get(id) {
            return Ok(Asked::Loading(Arc::clone(pending)));
        }
        // Loaded (or failed) between the first look and taking the lock.
        if let Some(m) = self.get(id) {
            return Ok(Asked::Loaded(m));
        }
        if let Some(reason) = self.failed.read().get(id) {
            return Err(LoadError::Failed {
                id: id.to_string(),
                reason: reason.clone(),
            });
        }
        self.check_room(id)?;
        let pending = Arc::new(PendingLoad::new(id));
        loading.insert(id.to_owned(), Arc::clone(&pending));
        drop(loading);
        let (this, load) = (Arc::clone(self), Arc::clone(&pending));
        let span = tracing::Span::current();
        let spawned = crate::pipeline::threads::spawn("cvserve-load".into(), move || {
            // At most LOADS_AT_ONCE models build their sessions at once (memory: a burst of
            // cold models cannot hold more than that many half-loaded); the others wait here.
            let _slot = this.load_slot();
            // A panic in a load fails that load (and answers its waiters), never leaves it
            // pending for ever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                span.in_scope(|| this.load_now(meta))
            }))
            .unwrap_or_else(|_| {
                Err(LoadError::Failed {
                    id: load.id.clone(),
                    reason: "loading panicked".into(),
                })
            });
            this.loading.lock().remove(&load.id);
            load.finish(result.map_err(|e| match e {
                LoadError::Failed { reason, .. } => reason,
                other => other.to_string(),
            }));
        });
        if let Err(e) = spawned {
            self.loading.lock().remove(id);
            return Err(LoadError::Failed {
                id: id.to_owned(),
                reason: format!("cannot start its loading thread: {e}"),
            });
        }
        Ok(Asked::Loading(pending))
    }

    /// The load of `id` under way, if any.
    pub fn pending(&self, id: &str) -> Option<Arc<PendingLoad>> {
        self.loading.lock().get(id).cloned()
    }

    /// Waits for one of the LOADS_AT_ONCE load slots (blocking: on a load's thread).
    fn load_slot(&self) -> LoadSlot<'_> {
        let mut running = self.loads_running.lock();
        while *running >= LOADS_AT_ONCE {
            self.load_ended.wait(&mut running);
        }
        *running += 1;
        LoadSlot(self)
    }

    /// The model, loading it first if needed and waiting for the load (blocking).
    pub fn get_or_load(self: &Arc<Self>, id: &str) -> Result<Arc<LoadedModel>, LoadError> {
        match self.ask(id, false)? {
            Asked::Loaded(m) => Ok(m),
            Asked::Loading(p) => p.wait(),
        }
    }

    /// Loads a model, retrying one that failed before (`/model/add`), and waits for it
    /// (blocking).
    pub fn add(self: &Arc<Self>, id: &str) -> Result<Arc<LoadedModel>, LoadError> {
        match self.ask(id, true)? {
            Asked::Loaded(m) => Ok(m),
            Asked::Loading(p) => p.wait(),
        }
    }

    /// Refuses to load `id` when MAX_ACTIVE_MODELS are loaded and none of them may be
    /// unloaded for it (all are preloaded): it could never be served.
    fn check_room(&self, id: &str) -> Result<(), LoadError> {
        let models = self.models.read();
        let pinned = self.pinned.read();
        let max = self.settings.max_active.max(1);
        if models.len() >= max && models.keys().all(|m| pinned.contains(m)) && !pinned.contains(id)
        {
            return Err(LoadError::NoRoom {
                id: id.to_owned(),
                max,
            });
        }
        Ok(())
    }

    /// Loads `meta`'s model (on its loading thread: no lock is held), then registers it,
    /// unloading the least recently used models that were not preloaded past
    /// MAX_ACTIVE_MODELS.
    fn load_now(&self, meta: ModelMetadata) -> Result<Arc<LoadedModel>, LoadError> {
        let id = meta.id.clone();
        let id = id.as_str();
        let started = std::time::Instant::now();
        if !self.settings.load_delay.is_zero()
            && self.settings.fault_model.as_ref().is_none_or(|m| m == id)
        {
            std::thread::sleep(self.settings.load_delay);
        }
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
            let pinned = self.pinned.read();
            let mut evicted = Vec::new();
            while models.len() >= self.settings.max_active.max(1) {
                let Some(lru) = models
                    .values()
                    .filter(|m| !pinned.contains(&m.meta.id))
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
        // Unloaded by an administrator: no longer kept loaded if it loads again.
        self.pinned.write().remove(id);
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
