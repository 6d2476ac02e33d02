//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, Triton's
//! `grpc_service.proto`, with tonic) on GRPC_PORT: the same models, inference
//! ([`super::infer`]), admission, deadlines (`grpc-timeout`), metrics and drain as HTTP.
//! `ModelStreamInfer` answers each request of the stream, in order, working on a few at
//! once (the form a video client wants), driven by the server ([`stream`]).

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
use super::super::call;
use super::super::call::RequestContext;
use super::super::error::ApiError;
use super::super::state::{AppState, Readiness};
use super::infer::{
    self as v2, region_error, resolve_model, Contents, InputTensor, RequestedOutput, V2Request,
    OUTPUT_PREDICTIONS,
};
use crate::metrics::METRICS;

/// The code generated from proto/grpc_service.proto.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

mod convert;
mod service;
mod stream;
mod transport;

use convert::*;
use service::*;
pub use transport::serve;

/// Requests of one `ModelStreamInfer` stream worked on at once, and answers queued for its
/// client (in order).
const STREAM_IN_FLIGHT: usize = 4;

/// Largest gRPC message accepted (a batch of raw frames): MAX_BODY_BYTES, as over HTTP.
fn max_message(st: &AppState) -> usize {
    st.cfg.max_body_bytes
}

/// HTTP/2 streams one gRPC connection may have open at once.
const STREAMS_PER_CONNECTION: u32 = 32;
