//! Reading request bodies: every body is read with a size limit (413), within the request's
//! deadline and at a minimum rate (408), and counted in the body budget (`budget.rs`) as its
//! bytes arrive (429 when the server, or this client, holds too much), so no client, however
//! slow or large, holds memory without bound. A refused body is drained in the background so
//! its client gets the answer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::extract::Request;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::CONTENT_LENGTH;
use hyper::StatusCode;

use super::budget::{body_memory_full, BodyLease, BudgetFull};
use super::error::ApiError;
use super::request::ModelIdScan;
use super::state::AppState;

/// A request body in memory, holding its share of MAX_BODY_MEMORY_BYTES until dropped.
pub struct Body {
    pub bytes: Bytes,
    pub lease: BodyLease,
}

/// Called with a JSON body's `model_id` as soon as its first bytes name it; an error refuses
/// the request there.
pub type EarlyCheck<'a> = &'a mut (dyn FnMut(&str) -> Result<(), ApiError> + Send);

/// Reads a whole body of at most `limit` bytes (413 past it) before `deadline` (408 after
/// it) and at MIN_BODY_RATE_BYTES_S at least once BODY_RATE_GRACE_S has passed (408 below
/// it), counting its bytes against MAX_BODY_MEMORY_BYTES and the client address's
/// BODY_MEMORY_PEER_SHARE as they arrive (429 when either is full). Nothing is counted for
/// bytes only declared, so connections that announce large bodies and send nothing hold
/// nothing. Shutdown cancels the read (503).
pub async fn read_body(
    state: &AppState,
    req: Request,
    limit: usize,
    setting: &'static str,
    deadline: Instant,
    mut early: Option<EarlyCheck<'_>>,
) -> Result<(hyper::http::request::Parts, Body), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than {setting} ({limit} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let (parts, mut body) = req.into_parts();
    let mut lease = state.body_memory.lease(peer);
    // Address space only: pages are touched (and counted) as bytes arrive.
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0));
    // Once refused for memory, the rest of the body is read and dropped (so the client gets
    // its 429 instead of a reset connection), within the same deadline.
    let mut refused: Option<BudgetFull> = None;
    // Refused by `early` (the waiting room) once it could tell from the first bytes.
    let mut turned_away: Option<ApiError> = None;
    let mut scan = super::request::ModelIdScanner::default();
    let pace = Pace::new(state.cfg.min_body_rate_bytes_s, state.cfg.body_rate_grace_s);
    let read = async {
        let mut received = 0usize;
        loop {
            let frame = match pace.next_byte_due(received) {
                Some(due) => tokio::time::timeout_at(due.into(), body.frame())
                    .await
                    .map_err(|_| pace.too_slow())?,
                None => body.frame().await,
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len();
            if refused.is_some() {
                continue;
            }
            let total = buf.len() + data.len();
            if total > limit {
                return Err(too_large());
            }
            if let Err(why) = lease.cover(total) {
                refused = Some(why);
                buf = bytes::BytesMut::new();
                lease.clear();
                continue;
            }
            buf.extend_from_slice(&data);
            if let Some(check) = early.as_mut() {
                match scan.feed(&buf) {
                    ModelIdScan::Found(id) => {
                        if let Err(e) = check(id) {
                            // Answered now; the rest of the body is dropped in the background.
                            turned_away = Some(e);
                            return Ok(());
                        }
                        early = None;
                    }
                    ModelIdScan::GaveUp => early = None,
                    ModelIdScan::NotYet => {}
                }
            }
        }
        Ok(())
    };
    let drain = state.drain_started.notified();
    if state.draining.load(Ordering::Acquire) {
        return Err(shutting_down());
    }
    tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), read) => match r {
            Ok(r) => r?,
            Err(_) => return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "The request body did not arrive within the request's deadline (REQUEST_TIMEOUT_S)",
            )),
        },
        _ = drain => return Err(shutting_down()),
    }
    if let Some(e) = turned_away {
        discard_rest(body, limit);
        return Err(e);
    }
    if let Some(why) = refused {
        return Err(body_memory_full(why));
    }
    Ok((
        parts,
        Body {
            bytes: buf.freeze(),
            lease,
        },
    ))
}

/// The client's address, put in each request's extensions by the connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::IpAddr);

/// The client's own address (a request extension), for what only local clients may do.
#[derive(Debug, Clone, Copy)]
pub struct RemoteIp(pub std::net::IpAddr);

/// The slowest a body may arrive: after `grace`, on average `rate` bytes a second since its
/// request began (0: any rate).
struct Pace {
    started: Instant,
    rate: u64,
    grace: Duration,
}

impl Pace {
    fn new(rate: u64, grace_s: f64) -> Self {
        Self {
            started: Instant::now(),
            rate,
            grace: Duration::from_secs_f64(grace_s),
        }
    }

    /// By when the byte after `received` must arrive.
    fn next_byte_due(&self, received: usize) -> Option<Instant> {
        (self.rate > 0).then(|| {
            self.started
                + self.grace
                + Duration::from_secs_f64((received as f64 + 1.0) / self.rate as f64)
        })
    }

    fn too_slow(&self) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "The request body arrives slower than MIN_BODY_RATE_BYTES_S ({} bytes/s, after BODY_RATE_GRACE_S = {} s)",
                self.rate,
                self.grace.as_secs_f64()
            ),
        )
    }
}

/// Answers a refused request at once and reads its body in the background, dropping it as
/// it arrives (nothing is buffered), so the client, perhaps still sending, receives its
/// answer rather than a reset connection. Reading stops after MAX_BODY_BYTES or
/// [`DISCARD_TIME`] (the connection is then closed).
pub fn discard_body(state: &AppState, req: Request) {
    // A client waiting for `100 Continue` has not sent its body: nothing to read.
    let expects_continue = req
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        discard_rest(req.into_body(), state.cfg.max_body_bytes);
    }
}

/// Reads what is left of `body` in the background and drops it (see [`discard_body`]).
fn discard_rest(mut body: AxumBody, limit: usize) {
    tokio::spawn(async move {
        let read = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIME, read).await;
    });
}

/// Longest a refused body is read (and dropped) after its answer.
const DISCARD_TIME: Duration = Duration::from_secs(5);

pub fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The server is shutting down; send the request to another replica",
    )
}

/// An admin route's body (ADMIN_MAX_BODY_BYTES).
pub async fn read_admin_body(state: &AppState, req: Request) -> Result<Body, ApiError> {
    let deadline = Instant::now() + Duration::from_secs_f64(state.cfg.request_timeout_s.max(0.0));
    let limit = state.cfg.admin_max_body_bytes;
    Ok(
        read_body(state, req, limit, "ADMIN_MAX_BODY_BYTES", deadline, None)
            .await?
            .1,
    )
}
