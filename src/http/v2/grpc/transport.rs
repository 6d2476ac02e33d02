//! The gRPC listener's bounds: connections counted against MAX_CONNECTIONS and closed after
//! GRPC_IDLE_TIMEOUT_S without request bytes or past a rate of control frames, calls limited in time and per connection, and every
//! message's bytes counted against the body budget while they arrive and until the answer.

use super::*;

/// Serves gRPC on `listener` until shutdown begins (`drain_started`), then lets the calls in
/// flight finish. Bounded like the HTTP front end: at most MAX_CONNECTIONS connections (more
/// are closed at once), each closed after GRPC_IDLE_TIMEOUT_S without request bytes from its
/// client or past a rate of control frames, a unary call at most
/// REQUEST_TIMEOUT_S, [`STREAMS_PER_CONNECTION`] calls each, and every message's bytes
/// counted against MAX_BODY_MEMORY_BYTES and the client's BODY_MEMORY_PEER_SHARE as they
/// arrive (a call over it fails with RESOURCE_EXHAUSTED).
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) {
    let limit = max_message(&state);
    let service = GrpcInferenceServiceServer::new(Grpc {
        state: Arc::clone(&state),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX);
    let connections = Arc::new(tokio::sync::Semaphore::new(
        state.cfg.max_connections as usize,
    ));
    let idle = Duration::from_secs_f64(state.cfg.grpc_idle_timeout_s);
    let incoming = futures_util::stream::unfold(listener, move |listener| {
        let connections = Arc::clone(&connections);
        async move {
            loop {
                match listener.accept().await {
                    Ok((io, peer)) => {
                        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                            METRICS.connections_shed.inc();
                            continue;
                        };
                        let _ = io.set_nodelay(true);
                        let closer = Arc::new(Closer::default());
                        OPEN.lock().insert(peer, Arc::clone(&closer));
                        let conn = Counted {
                            io,
                            peer,
                            closer,
                            _permit: permit,
                            idle,
                            silent_until: Box::pin(tokio::time::sleep(idle)),
                            frames: FrameScan::default(),
                            control: ControlBudget::new(),
                        };
                        return Some((Ok::<_, std::io::Error>(conn), listener));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    });
    // A unary call (its message read included) lives at most REQUEST_TIMEOUT_S, or its
    // `grpc-timeout`.
    let call_limit = Duration::from_secs_f64(state.cfg.request_timeout_s);
    let budget = Arc::clone(&state.body_memory);
    let shutdown = async move {
        loop {
            let started = state.drain_started.notified();
            if state.draining.load(Ordering::Acquire) {
                return;
            }
            started.await;
        }
    };
    let result = tonic::transport::Server::builder()
        .timeout(call_limit)
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        .layer(tower::layer::layer_fn(move |inner| Budgeted {
            inner,
            budget: Arc::clone(&budget),
        }))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the gRPC server stopped");
    }
}

/// A gRPC connection holding its place among MAX_CONNECTIONS, read as ended once its client
/// has sent no request bytes for `idle` (PINGs and other control frames do not count), or
/// sends control frames faster than [`CONTROL_FRAMES_PER_S`].
pub(super) struct Counted {
    io: tokio::net::TcpStream,
    /// The client's address: what the server closes the connection by ([`close`]).
    peer: SocketAddr,
    closer: Arc<Closer>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    silent_until: std::pin::Pin<Box<tokio::time::Sleep>>,
    frames: FrameScan,
    control: ControlBudget,
}

/// The open gRPC connections, by client address (one connection each: its port differs).
static OPEN: std::sync::LazyLock<parking_lot::Mutex<HashMap<SocketAddr, Arc<Closer>>>> =
    std::sync::LazyLock::new(Default::default);

/// Tells a connection to close.
#[derive(Default)]
pub(super) struct Closer {
    closed: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

/// Closes the connection of the client at `peer` (all its streams end): a stream that does
/// not take its answers holds its connection's flow-control window and its queued bytes
/// until then. `false` when no such connection is open.
pub(super) fn close(peer: SocketAddr) -> bool {
    let Some(closer) = OPEN.lock().get(&peer).cloned() else {
        return false;
    };
    closer.closed.store(true, Ordering::Release);
    closer.waker.wake();
    true
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = OPEN.lock();
        if open
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.closer))
        {
            open.remove(&self.peer);
        }
    }
}

/// Control frames (SETTINGS, PING, WINDOW_UPDATE, PRIORITY) a client may send per second on
/// one connection, sustained, and at once: far above what real clients' keep-alives and
/// flow control send, far below a flood that takes the reactor from other clients.
pub(super) const CONTROL_FRAMES_PER_S: f64 = 1_000.0;
const CONTROL_FRAMES_BURST: f64 = 2_000.0;

/// A token bucket of control frames.
pub(super) struct ControlBudget {
    tokens: f64,
    at: Instant,
}

impl ControlBudget {
    fn new() -> Self {
        Self {
            tokens: CONTROL_FRAMES_BURST,
            at: Instant::now(),
        }
    }

    /// Takes `n` frames' tokens; false once the client is past its rate.
    fn take(&mut self, n: usize, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * CONTROL_FRAMES_PER_S;
        self.tokens = (self.tokens + refill).min(CONTROL_FRAMES_BURST) - n as f64;
        self.at = now;
        self.tokens >= 0.0
    }
}

/// Where a connection's incoming bytes are in HTTP/2's framing: the client preface (24
/// bytes), then frames of a 9-byte header (3-byte length, type, flags, stream) and a payload.
pub(super) struct FrameScan {
    preface_left: usize,
    header: [u8; 9],
    header_seen: usize,
    payload_left: usize,
    /// A WINDOW_UPDATE's increment, as its 4 payload bytes arrive.
    increment: Option<([u8; 4], usize)>,
}

impl Default for FrameScan {
    fn default() -> Self {
        Self {
            preface_left: 24,
            header: [0; 9],
            header_seen: 0,
            payload_left: 0,
            increment: None,
        }
    }
}

/// A WINDOW_UPDATE smaller than this is counted against the control-frame rate: real
/// clients release window in large steps (HTTP/2 implementations send one after reading half
/// a window), a flood in tiny ones.
pub(super) const SMALL_WINDOW_UPDATE: u32 = 4096;

/// What a run of a client's bytes held.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Seen {
    /// Frames of requests: HEADERS, CONTINUATION, and DATA with a payload or ending its
    /// stream.
    pub request: usize,
    /// Every other frame (SETTINGS, PING, PRIORITY, RST_STREAM, GOAWAY, empty DATA, unknown
    /// types), except WINDOW_UPDATEs that open the window by at least
    /// [`SMALL_WINDOW_UPDATE`] bytes: what a client reading its answers sends.
    pub control: usize,
}

