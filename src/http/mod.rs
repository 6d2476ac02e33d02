//! The HTTP front end (hyper 1, HTTP/1.1): accepts connections, routes requests to handlers,
//! and drains in-flight requests on shutdown. Handlers parse and validate, call the engine
//! (`crate::engine`), and serialise its answers; bodies of megabytes are parsed on the
//! engine's CPU pool, so nothing CPU-heavy runs on the reactor threads.

pub mod error;
pub mod images;
pub mod request;
pub mod response;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::config::ServeConfig;
use crate::engine::Engine;

/// What every handler can reach.
pub struct AppState {
    pub cfg: ServeConfig,
    pub engine: Engine,
    /// Client for URL images; `None` when ALLOW_URL_INPUT is off.
    pub http_client: Option<reqwest::Client>,
    /// Six characters identifying this process (`/info`'s `uuid`).
    pub uuid: String,
    /// Set once the preloaded models are loaded and warmed up.
    pub ready: AtomicBool,
    /// Set when shutdown begins.
    pub draining: AtomicBool,
    /// Admission of inference requests (MAX_INFLIGHT_REQUESTS permits).
    pub inflight: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Ready to take traffic: models warmed up and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

/// Serves connections until `shutdown` resolves, then stops accepting and waits up to
/// `drain` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let header_timeout = Duration::from_secs_f64(state.cfg.header_read_timeout_s.max(0.001));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the connection limit, leave new connections in the kernel's backlog.
        let permit = tokio::select! {
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&state);
                let service = service_fn(move |req| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(routes::handle(st, req).await) }
                });
                // A small read buffer per connection (hyper's default grows to ~400 KB): with a
                // thousand clients streaming large bodies, that alone would be 400 MB.
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .max_buf_size(64 * 1024)
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    state.draining.store(true, Ordering::Release);
    drop(listener);
    tracing::info!(
        drain_timeout_s = drain.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
}
