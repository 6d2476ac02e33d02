//! The ONNX Runtime back-end (crate `ort`, library loaded at run time from ORT_DYLIB_PATH: the
//! CPU or the GPU build, one binary for both). One process-wide environment; one session per
//! inference instance, each with its own intra-op threads (usually 1: the instance's own
//! thread does the work), spinning off so an idle server uses no CPU. The instances of one
//! model share their pre-packed weights.
//!
//! The session runs on the execution provider chosen by `provider::ProviderChoice` (TensorRT,
//! CUDA or CPU), and says which. Runs go through an IO binding: the batch tensor is bound as
//! the input where it lies, and outputs are written straight into preallocated buffers taken
//! from a pool and given back when postprocessing drops them (no per-batch copy or
//! allocation once the pool is warm).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::ep;
use ort::ep::ExecutionProvider;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::IoBinding;
use ort::session::Session;
use ort::value::{Shape, Tensor, TensorRef, TensorRefMut};
use parking_lot::Mutex;

use super::backend::{
    Backend, BackendError, BatchBuffer, BatchShape, NetworkInput, OutputBuffer, OutputTensor,
    RunResult,
};
use super::provider::{Provider, ProviderChoice};

static ENVIRONMENT: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> =
    OnceLock::new();

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
            let env = builder
                .with_name("cvserve")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
            Ok((env, dylib.to_path_buf()))
        })
        .as_ref()
        .map(|(env, _)| env)
        .map_err(Clone::clone)
}

/// Whether the loaded library was built with `provider` (`Err` says why not, for the
/// operator). Call after [`environment`].
pub fn library_offers(provider: Provider) -> Result<(), String> {
    let available = match provider {
        Provider::Cpu => return Ok(()),
        Provider::Cuda => ep::CUDA::is_available(),
        Provider::TensorRt => ep::TensorRT::is_available(),
    };
    let library = ENVIRONMENT
        .get()
        .and_then(|e| e.as_ref().ok())
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_else(|| "(not loaded)".into());
    match available {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "{provider} is not in the loaded ONNX Runtime library ({library}): it is the CPU \
             build. Build the GPU flavour with CVSERVE_GPU=1 ./build.sh and start with ./run.sh"
        )),
        Err(e) => Err(format!("cannot ask ONNX Runtime for {provider}: {e}")),
    }
}

/// Whether this machine shows an NVIDIA GPU to the driver (a cheap check, before any model
/// is loaded, for sizing the CPU budget).
pub fn nvidia_gpu_present() -> bool {
    Path::new("/dev/nvidia0").exists() || Path::new("/proc/driver/nvidia/gpus").is_dir()
}

/// TensorRT settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRtOptions {
    /// Engine and timing caches (`None`: `tensorrt-cache/` beside the model file).
    pub cache_dir: Option<PathBuf>,
    /// Build FP16 engines.
    pub fp16: bool,
}

/// How one session runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOptions {
    /// Intra-op threads of the session (1: the calling thread alone).
    pub intra_threads: usize,
    /// ONNX Runtime's CPU arena allocator.
    pub cpu_arena: bool,
    pub providers: ProviderChoice,
    /// The GPU (CUDA device ordinal).
    pub device_id: i32,
    pub tensorrt: TensorRtOptions,
}

impl SessionOptions {
    /// CPU only, `threads` intra-op threads (tests, tools).
    pub fn cpu(intra_threads: usize) -> Self {
        Self {
            intra_threads,
            cpu_arena: false,
            providers: ProviderChoice::Listed {
                providers: vec![Provider::Cpu],
                ignored: vec![],
            },
            device_id: 0,
            tensorrt: TensorRtOptions {
                cache_dir: None,
                fp16: true,
            },
        }
    }
}

/// The batch range a TensorRT engine is built for (its optimisation profile).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchProfile {
    pub max_batch: usize,
    pub height: u32,
    pub width: u32,
}

/// Recycled output buffers of one session: a buffer goes back when the last postprocess task
/// holding the batch's outputs drops it.
type BufferPool = Arc<Mutex<Vec<Vec<f32>>>>;

/// One output of the model, and the per-image shape when the graph fixes it (then it is
/// written into a preallocated buffer).
struct OutputSpec {
    name: String,
    item_shape: Option<Vec<usize>>,
}

