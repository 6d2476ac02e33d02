//! The inference back-end seen by the batcher: a batch tensor in, the model's outputs out.
//! ONNX Runtime implements it (`ort.rs`); tests wrap it to inject delays and failures.

/// Host memory a batch is preprocessed into and the back end reads: ordinary heap memory,
/// or memory the back end allocated for its device (pinned for a GPU, so the upload is a DMA
/// transfer instead of a staged copy).
pub struct BatchBuffer {
    ptr: *mut f32,
    len: usize,
    pinned: bool,
    /// Owns the memory `ptr` points into (the back end that made it may look at it again,
    /// `owner`).
    owner: Box<dyn std::any::Any + Send + Sync>,
}

// SAFETY: the buffer is owned by one holder at a time (moved between the batcher and the
// instances), and `owner` (Send + Sync) keeps the memory alive and in place; shared
// references only read it.
unsafe impl Send for BatchBuffer {}
unsafe impl Sync for BatchBuffer {}

/// Heap floats owned through a raw pointer, so that the pointer a `BatchBuffer` keeps was
/// never derived from a `Box` that moves afterwards (moving a `Box` asserts it is the only
/// way to the memory, which would invalidate that pointer).
struct HeapFloats(*mut [f32]);

impl HeapFloats {
    fn zeroed(len: usize) -> Self {
        Self(Box::into_raw(vec![0f32; len].into_boxed_slice()))
    }
}

impl Drop for HeapFloats {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `Box::into_raw` in `zeroed` and is freed only here.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

// SAFETY: `HeapFloats` owns its allocation alone, like the `Box` it came from; all access
// goes through the `BatchBuffer` that holds it.
unsafe impl Send for HeapFloats {}
unsafe impl Sync for HeapFloats {}

impl BatchBuffer {
    /// `len` zeroed floats on the heap.
    pub fn heap(len: usize) -> Self {
        let floats = HeapFloats::zeroed(len);
        Self {
            ptr: floats.0.cast(),
            len,
            pinned: false,
            owner: Box::new(floats),
        }
    }

    /// `len` floats at `ptr`, owned by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` floats, aligned, and stay so while
    /// `owner` lives; nothing else may access the memory.
    pub unsafe fn from_owner(
        ptr: *mut f32,
        len: usize,
        pinned: bool,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        Self {
            ptr,
            len,
            pinned,
            owner,
        }
    }

    /// What owns the memory, when it is a `T` (a back end finding its own tensor again).
    pub fn owner<T: 'static>(&self) -> Option<&T> {
        self.owner.downcast_ref::<T>()
    }

    /// Whether the memory is pinned (page-locked) for a GPU.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }
}

impl std::ops::Deref for BatchBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: see `from_owner`; the heap case satisfies it by construction.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for BatchBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// The memory of one output, read-only: a vector (possibly lent by the back end's pool,
/// which gets it back when this is dropped, once postprocessing is done with the batch), or
/// memory owned by something else (a tensor ONNX Runtime allocated), never copied.
pub struct OutputBuffer {
    ptr: *const f32,
    len: usize,
    owner: Owner,
}

enum Owner {
    Vec(Vec<f32>, Option<GiveBack>),
    Other(#[allow(dead_code)] Box<dyn Send + Sync>),
}

type GiveBack = Box<dyn FnOnce(Vec<f32>) + Send + Sync>;

// SAFETY: `ptr` (used for `Owner::Other` only) points into memory `owner` owns, which never
// moves and is only read; the vector case is an ordinary owned `Vec`.
unsafe impl Send for OutputBuffer {}
unsafe impl Sync for OutputBuffer {}

impl OutputBuffer {
    /// A buffer that `give_back` receives again when it is dropped.
    pub fn recycled(
        data: Vec<f32>,
        give_back: impl FnOnce(Vec<f32>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            ptr: std::ptr::null(),
            len: data.len(),
            owner: Owner::Vec(data, Some(Box::new(give_back))),
        }
    }

    /// `len` floats at `ptr`, owned by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` floats for as long as `owner` lives, and the
    /// memory must not be written meanwhile.
    pub unsafe fn from_owner(ptr: *const f32, len: usize, owner: Box<dyn Send + Sync>) -> Self {
        Self {
            ptr,
            len,
            owner: Owner::Other(owner),
        }
    }
}

impl From<Vec<f32>> for OutputBuffer {
    fn from(data: Vec<f32>) -> Self {
        Self {
            ptr: std::ptr::null(),
            len: data.len(),
            owner: Owner::Vec(data, None),
        }
    }
}

impl std::ops::Deref for OutputBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.owner {
            Owner::Vec(data, _) => data,
            // SAFETY: the caller of `from_owner` promised that `ptr` is valid for reads of
            // `len` floats while `owner` lives, and unwritten meanwhile.
            Owner::Other(_) => unsafe { std::slice::from_raw_parts(self.ptr, self.len) },
        }
    }
}

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        if let Owner::Vec(data, give_back) = &mut self.owner {
            if let Some(give_back) = give_back.take() {
                give_back(std::mem::take(data));
            }
        }
    }
}

