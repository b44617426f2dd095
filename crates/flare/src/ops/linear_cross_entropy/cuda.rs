//! The CUDA forward of the fused linear + cross-entropy: per chunk of token rows, three or four
//! launches on the runtime's stream, all reusing one logits buffer of `chunk x vocab`:
//!
//! 1. `logits = h_c @ wᵀ` (cuBLASLt through [`crate::runtime::gemm::Gemm`], the compute dtype,
//!    f32 accumulation);
//! 2. `linear_cross_entropy_rows_*` (`crates/flare-kernels/src/cu/linear_cross_entropy.cu`):
//!    each row's NLL into `nll [n]` (f32) and, when a gradient is wanted, `softmax - onehot`
//!    written over the logits;
//! 3. `d(h_c) = dlogits @ w`, written straight into its rows of `d(hidden)`;
//! 4. `d(w) += dlogitsᵀ @ h_c` (the first chunk writes, later ones accumulate with `beta = 1`
//!    in the weight's dtype), only for a weight that takes part in autograd.
//!
//! The loss is the sum of `nll` (Candle's reduction, so deterministic). Nothing is copied to
//! the host: a target out of range shows as a NaN loss (see the kernel).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::ReduceOp;
use candle_core::{CudaStorage, DType, Layout};

use super::plan::{Dims, Plan, OP};
use crate::ops::contiguous_range;
use crate::ops::cuda::rows::{input, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use crate::runtime::gemm::GemmParams;

/// `LCE_THREADS` of linear_cross_entropy.cu: one block per row.
const THREADS: u32 = flare_kernels::launch::LCE_THREADS;
/// Grid cap: blocks loop over rows beyond it.
const MAX_GRID: usize = 1 << 20;

/// What the forward returns: the summed NLL (f32, one element), `d(hidden)` `[n, h]` and
/// `d(weight)` `[vocab, h]` for an upstream gradient of 1, each only where the plan asks.
pub(super) struct Forward {
    pub loss: CudaStorage,
    pub dh: Option<CudaStorage>,
    pub dw: Option<CudaStorage>,
}

/// The op's inputs with their layouts: contiguous `hidden [n, h]` and `weight [vocab, h]` of
/// one dtype, `targets [n]` (u32).
#[derive(Clone, Copy)]
pub(super) struct Io<'a> {
    pub sh: &'a CudaStorage,
    pub lh: &'a Layout,
    pub sw: &'a CudaStorage,
    pub lw: &'a Layout,
    pub st: &'a CudaStorage,
    pub lt: &'a Layout,
}

/// The fused forward.
pub(super) fn fwd(io: Io<'_>, d: Dims, plan: Plan) -> candle_core::Result<Forward> {
    if d.vocab > i32::MAX as usize {
        return Err(candle_core::Error::Msg(format!(
            "{OP}: a vocabulary of {} rows is more than the CUDA kernel indexes (2^31 - 1)",
            d.vocab
        )));
    }
    match io.sh.dtype() {
        DType::F32 => fwd_t::<f32>(Kernel::LinearCrossEntropyRowsF32, DType::F32, io, d, plan),
        DType::F16 => {
            fwd_t::<half::f16>(Kernel::LinearCrossEntropyRowsF16, DType::F16, io, d, plan)
        }
        DType::BF16 => {
            fwd_t::<half::bf16>(Kernel::LinearCrossEntropyRowsBF16, DType::BF16, io, d, plan)
        }
        dt => Err(unsupported(OP, dt)),
    }
}

/// The three GEMMs of a chunk of `rows` rows, as column-major cuBLASLt calls of row-major
/// products (see `ops::matmul::cuda`: `C = A · B` row-major is `Cᵀ = Bᵀ · Aᵀ`).
struct Gemms {
    /// `logits [rows, vocab] = h_c [rows, h] @ wᵀ`: A = w (stored `[vocab, h]`, used
    /// transposed), B = h_c.
    logits: GemmParams,
    /// `d(h_c) [rows, h] = dlogits [rows, vocab] @ w [vocab, h]`: A = w, B = dlogits.
    dh: GemmParams,
    /// `d(w) [vocab, h] (+)= dlogitsᵀ @ h_c`: A = h_c, B = dlogits (used transposed).
    dw: GemmParams,
}

