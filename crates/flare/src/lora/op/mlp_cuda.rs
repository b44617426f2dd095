//! CUDA steps of the fused LoRA MLP ([`super::lora_swiglu_mlp`]): the cuBLASLt GEMMs of
//! [`super::cuda`] around the `lora_swiglu_*` kernels (`crates/flare-kernels/src/cu/lora_swiglu.cu`).
//!
//! Forward (`T` tokens, hidden `h`, intermediate `I`, ranks `r` for gate/up and `r2` for down):
//! `yb = x W_guᵀ` and `H = x A_guᵀ` (two GEMMs, no low-rank expansion), then the kernel forms
//! `act = silu(yb_g + s H_g B_gᵀ) · (yb_u + s H_u B_uᵀ)` on the tensor cores, then the down
//! projection is [`super::cuda::fwd`]. Backward: down's [`super::cuda::bwd`] without the
//! low-rank part of its input gradient (`dab = dy W_d`, and `G_d` handed back), the kernel's
//! backward adds `G_d A_d` and writes `d[gate | up]`, then gate/up's backward. The two `[T, 2I]`
//! and `[T, I]` expansions of the unfused path, and the `beta = 1` reads of them by the base
//! GEMMs, never happen.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout};

use super::cuda::{self, BwdArgs, FactorDest, FwdArgs};
use super::internal;
use super::mlp::MlpDims;
use super::plan::{Needs, Packed};
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

const OP_FWD: &str = "lora_swiglu_mlp (cuda)";
const OP_BWD: &str = "lora_swiglu_mlp backward (cuda)";

/// What the forward keeps for the backward.
pub(crate) struct Saved {
    /// `x W_guᵀ`, `[T, 2I]`.
    yb: CudaStorage,
    /// `x A_guᵀ`, `[T, 2r]`.
    h_gu: CudaStorage,
    /// The activation (down's input), `[T, I]`.
    act: CudaStorage,
    /// `act A_dᵀ`, `[T, r2]`.
    h_d: CudaStorage,
    /// The factor packs in the base dtype, when the forward converted them from f32.
    ab: Option<(CudaStorage, CudaStorage)>,
}

/// The frozen weights and scales.
pub(crate) struct Weights<'a> {
    pub w_gu: (&'a CudaStorage, &'a Layout),
    pub w_d: (&'a CudaStorage, &'a Layout),
    pub s_gu: f64,
    pub s_d: f64,
}

/// The four factor layouts inside the packs whose contiguous data start at `a0` and `b0`
/// (element offsets): `A_gu [2r, h]`, `A_d [r2, I]`, `B_gu [2I, r]`, `B_d [h, r2]`.
fn factor_layouts(d: &MlpDims, a0: usize, b0: usize) -> [Layout; 4] {
    [
        Layout::contiguous_with_offset((2 * d.r, d.hidden), a0),
        Layout::contiguous_with_offset((d.r2, d.inter), a0 + d.a_down()),
        Layout::contiguous_with_offset((2 * d.inter, d.r), b0),
        Layout::contiguous_with_offset((d.hidden, d.r2), b0 + d.b_down()),
    ]
}

/// The start offset of a contiguous pack's data.
fn start(op: &str, l: &Layout) -> candle_core::Result<usize> {
    l.contiguous_offsets()
        .map(|(s, _)| s)
        .ok_or_else(|| internal(op, "a factor pack is not contiguous".into()))
}

/// A factor pack's storage and the element offset its data start at.
type PackAt<'a> = (&'a CudaStorage, usize);

/// The packs in the base dtype (converted by one launch from f32, or as they are) and their
/// data offsets.
fn packs<'a>(
    a: (&'a CudaStorage, &'a Layout),
    b: (&'a CudaStorage, &'a Layout),
    ab: Option<&'a (CudaStorage, CudaStorage)>,
) -> candle_core::Result<(PackAt<'a>, PackAt<'a>)> {
    Ok(match ab {
        Some((ca, cb)) => ((ca, 0), (cb, 0)),
        None => ((a.0, start(OP_FWD, a.1)?), (b.0, start(OP_FWD, b.1)?)),
    })
}

