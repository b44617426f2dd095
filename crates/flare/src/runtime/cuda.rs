//! The CUDA runtime: one [`CudaRuntime`] per device, created on first use and reused by every op.
//!
//! It holds Candle's stream for the device (flare launches on the same stream as Candle, so no
//! cross-stream synchronisation is ever needed), the cuBLASLt handle and workspace with the GEMM
//! plan cache ([`super::gemm`]), and every flare kernel: each PTX module is loaded once and each
//! function handle is resolved once, at creation, into a table indexed by [`Kernel`] (generated,
//! with the modules, from the one kernel list `crates/flare-kernels/src/registry.rs`). Launching
//! a kernel is then an array index, never a lookup by name.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDevice;

use super::gemm::Gemm;
use super::{FUNCTIONS_LOADED, MODULES_LOADED, RUNTIMES_CREATED};
use crate::{Error, Result};

/// Every flare kernel, by op and dtype; the discriminant indexes the runtime's function table.
/// The one list of kernels is `crates/flare-kernels/src/registry.rs` (adding a kernel is a line
/// there); this enum and the modules the runtime loads are generated from it.
pub use flare_kernels::Kernel;
use flare_kernels::Module;

/// Everything flare needs on one CUDA device, created once.
pub struct CudaRuntime {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    functions: Vec<CudaFunction>,
    gemm: Gemm,
    /// The cuDNN handle on Candle's stream, created the first time an op asks (or why not).
    cudnn: OnceLock<std::result::Result<super::cudnn::Handle, String>>,
    /// Multiprocessor count, for sizing persistent grids.
    pub sm_count: u32,
    /// Page-locked host buffers not in use, for [`super::offload::HostCopy`] (pinned once,
    /// reused; freed by [`empty_cache`]).
    pinned: Mutex<Vec<PinnedHostSlice<u8>>>,
}

impl std::fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime")
            .field("device", &self.device)
            .field("functions", &self.functions.len())
            .finish()
    }
}

/// Makes the device's memory pool keep freed memory instead of returning it to the driver at
/// every synchronisation (its default release threshold is 0). Without this, a large tensor freed
/// before a `synchronize` is unmapped and the next allocation of that size maps it again, which
/// costs hundreds of microseconds for a few hundred MB: the per-op setup cost flare exists to
/// avoid. PyTorch's caching allocator behaves the same way. [`empty_cache`] gives the memory back.
fn keep_pool_memory(
    ctx: &Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    ctx.bind_to_thread().cuda_ctx("binding the CUDA context")?;
    // SAFETY: `cu_device` comes from a live context; the pool handle is owned by the driver and
    // `threshold` is a u64, the type CU_MEMPOOL_ATTR_RELEASE_THRESHOLD expects.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device())
            .cuda_ctx("querying the device memory pool")?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .cuda_ctx("setting the memory pool's release threshold")?;
    }
    Ok(())
}

/// Returns the unused memory held in `device`'s memory pool to the driver (after waiting for
/// queued work), e.g. before handing the GPU to another process, and frees the page-locked
/// host buffers that checkpoint offload keeps for reuse.
pub fn empty_cache(device: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let stream = device.cuda_stream();
    stream
        .synchronize()
        .cuda_ctx("synchronizing before trimming the pool")?;
    // Every copy into or out of a pooled buffer was queued on this stream: all have finished.
    drop(std::mem::take(
        &mut *CudaRuntime::get(device)?
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    ));
    let ctx = stream.context();
    ctx.bind_to_thread().cuda_ctx("binding the CUDA context")?;
    // SAFETY: the pool belongs to a live device; trimming only releases memory no allocation
    // holds, and all queued work has finished.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device())
            .cuda_ctx("querying the device memory pool")?;
        result::mem_pool::trim_to(pool, 0).cuda_ctx("trimming the device memory pool")?;
    }
    Ok(())
}

