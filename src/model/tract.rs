//! The pure-Rust back end (sonos/tract): no native library, so cvserve serves where ONNX
//! Runtime's library is missing or does not exist (an ARM board, an air-gapped box, a
//! distroless image). CPU only.
//!
//! A model is parsed once and optimised for batches of 1 and of the largest size, with
//! concrete input facts (tract runs a plan specialised to one shape 1.1-1.8x faster than a
//! symbolic one); the plans are shared by every instance of the model, so are their weights.
//! Each instance keeps one run state per plan and runs on its own thread,
//! or on a pool of `threads` for the wide lone-request instance (tract parallelises matrix
//! products only).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::backend::{
    Backend, BackendError, BatchBuffer, BatchShape, NetworkInput, OutputBuffer, OutputTensor,
    RunResult,
};

/// Runs of one model: plans by batch size (1 and the largest), made at load.
pub struct TractModel {
    input: NetworkInput,
    height: u32,
    width: u32,
    plans: HashMap<usize, Arc<TypedSimplePlan>>,
    output_names: Vec<String>,
}

impl TractModel {
    /// Parses the model file at `path` and optimises a plan for the graph's fixed batch, or
    /// for batches of 1 and of `max_batch`. `size` (width, height) stands in for a symbolic
    /// input size.
    pub fn load(path: &Path, max_batch: usize, size: (u32, u32)) -> Result<Self, String> {
        let fail =
            |e: TractError| format!("tract cannot load {}: {}", path.display(), describe(&e));
        // The shapes an exporter wrote for intermediate values and outputs are hints that
        // some exports contradict (coco/1's say batch 1 past a dynamic batch input); tract
        // infers them from the graph instead, as ONNX Runtime does.
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .with_ignore_output_shapes(true)
            .model_for_path(path)
            .map_err(fail)?;
        let fact = model.input_fact(0).map_err(fail)?;
        let dims: Vec<Option<i64>> = fact
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
            .collect();
        if dims.len() != 4 {
            return Err(format!(
                "expected an NCHW image input, got {} dimensions",
                dims.len()
            ));
        }
        let dim = |i: usize| dims[i].filter(|&d| d > 0).map(|d| d as u32);
        let input = NetworkInput {
            fixed_batch: dim(0),
            height: dim(2),
            width: dim(3),
        };
        let (height, width) = (
            input.height.unwrap_or(size.1),
            input.width.unwrap_or(size.0),
        );
        // Plans for batches of 1 and of `max_batch` (each optimisation folds its own copy of
        // the weights, so one per size would multiply load time and memory by the largest
        // batch); a batch in between runs on the larger plan, padded.
        let mut sizes: Vec<usize> = match input.fixed_batch {
            Some(b) => vec![b as usize],
            None => vec![1, max_batch.max(1)],
        };
        sizes.dedup();
        let mut plans = HashMap::new();
        let mut output_names = Vec::new();
        for b in sizes {
            let shape = [b, 3, height as usize, width as usize];
            let typed = model
                .clone()
                .with_input_fact(0, f32::fact(shape).into())
                .and_then(|m| m.into_optimized())
                .map_err(fail)?;
            if output_names.is_empty() {
                output_names = typed
                    .output_outlets()
                    .map_err(fail)?
                    .iter()
                    .map(|&o| {
                        typed
                            .outlet_label(o)
                            .unwrap_or(&typed.node(o.node).name)
                            .to_string()
                    })
                    .collect();
            }
            let plan = typed.into_runnable().map_err(fail)?;
            plans.insert(b, plan);
        }
        Ok(Self {
            input,
            height,
            width,
            plans,
            output_names,
        })
    }
}

/// A tract error with its causes, which name the operator tract lacks.
fn describe(e: &TractError) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// A batch tensor tract reads where it lies: the preprocess pool writes into it through the
/// `BatchBuffer`, and a run hands tract another reference to the same tensor (no copy).
struct TractInput(Arc<Tensor>);

/// One instance of a model on tract.
pub struct TractBackend {
    model: Arc<TractModel>,
    states: HashMap<usize, TypedSimpleState>,
    /// The pool of the wide lone-request instance; `None`: the instance's own thread.
    executor: Option<Executor>,
}

impl TractBackend {
    /// An instance running on `threads` threads (1: its own).
    pub fn new(model: Arc<TractModel>, threads: usize) -> Result<Self, String> {
        let mut states = HashMap::new();
        for (&b, plan) in &model.plans {
            let state = TypedSimpleState::new(plan)
                .map_err(|e| format!("tract cannot prepare a run: {}", describe(&e)))?;
            states.insert(b, state);
        }
        let executor =
            (threads > 1).then(|| Executor::multithread_with_name(threads, "tract-lone"));
        Ok(Self {
            model,
            states,
            executor,
        })
    }
}

