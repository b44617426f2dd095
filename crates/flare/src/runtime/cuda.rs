//! The CUDA runtime: one [`CudaRuntime`] per device, created on first use and reused by every op.
//!
//! It holds Candle's stream for the device (flare launches on the same stream as Candle, so no
//! cross-stream synchronisation is ever needed), the cuBLASLt handle and workspace with the GEMM
//! plan cache ([`super::gemm`]), and every flare kernel: each PTX module is loaded once and each
//! function handle is resolved once, at creation, into a table indexed by [`Kernel`]. Launching a
//! kernel is then an array index, never a lookup by name.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream};
use candle_core::cuda_backend::CudaDevice;

use super::gemm::Gemm;
use super::{FUNCTIONS_LOADED, MODULES_LOADED, RUNTIMES_CREATED};
use crate::{Error, Result};

/// The kernel modules flare ships, one per op family (one `.cu` file each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Module {
    Softmax,
    RmsNorm,
    GemmSmall,
    Rope,
    SwiGlu,
    Argmax,
    Gemv,
    CrossEntropy,
    AdamW,
    Attention,
    Decode,
}

impl Module {
    const ALL: [Module; 11] = [
        Module::Softmax,
        Module::RmsNorm,
        Module::GemmSmall,
        Module::Rope,
        Module::SwiGlu,
        Module::Argmax,
        Module::Gemv,
        Module::CrossEntropy,
        Module::AdamW,
        Module::Attention,
        Module::Decode,
    ];

    fn ptx(self) -> &'static str {
        match self {
            Module::Softmax => flare_kernels::SOFTMAX,
            Module::RmsNorm => flare_kernels::RMS_NORM,
            Module::GemmSmall => flare_kernels::GEMM_SMALL,
            Module::Rope => flare_kernels::ROPE,
            Module::SwiGlu => flare_kernels::SWIGLU,
            Module::Argmax => flare_kernels::ARGMAX,
            Module::Gemv => flare_kernels::GEMV,
            Module::CrossEntropy => flare_kernels::CROSS_ENTROPY,
            Module::AdamW => flare_kernels::ADAMW,
            Module::Attention => flare_kernels::ATTENTION,
            Module::Decode => flare_kernels::DECODE,
        }
    }
}

macro_rules! kernels {
    ($($variant:ident => ($module:ident, $name:literal),)*) => {
        /// Every flare kernel, by op and dtype. The discriminant indexes the function table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum Kernel { $($variant,)* }

        const KERNELS: &[(Module, &str)] = &[$((Module::$module, $name),)*];
    };
}

