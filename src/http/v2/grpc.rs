//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, Triton's
//! `grpc_service.proto`, with tonic) on GRPC_PORT: the same models, inference
//! ([`super::infer`]), admission, deadlines (`grpc-timeout`), metrics and drain as HTTP.
//! `ModelStreamInfer` answers each request of the stream, in order, working on a few at
//! once: the form a video client wants.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use super::super::answer::RequestId;
use super::super::error::ApiError;
use super::super::inference::RequestContext;
use super::super::state::{AppState, Readiness};
use super::infer::{
    self as v2, region_error, resolve_model, Contents, InputTensor, RequestedOutput, V2Request,
    OUTPUT_PREDICTIONS,
};
use crate::metrics::{Outcome, Stage, METRICS};

/// The code generated from proto/grpc_service.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// Requests of one `ModelStreamInfer` stream worked on at once (answered in order).
const STREAM_IN_FLIGHT: usize = 4;

/// Largest gRPC message accepted (a batch of raw frames): MAX_BODY_BYTES, as over HTTP.
fn max_message(st: &AppState) -> usize {
    st.cfg.max_body_bytes
}

/// HTTP/2 streams one gRPC connection may have open at once.
const STREAMS_PER_CONNECTION: u32 = 32;

/// Serves gRPC on `listener` until shutdown begins (`drain_started`), then lets the calls in
/// flight finish. Bounded like the HTTP front end: at most MAX_CONNECTIONS connections (more
/// are closed at once), each closed after GRPC_IDLE_TIMEOUT_S without a byte from its client, a unary call at most
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
                    Ok((io, _)) => {
                        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                            METRICS.connections_shed.inc();
                            continue;
                        };
                        let _ = io.set_nodelay(true);
                        let conn = Counted {
                            io,
                            _permit: permit,
                            idle,
                            silent_until: Box::pin(tokio::time::sleep(idle)),
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
/// has sent nothing for `idle`.
struct Counted {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    silent_until: std::pin::Pin<Box<tokio::time::Sleep>>,
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
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let next = tokio::time::Instant::now() + self.idle;
                self.silent_until.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match std::future::Future::poll(self.silent_until.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent nothing for GRPC_IDLE_TIMEOUT_S",
                ))),
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
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
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
struct Budgeted<S> {
    inner: S,
    budget: Arc<super::super::budget::BodyBudget>,
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
            .map(|a| super::super::budget::client_key(a.ip()));
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
struct CountedBody {
    inner: tonic::body::Body,
    lease: super::super::budget::BodyLease,
    frames: Frames,
}

/// Where a body is in gRPC's framing: 5 header bytes (a flag, a 4-byte big-endian length),
/// then the message.
#[derive(Default)]
struct Frames {
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

struct Grpc {
    state: Arc<AppState>,
}

/// An error as a gRPC status (Triton's codes: unknown model NOT_FOUND, overload UNAVAILABLE).
fn status_of(e: ApiError) -> Status {
    use tonic::Code;
    let code = match e.status.as_u16() {
        400 | 413 | 422 => Code::InvalidArgument,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        429 | 503 => Code::Unavailable,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        _ => Code::Internal,
    };
    Status::new(code, e.message)
}

/// The request's deadline: REQUEST_TIMEOUT_S, or sooner by `grpc-timeout`.
fn deadline_of(st: &AppState, metadata: &tonic::metadata::MetadataMap, now: Instant) -> Instant {
    let default = Duration::from_secs_f64(st.cfg.request_timeout_s.max(0.0));
    let asked = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    now + asked.map_or(default, |a| a.min(default))
}

/// `grpc-timeout`: digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC parameter as the JSON value the HTTP protocol carries.
fn param_value(p: &pb::InferParameter) -> Value {
    use pb::infer_parameter::ParameterChoice as P;
    match &p.parameter_choice {
        Some(P::BoolParam(b)) => Value::Bool(*b),
        Some(P::Int64Param(i)) => Value::from(*i),
        Some(P::Uint64Param(u)) => Value::from(*u),
        Some(P::DoubleParam(d)) => Value::from(*d),
        Some(P::StringParam(s)) => Value::String(s.clone()),
        None => Value::Null,
    }
}

fn params_map(p: &HashMap<String, pb::InferParameter>) -> Map<String, Value> {
    p.iter().map(|(k, v)| (k.clone(), param_value(v))).collect()
}

/// A gRPC inference request as the protocol-neutral [`V2Request`].
fn v2_request(req: pb::ModelInferRequest) -> Result<V2Request, ApiError> {
    let mut raw = req.raw_input_contents.into_iter();
    let uses_raw = raw.len() > 0;
    if uses_raw && raw.len() != req.inputs.len() {
        return Err(ApiError::bad_request(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let params = params_map(&input.parameters);
        let raw_here = if uses_raw { raw.next() } else { None };
        let contents = if let Some(r) = super::region_ref(&input.name, &params)? {
            if raw_here.as_ref().is_some_and(|b| !b.is_empty()) {
                return Err(ApiError::bad_request(format!(
                    "input '{}' names a shared memory region and also has raw_input_contents",
                    input.name
                )));
            }
            Contents::Region(r)
        } else if let Some(bytes) = raw_here {
            Contents::Raw(bytes)
        } else if let Some(c) = input.contents {
            if !c.bytes_contents.is_empty() {
                Contents::Elements(c.bytes_contents)
            } else if !c.uint_contents.is_empty() {
                let bytes: Option<Vec<u8>> = c
                    .uint_contents
                    .iter()
                    .map(|&v| u8::try_from(v).ok())
                    .collect();
                Contents::Raw(Bytes::from(bytes.ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "input '{}' holds a value that is not 0 to 255",
                        input.name
                    ))
                })?))
            } else {
                return Err(ApiError::bad_request(format!(
                    "input '{}' has no contents of its datatype",
                    input.name
                )));
            }
        } else {
            return Err(ApiError::bad_request(format!(
                "input '{}' has no data: give raw_input_contents, contents or a shared memory region",
                input.name
            )));
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            contents,
        });
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        let params = params_map(&o.parameters);
        outputs.push(RequestedOutput {
            region: super::region_ref(&o.name, &params)?,
            binary: None,
            name: o.name,
        });
    }
    Ok(V2Request {
        id: Some(req.id).filter(|id| !id.is_empty()),
        parameters: params_map(&req.parameters),
        inputs,
        outputs,
    })
}