/// A model running on ONNX Runtime.
pub struct OrtBackend {
    session: Session,
    binding: IoBinding,
    input_name: String,
    input: NetworkInput,
    outputs: Vec<OutputSpec>,
    provider: Provider,
    pool: BufferPool,
    cpu_memory: MemoryInfo<'static>,
}

// SAFETY: the session and its binding are used by one thread at a time (`&mut self`); the
// binding only holds values bound during one `run`, cleared before it returns.
unsafe impl Send for OrtBackend {}

impl OrtBackend {
    /// Creates a session for the model file at `path` on the provider `opts` choose. Sessions
    /// given the same `prepacked` (the instances of one model) share their pre-packed weights.
    /// `profile`: the batch range for TensorRT when the batch axis is dynamic.
    pub fn load(
        env: &ort::environment::Environment,
        path: &Path,
        opts: &SessionOptions,
        prepacked: &PrepackedWeights,
        profile: Option<&BatchProfile>,
    ) -> Result<Self, String> {
        let (candidates, strict) = opts.providers.candidates();
        let mut fell_back: Vec<String> = Vec::new();
        for provider in candidates {
            if let Err(why) = library_offers(provider) {
                if strict {
                    return Err(why);
                }
                tracing::debug!(%provider, why, "provider not in this ONNX Runtime build");
                continue;
            }
            match session(env, path, opts, prepacked, profile, provider) {
                Ok(session) => {
                    if !fell_back.is_empty() {
                        tracing::warn!(
                            model = %path.display(),
                            %provider,
                            reasons = fell_back.join("; "),
                            "EXECUTION_PROVIDERS=auto fell back"
                        );
                    }
                    return Self::new(session, provider);
                }
                Err(e) => {
                    let e = e.to_string();
                    let driver = if e.contains("libcuda.so") {
                        " (libcuda.so.1 comes with the NVIDIA driver: this machine has no NVIDIA \
                         driver, or no GPU)"
                    } else {
                        ""
                    };
                    let why = format!("{provider} could not start: {e}{driver}{}", hint(provider));
                    if strict || provider == Provider::Cpu {
                        return Err(format!(
                            "ONNX Runtime cannot load {}: {why}",
                            path.display()
                        ));
                    }
                    fell_back.push(why);
                }
            }
        }
        Err(format!(
            "ONNX Runtime cannot load {}: no execution provider could start",
            path.display()
        ))
    }

