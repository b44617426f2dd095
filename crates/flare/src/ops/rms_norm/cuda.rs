//! Host launchers of the RMSNorm kernels (`crates/flare-kernels/src/cu/rms_norm.cu`).
//!
//! Forward and fused residual-add forward: one launch, rows in registers up to 32768 columns
//! (forward) or 16384 (fused add), streamed beyond. Backward: one launch for dx (rows in
//! registers up to 16384 columns) that also leaves per-slot dw partial sums in an f32 scratch
//! buffer, then `rms_norm_dw_*` reduces them in a fixed order into the packed last row. Without
//! dw (a frozen weight), rows of whole 16-byte packs (up to 2048 of them) take
//! `rms_norm_bwd_rows_*` instead: a block per row, two packs per thread, `w` in shared memory.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Shape};
use half::{bf16, f16};

use crate::ops::cuda::rows::{
    check_same_len, check_weight, input, rows_cols, unsupported, RowKernel, RowPlan,
    DEFAULT_SMEM_LIMIT,
};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use flare_kernels::launch;

const OP_FWD: &str = "rms_norm (cuda)";
const OP_ADD: &str = "add_rms_norm (cuda)";
const OP_BWD: &str = "rms_norm backward (cuda)";

/// `RMS_FWD_ELEMS` / `RMS_FWD_THREADS` of rms_norm.cu.
const FWD: RowKernel = RowKernel::new(launch::RMS_FWD_ELEMS, launch::RMS_FWD_THREADS);
/// `ADD_RMS_ELEMS` / `ADD_RMS_THREADS` of rms_norm.cu.
const ADD: RowKernel = RowKernel::new(launch::ADD_RMS_ELEMS, launch::ADD_RMS_THREADS);
/// `RMS_BWD_ELEMS` / `RMS_BWD_THREADS` of rms_norm.cu.
const BWD: RowKernel = RowKernel::new(launch::RMS_BWD_ELEMS, launch::RMS_BWD_THREADS);
/// `RMS_DW_THREADS` of rms_norm.cu; each block reduces 32 columns.
const DW_THREADS: u32 = launch::RMS_DW_THREADS;

/// `y = x * rsqrt(mean(x^2) + eps) * w` over the last dimension; the output has `x`'s shape.
pub(crate) fn fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let out = match x.dtype() {
        DType::F32 => fwd_t::<f32>(Kernel::RmsNormFwdF32, x, lx, w, lw, eps),
        DType::F16 => fwd_t::<f16>(Kernel::RmsNormFwdF16, x, lx, w, lw, eps),
        DType::BF16 => fwd_t::<bf16>(Kernel::RmsNormFwdBF16, x, lx, w, lw, eps),
        dt => Err(unsupported(OP_FWD, dt)),
    }?;
    Ok((out, lx.shape().clone()))
}

/// The fused residual add and norm: `h = x + r` (rounded to the dtype), `y = rms_norm(h) * w`,
/// packed as one output of shape `[2, ...x.shape]` (`y` first, then `h`).
pub(crate) fn add_fwd(
    x: &CudaStorage,
    lx: &Layout,
    r: &CudaStorage,
    lr: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    check_same_len(OP_ADD, "the residual", lx, lr)?;
    match x.dtype() {
        DType::F32 => add_fwd_t::<f32>(Kernel::AddRmsNormFwdF32, x, lx, r, lr, w, lw, eps),
        DType::F16 => add_fwd_t::<f16>(Kernel::AddRmsNormFwdF16, x, lx, r, lr, w, lw, eps),
        DType::BF16 => add_fwd_t::<bf16>(Kernel::AddRmsNormFwdBF16, x, lx, r, lr, w, lw, eps),
        dt => Err(unsupported(OP_ADD, dt)),
    }
}