/// The forward: `y [T, h]` and what the backward needs. `x: [T, h]` (contiguous), the packs as
/// [`super::lora_swiglu_mlp`] builds them (contiguous; f32 on a half base, or the base dtype).
pub(crate) fn fwd(
    x: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    w: &Weights<'_>,
    d: &MlpDims,
) -> candle_core::Result<(CudaStorage, Saved)> {
    let dtype = x.0.dtype();
    let ab = cuda::cast_pair(a, b, dtype)?;
    if ab.is_none() && a.0.dtype() != dtype {
        return Err(internal(
            OP_FWD,
            format!("factors of {:?} on a {dtype:?} base", a.0.dtype()),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, ab.as_ref())?;
    let [la_gu, la_d, lb_gu, lb_d] = factor_layouts(d, a0, b0);
    let t = x.1.dims()[0];
    let (yb, h_gu) = cuda::base_and_h(x, (sa, &la_gu), w.w_gu)?;
    let act = launch_fwd(&yb, &h_gu, (sb, &lb_gu), t, d, w.s_gu)?;
    let (y, h_d) = cuda::fwd(FwdArgs {
        x: (&act, &Layout::contiguous((t, d.inter))),
        a: (sa, &la_d),
        b: (sb, &lb_d),
        w: w.w_d,
        bias: None,
        scale: w.s_d,
        splits: &[d.hidden],
    })?;
    Ok((
        y,
        Saved {
            yb,
            h_gu,
            act,
            h_d,
            ab,
        },
    ))
}

/// The backward's outputs: `dx` (`[T, h]`, when asked) and the factor gradients, one buffer
/// laid out as [`MlpDims::grad_len`] says (f32 when the factors are f32).
pub(crate) struct Grads {
    pub dx: Option<CudaStorage>,
    pub factors: CudaStorage,
}

/// The backward from `dy: [T, h]` (contiguous). `a`, `b` are the forward's packs (read only
/// when the forward kept no converted copy).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    w: &Weights<'_>,
    d: &MlpDims,
    saved: &Saved,
    need_dx: bool,
) -> candle_core::Result<Grads> {
    let dtype = x.0.dtype();
    let split = a.0.dtype() != dtype;
    if split && saved.ab.is_none() {
        return Err(internal(
            OP_BWD,
            "f32 factors but the forward kept no converted pair".into(),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, saved.ab.as_ref())?;
    let [la_gu, la_d, lb_gu, lb_d] = factor_layouts(d, a0, b0);
    let t = x.1.dims()[0];
    let fdt = if split { DType::F32 } else { dtype };
    let fsize = fdt.size_in_bytes() as u64;
    let dev = &x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let len = d.grad_len();
    // Every piece of the buffer the caller reads (the four factor gradients, at the offsets of
    // `MlpDims`) is written in full by a GEMM with beta = 0 below; the padding between the two
    // packs' pieces is never read (the caller takes the pieces as views).
    let factors = alloc(OP_BWD, dev, fdt, len)?;
    let all = Needs {
        dx: true,
        da: true,
        db: true,
    };
    let dx = {
        let fp = ptr(OP_BWD, &factors, 0, stream)?;
        let at = |off: usize| fp + off as u64 * fsize;
        // Down: dab = dy W_d (no G_d A_d), G_d back, dA_d and dB_d into their pieces.
        let down = cuda::bwd(BwdArgs {
            x: (&saved.act, &Layout::contiguous((t, d.inter))),
            dy,
            a: (sa, &la_d),
            w: w.w_d,
            b: (sb, &lb_d),
            scale: w.s_d,
            need: all,
            packed: Packed::new(
                t,
                d.inter,
                d.hidden,
                (d.r2, d.r2),
                Needs {
                    da: false,
                    db: false,
                    ..all
                },
                split,
            ),
            h: Some(&saved.h_d),
            split,
            splits: &[d.hidden],
            // SAFETY (of the addresses): inside `factors` (`grad_len` elements of the factor
            // dtype, held by the guard above until this function returns), 16-element aligned
            // (`MlpDims` requires h and I multiples of 8), disjoint from every operand.
            factors_into: Some(FactorDest {
                da: at(d.a_down()),
                db: at(d.b_start() + d.b_down()),
            }),
            dx_low: false,
        })?;
        let (Some(dab), Some(gd)) = (down.base, down.g) else {
            return Err(internal(
                OP_BWD,
                "the down projection's backward lost dx or G".into(),
            ));
        };
        let dgu = launch_bwd(
            &saved.yb,
            &saved.h_gu,
            (sb, &lb_gu),
            &dab,
            &gd,
            (sa, &la_d),
            t,
            d,
            w.s_gu,
        )?;
        drop((dab, gd));
        // Gate/up: the standard grouped backward on d[gate | up].
        let gu = cuda::bwd(BwdArgs {
            x,
            dy: (&dgu, &Layout::contiguous((t, 2 * d.inter))),
            a: (sa, &la_gu),
            w: w.w_gu,
            b: (sb, &lb_gu),
            scale: w.s_gu,
            need: Needs { dx: need_dx, ..all },
            packed: Packed::new(
                t,
                d.hidden,
                2 * d.inter,
                (2 * d.r, d.r),
                Needs {
                    dx: need_dx,
                    da: false,
                    db: false,
                },
                split,
            ),
            h: Some(&saved.h_gu),
            split,
            splits: &[d.inter, d.inter],
            // SAFETY (of the addresses): as for the down projection's.
            factors_into: Some(FactorDest {
                da: at(0),
                db: at(d.b_start()),
            }),
            dx_low: true,
        })?;
        gu.base
    };
    Ok(Grads { dx, factors })
}

/// The kernels' grid: x over column tiles of `I`, y over groups of `LSW_ROW_TILES` row tiles
/// (each block stages its columns' factors once and strides over row tiles by `gridDim.y`).
fn grid(t: usize, d: &MlpDims) -> LaunchConfig {
    use flare_kernels::launch::{LSW_ROW_TILES, LSW_TM, LSW_TN};
    let row_tiles = t.div_ceil(LSW_TM as usize);
    LaunchConfig {
        grid_dim: (
            d.inter.div_ceil(LSW_TN as usize) as u32,
            row_tiles.div_ceil(LSW_ROW_TILES as usize).clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (flare_kernels::launch::LSW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A fresh storage of `n` elements of `dtype` (f32, f16, bf16), uninitialized: the caller
/// writes every element it later reads.
fn alloc(
    op: &str,
    dev: &candle_core::CudaDevice,
    dtype: DType,
    n: usize,
) -> candle_core::Result<CudaStorage> {
    // SAFETY (the three allocations): uninitialized device memory, written before it is read as
    // this function's contract states (each caller says how).
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, dev.clone()),
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n) }?, dev.clone())
        }
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, dev.clone())
        }
        dt => return Err(internal(op, format!("dtype {dt:?} reached the fused MLP"))),
    })
}

