//! The ONNX Runtime back-end (crate `ort`, library loaded at run time from ORT_DYLIB_PATH).
//! One process-wide environment; one session per inference instance, each with its own
//! intra-op threads (`intra_threads`, usually 1: the instance's own thread does the work),
//! spinning off so an idle server uses no CPU. The instances of one model share their
//! pre-packed weights, so an extra instance costs its activations, not another weight copy.

use std::path::Path;
use std::sync::OnceLock;

use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::Session;
use ort::value::TensorRef;

use super::backend::{Backend, BackendError, NetworkInput, OutputTensor};

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads libonnxruntime once and builds the shared environment.
pub fn environment(dylib: &Path) -> Result<&'static ort::environment::Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            if !dylib.is_file() {
                return Err(format!(
                    "ONNX Runtime library not found at {} (run ./build.sh, or set ORT_DYLIB_PATH)",
                    dylib.display()
                ));
            }
            let builder = ort::init_from(dylib)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", dylib.display()))?;
            builder
                .with_name("cvserve")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// How one session runs.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Intra-op threads of the session (1: the calling thread alone).
    pub intra_threads: usize,
    /// ONNX Runtime's CPU arena allocator.
    pub cpu_arena: bool,
}

/// A model running on ONNX Runtime.
pub struct OrtBackend {
    session: Session,
    input_name: String,
    input: NetworkInput,
}

impl OrtBackend {
    /// Creates a session for the model file at `path`.
    /// Creates a session for the model file at `path`. Sessions given the same
    /// `prepacked` (the instances of one model) share their pre-packed weights.
    pub fn load(
        env: &ort::environment::Environment,
        path: &Path,
        opts: SessionOptions,
        prepacked: &PrepackedWeights,
    ) -> Result<Self, String> {
        let session = (|| -> ort::Result<Session> {
            let mut builder = Session::builder(env)?
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(opts.cpu_arena)
                    .build()])?
                .with_optimization_level(GraphOptimizationLevel::Level3)?
                .with_intra_threads(opts.intra_threads.max(1))?
                .with_inter_threads(1)?
                .with_intra_op_spinning(false)?
                .with_inter_op_spinning(false)?
                .with_prepacked_weights(prepacked)?;
            builder.commit_from_file(path)
        })()
        .map_err(|e| format!("ONNX Runtime cannot load {}: {e}", path.display()))?;
        let first = session
            .inputs()
            .first()
            .ok_or_else(|| "the model has no input".to_string())?;
        let shape = first
            .dtype()
            .tensor_shape()
            .ok_or_else(|| "the model input is not a tensor".to_string())?;
        if shape.len() != 4 {
            return Err(format!(
                "expected an NCHW image input, got shape {:?}",
                &shape[..]
            ));
        }
        let dim = |d: i64| (d > 0).then_some(d as u32);
        let input = NetworkInput {
            fixed_batch: dim(shape[0]),
            height: dim(shape[2]),
            width: dim(shape[3]),
        };
        Ok(Self {
            input_name: first.name().to_string(),
            session,
            input,
        })
    }
}

impl Backend for OrtBackend {
    fn input(&self) -> &NetworkInput {
        &self.input
    }

    fn run(
        &mut self,
        input: &[f32],
        batch: usize,
        height: u32,
        width: u32,
    ) -> Result<Vec<OutputTensor>, BackendError> {
        let err = |e: ort::Error| BackendError(format!("inference failed: {e}"));
        let n = batch * 3 * height as usize * width as usize;
        let tensor =
            TensorRef::from_array_view(([batch, 3, height as usize, width as usize], &input[..n]))
                .map_err(err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(err)?;
        let mut result = Vec::with_capacity(outputs.len());
        for (name, value) in outputs.iter() {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(err)?;
            result.push(OutputTensor {
                name: name.to_string(),
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                data: data.to_vec(),
            });
        }
        Ok(result)
    }
}
