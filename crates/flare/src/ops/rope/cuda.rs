//! Host launcher of `rope_*` (`crates/flare-kernels/src/cu/rope.cu`): one launch per call,
//! the input read through its strides, the output a fresh contiguous buffer in the plan's
//! axis order (`p.ys`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::plan::RopePlan;
use crate::ops::cuda::elementwise::from_offset;
use crate::ops::cuda::rows::{input, unsupported};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

/// Runs the plan `p` on `x` (read from `p.x_off` through `p.xs`) with contiguous tables.
pub(crate) fn fwd(
    x: &CudaStorage,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    p: &RopePlan,
) -> candle_core::Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => run::<f32>(Kernel::RopeF32, x, cos, lc, sin, ls, p),
        DType::F16 => run::<f16>(Kernel::RopeF16, x, cos, lc, sin, ls, p),
        DType::BF16 => run::<bf16>(Kernel::RopeBF16, x, cos, lc, sin, ls, p),
        dt => Err(unsupported(p.op, dt)),
    }
}

/// Threads per block.
const THREADS: u32 = 256;

/// The kernel's grid: y over the `b · s` tokens (at most 65,535; the kernel strides past),
/// x over one token's `h · half` rotation pairs, or its `h · half / v` packs of `v` pairs when
/// the packed path runs (`v` > 1). A block is at most [`THREADS`] threads and at least one warp:
/// a token of few packs (8 KV heads of 128) takes a block of its size, not an idle 256.
fn grid(p: &RopePlan, v: usize) -> LaunchConfig {
    let items = (p.h * p.half / v).max(1);
    let threads = items.next_multiple_of(32).min(THREADS as usize) as u32;
    LaunchConfig {
        grid_dim: (
            items.div_ceil(threads as usize) as u32,
            (p.b * p.s).clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The elements per 16-byte pack of `T` when every pack of the call is aligned (unit dim
/// stride, `half` and the other strides multiples of it, 16-byte aligned first elements of the
/// input, output and tables), else 1 (the kernel's element path).
fn pack_width<T>(p: &RopePlan, ptrs: [u64; 4]) -> usize {
    let v = 16 / std::mem::size_of::<T>();
    let strides_ok = p.xs[3] == 1
        && p.half % v == 0
        && [p.xs[0], p.xs[1], p.xs[2], p.ys[0], p.ys[1], p.ys[2]]
            .iter()
            .all(|s| s % v == 0);
    if strides_ok && ptrs.iter().all(|a| a % 16 == 0) {
        v
    } else {
        1
    }
}

fn run<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    p: &RopePlan,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let n = p.out_dims.iter().product::<usize>();
    // SAFETY: every element is written by the kernel below (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    run_into::<T>(kernel, x, cos, lc, sin, ls, p, &mut out)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Runs the plan `p` into `out` (from `p.y_off`, through `p.ys`), which must hold every element
/// the plan writes.
pub(crate) fn fwd_into(
    x: &CudaStorage,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    p: &RopePlan,
    out: &mut CudaStorage,
) -> candle_core::Result<()> {
    match x.dtype() {
        DType::F32 => run_into::<f32>(
            Kernel::RopeF32,
            x,
            cos,
            lc,
            sin,
            ls,
            p,
            out.as_cuda_slice_mut()?,
        ),
        DType::F16 => run_into::<f16>(
            Kernel::RopeF16,
            x,
            cos,
            lc,
            sin,
            ls,
            p,
            out.as_cuda_slice_mut()?,
        ),
        DType::BF16 => run_into::<bf16>(
            Kernel::RopeBF16,
            x,
            cos,
            lc,
            sin,
            ls,
            p,
            out.as_cuda_slice_mut()?,
        ),
        dt => Err(unsupported(p.op, dt)),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_into<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    p: &RopePlan,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<()> {
    let op = p.op;
    let n = p.out_dims.iter().product::<usize>();
    let xs = from_offset::<T>(op, x, p.x_off)?;
    let cs = input::<T>(op, cos, lc)?;
    let ss = input::<T>(op, sin, ls)?;
    if n == 0 {
        return Ok(());
    }
    // The last element the plan writes must lie in `out` (every stride is positive, so the
    // last coordinates give the largest index).
    let reach =
        p.y_off + (p.b - 1) * p.ys[0] + (p.s - 1) * p.ys[1] + (p.h - 1) * p.ys[2] + 2 * p.half;
    if reach > out.len() {
        return Err(candle_core::Error::Msg(format!(
            "{op} (cuda): internal error: the output reaches {reach} in a buffer of {}",
            out.len()
        )));
    }
    let mut ys = out.slice_mut(p.y_off..);
    let pairs = n / 2;
    if pairs > 0 {
        // The last element the kernel reads must lie in the view (the strides come from a valid
        // Candle layout, so this holds; checked here because the kernel cannot).
        let last = (p.b - 1) * p.xs[0]
            + (p.s - 1) * p.xs[1]
            + (p.h - 1) * p.xs[2]
            + (2 * p.half - 1) * p.xs[3];
        let rows = if p.cos_bs == 0 { p.s } else { p.b * p.s };
        if last >= xs.len() || cs.len() < rows * p.half || ss.len() < rows * p.half {
            return Err(candle_core::Error::Msg(format!(
                "{op} (cuda): internal error: the layout reaches past its buffer ({last} >= {})",
                xs.len()
            )));
        }
        let rt = CudaRuntime::get(&x.device).map_err(crate::Error::into_candle)?;
        let i64s = |v: usize| v as i64;
        let (b, s, h, half) = (i64s(p.b), p.s as i32, p.h as i32, p.half as i32);
        let (xsb, xss, xsh, xsd) = (i64s(p.xs[0]), i64s(p.xs[1]), i64s(p.xs[2]), i64s(p.xs[3]));
        let (ysb, yss, ysh) = (i64s(p.ys[0]), i64s(p.ys[1]), i64s(p.ys[2]));
        let cos_bs = i64s(p.cos_bs);
        let (sign, scale) = (p.sign as f32, p.scale as f32);
        let v = {
            let st = rt.stream();
            let (xp, _gx) = xs.device_ptr(st);
            let (yp, _gy) = ys.device_ptr(st);
            let (cp, _gc) = cs.device_ptr(st);
            let (sp, _gs) = ss.device_ptr(st);
            pack_width::<T>(p, [xp, yp, cp, sp])
        };
        let vec = i32::from(v > 1);
        let mut lb = rt.stream().launch_builder(rt.function(kernel));
        lb.arg(&xs)
            .arg(&mut ys)
            .arg(&cs)
            .arg(&ss)
            .arg(&b)
            .arg(&s)
            .arg(&h)
            .arg(&half)
            .arg(&xsb)
            .arg(&xss)
            .arg(&xsh)
            .arg(&xsd)
            .arg(&ysb)
            .arg(&yss)
            .arg(&ysh)
            .arg(&cos_bs)
            .arg(&sign)
            .arg(&scale)
            .arg(&vec);
        // SAFETY: rope_<t>(const T *x, T *y, const T *cos, const T *sin, long long b, int s,
        // int h, int half, long long xs_b, xs_s, xs_h, xs_d, long long ys_b, ys_s, ys_h,
        // long long cos_bs, float sign, float scale, int vec): every input element read lies in `xs`
        // (checked above), the tables hold `rows * half` elements (checked above), and the
        // output indices `b*ys_b + t*ys_s + h*ys_h + i` (i < 2 * half) from `y_off` are all
        // below `reach`, which is within `out` (checked above). The grid strides over tokens (y) and each token's pairs (x),
        // or packs of `v` pairs when vec = 1: then every pack is a 16-byte aligned access inside
        // the same bounds (`pack_width` checked the first elements and strides).
        unsafe { lb.launch(grid(p, v)) }
            .cuda_ctx("launching rope")
            .map_err(crate::Error::into_candle)?;
    }
    Ok(())
}

/// `rows x width` elements from `x` (from element `x_off`, row stride `xs`) into `out` (from
/// `y_off`, row stride `ys`) by one `rope_copy_rows_*` launch, in 16-byte packs where the
/// width, strides and both starts allow: the v part of the packed q/k/v rotation
/// ([`super::RopeQkv`]), which Candle's `copy2d` moved 2 bytes at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_rows_into(
    x: &CudaStorage,
    out: &mut CudaStorage,
    rows: usize,
    width: usize,
    xs: usize,
    ys: usize,
    x_off: usize,
    y_off: usize,
) -> candle_core::Result<()> {
    match x.dtype() {
        DType::F32 => copy_rows_t::<f32>(
            Kernel::RopeCopyRowsF32,
            x,
            out.as_cuda_slice_mut()?,
            [rows, width, xs, ys, x_off, y_off],
        ),
        DType::F16 => copy_rows_t::<f16>(
            Kernel::RopeCopyRowsF16,
            x,
            out.as_cuda_slice_mut()?,
            [rows, width, xs, ys, x_off, y_off],
        ),
        DType::BF16 => copy_rows_t::<bf16>(
            Kernel::RopeCopyRowsBF16,
            x,
            out.as_cuda_slice_mut()?,
            [rows, width, xs, ys, x_off, y_off],
        ),
        dt => Err(unsupported("rope_qkv", dt)),
    }
}

fn copy_rows_t<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    x: &CudaStorage,
    out: &mut CudaSlice<T>,
    [rows, width, xs, ys, x_off, y_off]: [usize; 6],
) -> candle_core::Result<()> {
    const OPC: &str = "rope_qkv v copy (cuda)";
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let src = from_offset::<T>(OPC, x, x_off)?;
    // Rows must not overlap, and the last element read and written must lie in the buffers
    // (the kernel cannot check).
    if xs < width
        || ys < width
        || (rows - 1) * xs + width > src.len()
        || y_off + (rows - 1) * ys + width > out.len()
    {
        return Err(candle_core::Error::Msg(format!(
            "{OPC}: internal error: {rows} rows of {width} (strides {xs} / {ys}) past the buffers \
             ({} / {} elements)",
            src.len(),
            out.len() - y_off.min(out.len())
        )));
    }
    let dst = out.slice_mut(y_off..);
    let rt = CudaRuntime::get(&x.device).map_err(crate::Error::into_candle)?;
    let st = rt.stream();
    let (xp, _gx) = src.device_ptr(st);
    let (yp, _gy) = dst.device_ptr(st);
    // SAFETY: the rows read (from `xp`, `xs` apart) and written (from `yp`, `ys` apart) lie in
    // `src` and `dst` (checked above), both held by their guards until the launch is queued;
    // the source (q/k/v rows) and the destination (the op's fresh output) are different
    // buffers.
    unsafe { copy_rows_raw(&rt, kernel, xp, yp, [rows, width, xs, ys]) }
}

/// `rows x width` elements from device address `x` (rows `xs` apart) to `y` (rows `ys` apart)
/// by one `rope_copy_rows_*` launch (`kernel`, of the element type `T`), in 16-byte packs where
/// both addresses, the width and the strides allow, on the runtime's stream: the strided copy
/// of the RoPE v rows and of the fused LoRA MLP's padded rows
/// ([`crate::lora::op::lora_swiglu_mlp`]). `xs` may be 0 (every row reads the same elements).
///
/// # Safety
/// The `rows` rows read and written must lie inside live device allocations that stay alive
/// until the launch has run (the caller holds them), the rows written must not overlap each
/// other or the rows read, and nothing else may write them on another stream meanwhile.
pub(crate) unsafe fn copy_rows_raw(
    rt: &CudaRuntime,
    kernel: Kernel,
    x: u64,
    y: u64,
    [rows, width, xs, ys]: [usize; 4],
) -> candle_core::Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let size = match kernel {
        Kernel::RopeCopyRowsF32 => 4,
        Kernel::RopeCopyRowsF16 | Kernel::RopeCopyRowsBF16 => 2,
        other => {
            return Err(candle_core::Error::Msg(format!(
                "copy_rows: internal error: {other:?} is not a row copy"
            )))
        }
    };
    let v = 16 / size;
    let vec = x % 16 == 0 && y % 16 == 0 && width % v == 0 && xs % v == 0 && ys % v == 0;
    let work = if vec {
        rows * (width / v)
    } else {
        rows * width
    };
    let blocks = work
        .div_ceil(THREADS as usize)
        .clamp(1, 16 * rt.sm_count.max(1) as usize) as u32;
    let (rows64, width32, xs64, ys64, vec32) = (
        rows as i64,
        width as i32,
        xs as i64,
        ys as i64,
        i32::from(vec),
    );
    let mut b = rt.stream().launch_builder(rt.function(kernel));
    b.arg(&x)
        .arg(&y)
        .arg(&rows64)
        .arg(&width32)
        .arg(&xs64)
        .arg(&ys64)
        .arg(&vec32);
    // SAFETY: rope_copy_rows_<t>(const T *x, T *y, long long rows, int width, long long xs,
    // long long ys, int vec): the caller guarantees the rows read and written lie in live
    // allocations and do not overlap (this function's contract); with vec, the width, the
    // strides and both addresses are multiples of 16 bytes (checked above); on the runtime's
    // (Candle's) stream.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .cuda_ctx("launching rope_copy_rows")
    .map_err(crate::Error::into_candle)?;
    Ok(())
}