/// The device address of a storage's element `off` ([`crate::runtime::offload::slice_ptr`]).
fn ptr(
    op: &str,
    s: &CudaStorage,
    off: usize,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<u64> {
    let base = crate::runtime::offload::slice_ptr(&s.slice, stream)
        .ok_or_else(|| internal(op, format!("no device address for {:?}", s.dtype())))?;
    Ok(base + (off * s.dtype().size_in_bytes()) as u64)
}

/// `act = silu(g) · u` with the low-rank terms: `lora_swiglu_fwd_*`.
fn launch_fwd(
    yb: &CudaStorage,
    h_gu: &CudaStorage,
    (sb, lb): (&CudaStorage, &Layout),
    t: usize,
    d: &MlpDims,
    s: f64,
) -> candle_core::Result<CudaStorage> {
    let dev = &yb.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let n = t * d.inter;
    let kernel = match yb.dtype() {
        DType::F16 => Kernel::LoraSwiGluFwdF16,
        DType::BF16 => Kernel::LoraSwiGluFwdBF16,
        dt => return Err(internal(OP_FWD, format!("dtype {dt:?} reached the kernel"))),
    };
    // The kernel writes every element of act ([T, I]).
    let act = alloc(OP_FWD, dev, yb.dtype(), n)?;
    check_len(OP_FWD, "yb", yb, t * 2 * d.inter)?;
    check_len(OP_FWD, "H", h_gu, t * 2 * d.r)?;
    check_view(OP_FWD, "B", sb, lb, 2 * d.inter * d.r)?;
    let (ybp, hp, bp, actp) = (
        ptr(OP_FWD, yb, 0, stream)?,
        ptr(OP_FWD, h_gu, 0, stream)?,
        ptr(OP_FWD, sb, lb.start_offset(), stream)?,
        ptr(OP_FWD, &act, 0, stream)?,
    );
    let (rows, inter, r, sf) = (t as i64, d.inter as i32, d.r as i32, s as f32);
    let mut lb_ = stream.launch_builder(rt.function(kernel));
    lb_.arg(&ybp)
        .arg(&hp)
        .arg(&bp)
        .arg(&actp)
        .arg(&rows)
        .arg(&inter)
        .arg(&r)
        .arg(&sf);
    // SAFETY: lora_swiglu_fwd_<t>(const T *yb, const T *h, const T *b, T *act, long long rows,
    // int inter, int r, float s): yb holds rows · 2I elements, h rows · 2r, b (from its view's
    // offset) 2I · r, act is a fresh allocation of rows · I (lengths checked above); I % 8 == 0
    // and 1 <= r <= LSW_MAX_RANK (`MlpDims::fits`); yb and act are fresh pool allocations, so
    // every row start (2I and I elements apart) is 16-byte aligned; act aliases nothing. The
    // storages are held by the caller (and act returned) until the launch is queued on the
    // runtime's stream, the one every op of the step runs on.
    unsafe { lb_.launch(grid(t, d)) }
        .cuda_ctx("launching lora_swiglu_fwd")
        .map_err(crate::Error::into_candle)?;
    Ok(act)
}

/// `d[gate | up]` (`[T, 2I]`, fresh) from the saved forward values, `dab = dy W_d` and
/// `G_d`, `A_d`: `lora_swiglu_bwd_*`.
#[allow(clippy::too_many_arguments)]
fn launch_bwd(
    yb: &CudaStorage,
    h_gu: &CudaStorage,
    (sb, lb): (&CudaStorage, &Layout),
    dab: &CudaStorage,
    gd: &CudaStorage,
    (sa, la): (&CudaStorage, &Layout),
    t: usize,
    d: &MlpDims,
    s: f64,
) -> candle_core::Result<CudaStorage> {
    let dev = &yb.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let n = t * 2 * d.inter;
    let kernel = match yb.dtype() {
        DType::F16 => Kernel::LoraSwiGluBwdF16,
        DType::BF16 => Kernel::LoraSwiGluBwdBF16,
        dt => return Err(internal(OP_BWD, format!("dtype {dt:?} reached the kernel"))),
    };
    // The kernel writes every element of dgu ([T, 2I]).
    let dgu = alloc(OP_BWD, dev, yb.dtype(), n)?;
    check_len(OP_BWD, "yb", yb, t * 2 * d.inter)?;
    check_len(OP_BWD, "H", h_gu, t * 2 * d.r)?;
    check_view(OP_BWD, "B", sb, lb, 2 * d.inter * d.r)?;
    check_len(OP_BWD, "dy W_d", dab, t * d.inter)?;
    check_len(OP_BWD, "G_d", gd, t * d.r2)?;
    check_view(OP_BWD, "A_d", sa, la, d.r2 * d.inter)?;
    let (ybp, hp, bp, dabp, gdp, ap, dgup) = (
        ptr(OP_BWD, yb, 0, stream)?,
        ptr(OP_BWD, h_gu, 0, stream)?,
        ptr(OP_BWD, sb, lb.start_offset(), stream)?,
        ptr(OP_BWD, dab, 0, stream)?,
        ptr(OP_BWD, gd, 0, stream)?,
        ptr(OP_BWD, sa, la.start_offset(), stream)?,
        ptr(OP_BWD, &dgu, 0, stream)?,
    );
    let (rows, inter, r, r2, sf) = (t as i64, d.inter as i32, d.r as i32, d.r2 as i32, s as f32);
    let mut lb_ = stream.launch_builder(rt.function(kernel));
    lb_.arg(&ybp)
        .arg(&hp)
        .arg(&bp)
        .arg(&dabp)
        .arg(&gdp)
        .arg(&ap)
        .arg(&dgup)
        .arg(&rows)
        .arg(&inter)
        .arg(&r)
        .arg(&r2)
        .arg(&sf);
    // SAFETY: lora_swiglu_bwd_<t>(const T *yb, const T *h, const T *b, const T *dab,
    // const T *gd, const T *ad, T *dgu, long long rows, int inter, int r, int r2, float s): yb
    // holds rows · 2I elements, h rows · 2r, b 2I · r, dab rows · I, gd rows · r2, ad (from its
    // view's offset) r2 · I, dgu is a fresh allocation of rows · 2I (lengths checked above);
    // I % 8 == 0 and the ranks within 1..=LSW_MAX_RANK (`MlpDims::fits`); yb, dab and dgu are
    // whole pool allocations (dab: the down backward's packed buffer, dx at offset 0), so their
    // row starts are 16-byte aligned; dgu aliases nothing. The storages are held until the
    // launch is queued on the runtime's stream.
    unsafe { lb_.launch(grid(t, d)) }
        .cuda_ctx("launching lora_swiglu_bwd")
        .map_err(crate::Error::into_candle)?;
    Ok(dgu)
}

/// Checks that a whole storage holds at least `n` elements.
fn check_len(op: &str, what: &str, s: &CudaStorage, n: usize) -> candle_core::Result<()> {
    let len = match s.dtype() {
        DType::F16 => s.as_cuda_slice::<half::f16>()?.len(),
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.len(),
        dt => return Err(internal(op, format!("{what} is {dt:?}"))),
    };
    if len < n {
        return Err(internal(
            op,
            format!("{what} has {len} elements, needs {n}"),
        ));
    }
    Ok(())
}

/// Checks that a contiguous view holds `n` elements inside its storage.
fn check_view(
    op: &str,
    what: &str,
    s: &CudaStorage,
    l: &Layout,
    n: usize,
) -> candle_core::Result<()> {
    if !l.is_contiguous() || l.shape().elem_count() != n {
        return Err(internal(
            op,
            format!("{what} is not a contiguous {n}-element view"),
        ));
    }
    check_len(op, what, s, l.start_offset() + n)
}
