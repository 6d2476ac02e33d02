//! cvserve: a drop-in, single-process replacement for Roboflow Inference's HTTP server.
//!
//! A request walks: `http` (front end) → `pipeline::decode` (into a `pipeline::ring` slot) →
//! `pipeline::batcher` (per model; `pipeline::preprocess` into the batch tensor) →
//! `model::backend` (ONNX Runtime) → `pipeline::postprocess` (`tasks::*` decoding) → response.

pub mod bench;
pub mod ceiling;
pub mod config;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod server;
pub mod tasks;
