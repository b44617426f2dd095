//! Host launchers of the softmax kernels (`crates/flare-kernels/src/cu/softmax.cu`).
//!
//! One launch per op: rows stay in registers up to 32768 columns (f32 forward), 65536 (f16 / bf16
//! forward, 64 elements per thread kept packed) or 16384 (backward), one row per 1..1024-thread
//! group; longer rows, and rows whose length or alignment rules out 16-byte accesses, are
//! streamed (two reads, the second mostly from cache).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use crate::ops::cuda::rows::{check_same_len, input, rows_cols, unsupported, RowKernel, RowPlan};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use flare_kernels::launch;

const OP_FWD: &str = "softmax_last_dim (cuda)";
const OP_BWD: &str = "softmax_last_dim backward (cuda)";
const OP_MASKED: &str = "softmax_masked (cuda)";

/// `SOFTMAX_FWD_ELEMS_F32` / `SOFTMAX_FWD_THREADS` of softmax.cu.
const FWD_F32: RowKernel =
    RowKernel::new(launch::SOFTMAX_FWD_ELEMS_F32, launch::SOFTMAX_FWD_THREADS);
/// `SOFTMAX_FWD_ELEMS_16` / `SOFTMAX_FWD_THREADS` of softmax.cu (f16 and bf16: the same 128
/// bytes of input per thread as f32).
const FWD_16: RowKernel = RowKernel::new(launch::SOFTMAX_FWD_ELEMS_16, launch::SOFTMAX_FWD_THREADS);
/// `SOFTMAX_BWD_ELEMS` / `SOFTMAX_BWD_THREADS` of softmax.cu.
const BWD: RowKernel = RowKernel::new(launch::SOFTMAX_BWD_ELEMS, launch::SOFTMAX_BWD_THREADS);

/// Softmax over the last dimension of a contiguous `x`; the output has `x`'s shape.
pub(crate) fn fwd(x: &CudaStorage, lx: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let out = match x.dtype() {
        DType::F32 => fwd_t::<f32>(Kernel::SoftmaxFwdF32, FWD_F32, x, lx),
        DType::F16 => fwd_t::<f16>(Kernel::SoftmaxFwdF16, FWD_16, x, lx),
        DType::BF16 => fwd_t::<bf16>(Kernel::SoftmaxFwdBF16, FWD_16, x, lx),
        dt => Err(unsupported(OP_FWD, dt)),
    }?;
    Ok((out, lx.shape().clone()))
}

/// The softmax backward `dx = y * (dy - sum_row(dy * y))` from the forward's output `y` and the
/// output gradient `dy` (both contiguous, same shape); the output has `y`'s shape.
pub(crate) fn bwd(
    y: &CudaStorage,
    ly: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    check_same_len(OP_BWD, "the output gradient", ly, ldy)?;
    let out = match y.dtype() {
        DType::F32 => bwd_t::<f32>(Kernel::SoftmaxBwdF32, y, ly, dy, ldy),
        DType::F16 => bwd_t::<f16>(Kernel::SoftmaxBwdF16, y, ly, dy, ldy),
        DType::BF16 => bwd_t::<bf16>(Kernel::SoftmaxBwdBF16, y, ly, dy, ldy),
        dt => Err(unsupported(OP_BWD, dt)),
    }?;
    Ok((out, ly.shape().clone()))
}

/// The masked softmax of a contiguous `x` `[b, heads.., s, t]` with the contiguous u8 mask `keep`
/// `[mb, s, t]` (shapes checked into `mi` by the caller); the output has `x`'s shape.
pub(crate) fn fwd_masked(
    x: &CudaStorage,
    lx: &Layout,
    keep: &CudaStorage,
    lk: &Layout,
    mi: super::plan::MaskIndex,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if keep.dtype() != DType::U8 {
        return Err(candle_core::Error::Msg(format!(
            "{OP_MASKED}: the mask must be u8, got {:?}",
            keep.dtype()
        )));
    }
    let out = match x.dtype() {
        DType::F32 => {
            fwd_masked_t::<f32>(Kernel::SoftmaxMaskedFwdF32, FWD_F32, x, lx, keep, lk, mi)
        }
        DType::F16 => fwd_masked_t::<f16>(Kernel::SoftmaxMaskedFwdF16, FWD_16, x, lx, keep, lk, mi),
        DType::BF16 => {
            fwd_masked_t::<bf16>(Kernel::SoftmaxMaskedFwdBF16, FWD_16, x, lx, keep, lk, mi)
        }
        dt => Err(unsupported(OP_MASKED, dt)),
    }?;
    Ok((out, lx.shape().clone()))
}

fn fwd_masked_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    k: RowKernel,
    x: &CudaStorage,
    lx: &Layout,
    keep: &CudaStorage,
    lk: &Layout,
    mi: super::plan::MaskIndex,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP_MASKED, lx)?;
    let n = rows * cols;
    let src = input::<T>(OP_MASKED, x, lx)?;
    let mask = input::<u8>(OP_MASKED, keep, lk)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let plan = RowPlan::new(k, rows, cols, None);
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let (heads_s, s) = (mi.heads_s as i64, mi.s as i32);
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&src)
            .arg(&mask)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&group)
            .arg(&heads_s)
            .arg(&s);
        // SAFETY: softmax_masked_fwd_<t>(const T *x, const uint8_t *keep, T *y, long long rows,
        // int cols, int group, long long heads_s, int s): x has rows * cols elements from its
        // start offset and y has rows * cols; keep has mb * s * cols bytes with rows = mb *
        // heads_s and heads_s a multiple of s (MaskIndex::new checked the shapes), so every
        // mask row (r / heads_s) * s + r % s is below mb * s. The plan's group and block sizes
        // are the ones the kernel expects, as for softmax_fwd (the same limits), with no
        // dynamic shared memory.
        unsafe { b.launch(plan.config(0)) }
            .cuda_ctx("launching softmax_masked_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    k: RowKernel,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP_FWD, lx)?;
    let n = rows * cols;
    let src = input::<T>(OP_FWD, x, lx)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let plan = RowPlan::new(k, rows, cols, None);
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&src)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&group);
        // SAFETY: softmax_fwd_<t>(const T *x, T *y, long long rows, int cols, int group): x has
        // rows * cols elements from its start offset, y has rows * cols; the plan's group and
        // block sizes are the ones the kernel expects (group <= 32 with a 128-thread block, or
        // block == group <= SOFTMAX_FWD_THREADS), and it uses no dynamic shared memory.
        unsafe { b.launch(plan.config(0)) }
            .cuda_ctx("launching softmax_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    y: &CudaStorage,
    ly: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &y.device;
    let (rows, cols) = rows_cols(OP_BWD, ly)?;
    let n = rows * cols;
    let ys = input::<T>(OP_BWD, y, ly)?;
    let dys = input::<T>(OP_BWD, dy, ldy)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let plan = RowPlan::new(BWD, rows, cols, None);
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&ys)
            .arg(&dys)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&group);
        // SAFETY: softmax_bwd_<t>(const T *y, const T *dy, T *dx, long long rows, int cols,
        // int group): y and dy have rows * cols elements from their start offsets (checked
        // equal above), dx has rows * cols; group and block sizes as the kernel expects
        // (block <= SOFTMAX_BWD_THREADS), no dynamic shared memory.
        unsafe { b.launch(plan.config(0)) }
            .cuda_ctx("launching softmax_bwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
