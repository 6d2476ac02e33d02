//! The call guard: what every inference door (the legacy route, `/infer/<task>`, v2 over HTTP
//! and gRPC) passes first and what it holds until its answer. [`enter`] is the one place the
//! server refuses work while draining, counts the call among MAX_INFLIGHT_REQUESTS (the
//! [`Presence`] gives the place back when dropped, on every exit path: answer, error, a
//! client gone, a panic) and sets the deadline; [`RequestContext`] carries the rest a call
//! takes (its ticket in its model's line, its share of the body budget) and labels its
//! metrics. A door's own framing (a body, a gRPC message) stays in the door.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use hyper::HeaderMap;

use super::answer::{finish, RequestId, RouteLabels};
use super::body::discard_body;
use super::error::ApiError;
use super::state::AppState;
use crate::engine::admission::{Presence, Ticket};
use crate::metrics::{Outcome, Stage, METRICS};

type HttpResponse = axum::response::Response<http_body_util::Full<bytes::Bytes>>;

/// A call let in: when it arrived, its deadline, and its place among the calls in flight.
pub struct Entry<'a> {
    pub arrived: Instant,
    pub deadline: Instant,
    pub presence: Presence<'a>,
}

/// Lets a call in, or refuses it: not while shutting down (503), and only while fewer than
/// MAX_INFLIGHT_REQUESTS calls are in the server (429). Its deadline is REQUEST_TIMEOUT_S
/// from now, or sooner when the client asked for less (`asked`, read once the server is
/// known not to be draining); it covers reading the request and waiting for
/// a turn as well as the inference.
pub fn enter(
    st: &AppState,
    asked: impl FnOnce() -> Result<Option<Duration>, ApiError>,
) -> Result<Entry<'_>, ApiError> {
    if st.draining.load(Ordering::Acquire) {
        return Err(super::body::shutting_down());
    }
    let arrived = Instant::now();
    let deadline = deadline(st, arrived, asked()?);
    let Some(presence) = st.engine.activity().enter() else {
        METRICS.outcome("none", Outcome::Rejected, Stage::Admission);
        return Err(ApiError::overloaded(
            "Server overloaded: MAX_INFLIGHT_REQUESTS inference requests are in the server; retry shortly",
        ));
    };
    Ok(Entry {
        arrived,
        deadline,
        presence,
    })
}

/// The call guard's entry for an HTTP request ([`enter`]) with the deadline the client
/// may ask for in `X-Request-Timeout-Ms`; a request refused for overload has its body drained
/// in the background.
pub fn enter_http(
    st: &AppState,
    req: Request,
) -> Result<(Request, Instant, Instant, Presence<'_>), ApiError> {
    // Refused while draining, or for a malformed header, the connection is not kept for the
    // body; only the overload refusal reads it away (in the background).
    if st.draining.load(Ordering::Acquire) {
        return Err(super::body::shutting_down());
    }
    let asked = http_timeout(req.headers())?;
    match enter(st, || Ok(asked)) {
        Ok(Entry {
            arrived,
            deadline,
            presence,
        }) => Ok((req, arrived, deadline, presence)),
        Err(e) => {
            discard_body(st, req);
            Err(e)
        }
    }
}

/// REQUEST_TIMEOUT_S after `arrived`, or sooner when the client asked for less (never later).
pub fn deadline(st: &AppState, arrived: Instant, asked: Option<Duration>) -> Instant {
    let default = Duration::from_secs_f64(st.cfg.request_timeout_s.max(0.0));
    arrived + asked.map_or(default, |a| a.min(default))
}

/// The deadline an HTTP client asks for: `X-Request-Timeout-Ms`, whole milliseconds.
pub fn http_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    match headers.get("x-request-timeout-ms") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or_else(|| {
                ApiError::bad_request("X-Request-Timeout-Ms must be a whole number of milliseconds")
            }),
    }
}

/// What a handler learns about its request that the access log and metrics need.
pub struct RequestContext {
    pub(crate) request_id: String,
    /// The model, once known to be loaded (bounded label values).
    pub(crate) model: Option<String>,
    /// The route's path, for the request metrics.
    pub(crate) route: Option<&'static str>,
    /// Its place in its model's line (the waiting room), once let in.
    pub(crate) ticket: Option<Ticket>,
    /// The client's address (what its bodies and fetched images count under).
    pub(crate) peer: Option<std::net::IpAddr>,
    /// What the request's body holds of the body budget (its fetched images count on top).
    pub(crate) body_held: usize,
    /// The client's own address (what may use shared memory).
    pub(crate) remote: Option<std::net::IpAddr>,
}

impl RequestContext {
    pub(crate) fn new(id: RequestId, route: &'static str) -> Self {
        Self {
            request_id: id.0,
            model: None,
            route: Some(route),
            ticket: None,
            peer: None,
            body_held: 0,
            remote: None,
        }
    }

    /// A request answered 200 counts as served in its model's line (the rate admission
    /// predicts waits from).
    pub(crate) fn served<T>(&mut self, answer: &Result<T, ApiError>) {
        if let (Ok(_), Some(ticket)) = (answer, self.ticket.as_mut()) {
            ticket.served();
        }
    }

    /// The response, labelled for the metrics.
    pub(crate) fn finish(self, answer: Result<HttpResponse, ApiError>) -> Response {
        finish(answer, self.labels())
    }

    /// The labels of the request metrics.
    pub(crate) fn labels(self) -> Option<RouteLabels> {
        self.route.map(|route| RouteLabels {
            model: self.model,
            route,
        })
    }
}
