//! Host launchers of `swiglu_fwd_*` and `swiglu_bwd_*` (`crates/flare-kernels/src/cu/swiglu.cu`)
//! for both of [`crate::ops::swiglu`]'s forms (separate inputs, or one packed gate/up input,
//! described by a [`SwiGluPlan`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::plan::SwiGluPlan;
use crate::ops::cuda::elementwise::from_offset;
use crate::ops::cuda::rows::{input, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP_FWD: &str = "swiglu (cuda)";
const OP_BWD: &str = "swiglu backward (cuda)";

/// `silu(g) * u` by the plan `p` (`g` and `u` may be the same storage); a fresh `[rows, cols]`
/// output with rows `p.ldy` apart (contiguous when `ldy = cols`; a padded plan leaves the
/// `ldy - cols` elements after each row unwritten, for the caller to fill).
pub(crate) fn fwd(
    g: &CudaStorage,
    u: &CudaStorage,
    p: &SwiGluPlan,
) -> candle_core::Result<CudaStorage> {
    match g.dtype() {
        DType::F32 => fwd_t::<f32>(Kernel::SwiGluFwdF32, g, u, p),
        DType::F16 => fwd_t::<f16>(Kernel::SwiGluFwdF16, g, u, p),
        DType::BF16 => fwd_t::<bf16>(Kernel::SwiGluFwdBF16, g, u, p),
        dt => Err(unsupported(OP_FWD, dt)),
    }
}

/// The gradient buffer (`p.grad_len` elements: `dg` and `du` at `p.ldo` / `p.du_off`) from
/// `g`, `u` by the plan and a contiguous `dy` `[rows, cols]`.
pub(crate) fn bwd(
    g: &CudaStorage,
    u: &CudaStorage,
    dy: &CudaStorage,
    ldy: &Layout,
    p: &SwiGluPlan,
) -> candle_core::Result<CudaStorage> {
    match g.dtype() {
        DType::F32 => bwd_t::<f32>(Kernel::SwiGluBwdF32, g, u, dy, ldy, p),
        DType::F16 => bwd_t::<f16>(Kernel::SwiGluBwdF16, g, u, dy, ldy, p),
        DType::BF16 => bwd_t::<bf16>(Kernel::SwiGluBwdBF16, g, u, dy, ldy, p),
        dt => Err(unsupported(OP_BWD, dt)),
    }
}

/// The backward written over the inputs: `dg` into `g`'s elements and `du` into `u`'s (the
/// plan of two separate contiguous inputs). `u` is written through its device pointer although
/// it is borrowed shared: see [`crate::ops::swiglu_grad_in_place`] for the contract that makes
/// this sound (nothing reads `u` after this backward).
pub(crate) fn bwd_in_place(
    g: &mut CudaStorage,
    u: &CudaStorage,
    dy: &CudaStorage,
    ldy: &Layout,
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    match g.dtype() {
        DType::F32 => bwd_in_place_t::<f32>(Kernel::SwiGluBwdF32, g, u, dy, ldy, p),
        DType::F16 => bwd_in_place_t::<f16>(Kernel::SwiGluBwdF16, g, u, dy, ldy, p),
        DType::BF16 => bwd_in_place_t::<bf16>(Kernel::SwiGluBwdBF16, g, u, dy, ldy, p),
        dt => Err(unsupported(OP_BWD, dt)),
    }
}

/// Threads per block of both kernels.
const THREADS: u32 = 256;

/// Blocks per SM of the backward's grid-stride paths (`bench/dev/swiglu_probe.py`: 16
/// reached 2.9 TB/s at the Llama-3.1-8B MLP shape, 4 and 8 within 6% of it).
const FLAT_BLOCKS_PER_SM: usize = 16;

/// The kernels' grid: x over packs of `16 / size_of::<T>()` columns of a row, y over rows
/// (the kernels stride over rows past 65,535).
fn grid<T>(p: &SwiGluPlan) -> LaunchConfig {
    let v = 16 / std::mem::size_of::<T>();
    let packs = p.cols.div_ceil(v);
    LaunchConfig {
        grid_dim: (
            packs.div_ceil(THREADS as usize).max(1) as u32,
            p.rows.clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `packs` items: a thread each up to [`FLAT_BLOCKS_PER_SM`] blocks
/// per SM.
fn strided_grid(rt: &CudaRuntime, packs: usize) -> LaunchConfig {
    let blocks = packs
        .div_ceil(THREADS as usize)
        .clamp(1, FLAT_BLOCKS_PER_SM * rt.sm_count.max(1) as usize);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether every row of the operands starts 16-byte aligned (the kernels' one-access packs):
/// the operands' first elements (device addresses), and every row stride (in elements) a
/// multiple of the pack width.
fn aligned16<T>(ptrs: &[u64], strides: &[usize]) -> bool {
    let v = 16 / std::mem::size_of::<T>();
    strides.iter().all(|s| s % v == 0) && ptrs.iter().all(|ptr| ptr % 16 == 0)
}

/// Checks that the rows the plan reads lie inside `g`'s and `u`'s views.
fn check_reach(
    op: &'static str,
    g_len: usize,
    u_len: usize,
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    let last = |ld: usize| (p.rows - 1) * ld + p.cols - 1;
    if last(p.ldg) >= g_len || last(p.ldu) >= u_len {
        return Err(candle_core::Error::Msg(format!(
            "{op}: internal error: the plan reaches past its inputs"
        )));
    }
    Ok(())
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &CudaStorage,
    u: &CudaStorage,
    p: &SwiGluPlan,
) -> candle_core::Result<CudaStorage> {
    let dev = &g.device;
    let n = p.rows * p.cols;
    if p.ldy < p.cols {
        return Err(candle_core::Error::Msg(format!(
            "{OP_FWD}: internal error: output rows of {} elements {} apart",
            p.cols, p.ldy
        )));
    }
    let gs = from_offset::<T>(OP_FWD, g, p.g_off)?;
    let us = from_offset::<T>(OP_FWD, u, p.u_off)?;
    // SAFETY: the kernel below writes the first `cols` elements of every row (nothing when
    // n == 0); the `ldy - cols` after each row of a padded plan are the caller's to write
    // before anything reads them (`SwiGluPlan::padded`).
    let mut out = unsafe { dev.alloc::<T>((p.rows * p.ldy).max(1)) }?;
    if n > 0 {
        check_reach(OP_FWD, gs.len(), us.len(), p)?;
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let st = rt.stream();
        let (gp, _g) = gs.device_ptr(st);
        let (up, _u) = us.device_ptr(st);
        let (yp, _y) = out.device_ptr_mut(st);
        // SAFETY: g's and u's rows lie in their views (checked above); `out` is a fresh
        // allocation of rows * ldy elements with ldy >= cols (checked above), disjoint from
        // both; the guards hold the three until the launch is queued on the runtime's stream.
        unsafe { launch_fwd::<T>(&rt, kernel, [gp, up, yp], p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Launches `swiglu_fwd_<t>` on the device addresses `[g, u, y]` by the plan `p` (rows
/// `p.ldg`, `p.ldu` and `p.ldy` apart), in 16-byte packs on a grid-stride loop where every
/// row start is aligned (the row grid with 16-byte packs ran the 8B MLP's forward at 2.6 TB/s,
/// 137.7 µs at [4096, 14336] bf16, packed gate/up; the grid-stride loop does better).
///
/// # Safety
/// The `p.rows` rows of `p.cols` elements read from `g` and `u` and written to `y` must lie
/// in live allocations of `T` until the launch has run, `y`'s rows disjoint from each other
/// (`p.ldy >= p.cols`) and from `g` and `u`.
unsafe fn launch_fwd<T: CudaDType + DeviceRepr>(
    rt: &CudaRuntime,
    kernel: Kernel,
    ptrs: [u64; 3],
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    let [gp, up, yp] = ptrs;
    let (rows, cols, ldg, ldu, ldy) = (
        p.rows as i64,
        p.cols as i32,
        p.ldg as i64,
        p.ldu as i64,
        p.ldy as i64,
    );
    let v = 16 / std::mem::size_of::<T>();
    let (vec, cfg) = if aligned16::<T>(&ptrs, &[p.cols, p.ldg, p.ldu, p.ldy]) {
        (2i32, strided_grid(rt, p.rows * p.cols / v))
    } else {
        (0i32, grid::<T>(p))
    };
    let mut lb = rt.stream().launch_builder(rt.function(kernel));
    lb.arg(&gp)
        .arg(&up)
        .arg(&yp)
        .arg(&rows)
        .arg(&cols)
        .arg(&ldg)
        .arg(&ldu)
        .arg(&ldy)
        .arg(&vec);
    // SAFETY: swiglu_fwd_<t>(const T *g, const T *u, T *y, long long rows, int cols,
    // long long ldg, long long ldu, long long ldy, int vec): the caller guarantees the reads
    // r * ldg + c, r * ldu + c and the writes r * ldy + c (r < rows, c < cols) lie in live
    // allocations, y disjoint from g and u (this function's contract). vec = 2 only when every
    // row start of g, u and y is 16-byte aligned and cols is a multiple of the pack width
    // (checked just above), so each of the rows * cols / V packs is one aligned 16-byte
    // access inside its row; the grid strides over those packs (vec 2) or over rows and packs
    // (vec 0) with bound checks.
    unsafe { lb.launch(cfg) }
        .cuda_ctx("launching swiglu_fwd")
        .map_err(crate::Error::into_candle)?;
    Ok(())
}

/// [`fwd`] on device addresses `[g, u, y]` of `dtype` (the fused LoRA MLP's buffers).
///
/// # Safety
/// As [`launch_fwd`]'s.
pub(crate) unsafe fn fwd_raw(
    rt: &CudaRuntime,
    dtype: DType,
    ptrs: [u64; 3],
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    // SAFETY: forwarded: the caller keeps launch_fwd's contract.
    unsafe {
        match dtype {
            DType::F32 => launch_fwd::<f32>(rt, Kernel::SwiGluFwdF32, ptrs, p),
            DType::F16 => launch_fwd::<f16>(rt, Kernel::SwiGluFwdF16, ptrs, p),
            DType::BF16 => launch_fwd::<bf16>(rt, Kernel::SwiGluFwdBF16, ptrs, p),
            dt => Err(unsupported(OP_FWD, dt)),
        }
    }
}

/// [`bwd`] on device addresses `[g, u, dy, dg, du]` of `dtype`, output rows `p.ldo` apart.
///
/// # Safety
/// The reads `r * ld + c` (`r < rows`, `c < cols`) of `g`, `u` (their plan strides) and `dy`
/// (rows `cols` apart) and the writes `r * ldo + c` of `dg` and `du` must lie in live
/// allocations of `dtype` until the launch has run; the outputs may alias `g` and `u` element
/// for element only (as [`bwd_in_place`]) and nothing else.
pub(crate) unsafe fn bwd_raw(
    rt: &CudaRuntime,
    dtype: DType,
    ptrs: [u64; 5],
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    match dtype {
        DType::F32 => launch_bwd::<f32>(rt, Kernel::SwiGluBwdF32, ptrs, p, p.ldo),
        DType::F16 => launch_bwd::<f16>(rt, Kernel::SwiGluBwdF16, ptrs, p, p.ldo),
        DType::BF16 => launch_bwd::<bf16>(rt, Kernel::SwiGluBwdBF16, ptrs, p, p.ldo),
        dt => Err(unsupported(OP_BWD, dt)),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &CudaStorage,
    u: &CudaStorage,
    dy: &CudaStorage,
    ldy: &Layout,
    p: &SwiGluPlan,
) -> candle_core::Result<CudaStorage> {
    let dev = &g.device;
    let n = p.rows * p.cols;
    let gs = from_offset::<T>(OP_BWD, g, p.g_off)?;
    let us = from_offset::<T>(OP_BWD, u, p.u_off)?;
    let dys = input::<T>(OP_BWD, dy, ldy)?;
    if dys.len() != n || p.grad_len < p.du_off + (p.rows.max(1) - 1) * p.ldo + p.cols {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD}: internal error: gradient of {} elements for {n} outputs",
            dys.len()
        )));
    }
    // SAFETY: the kernel writes every element of the gradient buffer the caller reads: dg at
    // r * ldo + c and du at du_off + r * ldo + c cover all of it for the separate plan (two
    // [rows, cols] blocks) and the packed one (the two halves of each row of width
    // ldo = 2 * cols); a padded plan leaves the ldo - 2 * cols elements after each row for the
    // caller to write before it reads them (`SwiGluPlan::padded`).
    let out = unsafe { dev.alloc::<T>(p.grad_len.max(1)) }?;
    if n > 0 {
        check_reach(OP_BWD, gs.len(), us.len(), p)?;
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let stream = rt.stream();
        let (gp, _g) = gs.device_ptr(stream);
        let (up, _u) = us.device_ptr(stream);
        let (dyp, _dy) = dys.device_ptr(stream);
        let (outp, _out) = out.device_ptr(stream);
        let du = outp + (p.du_off * std::mem::size_of::<T>()) as u64;
        // `out` is a fresh allocation: dg at out, du at out + du_off, rows ldo apart; the
        // checks above keep every write inside its grad_len elements.
        launch_bwd::<T>(&rt, kernel, [gp, up, dyp, outp, du], p, p.ldo)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

fn bwd_in_place_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    g: &mut CudaStorage,
    u: &CudaStorage,
    dy: &CudaStorage,
    ldy: &Layout,
    p: &SwiGluPlan,
) -> candle_core::Result<()> {
    let n = p.rows * p.cols;
    if p.ldg != p.cols || p.ldu != p.cols {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD}: internal error: the in-place backward takes contiguous separate inputs"
        )));
    }
    let rt = CudaRuntime::get(&g.device).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let dys = input::<T>(OP_BWD, dy, ldy)?;
    let us = from_offset::<T>(OP_BWD, u, p.u_off)?;
    let gs = g.as_cuda_slice_mut::<T>()?;
    if n == 0 {
        return Ok(());
    }
    if dys.len() != n {
        return Err(candle_core::Error::Msg(format!(
            "{OP_BWD}: internal error: gradient of {} elements for {n} outputs",
            dys.len()
        )));
    }
    // The reads and the in-place writes are the same elements of g and u.
    check_reach(OP_BWD, gs.len().saturating_sub(p.g_off), us.len(), p)?;
    let elem = std::mem::size_of::<T>() as u64;
    let (gbase, _g) = gs.device_ptr_mut(stream);
    let gp = gbase + p.g_off as u64 * elem;
    let (up, _u) = us.device_ptr(stream);
    let (dyp, _dy) = dys.device_ptr(stream);
    // dg over g, du over u: the same n elements each thread reads (rows of ldo = cols).
    launch_bwd::<T>(&rt, kernel, [gp, up, dyp, gp, up], p, p.cols)
}

/// Launches `swiglu_bwd_<t>` on the device addresses `[g, u, dy, dg, du]` with output rows
/// `ldo` elements apart. The callers checked every read and write range.
fn launch_bwd<T: CudaDType + DeviceRepr>(
    rt: &CudaRuntime,
    kernel: Kernel,
    ptrs: [u64; 5],
    p: &SwiGluPlan,
    ldo: usize,
) -> candle_core::Result<()> {
    let [gp, up, dyp, dgp, dup] = ptrs;
    let (rows, cols) = (p.rows as i64, p.cols as i32);
    let (ldg, ldu, ldo_arg) = (p.ldg as i64, p.ldu as i64, ldo as i64);
    // Flat (every operand's rows back to back) and 16-byte aligned: the grid-stride path over
    // packs; aligned rows of other strides (packed gate/up): the grid-stride path over (row,
    // pack); both on a few blocks per SM. Else the row grid with element accesses.
    let v = 16 / std::mem::size_of::<T>();
    let flat = p.ldg == p.cols && p.ldu == p.cols && ldo == p.cols;
    let (vec, cfg) = if flat && aligned16::<T>(&ptrs, &[]) {
        (2, strided_grid(rt, p.rows * p.cols / v))
    } else if aligned16::<T>(&ptrs, &[p.cols, p.ldg, p.ldu, ldo]) {
        (3, strided_grid(rt, p.rows * (p.cols / v)))
    } else {
        (0, grid::<T>(p))
    };
    let mut lb = rt.stream().launch_builder(rt.function(kernel));
    lb.arg(&gp)
        .arg(&up)
        .arg(&dyp)
        .arg(&dgp)
        .arg(&dup)
        .arg(&rows)
        .arg(&cols)
        .arg(&ldg)
        .arg(&ldu)
        .arg(&ldo_arg)
        .arg(&vec);
    // SAFETY: swiglu_bwd_<t>(const T *g, const T *u, const T *dy, T *dg, T *du, long long rows,
    // int cols, long long ldg, ldu, ldo, int vec): the callers checked that the reads
    // r * ld + c (r < rows, c < cols) of g, u and dy and the writes r * ldo + c of dg and du
    // stay inside live allocations, whose guards they hold across this launch. dg and du may
    // be g and u (in place): the kernel reads each pack before writing the same pack, and the
    // outputs are not declared __restrict__. vec = 3 only when every row start of the five
    // operands is 16-byte aligned and cols a multiple of the pack width (checked here: the
    // grid-stride loop's packs are whole and aligned); vec = 2 only when
    // the five operands are flat arrays of rows * cols elements (ld = cols) with 16-byte
    // aligned first elements, which the grid-stride loop covers pack by pack and the tail
    // element by element.
    unsafe { lb.launch(cfg) }
        .cuda_ctx("launching swiglu_bwd")
        .map_err(crate::Error::into_candle)?;
    Ok(())
}
