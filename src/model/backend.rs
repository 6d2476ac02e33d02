//! The inference back-end seen by the batcher: a batch tensor in, the model's outputs out.
//! ONNX Runtime implements it (`ort.rs`); tests wrap it to inject delays and failures.

/// One output of a batch run, batch-major and contiguous.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    pub name: String,
    /// Full shape, batch first.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl OutputTensor {
    /// Shape of one image's slice (without the batch axis).
    pub fn item_shape(&self) -> &[usize] {
        &self.shape[1..]
    }

    /// One image's slice of the output.
    pub fn item(&self, i: usize) -> &[f32] {
        let n: usize = self.item_shape().iter().product();
        &self.data[i * n..(i + 1) * n]
    }
}

/// A failure of one batch run; only that batch's requests fail.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// What the network expects, read from the model file.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkInput {
    /// Input height and width; `None` where the graph leaves them symbolic.
    pub height: Option<u32>,
    pub width: Option<u32>,
    /// Fixed batch size, or `None` for a dynamic batch axis.
    pub fixed_batch: Option<u32>,
}

/// A loaded model that can run batches.
pub trait Backend: Send {
    /// What the network expects.
    fn input(&self) -> &NetworkInput;

    /// Runs `batch` images laid out as `[batch, 3, height, width]` in `input`.
    fn run(
        &mut self,
        input: &[f32],
        batch: usize,
        height: u32,
        width: u32,
    ) -> Result<Vec<OutputTensor>, BackendError>;
}

/// Faults to inject into every batch run (tests of overload, deadlines and failure handling).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultInjection {
    pub delay: std::time::Duration,
    pub fail_batch: Option<u64>,
    pub panic_batch: Option<u64>,
}

impl FaultInjection {
    pub fn is_active(&self) -> bool {
        *self != Self::default()
    }
}

/// A back end that misbehaves as told, around a real one. The instances of one model share
/// `runs`, so "the N-th batch" counts the model's batches, whichever instance runs them.
pub struct FaultyBackend {
    inner: Box<dyn Backend>,
    faults: FaultInjection,
    runs: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultyBackend {
    pub fn new(
        inner: Box<dyn Backend>,
        faults: FaultInjection,
        runs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            inner,
            faults,
            runs,
        }
    }
}

impl Backend for FaultyBackend {
    fn input(&self) -> &NetworkInput {
        self.inner.input()
    }

    fn run(
        &mut self,
        input: &[f32],
        batch: usize,
        height: u32,
        width: u32,
    ) -> Result<Vec<OutputTensor>, BackendError> {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        std::thread::sleep(self.faults.delay);
        if self.faults.fail_batch == Some(run) {
            return Err(BackendError(format!("injected failure of batch {run}")));
        }
        if self.faults.panic_batch == Some(run) {
            panic!("injected panic in batch {run}");
        }
        self.inner.run(input, batch, height, width)
    }
}
