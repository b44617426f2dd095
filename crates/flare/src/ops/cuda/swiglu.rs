//! Host launchers of `swiglu_fwd_*` and `swiglu_bwd_*` (`crates/flare-kernels/src/cu/swiglu.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::elementwise::items_config;
use super::rows::{check_same_len, input, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP_FWD: &str = "swiglu (cuda)";
const OP_BWD: &str = "swiglu backward (cuda)";

/// `silu(g) * u` for contiguous `g`, `u` of one length.
pub(crate) fn fwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> candle_core::Result<CudaStorage> {
    check_same_len(OP_FWD, "up", lg, lu)?;
    match g.dtype() {
        DType::F32 => fwd_t::<f32>(Kernel::SwiGluFwdF32, g, lg, u, lu),
        DType::F16 => fwd_t::<f16>(Kernel::SwiGluFwdF16, g, lg, u, lu),
        DType::BF16 => fwd_t::<bf16>(Kernel::SwiGluFwdBF16, g, lg, u, lu),
        dt => Err(unsupported(OP_FWD, dt)),
    }
}

/// `[dg; du]` (2n elements) from contiguous `g`, `u`, `dy` of one length n.
pub(crate) fn bwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> candle_core::Result<CudaStorage> {
    check_same_len(OP_BWD, "up", lg, lu)?;
    check_same_len(OP_BWD, "the output gradient", lg, ldy)?;
    match g.dtype() {
        DType::F32 => bwd_t::<f32>(Kernel::SwiGluBwdF32, g, lg, u, lu, dy, ldy),
        DType::F16 => bwd_t::<f16>(Kernel::SwiGluBwdF16, g, lg, u, lu, dy, ldy),
        DType::BF16 => bwd_t::<bf16>(Kernel::SwiGluBwdBF16, g, lg, u, lu, dy, ldy),
        dt => Err(unsupported(OP_BWD, dt)),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &g.device;
    let n = lg.shape().elem_count();
    let gs = input::<T>(OP_FWD, g, lg)?;
    let us = input::<T>(OP_FWD, u, lu)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let n_a = n as i64;
        let mut lb = rt.stream().launch_builder(rt.function(kernel));
        lb.arg(&gs).arg(&us).arg(&mut out).arg(&n_a);
        // SAFETY: swiglu_fwd_<t>(const T *g, const T *u, T *y, long long n): g and u hold n
        // elements from their start offsets (checked equal above), y holds n; grid-stride loop
        // with a bound check on n.
        unsafe { lb.launch(items_config(n)) }
            .cuda_ctx("launching swiglu_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = &g.device;
    let n = lg.shape().elem_count();
    let gs = input::<T>(OP_BWD, g, lg)?;
    let us = input::<T>(OP_BWD, u, lu)?;
    let dys = input::<T>(OP_BWD, dy, ldy)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>((2 * n).max(1)) }?;
    if n > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let n_a = n as i64;
        let mut lb = rt.stream().launch_builder(rt.function(kernel));
        lb.arg(&gs).arg(&us).arg(&dys).arg(&mut out).arg(&n_a);
        // SAFETY: swiglu_bwd_<t>(const T *g, const T *u, const T *dy, T *out, long long n):
        // g, u, dy hold n elements each (checked equal above), out holds 2n (dg then du);
        // grid-stride loop with a bound check on n.
        unsafe { lb.launch(items_config(n)) }
            .cuda_ctx("launching swiglu_bwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