/// The backward from the inputs `x`, `w` and the output gradient `dy`, packed as one output of
/// shape `[rows + 1, cols]`: `dx` in the first `rows` rows, `dw` in the last (zeros unless
/// `need_dw`). `rinv` is recomputed from `x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
    need_dw: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    check_same_len(OP_BWD, "the output gradient", lx, ldy)?;
    let (rows, cols) = rows_cols(OP_BWD, lx)?;
    let k = match x.dtype() {
        DType::F32 => [
            Kernel::RmsNormBwdF32,
            Kernel::RmsNormDwF32,
            Kernel::RmsNormBwdRowsF32,
        ],
        DType::F16 => [
            Kernel::RmsNormBwdF16,
            Kernel::RmsNormDwF16,
            Kernel::RmsNormBwdRowsF16,
        ],
        DType::BF16 => [
            Kernel::RmsNormBwdBF16,
            Kernel::RmsNormDwBF16,
            Kernel::RmsNormBwdRowsBF16,
        ],
        dt => return Err(unsupported(OP_BWD, dt)),
    };
    let a = BwdArgs {
        x,
        lx,
        w,
        lw,
        dy,
        ldy,
        eps,
        need_dw,
        rows,
        cols,
    };
    let out = match x.dtype() {
        DType::F32 => bwd_t::<f32>(k, &a),
        DType::F16 => bwd_t::<f16>(k, &a),
        _ => bwd_t::<bf16>(k, &a),
    }?;
    Ok((out, Shape::from((rows + 1, cols))))
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP_FWD, lx)?;
    let n = rows * cols;
    let xs = input::<T>(OP_FWD, x, lx)?;
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        check_weight(OP_FWD, lw, cols)?;
        let ws = input::<T>(OP_FWD, w, lw)?;
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let plan = RowPlan::new(FWD, rows, cols, None);
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&xs)
            .arg(&ws)
            .arg(&mut out)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&group)
            .arg(&eps);
        // SAFETY: rms_norm_fwd_<t>(const T *x, const T *w, T *y, long long rows, int cols,
        // int group, float eps): x and y have rows * cols elements, w has cols (checked); group
        // and block sizes as the kernel expects (block <= RMS_FWD_THREADS), no dynamic shared
        // memory.
        unsafe { b.launch(plan.config(0)) }
            .cuda_ctx("launching rms_norm_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

#[allow(clippy::too_many_arguments)]
fn add_fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    lx: &Layout,
    r: &CudaStorage,
    lr: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(OP_ADD, lx)?;
    let n = rows * cols;
    let xs = input::<T>(OP_ADD, x, lx)?;
    let rs = input::<T>(OP_ADD, r, lr)?;
    // SAFETY: every element of both outputs is written by the kernel below.
    let mut y = unsafe { dev.alloc::<T>(n) }?;
    // SAFETY: as above.
    let mut h = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        check_weight(OP_ADD, lw, cols)?;
        let ws = input::<T>(OP_ADD, w, lw)?;
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let plan = RowPlan::new(ADD, rows, cols, None);
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&xs)
            .arg(&rs)
            .arg(&ws)
            .arg(&mut y)
            .arg(&mut h)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&group)
            .arg(&eps);
        // SAFETY: add_rms_norm_fwd_<t>(const T *x, const T *r, const T *w, T *y, T *h,
        // long long rows, int cols, int group, float eps): x and r have rows * cols elements
        // (checked equal), w has cols, y and h have rows * cols each; group and block sizes as
        // the kernel expects (block <= ADD_RMS_THREADS), no dynamic shared memory.
        unsafe { b.launch(plan.config(0)) }
            .cuda_ctx("launching add_rms_norm_fwd")
            .map_err(crate::Error::into_candle)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        CudaStorage::wrap_cuda_slice(h, dev.clone()),
    ))
}

/// The backward's inputs, for passing around at once.
struct BwdArgs<'a> {
    x: &'a CudaStorage,
    lx: &'a Layout,
    w: &'a CudaStorage,
    lw: &'a Layout,
    dy: &'a CudaStorage,
    ldy: &'a Layout,
    eps: f32,
    need_dw: bool,
    rows: usize,
    cols: usize,
}