/// Counts a call in the request metrics, as the HTTP front end does (route `grpc ...`).
fn observe(ctx: RequestContext, status: &str, started: Instant) {
    if let Some(labels) = ctx.labels() {
        let model = labels.model.as_deref().unwrap_or("none");
        METRICS
            .requests_total
            .with_label_values(&[model, labels.route, status])
            .inc();
        METRICS
            .request_seconds
            .with_label_values(&[model, labels.route])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The metrics label of gRPC inference calls.
const GRPC_INFER_ROUTE: &str = "grpc ModelInfer";

impl Grpc {
    /// One inference, admitted and bounded like an HTTP one.
    async fn infer_one(
        &self,
        req: pb::ModelInferRequest,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<pb::ModelInferResponse, Status> {
        let st = &self.state;
        let _in_flight = st.in_flight.enter();
        let now = Instant::now();
        let mut ctx = RequestContext::new(
            RequestId(uuid::Uuid::new_v4().to_string()),
            GRPC_INFER_ROUTE,
        );
        let answer = async {
            if st.draining.load(Ordering::Acquire) {
                return Err(super::super::body::shutting_down());
            }
            let deadline = deadline_of(st, metadata, now);
            let Some(_presence) = st.engine.activity().enter() else {
                METRICS.outcome("none", Outcome::Rejected, Stage::Admission);
                return Err(ApiError::overloaded(
                    "Server overloaded: MAX_INFLIGHT_REQUESTS inference requests are in the server; retry shortly",
                ));
            };
            ctx.peer = peer.map(super::super::budget::client_key);
            ctx.remote = peer;
            // The message is held until the answer: counted like an HTTP body.
            let mut lease = st.body_memory.lease(ctx.peer);
            lease
                .cover(prost::Message::encoded_len(&req))
                .map_err(super::super::budget::body_memory_full)?;
            ctx.body_held = lease.held_bytes();
            let version = Some(req.model_version.as_str()).filter(|v| !v.is_empty());
            let (model_id, version) = resolve_model(st, &req.model_name, version)?;
            ctx.ticket = st.engine.admit(&model_id, now, deadline)?;
            let request = v2_request(req)?;
            let answer =
                v2::run(st, &model_id, &version, request, now, deadline, &mut ctx).await;
            ctx.served(&answer);
            answer
        }
        .await;
        let status = match &answer {
            Ok(_) => "200".to_string(),
            Err(e) => e.status.as_str().to_string(),
        };
        observe(ctx, &status, now);
        let r = answer.map_err(status_of)?;
        let mut output = pb::model_infer_response::InferOutputTensor {
            name: OUTPUT_PREDICTIONS.into(),
            datatype: "BYTES".into(),
            shape: vec![r.predictions.len() as i64],
            ..Default::default()
        };
        let mut raw_output_contents = Vec::new();
        if let Some(region) = &r.written_to {
            let p = |c| pb::InferParameter {
                parameter_choice: Some(c),
            };
            use pb::infer_parameter::ParameterChoice as P;
            output.parameters = HashMap::from([
                (
                    "shared_memory_region".into(),
                    p(P::StringParam(region.name.clone())),
                ),
                (
                    "shared_memory_byte_size".into(),
                    p(P::Int64Param(region.byte_size as i64)),
                ),
                (
                    "shared_memory_offset".into(),
                    p(P::Int64Param(region.offset as i64)),
                ),
            ]);
        } else {
            raw_output_contents.push(Bytes::from(v2::serialize_bytes(&r.predictions)));
        }
        Ok(pb::ModelInferResponse {
            model_name: r.model_name,
            model_version: r.model_version,
            id: r.id,
            outputs: vec![output],
            raw_output_contents,
            ..Default::default()
        })
    }
}

fn api<T>(r: Result<T, ApiError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(status_of)
}

type InferStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.readiness() == Readiness::Ready,
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let (id, _) = resolve_model(&self.state, &r.name, version).map_err(status_of)?;
        Ok(Response::new(pb::ModelReadyResponse {
            ready: self.state.engine.models().get(&id).is_some(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "cvserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: super::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let meta = super::model_metadata_of(&self.state, &r.name, version).map_err(status_of)?;
        let tensors = |v: &Value| -> Vec<pb::model_metadata_response::TensorMetadata> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t["name"].as_str().unwrap_or_default().into(),
                    datatype: t["datatype"].as_str().unwrap_or_default().into(),
                    shape: t["shape"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_i64)
                        .collect(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: r.name,
            versions: meta["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            platform: meta["platform"].as_str().unwrap_or_default().into(),
            inputs: tensors(&meta["inputs"]),
            outputs: tensors(&meta["outputs"]),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let peer = req.remote_addr().map(|a: SocketAddr| a.ip());
        let metadata = req.metadata().clone();
        let answer = self.infer_one(req.into_inner(), &metadata, peer).await?;
        Ok(Response::new(answer))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let peer = req.remote_addr().map(|a: SocketAddr| a.ip());
        // A stream's `grpc-timeout` bounds the whole stream (the client enforces it); each
        // of its requests gets REQUEST_TIMEOUT_S from its arrival.
        let metadata = tonic::metadata::MetadataMap::new();
        let this = Grpc {
            state: Arc::clone(&self.state),
        };
        let this = Arc::new(this);
        let answers = req
            .into_inner()
            .map(move |next| {
                let (this, metadata) = (Arc::clone(&this), metadata.clone());
                async move {
                    match next {
                        // A broken stream ends it.
                        Err(status) => Err(status),
                        Ok(one) => {
                            let id = one.id.clone();
                            Ok(match this.infer_one(one, &metadata, peer).await {
                                Ok(r) => pb::ModelStreamInferResponse {
                                    error_message: String::new(),
                                    infer_response: Some(r),
                                },
                                // An error answers that request; the stream goes on.
                                Err(status) => pb::ModelStreamInferResponse {
                                    error_message: status.message().to_owned(),
                                    infer_response: Some(pb::ModelInferResponse {
                                        id,
                                        ..Default::default()
                                    }),
                                },
                            })
                        }
                    }
                }
            })
            .buffered(STREAM_IN_FLIGHT);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let version = Some(r.version.as_str()).filter(|v| !v.is_empty());
        let cfg = super::model_config_of(&self.state, &r.name, version).map_err(status_of)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model_config_pb(&cfg)),
        }))
    }

    async fn model_statistics(
        &self,
        _: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        Err(Status::unimplemented(
            "the statistics extension is not served: see /metrics",
        ))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let ready = req.into_inner().ready;
        let models = super::repository_index_of(&self.state, ready)
            .into_iter()
            .map(|m| pb::repository_index_response::ModelIndex {
                name: m["name"].as_str().unwrap_or_default().into(),
                version: m["version"].as_str().unwrap_or_default().into(),
                state: m["state"].as_str().unwrap_or_default().into(),
                reason: m["reason"].as_str().unwrap_or_default().into(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let name = req.into_inner().model_name;
        api(super::load_model(&self.state, &name)
            .await
            .map(|()| pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let name = req.into_inner().model_name;
        api(super::unload_model(&self.state, &name).map(|()| pb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let regions = &self.state.regions;
        regions
            .allowed(peer)
            .map_err(|e| status_of(region_error(e)))?;
        let name = req.into_inner().name;
        let name = Some(name.as_str()).filter(|n| !n.is_empty());
        let all = regions
            .status(name)
            .map_err(|e| status_of(region_error(e)))?;
        let regions = all
            .into_iter()
            .map(|r| {
                (
                    r.name.clone(),
                    pb::system_shared_memory_status_response::RegionStatus {
                        name: r.name,
                        key: r.key,
                        offset: r.offset,
                        byte_size: r.byte_size,
                    },
                )
            })
            .collect();
        Ok(Response::new(pb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        self.state
            .regions
            .register(&r.name, &r.key, r.offset, r.byte_size, peer)
            .map_err(|e| status_of(region_error(e)))?;
        Ok(Response::new(pb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        self.state
            .regions
            .allowed(peer)
            .map_err(|e| status_of(region_error(e)))?;
        let name = req.into_inner().name;
        let name = Some(name.as_str()).filter(|n| !n.is_empty());
        api(super::unregister(&self.state, name)
            .await
            .map(|()| pb::SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(no_cuda_shm())
    }

    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        Err(Status::unimplemented("the trace extension is not served"))
    }

    async fn log_settings(
        &self,
        _: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        Err(Status::unimplemented(
            "the logging extension is not served: set LOG_LEVEL",
        ))
    }
}

fn no_cuda_shm() -> Status {
    Status::unimplemented(
        "CUDA shared memory is not served: frames go through system shared memory",
    )
}

/// The model configuration (as [`super::model_config_of`] gives it in JSON) as its message.
fn model_config_pb(cfg: &Value) -> pb::ModelConfig {
    let data_type = |t: &str| match t {
        "TYPE_UINT8" => pb::DataType::TypeUint8 as i32,
        _ => pb::DataType::TypeString as i32,
    };
    let dims = |v: &Value| -> Vec<i64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64)
            .collect()
    };
    let reshape = |v: &Value| {
        v.get("reshape").map(|r| pb::ModelTensorReshape {
            shape: dims(&r["shape"]),
        })
    };
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let queue = &cfg["dynamic_batching"]["default_queue_policy"];
    pb::ModelConfig {
        name: cfg["name"].as_str().unwrap_or_default().into(),
        platform: cfg["platform"].as_str().unwrap_or_default().into(),
        backend: cfg["backend"].as_str().unwrap_or_default().into(),
        max_batch_size: cfg["max_batch_size"].as_i64().unwrap_or(0) as i32,
        input: list(&cfg["input"])
            .iter()
            .map(|i| pb::ModelInput {
                name: i["name"].as_str().unwrap_or_default().into(),
                data_type: data_type(i["data_type"].as_str().unwrap_or_default()),
                dims: dims(&i["dims"]),
                reshape: reshape(i),
                ..Default::default()
            })
            .collect(),
        output: list(&cfg["output"])
            .iter()
            .map(|o| pb::ModelOutput {
                name: o["name"].as_str().unwrap_or_default().into(),
                data_type: data_type(o["data_type"].as_str().unwrap_or_default()),
                dims: dims(&o["dims"]),
                reshape: reshape(o),
                ..Default::default()
            })
            .collect(),
        instance_group: list(&cfg["instance_group"])
            .iter()
            .map(|g| pb::ModelInstanceGroup {
                name: g["name"].as_str().unwrap_or_default().into(),
                count: g["count"].as_i64().unwrap_or(1) as i32,
                kind: if g["kind"] == "KIND_GPU" {
                    pb::model_instance_group::Kind::Gpu as i32
                } else {
                    pb::model_instance_group::Kind::Cpu as i32
                },
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching {
                max_queue_delay_microseconds: cfg["dynamic_batching"]
                    ["max_queue_delay_microseconds"]
                    .as_u64()
                    .unwrap_or(0),
                default_queue_policy: Some(pb::ModelQueuePolicy {
                    timeout_action: pb::model_queue_policy::TimeoutAction::Reject as i32,
                    default_timeout_microseconds: queue["default_timeout_microseconds"]
                        .as_u64()
                        .unwrap_or(0),
                    allow_timeout_override: true,
                    max_queue_size: queue["max_queue_size"].as_u64().unwrap_or(0) as u32,
                }),
                ..Default::default()
            },
        )),
        parameters: cfg["parameters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelParameter {
                        string_value: v["string_value"].as_str().unwrap_or_default().into(),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::infer::{INPUT_IMAGE, INPUT_PIXELS};
    use super::*;

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

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn raw_contents_go_to_their_inputs_in_order() {
        let input = |name: &str| pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        };
        let req = pb::ModelInferRequest {
            inputs: vec![input(INPUT_IMAGE), input(INPUT_PIXELS)],
            raw_input_contents: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            ..Default::default()
        };
        let v = v2_request(req).unwrap();
        let raws: Vec<_> = v
            .inputs
            .iter()
            .map(|i| match &i.contents {
                Contents::Raw(b) => b.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(raws, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let short = pb::ModelInferRequest {
            inputs: vec![input(INPUT_IMAGE), input(INPUT_PIXELS)],
            raw_input_contents: vec![Bytes::from_static(b"a")],
            ..Default::default()
        };
        assert!(v2_request(short).is_err());
    }
}