/// Records the work `f` issues on `device`'s stream into a CUDA graph instead of running it,
/// and returns the graph, instantiated and uploaded (nothing has run yet: launch it).
///
/// The capture is thread-local: a call from this thread that would synchronise (a copy to
/// the host, a synchronous allocation) makes `f` fail rather than be recorded wrongly, and
/// Candle refuses host-to-device copies of data its launch-parameter cache does not hold.
/// Device memory that `f` allocates and frees becomes the graph's own (stream-ordered
/// allocations inside a capture are graph memory nodes), at the same addresses on every
/// launch; buffers that must outlive a launch (inputs, outputs) are allocated before the
/// capture. When `f` or the capture fails, the stream is usable again, and the errors that
/// the invalidated capture left in the context's error state are cleared.
pub(crate) fn capture_graph(
    device: &CudaDevice,
    f: impl FnOnce() -> Result<()>,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaGraph> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .cuda_ctx("beginning a CUDA graph capture")?;
    let ran = f();
    // End the capture whatever happened, so the stream is usable again.
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    if ran.is_err() || ended.is_err() {
        // The frees issued while the capture was invalid recorded their errors in the
        // context; they belong to this failure, not to the next call that checks.
        let _ = stream.context().check_err();
    }
    ran?;
    let graph = ended
        .cuda_ctx("ending a CUDA graph capture")?
        .ok_or_else(|| Error::Cuda {
            context: "capturing a CUDA graph",
            msg: "the capture produced no graph".into(),
        })?;
    graph.upload().cuda_ctx("uploading a CUDA graph")?;
    Ok(graph)
}

/// Launches a graph made by [`capture_graph`] on its stream.
pub(crate) fn launch_graph(
    graph: &candle_core::cuda_backend::cudarc::driver::CudaGraph,
) -> Result<()> {
    graph.launch().cuda_ctx("launching a CUDA graph")
}

// The context trait lives with the error type (so `gemm.rs` takes it from there, not from this
// file, which holds a `Gemm` per device); re-exported here for the CUDA launchers.
pub(crate) use crate::error::CudaResultExt;

fn registry() -> &'static Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaRuntime>>> {
    static REGISTRY: OnceLock<
        Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaRuntime>>>,
    > = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

impl CudaRuntime {
    /// Returns the runtime of `device`, creating it the first time the device is seen.
    pub fn get(device: &CudaDevice) -> Result<Arc<CudaRuntime>> {
        // The hot path: the last runtime this thread used, without touching the global lock.
        thread_local! {
            static LAST: std::cell::RefCell<Option<Arc<CudaRuntime>>> =
                const { std::cell::RefCell::new(None) };
        }
        let id = device.id();
        if let Some(rt) = LAST.with(|l| {
            l.borrow()
                .as_ref()
                .filter(|rt| rt.device.id() == id)
                .cloned()
        }) {
            return Ok(rt);
        }
        let rt = Self::get_slow(device)?;
        LAST.with(|l| *l.borrow_mut() = Some(rt.clone()));
        Ok(rt)
    }

    fn get_slow(device: &CudaDevice) -> Result<Arc<CudaRuntime>> {
        let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = map.get(&device.id()) {
            return Ok(rt.clone());
        }
        let rt = Arc::new(CudaRuntime::new(device)?);
        map.insert(device.id(), rt.clone());
        Ok(rt)
    }

