//! The request-body budget: every body is read with a size limit (413), within the request's
//! deadline (408), and counted against MAX_BODY_MEMORY_BYTES as its bytes arrive (429 when
//! the server holds too much), so no client, however slow or large, holds memory without
//! bound. A refused body is drained in the background so its client gets the answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::extract::Request;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::CONTENT_LENGTH;
use hyper::StatusCode;

use super::error::ApiError;
use super::request::ModelIdScan;
use super::state::AppState;
use crate::metrics::METRICS;

/// A request body in memory, holding its share of MAX_BODY_MEMORY_BYTES until dropped.
pub struct Body {
    pub bytes: Bytes,
    pub lease: BodyLease,
}

/// The share of MAX_BODY_MEMORY_BYTES (KiB permits) a body holds.
#[derive(Default)]
pub struct BodyLease {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyLease {
    fn held(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Grows the lease to cover `total` bytes; `false` when the server holds too much.
    fn cover(&mut self, pool: &Arc<tokio::sync::Semaphore>, total: usize) -> bool {
        let needed = total.div_ceil(1024);
        let held = self.held();
        if needed <= held {
            return true;
        }
        let Some(more) = u32::try_from(needed - held)
            .ok()
            .and_then(|n| Arc::clone(pool).try_acquire_many_owned(n).ok())
        else {
            return false;
        };
        METRICS.body_bytes_held.add(((needed - held) * 1024) as i64);
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        true
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        METRICS.body_bytes_held.sub((self.held() * 1024) as i64);
    }
}

/// Called with a JSON body's `model_id` as soon as its first bytes name it; an error refuses
/// the request there.
pub type EarlyCheck<'a> = &'a mut (dyn FnMut(&str) -> Result<(), ApiError> + Send);

/// Reads a whole body of at most `limit` bytes (413 past it) before `deadline` (408 after
/// it), counting its bytes against MAX_BODY_MEMORY_BYTES as they arrive (429 when the
/// server holds too much). Shutdown cancels the read (503).
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
    let (parts, mut body) = req.into_parts();
    let mut lease = BodyLease::default();
    // The declared length (up to BODY_UP_FRONT) is reserved before reading: under load the
    // excess is refused at once, before its upload, instead of mid-body; beyond that, bytes
    // are counted as they arrive, so a stalled body holds little.
    let up_front = declared.unwrap_or(0).min(BODY_UP_FRONT);
    let mut buf = bytes::BytesMut::new();
    // Once refused for memory, the rest of the body is read and dropped (so the client gets
    // its 429 instead of a reset connection), within the same deadline.
    let mut refused = !lease.cover(&state.body_memory, up_front);
    if !refused {
        buf.reserve(declared.unwrap_or(0));
    }
    // Refused by `early` (the waiting room) once it could tell from the first bytes.
    let mut turned_away: Option<ApiError> = None;
    let mut scan = super::request::ModelIdScanner::default();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if refused {
                continue;
            }
            let total = buf.len() + data.len();
            if total > limit {
                return Err(too_large());
            }
            if !lease.cover(&state.body_memory, total) {
                refused = true;
                buf = bytes::BytesMut::new();
                lease = BodyLease::default();
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
    if refused {
        return Err(body_memory_full());
    }
    Ok((
        parts,
        Body {
            bytes: buf.freeze(),
            lease,
        },
    ))
}

/// Bytes of a body's declared length reserved before it is read.
const BODY_UP_FRONT: usize = 1 << 20;

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

fn body_memory_full() -> ApiError {
    ApiError::overloaded(
        "Server overloaded: it holds as many request bodies as it may (MAX_BODY_MEMORY_BYTES); retry shortly",
    )
}

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
