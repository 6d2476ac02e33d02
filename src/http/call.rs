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
use super::budget::BodyLease;
use super::error::ApiError;
use super::state::AppState;
use crate::engine::admission::{Presence, Ticket, Tickets};
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

/// What a call holds and learns until its answer: its places in its models' lines, every
/// byte it brought (body, fetched images, shared-memory reads) as leases of the body budget,
/// and what the access log and metrics need. Dropping it gives everything back, on every
/// exit path.
pub struct RequestContext {
    pub(crate) request_id: String,
    /// The model, once known to be loaded (bounded label values).
    pub(crate) model: Option<String>,
    /// The route's path, for the request metrics.
    pub(crate) route: Option<&'static str>,
    /// Its places in its models' lines (the waiting room), by model: one for a model route,
    /// one per model step a workflow has reached.
    pub(crate) tickets: Tickets,
    /// The client's address (what its bodies and fetched images count under).
    pub(crate) peer: Option<std::net::IpAddr>,
    /// What the call's bytes hold of the body budget.
    leases: Vec<BodyLease>,
    /// The client's own address (what may use shared memory).
    pub(crate) remote: Option<std::net::IpAddr>,
}

impl RequestContext {
    pub(crate) fn new(id: RequestId, route: &'static str) -> Self {
        Self {
            request_id: id.0,
            model: None,
            route: Some(route),
            tickets: Tickets::default(),
            peer: None,
            leases: Vec::new(),
            remote: None,
        }
    }

    /// Takes a place in `model_id`'s line (the waiting room): let in if, by the model's
    /// measured rate, it can be answered before `deadline`; refused with 429 otherwise. A
    /// call already in that line keeps its place; a model not loaded yet has no line.
    pub(crate) fn admit(
        &mut self,
        st: &AppState,
        model_id: &str,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<(), ApiError> {
        Ok(st
            .engine
            .take_place(&mut self.tickets, model_id, arrived, deadline)?)
    }

    /// Leaves every line but `model_id`'s (a place taken for a model the call turned out
    /// not to name).
    pub(crate) fn keep_line_of(&mut self, model_id: &str) {
        self.tickets.keep_only(model_id);
    }

    /// Its place in `model_id`'s line.
    pub(crate) fn ticket(&mut self, model_id: &str) -> Option<&mut Ticket> {
        self.tickets.get(model_id)
    }

    /// Holds `lease` until the answer.
    pub(crate) fn hold(&mut self, lease: BodyLease) {
        self.leases.push(lease);
    }

    /// Bytes of the body budget the call holds.
    pub(crate) fn held_bytes(&self) -> usize {
        self.leases.iter().map(BodyLease::held_bytes).sum()
    }

    /// A call answered 200 counts as served in each of its lines (the rate admission
    /// predicts waits from).
    pub(crate) fn served<T>(&mut self, answer: &Result<T, ApiError>) {
        if answer.is_ok() {
            for (_, ticket) in self.tickets.iter_mut() {
                ticket.served();
            }
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