    fn new(session: Session, provider: Provider) -> Result<Self, String> {
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
        let outputs = session
            .outputs()
            .iter()
            .map(|o| OutputSpec {
                name: o.name().to_string(),
                item_shape: o.dtype().tensor_shape().and_then(|s| {
                    s.iter()
                        .skip(1)
                        .map(|&d| (d > 0).then_some(d as usize))
                        .collect::<Option<Vec<usize>>>()
                }),
            })
            .collect();
        let input_name = first.name().to_string();
        let binding = session
            .create_binding()
            .map_err(|e| format!("cannot create an IO binding: {e}"))?;
        let cpu_memory = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| format!("cannot describe CPU memory: {e}"))?;
        Ok(Self {
            session,
            binding,
            input_name,
            input,
            outputs,
            provider,
            pool: Arc::default(),
            cpu_memory,
        })
    }

    /// The execution provider this session runs on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// A buffer of `len` floats from the pool (or a new one).
    fn take_buffer(&self, len: usize) -> Vec<f32> {
        let mut free = self.pool.lock();
        let mut data = match free.iter().position(|b| b.capacity() >= len) {
            Some(i) => free.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        drop(free);
        data.resize(len, 0.0);
        data
    }

    /// Lends `data` to postprocessing; it comes back to the pool when dropped.
    fn lend(&self, data: Vec<f32>) -> OutputBuffer {
        let pool = Arc::clone(&self.pool);
        OutputBuffer::recycled(data, move |buf| {
            let mut free = pool.lock();
            // Enough for the batches postprocessing may hold at once; the rest is freed.
            if free.len() < 16 {
                free.push(buf);
            }
        })
    }

    /// Runs with every output written into a preallocated buffer. Whatever happens, the
    /// binding is cleared before the buffers can go back to the pool: a binding left
    /// pointing into a pooled buffer would let a later run write into memory that
    /// postprocessing is reading.
    fn run_bound(
        &mut self,
        batch: usize,
        input: &Tensor<f32>,
    ) -> Result<Vec<OutputTensor>, ort::Error> {
        let mut results = Vec::with_capacity(self.outputs.len());
        let run = self.bind_and_run(batch, input, &mut results);
        self.binding.clear_outputs();
        self.binding.clear_inputs();
        // Only now may the buffers (on an error, all of them) go back to the pool.
        run.map(|()| results)
    }

    /// Binds `input` and one pooled buffer per output (each pushed to `results` as soon as
    /// it is bound) and runs; the caller clears the binding whether or not this succeeds.
    fn bind_and_run(
        &mut self,
        batch: usize,
        input: &Tensor<f32>,
        results: &mut Vec<OutputTensor>,
    ) -> Result<(), ort::Error> {
        self.binding.bind_input(&self.input_name, input)?;
        for o in &self.outputs {
            let item = o.item_shape.as_ref().expect("checked by the caller");
            let mut shape = vec![batch];
            shape.extend_from_slice(item);
            let mut buf = self.take_buffer(shape.iter().product());
            // SAFETY: `buf` is CPU memory of exactly the tensor's size. Its heap memory does
            // not move when `buf` moves into `results`, which outlives the bound value:
            // `run_bound` clears the binding before `results` is returned or dropped.
            let value = unsafe {
                TensorRefMut::<f32>::from_raw(
                    self.cpu_memory.clone(),
                    buf.as_mut_ptr().cast(),
                    Shape::new(shape.iter().map(|&d| d as i64)),
                )?
            };
            results.push(OutputTensor {
                name: o.name.clone(),
                shape,
                data: self.lend(buf),
            });
            self.binding.bind_output(&o.name, value)?;
        }
        self.session.run_binding(&self.binding).map(drop)
    }

    /// Runs with outputs allocated by ONNX Runtime, handed on as they are (no copy).
    fn run_plain(&mut self, input: &Tensor<f32>) -> Result<Vec<OutputTensor>, ort::Error> {
        let names: Vec<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => input])?;
        let mut result = Vec::with_capacity(names.len());
        for name in names {
            let Some(mut value) = outputs.remove(&name) else {
                continue;
            };
            let (shape, data) = value.try_extract_tensor_mut::<f32>()?;
            let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            let (ptr, len) = (data.as_ptr(), data.len());
            // SAFETY: the value owns the `len` floats at `ptr` (ONNX Runtime's allocation, which
            // does not move with the `Value`) and moves into the buffer, which only reads them.
            let data = unsafe { OutputBuffer::from_owner(ptr, len, Box::new(value)) };
            result.push(OutputTensor { name, shape, data });
        }
        Ok(result)
    }
}

impl OrtBackend {
    /// Runs one batch. On a GPU through the IO binding: the (pinned) host input is copied to
    /// the device by ONNX Runtime and the outputs are written straight into pooled host
    /// buffers. On the CPU the input is read where it lies and the outputs ONNX Runtime
    /// allocates are handed on without a copy (binding a host input to a CPU session would
    /// make ONNX Runtime copy it first).
    fn run_tensor(
        &mut self,
        batch: usize,
        input: &Tensor<f32>,
    ) -> Result<Vec<OutputTensor>, ort::Error> {
        if self.provider.is_gpu() && self.outputs.iter().all(|o| o.item_shape.is_some()) {
            self.run_bound(batch, input)
        } else {
            self.run_plain(input)
        }
    }
}

/// The rows a run computes: on a GPU with a dynamic batch axis, every row of the tensor (one
/// shape for every run, `run`); otherwise the batch's own.
fn rows_to_run(whole_tensor: bool, tensor_len: usize, image: usize, batch: usize) -> usize {
    if whole_tensor {
        (tensor_len / image.max(1)).max(batch)
    } else {
        batch
    }
}