kernels! {
    SoftmaxFwdF32 => (Softmax, "softmax_fwd_f32"),
    SoftmaxFwdF16 => (Softmax, "softmax_fwd_f16"),
    SoftmaxFwdBF16 => (Softmax, "softmax_fwd_bf16"),
    SoftmaxBwdF32 => (Softmax, "softmax_bwd_f32"),
    SoftmaxBwdF16 => (Softmax, "softmax_bwd_f16"),
    SoftmaxBwdBF16 => (Softmax, "softmax_bwd_bf16"),
    SoftmaxMaskedFwdF32 => (Softmax, "softmax_masked_fwd_f32"),
    SoftmaxMaskedFwdF16 => (Softmax, "softmax_masked_fwd_f16"),
    SoftmaxMaskedFwdBF16 => (Softmax, "softmax_masked_fwd_bf16"),
    RmsNormFwdF32 => (RmsNorm, "rms_norm_fwd_f32"),
    RmsNormFwdF16 => (RmsNorm, "rms_norm_fwd_f16"),
    RmsNormFwdBF16 => (RmsNorm, "rms_norm_fwd_bf16"),
    AddRmsNormFwdF32 => (RmsNorm, "add_rms_norm_fwd_f32"),
    AddRmsNormFwdF16 => (RmsNorm, "add_rms_norm_fwd_f16"),
    AddRmsNormFwdBF16 => (RmsNorm, "add_rms_norm_fwd_bf16"),
    RmsNormBwdF32 => (RmsNorm, "rms_norm_bwd_f32"),
    RmsNormBwdF16 => (RmsNorm, "rms_norm_bwd_f16"),
    RmsNormBwdBF16 => (RmsNorm, "rms_norm_bwd_bf16"),
    RmsNormDwF32 => (RmsNorm, "rms_norm_dw_f32"),
    RmsNormDwF16 => (RmsNorm, "rms_norm_dw_f16"),
    RmsNormDwBF16 => (RmsNorm, "rms_norm_dw_bf16"),
    GemmSmallF32 => (GemmSmall, "gemm_small_f32"),
    GemmSmallF16 => (GemmSmall, "gemm_small_f16"),
    GemmSmallBF16 => (GemmSmall, "gemm_small_bf16"),
    RopeF32 => (Rope, "rope_f32"),
    RopeF16 => (Rope, "rope_f16"),
    RopeBF16 => (Rope, "rope_bf16"),
    SwiGluFwdF32 => (SwiGlu, "swiglu_fwd_f32"),
    SwiGluFwdF16 => (SwiGlu, "swiglu_fwd_f16"),
    SwiGluFwdBF16 => (SwiGlu, "swiglu_fwd_bf16"),
    SwiGluBwdF32 => (SwiGlu, "swiglu_bwd_f32"),
    SwiGluBwdF16 => (SwiGlu, "swiglu_bwd_f16"),
    SwiGluBwdBF16 => (SwiGlu, "swiglu_bwd_bf16"),
    ArgmaxF32 => (Argmax, "argmax_f32"),
    ArgmaxF16 => (Argmax, "argmax_f16"),
    ArgmaxBF16 => (Argmax, "argmax_bf16"),
    ArgmaxPartF32 => (Argmax, "argmax_part_f32"),
    ArgmaxPartF16 => (Argmax, "argmax_part_f16"),
    ArgmaxPartBF16 => (Argmax, "argmax_part_bf16"),
    ArgmaxFinal => (Argmax, "argmax_final"),
    GemvF32 => (Gemv, "gemv_f32"),
    GemvF16 => (Gemv, "gemv_f16"),
    GemvBF16 => (Gemv, "gemv_bf16"),
    CrossEntropyFwdF32 => (CrossEntropy, "cross_entropy_fwd_f32"),
    CrossEntropyFwdF16 => (CrossEntropy, "cross_entropy_fwd_f16"),
    CrossEntropyFwdBF16 => (CrossEntropy, "cross_entropy_fwd_bf16"),
    CrossEntropyBwdF32 => (CrossEntropy, "cross_entropy_bwd_f32"),
    CrossEntropyBwdF16 => (CrossEntropy, "cross_entropy_bwd_f16"),
    CrossEntropyBwdBF16 => (CrossEntropy, "cross_entropy_bwd_bf16"),
    AdamWMultiF32 => (AdamW, "adamw_multi_f32"),
    AttentionSplitF32 => (Attention, "attention_split_f32"),
    AttentionSplitF16 => (Attention, "attention_split_f16"),
    AttentionSplitBF16 => (Attention, "attention_split_bf16"),
    AttentionCombineF32 => (Attention, "attention_combine_f32"),
    AttentionCombineF16 => (Attention, "attention_combine_f16"),
    AttentionCombineBF16 => (Attention, "attention_combine_bf16"),
    DecodeEmbedF32 => (Decode, "decode_embed_f32"),
    DecodeGemvF32 => (Decode, "decode_gemv_f32"),
    DecodeAttnSplitF32 => (Decode, "decode_attn_split_f32"),
    DecodeAttnCombineF32 => (Decode, "decode_attn_combine_f32"),
    DecodeEmbedF16 => (Decode, "decode_embed_f16"),
    DecodeGemvF16 => (Decode, "decode_gemv_f16"),
    DecodeAttnSplitF16 => (Decode, "decode_attn_split_f16"),
    DecodeAttnCombineF16 => (Decode, "decode_attn_combine_f16"),
    DecodeEmbedBF16 => (Decode, "decode_embed_bf16"),
    DecodeGemvBF16 => (Decode, "decode_gemv_bf16"),
    DecodeAttnSplitBF16 => (Decode, "decode_attn_split_bf16"),
    DecodeAttnCombineBF16 => (Decode, "decode_attn_combine_bf16"),
    DecodeArgmaxFinal => (Decode, "decode_argmax_final"),
    DecodeSpin => (Decode, "decode_spin"),
}

/// Everything flare needs on one CUDA device, created once.
pub struct CudaRuntime {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    functions: Vec<CudaFunction>,
    gemm: Gemm,
    /// Multiprocessor count, for sizing persistent grids.
    pub sm_count: u32,
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
/// queued work), e.g. before handing the GPU to another process.
pub fn empty_cache(device: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let stream = device.cuda_stream();
    stream
        .synchronize()
        .cuda_ctx("synchronizing before trimming the pool")?;
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

/// Shorthand: maps any `Debug` error into [`Error::Cuda`] with a context.
pub(crate) trait CudaResultExt<T> {
    /// Attaches `context` to a CUDA-layer error.
    fn cuda_ctx(self, context: &'static str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> CudaResultExt<T> for std::result::Result<T, E> {
    fn cuda_ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|e| Error::Cuda {
            context,
            msg: format!("{e:?}"),
        })
    }
}

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
        let mut functions = Vec::with_capacity(KERNELS.len());
        for (m, name) in KERNELS {
            let idx = Module::ALL.iter().position(|x| x == m).unwrap_or(0);
            let f = modules[idx].load_function(name).map_err(|e| Error::Cuda {
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
            sm_count,
        })
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
}
