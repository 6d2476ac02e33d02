//! What every handler can reach (`AppState`), whether the server should get traffic
//! (`Readiness`), the count of requests being handled (for shutdown) and the service a
//! connection gets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::budget::BodyBudget;
use super::images::UrlFetcher;
use crate::config::ServeConfig;
use crate::engine::Engine;

/// What every handler can reach.
pub struct AppState {
    pub cfg: ServeConfig,
    pub engine: Engine,
    /// Fetches URL images (ALLOW_URL_INPUT).
    pub urls: UrlFetcher,
    /// Six characters identifying this process (`/info`'s `uuid`).
    pub uuid: String,
    /// Set once the preloaded models are loaded and warmed up (or failed to).
    pub ready: AtomicBool,
    /// The models of PRELOAD_MODELS that failed to load at start (id, why), until each is
    /// loaded (`/model/add`, or a request that loads it): while one is left, the server is
    /// not ready. Later failures (a reload after an eviction) do not count.
    pub preload_failed: parking_lot::Mutex<Vec<(String, String)>>,
    /// Set when shutdown begins.
    pub draining: AtomicBool,
    /// Notified when shutdown begins: requests still waiting for their bodies give up.
    pub drain_started: tokio::sync::Notify,
    /// Bytes of request bodies and fetched URL images held at once (MAX_BODY_MEMORY_BYTES) and
    /// each client address's share of them, counted as the bytes arrive.
    pub body_memory: Arc<BodyBudget>,
    /// Requests being handled, for shutdown.
    pub in_flight: InFlight,
    /// Clients' shared-memory regions (the Open Inference Protocol's extension).
    pub regions: crate::regions::Regions,
    /// The administrator's token (MODEL_CONTROL=explicit).
    pub admin_token: Option<String>,
    /// Compiled workflow definitions and saved ones fetched (bounded caches).
    pub workflows: crate::workflows::Workflows,
}

/// Whether the server should get traffic (`/readiness`).
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The preloaded models are still loading and warming up.
    Loading,
    /// Shutdown has begun.
    Draining,
    /// Models named in PRELOAD_MODELS failed to load at start (id, why): a replica that
    /// cannot serve them gets no traffic until they load (`/model/add`).
    Failed(Vec<(String, String)>),
}

impl AppState {
    pub fn readiness(&self) -> Readiness {
        if self.draining.load(Ordering::Acquire) {
            return Readiness::Draining;
        }
        if !self.ready.load(Ordering::Acquire) {
            return Readiness::Loading;
        }
        let mut failed = self.preload_failed.lock();
        if !failed.is_empty() {
            let loaded = self.engine.served_models();
            failed.retain(|(id, _)| !loaded.iter().any(|m| &m.id == id));
        }
        let failed = failed.clone();
        if failed.is_empty() {
            Readiness::Ready
        } else {
            Readiness::Failed(failed)
        }
    }
}

/// Connections beyond MAX_CONNECTIONS that are still served, for health checks only: a
/// flood of idle connections cannot keep `/healthz` and `/readiness` from answering.
pub const RESERVED_CONNECTIONS: usize = 64;

/// Counts requests being handled, so shutdown can end the moment the last one answers.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held while one request is handled.
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self)
    }

    /// Requests being handled now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no request is being handled.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Which service a connection gets.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConnectionClass {
    /// Within MAX_CONNECTIONS: every route, keep-alive.
    Full,
    /// Over the cap, within the reserve: health, readiness, metrics and info only, one
    /// request, headers within a second.
    Reserved,
}