/// What to check when a provider does not start.
fn hint(provider: Provider) -> &'static str {
    match provider {
        Provider::Cuda => {
            " (the CUDA provider needs an NVIDIA GPU with driver >= 580, and the CUDA 13 runtime \
             and cuDNN 9 libraries on the library path: ./build.sh on the GPU machine fetches \
             them into vendor/cuda/lib and ./run.sh adds it)"
        }
        Provider::TensorRt => {
            " (the TensorRT provider needs the CUDA provider's libraries and TensorRT 10 for \
             CUDA 13, libnvinfer.so.10 and libnvonnxparser.so.10: ./build.sh fetches them into \
             vendor/cuda/lib where NVIDIA's package index, pypi.nvidia.com, is reachable)"
        }
        Provider::Cpu => "",
    }
}

/// Builds a session registering `provider` first (with CUDA, then CPU, behind TensorRT for
/// the nodes it does not take), failing if `provider` cannot register.
fn session(
    env: &ort::environment::Environment,
    path: &Path,
    opts: &SessionOptions,
    prepacked: &PrepackedWeights,
    profile: Option<&BatchProfile>,
    provider: Provider,
) -> ort::Result<Session> {
    let cpu = ep::CPU::default()
        .with_arena_allocator(opts.cpu_arena)
        .build();
    let cuda = || ep::CUDA::default().with_device_id(opts.device_id).build();
    let providers = match provider {
        Provider::Cpu => vec![cpu],
        Provider::Cuda => vec![cuda().error_on_failure(), cpu],
        Provider::TensorRt => {
            let cache = opts.tensorrt.cache_dir.clone().unwrap_or_else(|| {
                path.parent()
                    .unwrap_or(Path::new("."))
                    .join("tensorrt-cache")
            });
            let _ = std::fs::create_dir_all(&cache);
            let cache = cache.to_string_lossy().into_owned();
            let mut trt = ep::TensorRT::default()
                .with_device_id(opts.device_id)
                .with_fp16(opts.tensorrt.fp16)
                .with_engine_cache(true)
                .with_engine_cache_path(&cache)
                .with_timing_cache(true)
                .with_timing_cache_path(&cache);
            if let Some(p) = profile {
                // A dynamic batch axis: batch 1 .. max_batch in one engine, tuned for full
                // batches. Symbolic height/width take the size preprocessing produces.
                let probe = probe_input(env, path)?;
                if probe.batch <= 0 {
                    let h = if probe.height > 0 {
                        probe.height as u32
                    } else {
                        p.height
                    };
                    let w = if probe.width > 0 {
                        probe.width as u32
                    } else {
                        p.width
                    };
                    let name = probe.name;
                    let shape = |b: usize| format!("{name}:{b}x3x{h}x{w}");
                    trt = trt
                        .with_profile_min_shapes(shape(1))
                        .with_profile_opt_shapes(shape(p.max_batch))
                        .with_profile_max_shapes(shape(p.max_batch));
                }
            }
            vec![trt.build().error_on_failure(), cuda(), cpu]
        }
    };
    Session::builder(env)?
        .with_execution_providers(providers)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(opts.intra_threads.max(1))?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?
        .with_prepacked_weights(prepacked)?
        .commit_from_file(path)
}

/// The model's first input as the graph declares it (dimensions <= 0 are symbolic).
struct InputProbe {
    name: String,
    batch: i64,
    height: i64,
    width: i64,
}

/// Reads the first input with a plain CPU session: TensorRT's profile must name it before
/// its own session exists.
fn probe_input(env: &ort::environment::Environment, path: &Path) -> ort::Result<InputProbe> {
    let probe = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Disable)?
        .with_intra_threads(1)?
        .commit_from_file(path)?;
    let first = probe.inputs().first();
    let dims: Vec<i64> = first
        .and_then(|i| i.dtype().tensor_shape())
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default();
    let dim = |i: usize| dims.get(i).copied().unwrap_or(-1);
    Ok(InputProbe {
        name: first
            .map(|i| i.name().to_string())
            .unwrap_or_else(|| "images".into()),
        batch: dim(0),
        height: dim(2),
        width: dim(3),
    })
}

impl Backend for OrtBackend {
    fn input(&self) -> &NetworkInput {
        &self.input
    }