impl Backend for TractBackend {
    fn input(&self) -> &NetworkInput {
        &self.model.input
    }

    fn backend(&self) -> &'static str {
        "tract"
    }

    fn alloc_batch(&self, len: usize) -> BatchBuffer {
        let image = 3 * self.model.height as usize * self.model.width as usize;
        let shape: Vec<usize> = if image > 0 && len.is_multiple_of(image) {
            vec![
                len / image,
                3,
                self.model.height as usize,
                self.model.width as usize,
            ]
        } else {
            vec![len]
        };
        let mut tensor = Tensor::zero::<f32>(&shape).expect("an f32 tensor of a known shape");
        // SAFETY: the tensor was made as f32 just above.
        let ptr = unsafe { tensor.as_slice_mut_unchecked::<f32>() }.as_mut_ptr();
        // SAFETY: the tensor owns `len` floats at `ptr`; its data is a heap allocation that
        // does not move with the `Arc`, which the buffer owns. Tract reads it only during a
        // run, while the buffer is borrowed exclusively (`run` takes `&mut`), and writes it
        // never: tract changes an input in place only when it holds the only reference
        // (`Arc::try_unwrap`), and the buffer always keeps one.
        unsafe { BatchBuffer::from_owner(ptr, len, false, Box::new(TractInput(Arc::new(tensor)))) }
    }

    fn run(&mut self, input: &mut BatchBuffer, shape: BatchShape) -> RunResult {
        let (batch, height, width) = (shape.batch, shape.height, shape.width);
        let err = |e: TractError| BackendError(format!("inference failed: {}", describe(&e)));
        if (height, width) != (self.model.height, self.model.width) {
            return Err(BackendError(format!(
                "tract's plans are for {}x{} inputs, not {width}x{height}",
                self.model.width, self.model.height
            )));
        }
        let image = 3 * height as usize * width as usize;
        let n = batch * image;
        if n > input.len() {
            return Err(BackendError(format!(
                "a batch of {batch} needs {n} floats, the tensor has {}",
                input.len()
            )));
        }
        // The plan of this batch size, or the smallest larger one (its extra rows zero).
        let Some(rows) = self.states.keys().copied().filter(|&r| r >= batch).min() else {
            return Err(BackendError(format!(
                "no tract plan for a batch of {batch} (plans: {:?})",
                self.model.plans.keys().collect::<Vec<_>>()
            )));
        };
        let shape = [rows, 3, height as usize, width as usize];
        // The tensor itself when it is exactly this shape (always with one row per batch,
        // the CPU's default); otherwise its first rows, copied.
        let own = input.owner::<TractInput>().map(|TractInput(t)| t);
        let value: TValue = match own {
            Some(t) if t.shape() == shape => TValue::from_const(Arc::clone(t)),
            _ => {
                let mut t = Tensor::zero::<f32>(&shape).map_err(err)?;
                // SAFETY: `t` was made as f32 just above.
                let rows = unsafe { t.as_slice_mut_unchecked::<f32>() };
                rows[..n].copy_from_slice(&input[..n]);
                t.into()
            }
        };
        let state = self.states.get_mut(&rows).expect("a plan of that size");
        let outputs = match &self.executor {
            Some(pool) => multithread_tract_scope(pool.clone(), || state.run(tvec![value])),
            None => state.run(tvec![value]),
        };
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => {
                // A failed run leaves its input and intermediate values in the state.
                let _ = state.reset_turn();
                return Err(err(e));
            }
        };
        let mut result = Vec::with_capacity(outputs.len());
        for (i, value) in outputs.into_iter().enumerate() {
            let tensor = value.into_arc_tensor();
            let is_input = own.is_some_and(|t| Arc::ptr_eq(t, &tensor));
            let tensor = if tensor.datum_type() != f32::datum_type() {
                Arc::new(tensor.cast_to::<f32>().map_err(err)?.into_owned())
            } else if is_input {
                // An output that is the input itself: the batch tensor is refilled while
                // postprocessing reads the outputs, so it is copied.
                Arc::new(tensor.as_ref().clone())
            } else {
                tensor
            };
            let shape = tensor.shape().to_vec();
            let (ptr, len) = (tensor.as_ptr::<f32>().map_err(err)?, tensor.len());
            // SAFETY: the tensor owns the `len` floats at `ptr` (a heap allocation that does
            // not move with the `Arc`) and moves into the buffer, which only reads them.
            let data = unsafe { OutputBuffer::from_owner(ptr, len, Box::new(tensor)) };
            let name = self
                .model
                .output_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("output{i}"));
            result.push(OutputTensor { name, shape, data });
        }
        Ok(result)
    }
}
