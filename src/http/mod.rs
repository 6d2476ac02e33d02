//! The HTTP front end (hyper 1, HTTP/1.1, with axum's router): accepts connections, hands
//! each request to the one route table (`router`), and drains in-flight requests on shutdown.
//! Handlers (`inference`, `admin`) parse and validate, call the engine (`crate::engine`, the
//! only door inward), and serialise its answers; `body` bounds what a request body may hold;
//! `error` is the one place an error becomes a status. Bodies of megabytes are parsed on the
//! engine's CPU pool, so nothing CPU-heavy runs on the reactor threads.

pub mod admin;
pub mod answer;
pub mod body;
pub mod budget;
pub mod call;
pub mod control;
pub mod error;
pub mod images;
pub mod inference;
pub mod request;
pub mod response;
pub mod router;
pub mod state;
pub mod v2;
pub mod workflows;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::METRICS;
pub use state::{AppState, ConnectionClass, InFlight, Readiness, RESERVED_CONNECTIONS};

/// How long a connection over the cap may take to send its headers.
const RESERVED_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// After the last in-flight request has answered, how long responses may take to flush.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Listens on `addr` (a host name resolves to its first address that binds) with the
/// largest accept backlog the kernel allows (`net.core.somaxconn`). Every connection is
/// accepted at once and MAX_CONNECTIONS applied here, where it is counted; the backlog only
/// absorbs bursts while the accept loop waits for a core. The standard library's backlog
/// (128) overflows on a burst of a few hundred clients on a busy box: the kernel then drops
/// handshakes or answers with SYN cookies, and some clients are reset.
pub async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(i32::MAX as u32)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the host name has no address")
    }))
}

/// Serves connections until `shutdown` resolves, then stops accepting, cancels requests
/// still waiting for their bodies, and returns as soon as every in-flight request has
/// answered (or after `drain`, whichever comes first), with the instant the drain began.
/// Idle and stalled connections do not hold shutdown up.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) -> std::time::Instant {
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let reserved = Arc::new(tokio::sync::Semaphore::new(RESERVED_CONNECTIONS));
    let header_timeout = Duration::from_secs_f64(state.cfg.header_read_timeout_s.max(0.001));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let routers = router::Routers::new(Arc::clone(&state));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => (stream, addr),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Every connection is accepted; over the cap it gets the health-only service, and
        // over the reserve too it is closed at once (shed fast, never left in the backlog).
        let (permit, class) = if let Ok(p) = Arc::clone(&connections).try_acquire_owned() {
            (p, ConnectionClass::Full)
        } else if let Ok(p) = Arc::clone(&reserved).try_acquire_owned() {
            (p, ConnectionClass::Reserved)
        } else {
            METRICS.connections_shed.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let st = Arc::clone(&state);
        let routers = routers.clone();
        let peer = body::Peer(budget::client_key(addr.ip()));
        let remote = body::RemoteIp(addr.ip());
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer);
            req.extensions_mut().insert(remote);
            let (st, routers) = (Arc::clone(&st), routers.clone());
            async move { Ok::<_, Infallible>(router::handle(st, routers, req, class).await) }
        });
        // A small read buffer per connection (hyper's default grows to ~400 KB): with a
        // thousand clients streaming large bodies, that alone would be 400 MB.
        let conn = http1::Builder::new()
            .keep_alive(class == ConnectionClass::Full)
            .max_buf_size(64 * 1024)
            .timer(TokioTimer::new())
            .header_read_timeout(match class {
                ConnectionClass::Full => header_timeout,
                ConnectionClass::Reserved => header_timeout.min(RESERVED_HEADER_TIMEOUT),
            })
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    state.draining.store(true, Ordering::Release);
    state.drain_started.notify_waiters();
    let draining_since = std::time::Instant::now();
    drop(listener);
    tracing::info!(
        drain_timeout_s = drain.as_secs_f64(),
        in_flight = state.in_flight.count(),
        "shutting down: draining in-flight requests"
    );
    let last_answer = async {
        state.in_flight.until_idle().await;
        tokio::time::sleep(FLUSH_GRACE).await;
    };
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = last_answer => tracing::info!("every in-flight request answered; closing the remaining idle connections"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
    draining_since
}