    fn provider(&self) -> &'static str {
        self.provider.ort_name()
    }

    fn alloc_batch(&self, len: usize) -> BatchBuffer {
        if !self.provider.is_gpu() {
            return BatchBuffer::heap(len);
        }
        // Page-locked host memory from the CUDA provider's allocator: the upload is a DMA.
        let pinned = (|| -> ort::Result<BatchBuffer> {
            let info = MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                0,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )?;
            let allocator = Allocator::new(&self.session, info)?;
            let mut tensor = Tensor::<f32>::new(&allocator, [len])?;
            let (_, data) = tensor.try_extract_tensor_mut::<f32>()?;
            data.fill(0.0);
            let ptr = data.as_mut_ptr();
            // The session the allocator belongs to lives as long as the buffer (a tuple
            // drops its fields in order: the tensor first): a batcher keeps the tensor of an
            // instance that has stopped, and freeing pinned memory through the allocator of
            // a released session is undefined.
            let owner = Box::new((tensor, self.session.inner()));
            // SAFETY: the tensor owns `len` floats at `ptr` (and keeps its allocator alive);
            // it moves into the buffer, so the memory lives exactly as long as the buffer.
            Ok(unsafe { BatchBuffer::from_owner(ptr, len, true, owner) })
        })();
        pinned.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot allocate pinned memory; the batch tensor is ordinary memory");
            BatchBuffer::heap(len)
        })
    }

    fn run(&mut self, input: &mut BatchBuffer, shape: BatchShape) -> RunResult {
        let (batch, height, width) = (shape.batch, shape.height, shape.width);
        let err = |e: ort::Error| BackendError(format!("inference failed: {e}"));
        let image = 3 * height as usize * width as usize;
        // On a GPU every run has the shape of the whole tensor (the model's largest batch;
        // the rows past `batch` hold whatever an earlier batch left and their outputs are
        // never read): ONNX Runtime's CUDA provider searched cuDNN's convolution algorithms
        // again whenever the batch size changed from one run to the next, which took 0.2 to
        // 0.8 s a run, and served coco/1 at 20 img/s instead of 490 (measured on an H200,
        // docs/gpu.md). One shape also keeps TensorRT on its tuned profile.
        let batch = rows_to_run(
            self.provider.is_gpu() && self.input.fixed_batch.is_none(),
            input.len(),
            image,
            batch,
        );
        let n = batch * image;
        if n > input.len() {
            return Err(BackendError(format!(
                "a batch of {batch} needs {n} floats, the tensor has {}",
                input.len()
            )));
        }
        let shape = [batch, 3, height as usize, width as usize];
        if input.is_pinned() {
            let info = MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                0,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )
            .map_err(err)?;
            // SAFETY: the first `n` floats of `input` are valid pinned memory, borrowed
            // exclusively (`&mut`) for this call; `view` is dropped before it returns, and
            // `run_tensor` clears any binding of it (`run_bound`) before that.
            let view = unsafe {
                TensorRefMut::<f32>::from_raw(
                    info,
                    input.as_mut_ptr().cast(),
                    Shape::new(shape.iter().map(|&d| d as i64)),
                )
            }
            .map_err(err)?;
            self.run_tensor(batch, &view).map_err(err)
        } else {
            let view = TensorRef::from_array_view((shape, &input[..n])).map_err(err)?;
            self.run_tensor(batch, &view).map_err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dylib() -> PathBuf {
        std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("vendor/onnxruntime/libonnxruntime.so.1.31.1")
            })
    }

    fn model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-seg/1/weights.onnx")
    }

    /// The IO-bound path (outputs written into pooled buffers, as on a GPU) gives exactly
    /// what ONNX Runtime's own output allocation gives, for every output of a two-output
    /// model, and its buffers come back to the pool once the outputs are dropped.
    #[test]
    fn bound_outputs_equal_plain_outputs_and_their_buffers_are_reused() {
        let env = environment(&dylib()).expect("ONNX Runtime (scripts/setup.sh fetches it)");
        let prepacked = PrepackedWeights::new();
        let mut backend =
            OrtBackend::load(env, &model(), &SessionOptions::cpu(1), &prepacked, None).unwrap();
        assert_eq!(backend.provider(), Provider::Cpu);
        assert!(backend.outputs.iter().all(|o| o.item_shape.is_some()));
        let (h, w) = (640usize, 640usize);
        let data: Vec<f32> = (0..2 * 3 * h * w)
            .map(|i| (i % 251) as f32 / 251.0)
            .collect();
        // An owned input: ONNX Runtime binds it without a copy, as it does a host input of a
        // GPU session.
        let owned = Tensor::from_array(([2, 3, h, w], data.clone().into_boxed_slice())).unwrap();
        let bound = backend.run_bound(2, &owned).unwrap();
        let mut buffer = backend.alloc_batch(data.len());
        assert!(!buffer.is_pinned());
        buffer.copy_from_slice(&data);
        let plain = backend
            .run(
                &mut buffer,
                BatchShape {
                    batch: 2,
                    height: h as u32,
                    width: w as u32,
                },
            )
            .unwrap();
        assert_eq!(bound.len(), 2);
        for (b, p) in bound.iter().zip(&plain) {
            assert_eq!(b.name, p.name);
            assert_eq!(b.shape, p.shape);
            assert_eq!(&b.data[..], &p.data[..], "output {}", b.name);
        }
        let mut first: Vec<*const f32> = bound.iter().map(|o| o.data.as_ptr()).collect();
        drop(bound);
        assert_eq!(backend.pool.lock().len(), 2);
        let again = backend.run_bound(2, &owned).unwrap();
        let mut reused: Vec<*const f32> = again.iter().map(|o| o.data.as_ptr()).collect();
        first.sort();
        reused.sort();
        assert_eq!(first, reused, "the second run writes into the same buffers");
        assert!(backend.pool.lock().is_empty());
    }

    /// A run that fails half-way through binding (here the second output's name cannot be
    /// passed to ONNX Runtime) leaves nothing bound: its pooled buffers are back in the pool,
    /// and a binding still pointing into one would let the next run write into it.
    #[test]
    fn a_bound_run_that_fails_leaves_nothing_bound() {
        let env = environment(&dylib()).unwrap();
        let mut backend = OrtBackend::load(
            env,
            &model(),
            &SessionOptions::cpu(1),
            &PrepackedWeights::new(),
            None,
        )
        .unwrap();
        let (h, w) = (640usize, 640usize);
        let input =
            Tensor::from_array(([1, 3, h, w], vec![0.5f32; 3 * h * w].into_boxed_slice())).unwrap();
        let good = backend.outputs[1].name.clone();
        backend.outputs[1].name = "no\0such output".into();
        assert!(backend.run_bound(1, &input).is_err());
        assert_eq!(backend.pool.lock().len(), 2, "both buffers are back");
        // Nothing is bound (not the input, not the first output): running the binding as it
        // was left fails on the missing input instead of writing into a pooled buffer.
        assert!(backend.session.run_binding(&backend.binding).is_err());
        backend.outputs[1].name = good;
        assert_eq!(backend.run_bound(1, &input).unwrap().len(), 2);
    }

    /// On a GPU a batch of 1 to 8 in a tensor of 8 rows always runs 8 rows (the CUDA
    /// provider re-tuned cuDNN at every change of shape); on the CPU it runs its own rows.
    #[test]
    fn a_gpu_batch_always_runs_at_the_whole_tensors_shape() {
        let image = 3 * 416 * 416;
        for batch in 1..=8 {
            assert_eq!(rows_to_run(true, 8 * image, image, batch), 8);
            assert_eq!(rows_to_run(false, 8 * image, image, batch), batch);
        }
    }

    #[test]
    fn a_gpu_provider_asked_from_the_cpu_build_names_what_is_missing() {
        let env = environment(&dylib()).unwrap();
        let opts = SessionOptions {
            providers: ProviderChoice::parse("cuda").unwrap(),
            ..SessionOptions::cpu(1)
        };
        let err = OrtBackend::load(env, &model(), &opts, &PrepackedWeights::new(), None)
            .err()
            .expect("refused");
        assert!(
            err.contains("CUDAExecutionProvider is not in the loaded ONNX Runtime library"),
            "{err}"
        );
        // `auto` falls back to the CPU.
        let opts = SessionOptions {
            providers: ProviderChoice::Auto,
            ..SessionOptions::cpu(1)
        };
        let b = OrtBackend::load(env, &model(), &opts, &PrepackedWeights::new(), None).unwrap();
        assert_eq!(b.provider(), Provider::Cpu);
    }
}