impl FrameScan {
    pub(super) fn feed(&mut self, mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                data = &data[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                if let Some((bytes, seen_bytes)) = &mut self.increment {
                    let k = (4 - *seen_bytes).min(n);
                    bytes[*seen_bytes..*seen_bytes + k].copy_from_slice(&data[..k]);
                    *seen_bytes += k;
                    if *seen_bytes == 4 {
                        let increment = u32::from_be_bytes(*bytes) & 0x7fff_ffff;
                        if increment < SMALL_WINDOW_UPDATE {
                            seen.control += 1;
                        }
                        self.increment = None;
                    }
                }
                self.payload_left -= n;
                data = &data[n..];
            } else {
                let n = (9 - self.header_seen).min(data.len());
                self.header[self.header_seen..self.header_seen + n].copy_from_slice(&data[..n]);
                self.header_seen += n;
                data = &data[n..];
                if self.header_seen == 9 {
                    self.header_seen = 0;
                    let h = self.header;
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (kind, flags) = (h[3], h[4]);
                    match kind {
                        // DATA with bytes, or ending its stream (END_STREAM).
                        0 if len > 0 || flags & 1 == 1 => seen.request += 1,
                        1 | 9 => seen.request += 1,
                        // Judged by its increment once its payload is read.
                        8 if len == 4 => self.increment = Some(([0; 4], 0)),
                        _ => seen.control += 1,
                    }
                    self.payload_left = len;
                }
            }
        }
        seen
    }
}

