//! Host launchers of the fused cross-entropy kernels
//! (`crates/flare-kernels/src/cu/cross_entropy.cu`): one block of `CE_THREADS` threads per row,
//! blocks looping over rows with a grid stride.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use crate::ops::cuda::rows::{input, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP_FWD: &str = "cross_entropy (cuda)";
const OP_BWD: &str = "cross_entropy backward (cuda)";
/// `CE_THREADS` of cross_entropy.cu.
const THREADS: u32 = flare_kernels::launch::CE_THREADS;
/// Grid cap: blocks loop over rows beyond it.
const MAX_GRID: usize = 1 << 20;

fn dims(op: &'static str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        [n, v] if *v <= i32::MAX as usize => Ok((*n, *v)),
        d => Err(candle_core::Error::Msg(format!(
            "{op}: logits must be [n, vocab] with vocab < 2^31, got {d:?}"
        ))),
    }
}

fn config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_GRID) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per-row NLL `[n]` (f32) of contiguous `logits [n, vocab]` and `targets [n]` (u32).
pub(crate) fn fwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    ignore: u32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, vocab) = dims(OP_FWD, lx)?;
    let out = match x.dtype() {
        DType::F32 => fwd_t::<f32>(
            Kernel::CrossEntropyFwdF32,
            x,
            lx,
            t,
            lt,
            rows,
            vocab,
            ignore,
        ),
        DType::F16 => fwd_t::<f16>(
            Kernel::CrossEntropyFwdF16,
            x,
            lx,
            t,
            lt,
            rows,
            vocab,
            ignore,
        ),
        DType::BF16 => fwd_t::<bf16>(
            Kernel::CrossEntropyFwdBF16,
            x,
            lx,
            t,
            lt,
            rows,
            vocab,
            ignore,
        ),
        dt => Err(unsupported(OP_FWD, dt)),
    }?;
    Ok((out, Shape::from(rows)))
}

#[allow(clippy::too_many_arguments)]
fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    rows: usize,
    vocab: usize,
    ignore: u32,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let xs = input::<T>(OP_FWD, x, lx)?;
    let ts = input::<u32>(OP_FWD, t, lt)?;
    if ts.len() != rows {
        return Err(candle_core::Error::Msg(format!(
            "{OP_FWD}: {} targets for {rows} rows",
            ts.len()
        )));
    }
    // SAFETY: the kernel writes every one of the `rows` elements.
    let mut out = unsafe { dev.alloc::<f32>(rows) }?;
    if rows > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (rows_a, vocab_a) = (rows as i64, vocab as i32);
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&xs)
            .arg(&ts)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&vocab_a)
            .arg(&ignore);
        // SAFETY: cross_entropy_fwd_<t>(const T *x, const u32 *targets, float *nll, long long
        // rows, int vocab, u32 ignore): x has rows * vocab elements, targets and nll have rows;
        // the block size is CE_THREADS (a multiple of 32, as the reductions need), static
        // shared memory only.
        unsafe { b.launch(config(rows)) }
            .cuda_ctx("launching cross_entropy_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `dlogits [n, vocab]` (logits' dtype) from contiguous logits, targets and `dnll [n]` (f32).
pub(crate) fn bwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    ignore: u32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, vocab) = dims(OP_BWD, lx)?;
    let args = (t, lt, g, lg, rows, vocab, ignore);
    let out = match x.dtype() {
        DType::F32 => bwd_t::<f32>(Kernel::CrossEntropyBwdF32, x, lx, args),
        DType::F16 => bwd_t::<f16>(Kernel::CrossEntropyBwdF16, x, lx, args),
        DType::BF16 => bwd_t::<bf16>(Kernel::CrossEntropyBwdBF16, x, lx, args),
        dt => Err(unsupported(OP_BWD, dt)),
    }?;
    Ok((out, lx.shape().clone()))
}

type BwdArgs<'a> = (
    &'a CudaStorage,
    &'a Layout,
    &'a CudaStorage,
    &'a Layout,
    usize,
    usize,
    u32,
);

fn bwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    lx: &Layout,
    (t, lt, g, lg, rows, vocab, ignore): BwdArgs<'_>,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let xs = input::<T>(OP_BWD, x, lx)?;
    let ts = input::<u32>(OP_BWD, t, lt)?;
    let gs = input::<f32>(OP_BWD, g, lg)?;
    if ts.len() != rows || gs.len() != rows {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD}: {} targets and {} gradients for {rows} rows",
            ts.len(),
            gs.len()
        )));
    }
    let n = rows * vocab;
    // SAFETY: the kernel writes every element of every row (zeros for ignored rows).
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (rows_a, vocab_a) = (rows as i64, vocab as i32);
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&xs)
            .arg(&ts)
            .arg(&gs)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&vocab_a)
            .arg(&ignore);
        // SAFETY: cross_entropy_bwd_<t>(const T *x, const u32 *targets, const float *dnll,
        // T *dx, long long rows, int vocab, u32 ignore): x and dx have rows * vocab elements,
        // targets and dnll have rows (checked above); block size CE_THREADS, static shared
        // memory only.
        unsafe { b.launch(config(rows)) }
            .cuda_ctx("launching cross_entropy_bwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