impl std::fmt::Debug for OutputBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutputBuffer({} floats)", self.len)
    }
}

/// One output of a batch run, batch-major and contiguous.
#[derive(Debug)]
pub struct OutputTensor {
    pub name: String,
    /// Full shape, batch first.
    pub shape: Vec<usize>,
    pub data: OutputBuffer,
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

    /// The execution provider it runs on (ONNX Runtime's name; `CPUExecutionProvider` for
    /// any back end on the CPU).
    fn provider(&self) -> &'static str {
        "CPUExecutionProvider"
    }

    /// The inference engine: `onnxruntime` or `tract`.
    fn backend(&self) -> &'static str {
        "onnxruntime"
    }

    /// A batch tensor of `len` floats in the memory this back end reads fastest.
    fn alloc_batch(&self, len: usize) -> BatchBuffer {
        BatchBuffer::heap(len)
    }

    /// Runs `batch` images laid out as `[batch, 3, height, width]` in `input`. Exclusive
    /// (`&mut`): ONNX Runtime's raw tensor views are typed mutable even when only read.
    fn run(&mut self, input: &mut BatchBuffer, shape: BatchShape) -> RunResult;
}

/// What a run gives: the model's outputs, or why it failed.
pub type RunResult = Result<Vec<OutputTensor>, BackendError>;

/// The shape of a run's input: `batch` images of `height` x `width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    pub height: u32,
    pub width: u32,
}

impl BatchShape {
    /// `batch` images of the network input `spec`'s size.
    pub fn of(batch: usize, spec: &crate::geometry::InputSpec) -> BatchShape {
        BatchShape {
            batch,
            height: spec.height,
            width: spec.width,
        }
    }
}

/// Which back end runs the models (`BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// ONNX Runtime when its library loads, otherwise tract (said in the log, with why).
    Auto,
    Ort,
    Tract,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "ort" | "onnxruntime" => Ok(Self::Ort),
            "tract" => Ok(Self::Tract),
            other => Err(format!("must be auto, ort or tract, not {other:?}")),
        }
    }

    /// The back end to use: `auto` takes ONNX Runtime when `ort_usable` says its library
    /// loads, or when a GPU is asked for by name (only ONNX Runtime has one: the models then
    /// fail to load with the library's reason), and tract otherwise, with the reason.
    pub fn resolve(
        self,
        ort_usable: Result<(), String>,
        gpu_asked: bool,
    ) -> (BackendKind, Option<String>) {
        match self {
            Self::Ort => (BackendKind::Ort, None),
            Self::Tract => (BackendKind::Tract, None),
            Self::Auto => match ort_usable {
                Ok(()) => (BackendKind::Ort, None),
                Err(_) if gpu_asked => (BackendKind::Ort, None),
                Err(why) => (BackendKind::Tract, Some(why)),
            },
        }
    }
}

/// The back end the models run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Ort,
    Tract,
}

impl BackendKind {
    /// As `/info`, `/model/registry` and the metrics name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ort => "onnxruntime",
            Self::Tract => "tract",
        }
    }
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

    fn provider(&self) -> &'static str {
        self.inner.provider()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn alloc_batch(&self, len: usize) -> BatchBuffer {
        self.inner.alloc_batch(len)
    }

    fn run(&mut self, input: &mut BatchBuffer, shape: BatchShape) -> RunResult {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        std::thread::sleep(self.faults.delay);
        if self.faults.fail_batch == Some(run) {
            return Err(BackendError(format!("injected failure of batch {run}")));
        }
        if self.faults.panic_batch == Some(run) {
            panic!("injected panic in batch {run}");
        }
        self.inner.run(input, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` takes ONNX Runtime when it loads, tract (with the reason) when it does not,
    /// and never tract when a GPU is asked for; `ort` and `tract` are taken as said.
    #[test]
    fn the_back_end_choice_falls_back_only_when_it_should() {
        let missing = || Err("library not found".to_string());
        assert_eq!(
            BackendChoice::Auto.resolve(Ok(()), false),
            (BackendKind::Ort, None)
        );
        assert_eq!(
            BackendChoice::Auto.resolve(missing(), false),
            (BackendKind::Tract, Some("library not found".into()))
        );
        assert_eq!(
            BackendChoice::Auto.resolve(missing(), true),
            (BackendKind::Ort, None)
        );
        assert_eq!(
            BackendChoice::Ort.resolve(missing(), false),
            (BackendKind::Ort, None)
        );
        assert_eq!(
            BackendChoice::Tract.resolve(Ok(()), false),
            (BackendKind::Tract, None)
        );
        assert_eq!(BackendChoice::parse(" ONNXRuntime"), Ok(BackendChoice::Ort));
        assert!(BackendChoice::parse("tensorflow").is_err());
    }
}
