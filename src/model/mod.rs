//! Model files and back ends: where models live on disk and what their metadata says
//! (`repository`), the back-end trait the pipeline runs (`backend`), and its two
//! implementations, ONNX Runtime (`ort`) and tract (`tract`, pure Rust). Knows nothing of the
//! pipeline or of HTTP.

pub mod backend;
pub mod download;
pub mod ort;
pub mod provider;
pub mod repository;
pub mod tract;