    fn new(device: &CudaDevice) -> Result<Self> {
        let stream = device.cuda_stream();
        let ctx = stream.context().clone();
        // flare issues all of its work on Candle's single stream per device, so cudarc's
        // per-allocation event tracking (an event record and wait around every kernel argument)
        // buys nothing. Set FLARE_CUDA_EVENT_TRACKING=1 to keep it, e.g. when the same buffers
        // are also used from streams of your own.
        if !super::settings().cuda_event_tracking {
            // SAFETY: flare and Candle use one stream per device; nothing flare creates is
            // shared with another stream, so the cross-stream ordering the events provide is
            // never needed. Only allocations made after this call are affected.
            unsafe { ctx.disable_event_tracking() };
        }
        if super::settings().cuda_keep_pool {
            keep_pool_memory(&ctx)?;
        }
        // The backward pass's gradient sums through flare's vectorised add (process-wide, set
        // by the first runtime; the same values as Candle's add).
        candle_core::backprop::set_accumulate_add(crate::ops::cuda::grad_add::accumulate_add);
        let mut modules = Vec::with_capacity(Module::ALL.len());
        for m in Module::ALL {
            let module = ctx
                .load_module(candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_src(
                    m.ptx(),
                ))
                .cuda_ctx("loading a flare kernel module")?;
            MODULES_LOADED.fetch_add(1, Ordering::Relaxed);
            modules.push(module);
        }
        // In `Kernel::ALL` order, so `functions[k as usize]` is `k`; a module's discriminant is
        // its index in `Module::ALL` (both checked by flare-kernels' tests).
        let mut functions = Vec::with_capacity(Kernel::ALL.len());
        for k in Kernel::ALL {
            let name = k.name();
            let f = modules[k.module() as usize]
                .load_function(name)
                .map_err(|e| Error::Cuda {
                    context: "resolving a flare kernel",
                    msg: format!("{name}: {e:?}"),
                })?;
            FUNCTIONS_LOADED.fetch_add(1, Ordering::Relaxed);
            functions.push(f);
        }
        let sm_count = ctx
            .attribute(
                candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .cuda_ctx("reading the multiprocessor count")? as u32;
        let gemm = Gemm::new(stream.clone())?;
        RUNTIMES_CREATED.fetch_add(1, Ordering::Relaxed);
        Ok(CudaRuntime {
            device: device.clone(),
            stream,
            _modules: modules,
            functions,
            gemm,
            cudnn: OnceLock::new(),
            sm_count,
            pinned: Mutex::new(Vec::new()),
        })
    }

    /// A page-locked host buffer of at least `bytes` bytes: the smallest pooled one that is
    /// large enough, else a new one (see [`super::offload`]).
    ///
    /// Errors: the driver cannot pin that much host memory.
    pub(crate) fn take_pinned(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        {
            let mut pool = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= bytes)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(pool.swap_remove(i));
            }
        }
        // SAFETY: the buffer's contents are undefined until a copy writes them; a HostCopy
        // reads it only through the device-to-host copy it queued first.
        unsafe { self.stream.context().alloc_pinned::<u8>(bytes.max(1)) }.map_err(|e| Error::Cuda {
            context: "pinning host memory for checkpoint offload",
            msg: format!("{:.2} GiB: {e:?}", bytes as f64 / (1u64 << 30) as f64),
        })
    }

    /// Puts a buffer from [`take_pinned`](Self::take_pinned) back into the pool. Copies that
    /// used it may still be queued; later ones queue after them on the same stream.
    pub(crate) fn give_pinned(&self, buf: PinnedHostSlice<u8>) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
    }

    /// Bytes of page-locked host memory pooled and not in use.
    pub fn pinned_pool_bytes(&self) -> usize {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|b| b.len())
            .sum()
    }

    /// The function handle of `k`, resolved when the runtime was created.
    pub fn function(&self, k: Kernel) -> &CudaFunction {
        &self.functions[k as usize]
    }

    /// The stream every flare op on this device is issued on (Candle's).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The Candle device this runtime belongs to.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The cuBLASLt handle, workspace and plan cache of this device.
    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    /// This device's cuDNN handle, bound to Candle's stream; created on first use. The error
    /// says why cuDNN cannot be used (not found, too old, or the handle failed), every time
    /// it is asked.
    pub fn cudnn(&self) -> std::result::Result<&super::cudnn::Handle, &str> {
        self.cudnn
            .get_or_init(|| {
                super::cudnn::Handle::new(self.stream.cu_stream().cast()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| e.as_str())
    }
}