/// The launch of `rms_norm_bwd_rows_*` for `rows x cols` of `T` (rows > 0), or `None` where it
/// does not apply: cols not a whole number of 16-byte packs, a pointer not 16-byte aligned, or
/// a row of more packs than `RMS_BWD_ROW_MAX_THREADS` threads hold. A block of the fewest
/// threads (a multiple of 32) that holds a row at `RMS_BWD_ROW_PACKS` packs each, one block per
/// row, `w`'s packs in dynamic shared memory.
fn rows_config<T>(ptrs: [u64; 4], rows: usize, cols: usize) -> Option<LaunchConfig> {
    let v = 16 / std::mem::size_of::<T>();
    let packs = launch::RMS_BWD_ROW_PACKS as usize;
    let max_threads = launch::RMS_BWD_ROW_MAX_THREADS as usize;
    if cols % v != 0 || ptrs.iter().any(|p| p % 16 != 0) {
        return None;
    }
    let nvr = cols / v;
    let threads = nvr.div_ceil(packs).div_ceil(32) * 32;
    if threads > max_threads {
        return None;
    }
    let smem = nvr * 16;
    (smem <= DEFAULT_SMEM_LIMIT).then_some(LaunchConfig {
        grid_dim: (rows.min(i32::MAX as usize) as u32, 1, 1),
        block_dim: (threads.max(32) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

fn bwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    [k_bwd, k_dw, k_rows]: [Kernel; 3],
    a: &BwdArgs<'_>,
) -> candle_core::Result<CudaStorage> {
    let dev = &a.x.device;
    let (rows, cols) = (a.rows, a.cols);
    let n = rows * cols;
    let xs = input::<T>(OP_BWD, a.x, a.lx)?;
    let dys = input::<T>(OP_BWD, a.dy, a.ldy)?;
    // SAFETY: every element is written below: dx ([0, n)) by the backward kernel, dw
    // ([n, n + cols)) by the dw kernel, or zeroed (by the rows kernel, else by a memset) when it
    // is not needed or there are no rows (nothing to write when cols == 0).
    let mut out = unsafe { dev.alloc::<T>(n + cols) }?;
    if cols == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    check_weight(OP_BWD, a.lw, cols)?;
    let ws = input::<T>(OP_BWD, a.w, a.lw)?;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let reduce_dw = a.need_dw && rows > 0;
    // Without dw, aligned rows take the block-per-row kernel (see `rows_config`).
    let rows_cfg = if rows > 0 && !reduce_dw {
        let (xp, _gx) = xs.device_ptr(stream);
        let (wp, _gw) = ws.device_ptr(stream);
        let (dyp, _gdy) = dys.device_ptr(stream);
        let (op, _go) = out.device_ptr(stream);
        rows_config::<T>([xp, wp, dyp, op], rows, cols)
    } else {
        None
    };
    if let Some(cfg) = rows_cfg {
        let (rows_a, cols_a) = (rows as i64, cols as i32);
        // dx is the first n elements of `out`, dw (zeroed by the kernel) the last cols.
        let (dxp, _gout) = out.device_ptr_mut(stream);
        let dwp = dxp + (n * std::mem::size_of::<T>()) as u64;
        let mut b = stream.launch_builder(rt.function(k_rows));
        b.arg(&xs)
            .arg(&ws)
            .arg(&dys)
            .arg(&dxp)
            .arg(&dwp)
            .arg(&rows_a)
            .arg(&cols_a)
            .arg(&a.eps);
        // SAFETY: rms_norm_bwd_rows_<t>(const T *x, const T *w, const T *dy, T *dx, T *dw,
        // long long rows, int cols, float eps): x and dy have rows * cols elements (checked
        // equal), w has cols, dx is the first rows * cols of `out` and dw its last cols (the
        // guard keeps `out` borrowed until the launch is queued); `rows_config` checked that
        // cols is a whole number of 16-byte packs, that every pointer is 16-byte aligned, that
        // the block (a multiple of 32 threads, at most RMS_BWD_ROW_MAX_THREADS) holds a row at
        // RMS_BWD_ROW_PACKS packs per thread, and that w's packs fit the dynamic shared memory
        // it passes (at most the default 48 KiB).
        unsafe { b.launch(cfg) }
            .cuda_ctx("launching rms_norm_bwd_rows")
            .map_err(crate::Error::into_candle)?;
    } else if rows > 0 {
        // Persistent grid: each block (or warp, with sub-warp groups) accumulates dw over many
        // rows, so the partial sums stay few. About as many blocks as fit at once.
        let block = RowPlan::new(BWD, rows, cols, None).block;
        let cap = rt.sm_count.max(1) as usize * (512 / block).max(1);
        let plan = RowPlan::new(BWD, rows, cols, Some(cap));
        let slots = if reduce_dw { plan.dw_slots() } else { 0 };
        // The register and fitting streaming paths keep their dw sums in dynamic shared memory
        // (block * ELEMS floats); the long-row path accumulates straight into its partial row.
        let smem = if reduce_dw && plan.fits {
            plan.block * BWD.elems * std::mem::size_of::<f32>()
        } else {
            0
        };
        if smem > DEFAULT_SMEM_LIMIT {
            rt.function(k_bwd)
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .cuda_ctx("raising the shared memory limit of rms_norm_bwd")
                .map_err(crate::Error::into_candle)?;
        }
        // SAFETY: every element of the scratch is written by the backward kernel before the dw
        // kernel reads it: each of the `slots` rows by its warp or block (all of them run, and a
        // block of the long-row path handles at least one row since grid <= rows).
        let partial: Option<CudaSlice<f32>> = if reduce_dw {
            Some(unsafe { dev.alloc::<f32>(slots * cols) }?)
        } else {
            None
        };
        let null: u64 = 0;
        let (rows_a, cols_a, group) = (rows as i64, cols as i32, plan.group_arg());
        let need_dw_a = i32::from(reduce_dw);
        let mut b = stream.launch_builder(rt.function(k_bwd));
        b.arg(&xs).arg(&ws).arg(&dys).arg(&mut out);
        match &partial {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        b.arg(&rows_a)
            .arg(&cols_a)
            .arg(&group)
            .arg(&a.eps)
            .arg(&need_dw_a);
        // SAFETY: rms_norm_bwd_<t>(const T *x, const T *w, const T *dy, T *dx, float *partial,
        // long long rows, int cols, int group, float eps, int need_dw): x and dy have
        // rows * cols elements (checked equal), w has cols, dx is the first rows * cols of
        // `out`; partial has dw_slots() * cols floats when need_dw (null and untouched
        // otherwise); group and block sizes as the kernel expects (block <= RMS_BWD_THREADS)
        // with `smem` bytes of dynamic shared memory, the limit raised above when over 48 KiB.
        unsafe { b.launch(plan.config(smem)) }
            .cuda_ctx("launching rms_norm_bwd")
            .map_err(crate::Error::into_candle)?;
        if let Some(p) = &partial {
            let slots_a = slots as i32;
            let mut dw = out.slice_mut(n..n + cols);
            let mut b = stream.launch_builder(rt.function(k_dw));
            b.arg(p).arg(&mut dw).arg(&slots_a).arg(&cols_a);
            let cfg = LaunchConfig {
                grid_dim: (cols.div_ceil(32) as u32, 1, 1),
                block_dim: (DW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: rms_norm_dw_<t>(const float *partial, T *dw, int slots, int cols):
            // partial has slots * cols floats, all written by the launch above (same stream);
            // dw is the last cols elements of `out`; one 256-thread block per 32 columns.
            unsafe { b.launch(cfg) }
                .cuda_ctx("launching rms_norm_dw")
                .map_err(crate::Error::into_candle)?;
        }
    }
    if !reduce_dw && rows_cfg.is_none() {
        let mut dw = out.slice_mut(n..n + cols);
        stream
            .memset_zeros(&mut dw)
            .cuda_ctx("zeroing rms_norm dw")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