impl Gemms {
    fn new(dtype: DType, rows: usize, d: Dims) -> Self {
        let p = |transa, transb, m, n, k, lda, ldb, ldc| GemmParams {
            dtype,
            c_dtype: None,
            transa,
            transb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        let (h, v) = (d.h, d.vocab);
        Gemms {
            logits: p(true, false, v, rows, h, h, h, v),
            dh: p(false, false, h, rows, v, h, v, h),
            dw: p(false, true, h, v, rows, h, v, h),
        }
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    dtype: DType,
    io: Io<'_>,
    d: Dims,
    plan: Plan,
) -> candle_core::Result<Forward> {
    let dev = &io.sh.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let hs = io.sh.as_cuda_slice::<T>()?;
    let ws = io.sw.as_cuda_slice::<T>()?;
    let (h_off, h_end) = contiguous_range(OP, io.lh)?;
    let (w_off, w_end) = contiguous_range(OP, io.lw)?;
    if h_end - h_off != d.n * d.h || w_end - w_off != d.vocab * d.h {
        return Err(candle_core::Error::Msg(format!(
            "{OP}: internal error: layouts {:?} and {:?} for {d:?}",
            io.lh.dims(),
            io.lw.dims()
        )));
    }
    let ts = input::<u32>(OP, io.st, io.lt)?;
    if ts.len() != d.n {
        return Err(candle_core::Error::Msg(format!(
            "{OP}: {} targets for {} rows",
            ts.len(),
            d.n
        )));
    }
    // Zeroed: with n = 0 the one element is the sum.
    let mut nll = dev.alloc_zeros::<f32>(d.n.max(1))?;
    // SAFETY (both): every row of d(hidden) is written by the d(h_c) GEMM of its chunk (beta =
    // 0), and d(weight) by the first chunk's GEMM (beta = 0), before anything reads them.
    let mut dh: Option<CudaSlice<T>> = if plan.need_dh && d.n > 0 {
        Some(unsafe { dev.alloc::<T>(d.n * d.h) }?)
    } else {
        None
    };
    let mut dw: Option<CudaSlice<T>> = if plan.need_dw && d.n > 0 {
        Some(unsafe { dev.alloc::<T>(d.vocab * d.h) }?)
    } else {
        None
    };
    let grad = dh.is_some() || dw.is_some();
    let chunk = plan.chunk.clamp(1, d.n.max(1));
    // SAFETY: each chunk's logits GEMM writes its `rows x vocab` elements (beta = 0) before the
    // row kernel and the gradient GEMMs read exactly those.
    let mut logits = unsafe { dev.alloc::<T>(chunk * d.vocab) }?;
    let size = std::mem::size_of::<T>() as u64;
    for (i, (start, rows)) in d.chunks(chunk).enumerate() {
        let g = Gemms::new(dtype, rows, d);
        let h_c = (h_off + start * d.h) as u64 * size;
        {
            let (hp, _hg) = hs.device_ptr(stream);
            let (wp, _wg) = ws.device_ptr(stream);
            let (lp, _lg) = logits.device_ptr_mut(stream);
            // SAFETY: w is `[vocab, h]` row-major from `w_off` and h_c is `rows x h` row-major
            // from row `start` of hidden (both inside their storages: the layout ranges were
            // checked above); `logits` holds at least `rows * vocab` elements (ldc = vocab) and
            // is a separate allocation. All on this device and its one stream; the guards keep
            // them borrowed until the launch is queued.
            unsafe {
                rt.gemm()
                    .matmul(&g.logits, wp + w_off as u64 * size, hp + h_c, lp, 1.0, 0.0)
            }
            .map_err(crate::Error::into_candle)?;
        }
        {
            let tv = ts.slice(start..start + rows);
            let mut nv = nll.slice_mut(start..start + rows);
            let (rows_a, vocab_a, grad_a) = (rows as i64, d.vocab as i32, grad as i32);
            let mut b = stream.launch_builder(rt.function(kernel));
            b.arg(&mut logits)
                .arg(&tv)
                .arg(&mut nv)
                .arg(&rows_a)
                .arg(&vocab_a)
                .arg(&plan.ignore)
                .arg(&grad_a);
            let cfg = LaunchConfig {
                grid_dim: (rows.clamp(1, MAX_GRID) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: linear_cross_entropy_rows_<t>(T *x, const u32 *targets, float *nll,
            // long long rows, int vocab, u32 ignore, int grad), T the dtype of `logits` (chosen
            // by dtype): x holds at least rows * vocab elements, the targets and nll views
            // exactly `rows`; the block is LCE_THREADS (the kernel's launch bound, a multiple of
            // 32 as its reductions need), static shared memory only; any grid is correct (grid
            // stride).
            unsafe { b.launch(cfg) }
                .cuda_ctx("launching linear_cross_entropy_rows")
                .map_err(crate::Error::into_candle)?;
        }
        if let Some(dh) = dh.as_mut() {
            let (wp, _wg) = ws.device_ptr(stream);
            let (lp, _lg) = logits.device_ptr(stream);
            let (dp, _dg) = dh.device_ptr_mut(stream);
            let dst = (start * d.h) as u64 * size;
            // SAFETY: dlogits is `rows x vocab` row-major in `logits`, w `[vocab, h]` inside
            // its storage; the output is rows start..start + rows of d(hidden) (`n x h`
            // elements, its own allocation, ldc = h).
            unsafe {
                rt.gemm()
                    .matmul(&g.dh, wp + w_off as u64 * size, lp, dp + dst, 1.0, 0.0)
            }
            .map_err(crate::Error::into_candle)?;
        }
        if let Some(dw) = dw.as_mut() {
            let (hp, _hg) = hs.device_ptr(stream);
            let (lp, _lg) = logits.device_ptr(stream);
            let (dp, _dg) = dw.device_ptr_mut(stream);
            let beta = if i == 0 { 0.0 } else { 1.0 };
            // SAFETY: h_c is `rows x h` inside hidden's storage, dlogits `rows x vocab` in
            // `logits`; d(weight) is its own `vocab x h` allocation (ldc = h), written by the
            // first chunk (beta = 0) and accumulated by the later ones.
            unsafe { rt.gemm().matmul(&g.dw, hp + h_c, lp, dp, 1.0, beta) }
                .map_err(crate::Error::into_candle)?;
        }
    }
    let nll = CudaStorage::wrap_cuda_slice(nll, dev.clone());
    let loss = nll.reduce_op(ReduceOp::Sum, &Layout::contiguous(d.n.max(1)), &[0])?;
    let wrap = |s: CudaSlice<T>| CudaStorage::wrap_cuda_slice(s, dev.clone());
    Ok(Forward {
        loss,
        dh: dh.map(wrap),
        dw: dw.map(wrap),
    })
}

/// `g · s` for the backward (`g` the gradient computed for an upstream gradient of 1, `s` the
/// real upstream gradient, an f32 scalar on the same device), in f32 and rounded once to `g`'s
/// dtype, by one `linear_cross_entropy_scale_*` launch: Candle's composition (a cast to f32, a
/// broadcast multiply, a cast back) took three passes over `d(hidden)`, about 0.55 ms per
/// Llama-3.1-8B step at 4096 tokens. `None` when `s` is not an f32 CUDA scalar (the caller
/// composes).
pub(super) fn scale(
    g: &candle_core::Tensor,
    s: &candle_core::Tensor,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    let cuda = g.device().is_cuda() && s.device().same_device(g.device());
    if !cuda
        || s.dtype() != DType::F32
        || s.elem_count() != 1
        || !matches!(g.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return Ok(None);
    }
    Ok(Some(
        g.contiguous()?.apply_op2_no_bwd(&s.contiguous()?, &Scale)?,
    ))
}

/// The op behind [`scale`] (CUDA only; its checks are made before it is applied).
struct Scale;

impl candle_core::CustomOp2 for Scale {
    fn name(&self) -> &'static str {
        "linear_cross_entropy backward scale"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("{OP}: internal error: the backward scale applied to CPU tensors")
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let out = match g.dtype() {
            DType::F32 => scale_t::<f32>(Kernel::LinearCrossEntropyScaleF32, g, lg, s, ls)?,
            DType::F16 => scale_t::<half::f16>(Kernel::LinearCrossEntropyScaleF16, g, lg, s, ls)?,
            DType::BF16 => {
                scale_t::<half::bf16>(Kernel::LinearCrossEntropyScaleBF16, g, lg, s, ls)?
            }
            dt => return Err(unsupported(OP, dt)),
        };
        Ok((out, lg.shape().clone()))
    }
}

fn scale_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &CudaStorage,
    lg: &Layout,
    s: &CudaStorage,
    ls: &Layout,
) -> candle_core::Result<CudaStorage> {
    let gs = input::<T>(OP, g, lg)?;
    let ss = input::<f32>(OP, s, ls)?;
    let n = lg.shape().elem_count();
    let dev = &g.device;
    // SAFETY: the kernel writes every one of the n elements (nothing when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let blocks = n
        .div_ceil(THREADS as usize * 8)
        .clamp(1, 8 * rt.sm_count.max(1) as usize) as u32;
    let n64 = n as i64;
    let mut b = rt.stream().launch_builder(rt.function(kernel));
    b.arg(&gs).arg(&ss).arg(&mut out).arg(&n64);
    // SAFETY: linear_cross_entropy_scale_<t>(const T *g, const float *s, T *out, long long n):
    // g holds n contiguous elements and s one f32 (`input` checked both layouts), out is a fresh
    // allocation of n; the kernel takes 16-byte packs only where both pointers are aligned and
    // bound-checks every element.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .cuda_ctx("launching linear_cross_entropy_scale")
    .map_err(crate::Error::into_candle)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
