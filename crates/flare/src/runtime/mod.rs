//! The per-device runtime: everything an op needs on a device, created once and reused.
//!
//! On CUDA a `cuda::CudaRuntime` holds, per device: Candle's stream, one cuBLASLt handle and
//! its workspace, every flare kernel module loaded once with each kernel's function handle
//! resolved once, and the GEMM plans (descriptors plus the heuristic's algorithm) cached per
//! shape and dtype. It is created lazily the first time an op runs on a device. The CPU needs no
//! state. The counters in [`RuntimeStats`] let tests and benchmarks check that nothing is created
//! per call.
//!
//! [`Settings`] (module [`settings`](mod@settings)) holds every `FLARE_*` environment switch,
//! read once; its module docs have the table.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "nccl")]
pub(crate) mod nccl;
#[cfg(feature = "cuda")]
pub(crate) mod offload;
pub mod settings;

pub use settings::{settings, Settings, SettingsGuard};

/// Counts of the expensive per-device objects flare has created since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeStats {
    /// Per-device runtimes created (one per CUDA device used).
    pub runtimes_created: usize,
    /// cuBLASLt handles created.
    pub blas_handles_created: usize,
    /// Kernel modules loaded (PTX JIT-compiled by the driver).
    pub modules_loaded: usize,
    /// Kernel function handles looked up by name.
    pub functions_loaded: usize,
    /// GEMM plans built (descriptors created and the algorithm heuristic queried).
    pub gemm_plans_created: usize,
    /// GEMMs issued through the runtime's cuBLASLt entry point (`Gemm::matmul`, with the
    /// `cuda` feature): every frozen and LoRA product of the model's projections. Not an
    /// object created but work done: tests count it to check that a path runs the products it
    /// should and no more.
    pub gemms_launched: usize,
}

pub(crate) static RUNTIMES_CREATED: AtomicUsize = AtomicUsize::new(0);
pub(crate) static BLAS_HANDLES_CREATED: AtomicUsize = AtomicUsize::new(0);
pub(crate) static MODULES_LOADED: AtomicUsize = AtomicUsize::new(0);
pub(crate) static FUNCTIONS_LOADED: AtomicUsize = AtomicUsize::new(0);
pub(crate) static GEMM_PLANS_CREATED: AtomicUsize = AtomicUsize::new(0);
pub(crate) static GEMMS_LAUNCHED: AtomicUsize = AtomicUsize::new(0);

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);

/// Whether flare can use cuDNN (its fused attention): cuDNN's version number (e.g. `91300` for
/// 9.13.0), or why not: built without the `cuda` feature, or libcudnn 9 not found by the dynamic
/// loader (see `runtime::cudnn`, with the `cuda` feature).
pub fn cudnn_version() -> std::result::Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        cudnn::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("flare was built without the cuda feature".to_string())
    }
}

/// Returns how many runtimes, handles, modules, functions and GEMM plans flare has created, and
/// how many GEMMs it has issued.
pub fn stats() -> RuntimeStats {
    RuntimeStats {
        runtimes_created: RUNTIMES_CREATED.load(Ordering::Relaxed),
        blas_handles_created: BLAS_HANDLES_CREATED.load(Ordering::Relaxed),
        modules_loaded: MODULES_LOADED.load(Ordering::Relaxed),
        functions_loaded: FUNCTIONS_LOADED.load(Ordering::Relaxed),
        gemm_plans_created: GEMM_PLANS_CREATED.load(Ordering::Relaxed),
        gemms_launched: GEMMS_LAUNCHED.load(Ordering::Relaxed),
    }
}

/// Lets f32 matmuls on CUDA use TF32 tensor cores (about 10 bits of mantissa in the products,
/// several times faster). Off by default, as in PyTorch. Has no effect on CPU or half types.
pub fn set_allow_tf32(allow: bool) {
    ALLOW_TF32.store(allow, Ordering::Relaxed);
}

/// Whether f32 matmuls on CUDA may use TF32; see [`set_allow_tf32`].
pub fn allow_tf32() -> bool {
    ALLOW_TF32.load(Ordering::Relaxed)
}

/// Waits until all work queued on `device` has finished (a no-op on CPU).
pub fn synchronize(device: &candle_core::Device) -> crate::Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Creates flare's runtime for `device` now (CUDA; a no-op elsewhere) instead of at the first
/// flare op. Call it before allocating long-lived tensors (model weights, KV caches): the
/// runtime turns off cudarc's per-allocation event tracking, which only affects allocations
/// made afterwards, and a tracked buffer costs an event wait and record on every kernel that
/// reads it. [`crate::models::Transformer`]'s constructors call it.
pub fn init(device: &candle_core::Device) -> crate::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::CudaRuntime::get(d).map(|_| ()),
        _ => Ok(()),
    }
}

/// Gives the unused device memory that flare keeps pooled back to the driver (CUDA; a no-op
/// elsewhere). flare keeps freed memory in the device's pool rather than unmapping it at every
/// synchronisation, as PyTorch's caching allocator does; set `FLARE_CUDA_KEEP_POOL=0` before
/// the first op to turn that off ([`Settings::cuda_keep_pool`]).
pub fn empty_cache(device: &candle_core::Device) -> crate::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::empty_cache(d),
        _ => Ok(()),
    }
}

/// While it lives, Candle's CUDA backend caches, on this thread, the shape-and-stride
/// parameters of strided kernel launches; see [`cache_launch_params`].
#[must_use = "the cache is on only while the guard lives"]
pub struct LaunchParamCache {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    guard: Option<Box<dyn std::any::Any>>,
}

impl std::fmt::Debug for LaunchParamCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchParamCache")
            .field("active", &self.guard.is_some())
            .finish()
    }
}

/// Turns on Candle's launch-parameter cache for `device` on this thread until the returned
/// guard is dropped (CUDA; a no-op elsewhere).
///
/// Without it, every Candle elementwise, copy or reduction kernel launched on a strided
/// (non-contiguous) layout first copies its dims and strides from the host to the device: in a
/// LoRA training step of a 24-layer model that is about 490 host-to-device copies, 17% of the
/// GPU time in the H100 trace (BENCHMARKS.md). With the cache on, each distinct layout is
/// uploaded once and reused. Candle's cache also keys host data of at most 4 KiB by its content,
/// so tensors created from host data while the guard lives may share one device buffer: create
/// inputs that vary from call to call (token ids, targets) *before* taking the guard, and never
/// write in place into tensors made under it. The cache is never emptied; it grows with the
/// number of distinct layouts (bounded for a fixed set of shapes).
///
/// [`crate::train::Trainer`] holds it around each forward and backward pass.
/// `FLARE_LAUNCH_PARAM_CACHE=0` ([`Settings::launch_param_cache`]) makes it a no-op.
pub fn cache_launch_params(device: &candle_core::Device) -> LaunchParamCache {
    let enabled = settings().launch_param_cache;
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) if enabled => LaunchParamCache {
            guard: Some(Box::new(d.enable_cuda_graph_htod_cache())),
        },
        _ => {
            let _ = (device, enabled);
            LaunchParamCache { guard: None }
        }
    }
}
