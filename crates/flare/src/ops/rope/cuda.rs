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