impl Counted {
    /// Why the connection must end now (closed by the server, or idle), checked on writes
    /// too: HTTP/2 stops reading while it cannot write (a client that sends a PING and
    /// never reads), and such a connection must still end. Registers the task to be woken
    /// when either happens.
    fn ended(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Option<std::io::Error> {
        self.closer.waker.register(cx.waker());
        if self.closer.closed.load(Ordering::Acquire) {
            return Some(std::io::Error::other(
                "closed by the server: a stream's answers went unread",
            ));
        }
        if std::future::Future::poll(self.silent_until.as_mut(), cx).is_ready() {
            METRICS.grpc_closed.with_label_values(&["idle"]).inc();
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client sent no request bytes for GRPC_IDLE_TIMEOUT_S",
            ));
        }
        None
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        self.closer.waker.register(cx.waker());
        if self.closer.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(std::io::Error::other(
                "closed by the server: a stream's answers went unread",
            )));
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let this = &mut *self;
                let seen = this.frames.feed(&buf.filled()[before..]);
                if seen.control > 0 && !this.control.take(seen.control, Instant::now()) {
                    METRICS
                        .grpc_closed
                        .with_label_values(&["control_flood"])
                        .inc();
                    return Poll::Ready(Err(std::io::Error::other(
                        "the client sent control frames past their rate",
                    )));
                }
                if seen.request > 0 {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.silent_until.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match std::future::Future::poll(self.silent_until.as_mut(), cx) {
                Poll::Ready(()) => {
                    METRICS.grpc_closed.with_label_values(&["idle"]).inc();
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent no request bytes for GRPC_IDLE_TIMEOUT_S",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(closed) = self.as_mut().ended(cx) {
            return std::task::Poll::Ready(Err(closed));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(closed) = self.as_mut().ended(cx) {
            return std::task::Poll::Ready(Err(closed));
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts each call's request bytes against the body budget as they arrive.
#[derive(Clone)]
pub(super) struct Budgeted<S> {
    inner: S,
    budget: Arc<crate::http::budget::BodyBudget>,
}

impl<S> tower::Service<hyper::Request<tonic::body::Body>> for Budgeted<S>
where
    S: tower::Service<hyper::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map(|a| crate::http::budget::client_key(a.ip()));
        let lease = self.budget.lease(peer);
        let req = req.map(|inner| {
            tonic::body::Body::new(CountedBody {
                inner,
                lease,
                frames: Frames::default(),
            })
        });
        self.inner.call(req)
    }
}

/// A request body whose bytes grow its lease as they arrive; a message's bytes leave the
/// lease once the message is whole (its handler counts it from then on), so a long stream
/// (ModelStreamInfer) holds only its partial message.
pub(super) struct CountedBody {
    inner: tonic::body::Body,
    lease: crate::http::budget::BodyLease,
    frames: Frames,
}

/// Where a body is in gRPC's framing: 5 header bytes (a flag, a 4-byte big-endian length),
/// then the message.
#[derive(Default)]
pub(super) struct Frames {
    header: [u8; 5],
    header_seen: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// Bytes of the current, incomplete message (header included).
    pending: usize,
}

impl Frames {
    /// Takes `data`; returns the bytes of the messages still incomplete after it.
    fn feed(&mut self, mut data: &[u8]) -> usize {
        while !data.is_empty() {
            if self.header_seen < 5 {
                let n = (5 - self.header_seen).min(data.len());
                self.header[self.header_seen..self.header_seen + n].copy_from_slice(&data[..n]);
                self.header_seen += n;
                self.pending += n;
                data = &data[n..];
                if self.header_seen == 5 {
                    let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                    self.remaining = len as usize;
                }
            } else {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                self.pending += n;
                data = &data[n..];
            }
            if self.header_seen == 5 && self.remaining == 0 {
                // A whole message: handed to the call.
                self.header_seen = 0;
                self.pending = 0;
            }
        }
        self.pending
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                let pending = self.frames.feed(data);
                if self.lease.cover(pending).is_err() {
                    return std::task::Poll::Ready(Some(Err(Status::resource_exhausted(
                        "Too many request bytes are being received at once (MAX_BODY_MEMORY_BYTES, BODY_MEMORY_PEER_SHARE); retry shortly",
                    ))));
                }
                self.lease.shrink_to(pending);
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    fn window_update(increment: u32) -> Vec<u8> {
        let mut f = frame(8, 0, 0);
        f[2] = 4;
        f.extend_from_slice(&increment.to_be_bytes());
        f
    }

    #[test]
    fn frames_are_told_apart_across_reads() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 12)); // SETTINGS
        bytes.extend(frame(4, 1, 0)); // its acknowledgement
        bytes.extend(frame(6, 0, 8)); // PING
        bytes.extend(frame(1, 4, 30)); // HEADERS
        bytes.extend(frame(0, 0, 100)); // DATA
        bytes.extend(frame(0, 1, 0)); // an empty DATA ending its stream: a request's
        bytes.extend(frame(0, 0, 0)); // an empty DATA that ends nothing: control
        bytes.extend(window_update(1)); // a tiny WINDOW_UPDATE: control
        bytes.extend(window_update(32768)); // a reader's WINDOW_UPDATE: neither
        let mut scan = FrameScan::default();
        let mut total = Seen::default();
        for chunk in bytes.chunks(7) {
            let s = scan.feed(chunk);
            total.request += s.request;
            total.control += s.control;
        }
        assert_eq!(
            total,
            Seen {
                request: 3,
                control: 5
            }
        );
    }

    #[test]
    fn control_frames_past_their_rate_are_refused() {
        let t0 = Instant::now();
        let mut b = ControlBudget::new();
        assert!(b.take(CONTROL_FRAMES_BURST as usize, t0));
        assert!(!b.take(1, t0));
        // A second later the rate's worth is back.
        let mut b = ControlBudget::new();
        assert!(b.take(CONTROL_FRAMES_BURST as usize, t0));
        let later = t0 + Duration::from_secs(1);
        assert!(b.take(CONTROL_FRAMES_PER_S as usize, later));
        assert!(!b.take(1, later));
    }

    #[test]
    fn only_incomplete_messages_stay_counted() {
        let mut f = Frames::default();
        let msg = |len: u32| {
            let mut m = vec![0u8];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let (a, b) = (msg(10), msg(3));
        assert_eq!(f.feed(&a[..3]), 3);
        assert_eq!(f.feed(&a[3..12]), 12);
        // The first message completes and the second arrives whole in the same chunk.
        let mut rest = a[12..].to_vec();
        rest.extend_from_slice(&b);
        assert_eq!(f.feed(&rest), 0);
        let c = msg(100);
        assert_eq!(f.feed(&c[..50]), 50);
        assert_eq!(f.feed(&c[50..]), 0);
        assert_eq!(f.feed(&msg(0)), 0);
    }
}
