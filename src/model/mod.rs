//! Models: where they live on disk (repository), how they run (backend, ort), and which are
//! loaded and serving (manager).

pub mod backend;
pub mod manager;
pub mod ort;
pub mod repository;
