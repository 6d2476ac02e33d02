//! Roboflow Workflows: a JSON definition of steps (models, filters, crops, drawings) run per
//! image. `spec` compiles a definition against the blocks this server has (`blocks`), `exec`
//! runs it on a request's inputs through the engine (its model steps through the same
//! batching pipeline as the model routes), `value` and `uql` are the data and the query
//! language steps share. The HTTP routes are `http::workflows`.

pub mod blocks;
pub mod error;
pub mod exec;
pub mod fusion;
pub mod spec;
pub mod uql;
pub mod value;
pub mod visual;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::metrics::METRICS;
use error::WorkflowError;
use spec::{DefinitionLimits, Workflow};

/// How long a saved workflow's definition fetched from Roboflow's API is reused (the
/// reference's 15 minutes).
pub const SAVED_DEFINITION_TTL: Duration = Duration::from_secs(15 * 60);

/// Most distinct workflow labels on the metrics; later ids count as `other`.
const MAX_LABELS: usize = 64;

/// A bounded map, least recently used dropped first.
struct Lru<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
    cap: usize,
}

impl<V: Clone> Lru<V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn get(&mut self, k: &str) -> Option<V> {
        let v = self.map.get(k)?.clone();
        if let Some(p) = self.order.iter().position(|x| x == k) {
            let key = self.order.remove(p).expect("position is in range");
            self.order.push_back(key);
        }
        Some(v)
    }

    fn put(&mut self, k: String, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The server's workflow state: compiled definitions by the hash of their text, saved
/// definitions fetched by id, and the workflow labels its metrics use. All bounded.
pub struct Workflows {
    compiled: Mutex<Lru<Arc<Workflow>>>,
    saved: Mutex<Lru<(Instant, Arc<serde_json::Value>)>>,
    labels: Mutex<Vec<String>>,
    limits: DefinitionLimits,
}

impl Workflows {
    pub fn new(cache_size: usize, limits: DefinitionLimits) -> Self {
        Self {
            compiled: Mutex::new(Lru::new(cache_size)),
            saved: Mutex::new(Lru::new(cache_size)),
            labels: Mutex::new(Vec::new()),
            limits,
        }
    }

    /// The compiled form of `def`, compiled once per distinct definition.
    pub fn compile(&self, def: &serde_json::Value) -> Result<Arc<Workflow>, WorkflowError> {
        let text = def.to_string();
        let key = format!("{:x}", Sha256::digest(text.as_bytes()));
        if let Some(w) = self.compiled.lock().get(&key) {
            return Ok(w);
        }
        let w = Arc::new(spec::compile(def, self.limits)?);
        let mut cache = self.compiled.lock();
        cache.put(key, Arc::clone(&w));
        METRICS.workflow_definitions_cached.set(cache.len() as i64);
        Ok(w)
    }

    /// A saved definition fetched within the last 15 minutes.
    pub fn saved(&self, key: &str) -> Option<Arc<serde_json::Value>> {
        let (at, def) = self.saved.lock().get(key)?;
        (at.elapsed() < SAVED_DEFINITION_TTL).then_some(def)
    }

    /// Keeps a fetched saved definition.
    pub fn keep_saved(&self, key: String, def: Arc<serde_json::Value>) {
        self.saved.lock().put(key, (Instant::now(), def));
    }

    /// The metrics label of a workflow: `inline`, or a saved workflow's id while fewer than
    /// 64 ids have been seen, `other` after.
    pub fn label(&self, id: Option<&str>) -> String {
        let Some(id) = id else {
            return "inline".into();
        };
        let mut labels = self.labels.lock();
        if labels.iter().any(|l| l == id) {
            return id.to_owned();
        }
        if labels.len() < MAX_LABELS {
            labels.push(id.to_owned());
            return id.to_owned();
        }
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(n: usize) -> serde_json::Value {
        json!({"version": "1.0", "inputs": [{"type": "WorkflowParameter", "name": format!("p{n}")}],
               "steps": [], "outputs": []})
    }

    /// The cache of compiled definitions keeps at most its size (inline definitions are
    /// the client's choice), and a definition seen again is the same compiled one.
    #[test]
    fn compiled_definitions_are_bounded_and_reused() {
        let w = Workflows::new(3, DefinitionLimits { max_steps: 8 });
        let first = w.compile(&def(0)).unwrap();
        assert!(Arc::ptr_eq(&first, &w.compile(&def(0)).unwrap()));
        for n in 1..100 {
            w.compile(&def(n)).unwrap();
        }
        assert_eq!(w.compiled.lock().len(), 3);
        assert!(!Arc::ptr_eq(&first, &w.compile(&def(0)).unwrap()));
    }

    #[test]
    fn labels_are_bounded() {
        let w = Workflows::new(3, DefinitionLimits { max_steps: 8 });
        assert_eq!(w.label(None), "inline");
        for n in 0..MAX_LABELS {
            assert_eq!(w.label(Some(&format!("w{n}"))), format!("w{n}"));
        }
        assert_eq!(w.label(Some("one-more")), "other");
        assert_eq!(w.label(Some("w3")), "w3");
    }
}
