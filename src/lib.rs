//! cvserve: a drop-in, single-process replacement for Roboflow Inference's HTTP server.
//!
//! A request walks: `http` (front end: parse, validate, serialise) → `engine` (owns the loaded
//! models; one call per request) → `pipeline::decode` (into a `pipeline::ring` slot) →
//! `pipeline::batcher` (per model; `pipeline::preprocess` into the batch tensor) →
//! `pipeline::instance` (a `model::backend` session, ONNX Runtime) → `pipeline::postprocess`
//! (`tasks::*` decoding) → back to the handler. Workflows (`workflows`) run definitions of
//! steps through the engine. Lower rooms never import higher ones:
//! `geometry` < `model` < `tasks` < `pipeline` < `engine` < `workflows` < `http` < `server`.
//! The load generator and the ceiling are tools beside the server, in `src/bin/cvserve/`.

pub mod config;
pub mod engine;
pub mod geometry;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod regions;
pub mod server;
pub mod stage_cpu;
pub mod tasks;
#[doc(hidden)]
pub mod testing;
pub mod thread_cpu;
pub mod workflows;
