//! CUDA steps of the fused LoRA MLP ([`super::lora_swiglu_mlp`]): cuBLASLt GEMMs (the runtime's
//! one entry point) with every low-rank term folded into a frozen GEMM's reduction, around
//! `swiglu.cu`'s kernels writing padded rows.
//!
//! Sizes: `T` tokens, hidden `h`, intermediate `I`, ranks `r` (gate, up) and `r2` (down), `S`
//! spare elements ([`MLP_SPARE`]). The weights are stored padded ([`super::MlpWeights`]):
//! `WGU [2I + S, h + S]` holds `W_gu` in its top-left `[2I, h]`, and `WD [h + S, I + S]`
//! holds `W_d` likewise. A call writes the factors (in the base dtype) into the spare parts:
//! `B_g` and `B_u` block-diagonally into columns `h .. h + 2r` of gate's and up's rows (the
//! other block zeroed), `A_gu` into rows `2I .. 2I + 2r`; `B_d` into columns `I .. I + r2`,
//! `A_d` into rows `h .. h + r2`. The `B`s are written by the forward, which reads them, and
//! the `A`s by the backward, which reads them: no value crosses from one call to another.
//!
//! Forward:
//! 1. `XP [T, h + S]`: `x` copied into its first `h` columns; `s_gu · x A_guᵀ` into the next
//!    `2r` (one GEMM, `ldc = h + S`).
//! 2. `yb = XP[:, :h + 2r] · WGU[:2I, :h + 2r]ᵀ`: `x W_guᵀ` plus both low-rank terms, one GEMM.
//! 3. `ACTP [T, I + S]`: the SwiGLU kernel writes `act` into its first `I` columns; one GEMM
//!    writes `s_d · act A_dᵀ` into the next `r2`.
//! 4. `y = ACTP[:, :I + r2] · WD[:h, :I + r2]ᵀ`.
//!
//! Backward, from `dy [T, h]`:
//! 1. `DYP [T, h + S]`: `dy` copied in; `G_d = s_d · dy B_d` into the next `r2` columns.
//! 2. `dact = DYP[:, :h + r2] · WD[:h + r2, :I]` (`dy W_d + G_d A_d`, one GEMM).
//! 3. `dA_d = G_dᵀ act`, `dB_d = dyᵀ (s_d act A_dᵀ)`.
//! 4. `DGUP [T, 2I + S]`: the SwiGLU backward writes `d[gate | up]` into its first `2I`
//!    columns; `G_g = s_gu · d gate B_g` and `G_u` into the next `2r` (one GEMM each).
//! 5. `dx = DGUP[:, :2I + 2r] · WGU[:2I + 2r, :h]` (one GEMM), `dA_gu = G_guᵀ x`,
//!    `dB_g = d gateᵀ (s_gu x A_gᵀ)`, `dB_u` likewise.
//!
//! Kept from the forward: `yb` (the SwiGLU backward's input), `s_gu · x A_guᵀ` (`[T, 2r]`) and
//! `ACTP` (`act` and `s_d · act A_dᵀ`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::{CudaStorage, DType, Layout};
use std::sync::Arc;

use super::cuda;
use super::internal;
use super::mlp::{MlpDims, MLP_SPARE};
use crate::ops::rope::cuda::copy_rows_raw;
use crate::ops::swiglu::cuda as swiglu;
use crate::ops::swiglu::plan::SwiGluPlan;
use crate::runtime::cuda::{CudaRuntime, Kernel};
use crate::runtime::gemm::GemmParams;

const OP_FWD: &str = "lora_swiglu_mlp (cuda)";
const OP_BWD: &str = "lora_swiglu_mlp backward (cuda)";

/// The spare elements `S` after every row (and the spare rows) of the padded buffers.
const S: usize = MLP_SPARE;

/// What the forward keeps for the backward.
pub(crate) struct Saved {
    /// `x W_guᵀ` with the low-rank terms, `[T, 2I]`.
    yb: CudaStorage,
    /// `s_gu · x A_guᵀ`, `[T, 2r]`.
    h_gu: CudaStorage,
    /// `[T, I + S]`: the activation (down's input) in the first `I` columns, `s_d · act A_dᵀ`
    /// in the next `r2`.
    actp: CudaStorage,
    /// The factor packs in the base dtype, when the forward converted them from f32.
    ab: Option<(CudaStorage, CudaStorage)>,
}

/// The padded frozen weights (`[2I + S, h + S]` and `[h + S, I + S]`, contiguous) and scales.
pub(crate) struct Weights<'a> {
    pub w_gu: (&'a CudaStorage, &'a Layout),
    pub w_d: (&'a CudaStorage, &'a Layout),
    pub s_gu: f64,
    pub s_d: f64,
}

/// The element offsets of the four factors inside the packs whose contiguous data start at
/// `a0` and `b0`: `A_gu [2r, h]`, `A_d [r2, I]`, `B_gu [2I, r]`, `B_d [h, r2]`.
fn factor_offsets(d: &MlpDims, a0: usize, b0: usize) -> [usize; 4] {
    [a0, a0 + d.a_down(), b0, b0 + d.b_down()]
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

/// One plain column-major GEMM `C[m, n] = alpha · op(A) op(B) + beta · C` of the base dtype,
/// `C` in `c_dtype` (`None`: the base dtype).
#[allow(clippy::too_many_arguments)]
fn params(
    dtype: DType,
    c_dtype: Option<DType>,
    transa: bool,
    transb: bool,
    [m, n, k]: [usize; 3],
    [lda, ldb, ldc]: [usize; 3],
) -> GemmParams {
    GemmParams {
        dtype,
        c_dtype,
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
    }
}

/// The device addresses of one call's operands, with the element size of the base dtype.
struct Addr {
    size: u64,
}

impl Addr {
    /// Element `off` of the storage `s` (of the base dtype, or f32 for `f32` buffers).
    fn at(
        &self,
        op: &str,
        s: &CudaStorage,
        off: usize,
        stream: &Arc<CudaStream>,
    ) -> candle_core::Result<u64> {
        let base = crate::runtime::offload::slice_ptr(&s.slice, stream)
            .ok_or_else(|| internal(op, format!("no device address for {:?}", s.dtype())))?;
        Ok(base + (off * s.dtype().size_in_bytes()) as u64)
    }

    /// `elems` elements of the base dtype past `ptr`.
    fn plus(&self, ptr: u64, elems: usize) -> u64 {
        ptr + elems as u64 * self.size
    }
}

/// The row copy kernel of the base dtype.
fn copy_kernel(op: &str, dtype: DType) -> candle_core::Result<Kernel> {
    match dtype {
        DType::F16 => Ok(Kernel::RopeCopyRowsF16),
        DType::BF16 => Ok(Kernel::RopeCopyRowsBF16),
        dt => Err(internal(op, format!("dtype {dt:?} reached the fused MLP"))),
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

/// Elements of a whole storage.
fn len(s: &CudaStorage) -> candle_core::Result<usize> {
    Ok(match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.len(),
        DType::F16 => s.as_cuda_slice::<half::f16>()?.len(),
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.len(),
        dt => {
            return Err(internal(
                OP_FWD,
                format!("a {dt:?} buffer in the fused MLP"),
            ))
        }
    })
}

/// Checks that a padded weight is the contiguous `[rows + S, cols + S]` [`super::MlpWeights`]
/// made, of `dtype`, and returns the element offset it starts at.
fn padded_weight(
    op: &str,
    what: &str,
    (s, l): (&CudaStorage, &Layout),
    (rows, cols): (usize, usize),
    dtype: DType,
) -> candle_core::Result<usize> {
    let want = [rows + S, cols + S];
    match l.contiguous_offsets() {
        Some((start, end))
            if l.dims() == want && s.dtype() == dtype && end <= len(s)? && end > start =>
        {
            Ok(start)
        }
        _ => Err(internal(
            op,
            format!(
                "{what} is {:?} {:?} (contiguous: {}), expected a contiguous padded {want:?} of \
                 {dtype:?}",
                l.dims(),
                s.dtype(),
                l.is_contiguous()
            ),
        )),
    }
}

/// Checks that a contiguous `[rows, cols]` operand of `dtype` lies in its storage; its offset.
fn operand(
    op: &str,
    what: &str,
    (s, l): (&CudaStorage, &Layout),
    (rows, cols): (usize, usize),
    dtype: DType,
) -> candle_core::Result<usize> {
    match l.contiguous_offsets() {
        Some((start, end)) if l.dims() == [rows, cols] && s.dtype() == dtype && end <= len(s)? => {
            Ok(start)
        }
        _ => Err(internal(
            op,
            format!(
                "{what} is {:?} {:?}, expected a contiguous [{rows}, {cols}] of {dtype:?}",
                l.dims(),
                s.dtype()
            ),
        )),
    }
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
    let (h, inter, r, r2) = (d.hidden, d.inter, d.r, d.r2);
    let t = x.1.dims().first().copied().unwrap_or(0);
    let x_off = operand(OP_FWD, "x", x, (t, h), dtype)?;
    let wgu_off = padded_weight(OP_FWD, "the gate/up weight", w.w_gu, (2 * inter, h), dtype)?;
    let wd_off = padded_weight(OP_FWD, "the down weight", w.w_d, (h, inter), dtype)?;
    let ab = cuda::cast_pair(a, b, dtype)?;
    if ab.is_none() && a.0.dtype() != dtype {
        return Err(internal(
            OP_FWD,
            format!("factors of {:?} on a {dtype:?} base", a.0.dtype()),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, ab.as_ref())?;
    let [a_gu, a_d, b_gu, b_d] = factor_offsets(d, a0, b0);
    let dev = &x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let ad = Addr {
        size: dtype.size_in_bytes() as u64,
    };
    let copy = copy_kernel(OP_FWD, dtype)?;
    let (ldgu, ldd, ldx, ldact) = (h + S, inter + S, h + S, inter + S);

    // Every element of XP that a GEMM reads is written first: columns 0..h by the copy,
    // h..h + 2r by the H GEMM; the rest of each row is never read.
    let xp = alloc(OP_FWD, dev, dtype, t * ldx)?;
    // SAFETY (of `h_gu`, `yb`, `y`): each is written in full by its GEMM (beta = 0) below.
    let h_gu = alloc(OP_FWD, dev, dtype, t * 2 * r)?;
    let yb = alloc(OP_FWD, dev, dtype, t * 2 * inter)?;
    let y = alloc(OP_FWD, dev, dtype, t * h)?;
    // Two zeros for the off-diagonal blocks of the B columns (read with row stride 0).
    let zeros = zeros(OP_FWD, dev, dtype, r)?;
    let gemm = rt.gemm();
    let (xa, wgu, wd) = (
        ad.at(OP_FWD, x.0, x_off, stream)?,
        ad.at(OP_FWD, w.w_gu.0, wgu_off, stream)?,
        ad.at(OP_FWD, w.w_d.0, wd_off, stream)?,
    );
    let (sa_, sb_) = (ad.at(OP_FWD, sa, 0, stream)?, ad.at(OP_FWD, sb, 0, stream)?);
    let (xpa, hgua, yba, ya, za) = (
        ad.at(OP_FWD, &xp, 0, stream)?,
        ad.at(OP_FWD, &h_gu, 0, stream)?,
        ad.at(OP_FWD, &yb, 0, stream)?,
        ad.at(OP_FWD, &y, 0, stream)?,
        ad.at(OP_FWD, &zeros, 0, stream)?,
    );
    // SAFETY (the five copies): every source and destination row lies in its allocation (the
    // padded weights are [2I + S, h + S] and [h + S, I + S], checked above, and r, r2 <= S by
    // `MlpDims::fits`; B_g, B_u, B_d are the packs' [I, r], [I, r], [h, r2] pieces; XP is
    // [T, h + S]); sources and destinations are different buffers, the rows written do not
    // overlap; the storages are borrowed by this function's callers (the weights by the op,
    // which keeps them) until the launches are queued on the runtime's stream, where every
    // later read of them is queued too.
    unsafe {
        // B_g into gate's rows, columns h..h + r, zeros beside it; B_u into up's rows,
        // columns h + r..h + 2r, zeros before it.
        copy_rows_raw(
            &rt,
            copy,
            ad.plus(sb_, b_gu),
            ad.plus(wgu, h),
            [inter, r, r, ldgu],
        )?;
        copy_rows_raw(&rt, copy, za, ad.plus(wgu, h + r), [inter, r, 0, ldgu])?;
        copy_rows_raw(
            &rt,
            copy,
            za,
            ad.plus(wgu, inter * ldgu + h),
            [inter, r, 0, ldgu],
        )?;
        copy_rows_raw(
            &rt,
            copy,
            ad.plus(sb_, b_gu + inter * r),
            ad.plus(wgu, inter * ldgu + h + r),
            [inter, r, r, ldgu],
        )?;
        // B_d into down's columns I..I + r2.
        copy_rows_raw(
            &rt,
            copy,
            ad.plus(sb_, b_d),
            ad.plus(wd, inter),
            [h, r2, r2, ldd],
        )?;
        // x into XP's first h columns.
        copy_rows_raw(&rt, copy, xa, xpa, [t, h, h, ldx])?;
    }
    let s_gu = w.s_gu as f32;
    // H_guᵀ[2r, T] = s_gu · A_gu[2r, h] · Xᵀ[h, T] into XP's columns h..: A's buffer is A_guᵀ
    // (h × 2r, ld h), so transa; X's is Xᵀ (h × T, ld h); C is XP's columns (ld h + S).
    let p_h = params(dtype, None, true, false, [2 * r, t, h], [h, h, ldx]);
    // yb ᵀ[2I, T] = WGU[2I, h + 2r] · XPᵀ[h + 2r, T]: WGU's buffer read column-major is WGUᵀ
    // (ld h + S), so transa; XP's is XPᵀ (ld h + S).
    let p_yb = params(
        dtype,
        None,
        true,
        false,
        [2 * inter, t, h + 2 * r],
        [ldgu, ldx, 2 * inter],
    );
    // SAFETY: A_gu (2r · h elements from `a_gu`), X (T · h) and XP's columns h..h + 2r of its
    // T rows; then WGU's rows 0..2I, columns 0..h + 2r (written: the weight, and the B blocks
    // just above), XP's columns 0..h + 2r (the copy and the H GEMM above) and yb (T · 2I,
    // fresh): all inside their allocations (checked), ordered on the runtime's stream; the
    // storages stay borrowed until the GEMMs are queued.
    unsafe {
        gemm.matmul(&p_h, ad.plus(sa_, a_gu), xa, ad.plus(xpa, h), s_gu, 0.0)
            .map_err(crate::Error::into_candle)?;
        gemm.matmul(&p_yb, wgu, xpa, yba, 1.0, 0.0)
            .map_err(crate::Error::into_candle)?;
        // The forward's H (with its scale) for the backward: XP's columns h..h + 2r, compact.
        copy_rows_raw(&rt, copy, ad.plus(xpa, h), hgua, [t, 2 * r, ldx, 2 * r])?;
    }
    drop(xp);
    // act into ACTP's first I columns (rows I + S apart; the rest written below or never read).
    let plan = SwiGluPlan::packed(&Layout::contiguous((t, 2 * inter)))?.padded(S);
    let actp = swiglu::fwd(&yb, &yb, &plan)?;
    let acta = ad.at(OP_FWD, &actp, 0, stream)?;
    let s_d = w.s_d as f32;
    // H_dᵀ[r2, T] = s_d · A_d[r2, I] · ACTᵀ[I, T] into ACTP's columns I..: transa as above.
    let p_hd = params(
        dtype,
        None,
        true,
        false,
        [r2, t, inter],
        [inter, ldact, ldact],
    );
    // yᵀ[h, T] = WD[h, I + r2] · ACTPᵀ[I + r2, T]: transa as for yb.
    let p_y = params(
        dtype,
        None,
        true,
        false,
        [h, t, inter + r2],
        [ldd, ldact, h],
    );
    // SAFETY: A_d (r2 · I from `a_d`), ACTP (T rows of I + S: act written by the SwiGLU kernel
    // queued above, columns I..I + r2 written by the first GEMM), WD's rows 0..h, columns
    // 0..I + r2 (the weight and B_d, written above) and y (T · h, fresh): inside their
    // allocations, ordered on the runtime's stream, borrowed until queued.
    unsafe {
        gemm.matmul(
            &p_hd,
            ad.plus(sa_, a_d),
            acta,
            ad.plus(acta, inter),
            s_d,
            0.0,
        )
        .map_err(crate::Error::into_candle)?;
        gemm.matmul(&p_y, wd, acta, ya, 1.0, 0.0)
            .map_err(crate::Error::into_candle)?;
    }
    Ok((y, Saved { yb, h_gu, actp, ab }))
}

/// `n` zeros of `dtype` (at least one element).
fn zeros(
    op: &str,
    dev: &candle_core::CudaDevice,
    dtype: DType,
    n: usize,
) -> candle_core::Result<CudaStorage> {
    let n = n.max(1);
    Ok(match dtype {
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::f16>(n)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(n)?, dev.clone()),
        dt => return Err(internal(op, format!("dtype {dt:?} reached the fused MLP"))),
    })
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
    let (h, inter, r, r2) = (d.hidden, d.inter, d.r, d.r2);
    let t = x.1.dims().first().copied().unwrap_or(0);
    let x_off = operand(OP_BWD, "x", x, (t, h), dtype)?;
    let dy_off = operand(OP_BWD, "dy", dy, (t, h), dtype)?;
    let wgu_off = padded_weight(OP_BWD, "the gate/up weight", w.w_gu, (2 * inter, h), dtype)?;
    let wd_off = padded_weight(OP_BWD, "the down weight", w.w_d, (h, inter), dtype)?;
    for (what, s, n) in [
        ("yb", &saved.yb, t * 2 * inter),
        ("H", &saved.h_gu, t * 2 * r),
        ("act", &saved.actp, t * (inter + S)),
    ] {
        if s.dtype() != dtype || len(s)? < n {
            return Err(internal(
                OP_BWD,
                format!("the saved {what} is not {n} elements of {dtype:?}"),
            ));
        }
    }
    let split = a.0.dtype() != dtype;
    if split && saved.ab.is_none() {
        return Err(internal(
            OP_BWD,
            "f32 factors but the forward kept no converted pair".into(),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, saved.ab.as_ref())?;
    let [a_gu, a_d, b_gu, b_d] = factor_offsets(d, a0, b0);
    let fdt = if split { DType::F32 } else { dtype };
    let fsize = fdt.size_in_bytes() as u64;
    let fc = split.then_some(DType::F32);
    let dev = &x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let ad = Addr {
        size: dtype.size_in_bytes() as u64,
    };
    let copy = copy_kernel(OP_BWD, dtype)?;
    let (ldgu, ldd, ldy, ldact, ldg) = (h + S, inter + S, h + S, inter + S, 2 * inter + S);
    // Every piece of the buffer the caller reads (the four factor gradients, at the offsets of
    // `MlpDims`) is written in full by a GEMM with beta = 0 below; the padding between the two
    // packs' pieces is never read (the caller takes the pieces as views).
    let factors = alloc(OP_BWD, dev, fdt, d.grad_len())?;
    // Every element of DYP a GEMM reads is written first: columns 0..h by the copy, h..h + r2
    // by the G_d GEMM. dact is written in full by its GEMM (beta = 0).
    let dyp = alloc(OP_BWD, dev, dtype, t * ldy)?;
    let dact = alloc(OP_BWD, dev, dtype, t * inter)?;
    let dx = if need_dx {
        // Written in full by the dx GEMM (beta = 0).
        Some(alloc(OP_BWD, dev, dtype, t * h)?)
    } else {
        None
    };
    let gemm = rt.gemm();
    let (xa, dya, wgu, wd) = (
        ad.at(OP_BWD, x.0, x_off, stream)?,
        ad.at(OP_BWD, dy.0, dy_off, stream)?,
        ad.at(OP_BWD, w.w_gu.0, wgu_off, stream)?,
        ad.at(OP_BWD, w.w_d.0, wd_off, stream)?,
    );
    let (sa_, sb_) = (ad.at(OP_BWD, sa, 0, stream)?, ad.at(OP_BWD, sb, 0, stream)?);
    let (dypa, dacta, acta, hgua, fa) = (
        ad.at(OP_BWD, &dyp, 0, stream)?,
        ad.at(OP_BWD, &dact, 0, stream)?,
        ad.at(OP_BWD, &saved.actp, 0, stream)?,
        ad.at(OP_BWD, &saved.h_gu, 0, stream)?,
        ad.at(OP_BWD, &factors, 0, stream)?,
    );
    let f_at = |off: usize| fa + off as u64 * fsize;
    // SAFETY (the three copies): A_gu ([2r, h] from `a_gu`) into WGU's rows 2I..2I + 2r,
    // columns 0..h; A_d ([r2, I]) into WD's rows h..h + r2, columns 0..I (2r, r2 <= S:
    // `MlpDims::fits`); dy into DYP's first h columns: every row inside its allocation
    // (checked above), sources and destinations different buffers, rows written disjoint;
    // borrowed until queued on the runtime's stream.
    unsafe {
        copy_rows_raw(
            &rt,
            copy,
            ad.plus(sa_, a_gu),
            ad.plus(wgu, 2 * inter * ldgu),
            [2 * r, h, h, ldgu],
        )?;
        copy_rows_raw(
            &rt,
            copy,
            ad.plus(sa_, a_d),
            ad.plus(wd, h * ldd),
            [r2, inter, inter, ldd],
        )?;
        copy_rows_raw(&rt, copy, dya, dypa, [t, h, h, ldy])?;
    }
    let (s_gu, s_d) = (w.s_gu as f32, w.s_d as f32);
    // G_dᵀ[r2, T] = s_d · B_dᵀ[r2, h] · dyᵀ[h, T] into DYP's columns h..: B_d's buffer read
    // column-major is B_dᵀ (r2 × h, ld r2), dy's is dyᵀ (ld h).
    let p_gd = params(dtype, None, false, false, [r2, t, h], [r2, h, ldy]);
    // dactᵀ[I, T] = [W_d ; A_d]ᵀ[I, h + r2] · DYPᵀ[h + r2, T]: WD's buffer read column-major
    // is WDᵀ (ld I + S): its first h + r2 rows, I columns, no transpose.
    let p_dact = params(
        dtype,
        None,
        false,
        false,
        [inter, t, h + r2],
        [ldd, ldy, inter],
    );
    // dA_dᵀ[I, r2] = ACTᵀ[I, T] · G_d[T, r2]: ACTP's buffer is ACTᵀ (ld I + S); G_d's columns
    // of DYP read column-major are G_dᵀ (ld h + S), so transb.
    let p_dad = params(dtype, fc, false, true, [inter, r2, t], [ldact, ldy, inter]);
    // dB_dᵀ[r2, h] = (s_d H_d)ᵀ[r2, T] · dy[T, h]: ACTP's columns I.. are (s_d H_d)ᵀ (ld I + S);
    // dy's buffer is dyᵀ (ld h), so transb.
    let p_dbd = params(dtype, fc, false, true, [r2, h, t], [ldact, h, r2]);
    // SAFETY: B_d (h · r2 from `b_d`), dy (T · h), DYP's columns h..h + r2; then WD's rows
    // 0..h + r2, columns 0..I (the weight and A_d, written above), DYP's columns 0..h + r2
    // (the copy and the G_d GEMM), dact (T · I, fresh); ACTP (the forward's, T rows of I + S)
    // with DYP's G_d columns into dA_d's piece (r2 · I of the factor dtype at `a_down`), and
    // ACTP's H_d columns with dy into dB_d's piece (h · r2 at `b_start + b_down`): all inside
    // their allocations, the factor pieces disjoint and 16-element aligned (`MlpDims`), with
    // f32 C only as bf16/f16 A, B into f32 C/D, which cuBLASLt supports with
    // CUBLAS_COMPUTE_32F; ordered on the runtime's stream, borrowed until queued.
    unsafe {
        gemm.matmul(&p_gd, ad.plus(sb_, b_d), dya, ad.plus(dypa, h), s_d, 0.0)
            .map_err(crate::Error::into_candle)?;
        gemm.matmul(&p_dact, wd, dypa, dacta, 1.0, 0.0)
            .map_err(crate::Error::into_candle)?;
        gemm.matmul(&p_dad, acta, ad.plus(dypa, h), f_at(d.a_down()), 1.0, 0.0)
            .map_err(crate::Error::into_candle)?;
        gemm.matmul(
            &p_dbd,
            ad.plus(acta, inter),
            dya,
            f_at(d.b_start() + d.b_down()),
            1.0,
            0.0,
        )
        .map_err(crate::Error::into_candle)?;
    }
    drop(dyp);
    // d[gate | up] into DGUP's first 2I columns (rows 2I + S apart).
    let plan = SwiGluPlan::packed(&Layout::contiguous((t, 2 * inter)))?.padded(S);
    let dgup = swiglu::bwd(
        &saved.yb,
        &saved.yb,
        &dact,
        &Layout::contiguous((t, inter)),
        &plan,
    )?;
    drop(dact);
    let dga = ad.at(OP_BWD, &dgup, 0, stream)?;
    // G_gᵀ[r, T] = s_gu · B_gᵀ[r, I] · d gateᵀ[I, T] into DGUP's columns 2I + g · r..: B_g's
    // buffer is B_gᵀ (ld r), d gate's columns of DGUP are d gateᵀ (ld 2I + S).
    let p_g = params(dtype, None, false, false, [r, t, inter], [r, ldg, ldg]);
    // dxᵀ[h, T] = [W_gu ; A_gu]ᵀ[h, 2I + 2r] · DGUPᵀ[2I + 2r, T]: WGU's buffer read
    // column-major is WGUᵀ (ld h + S): its first 2I + 2r rows, h columns.
    let p_dx = params(
        dtype,
        None,
        false,
        false,
        [h, t, 2 * inter + 2 * r],
        [ldgu, ldg, h],
    );
    // dA_guᵀ[h, 2r] = Xᵀ[h, T] · G_gu[T, 2r]: G's columns of DGUP read column-major are G_guᵀ
    // (ld 2I + S), so transb.
    let p_dagu = params(dtype, fc, false, true, [h, 2 * r, t], [h, ldg, h]);
    // dB_gᵀ[r, I] = (s_gu H_g)ᵀ[r, T] · d gate[T, I]: the saved H's columns g · r.. are
    // (s_gu H_g)ᵀ (ld 2r); d gate's columns of DGUP read column-major are d gateᵀ, so transb.
    let p_db = params(dtype, fc, false, true, [r, inter, t], [2 * r, ldg, r]);
    // SAFETY: B_g, B_u (I · r each from `b_gu`), DGUP (T rows of 2I + S: d[gate | up] written
    // by the SwiGLU backward queued above, columns 2I..2I + 2r by the G GEMMs), WGU's rows
    // 0..2I + 2r, columns 0..h (the weight and A_gu, written above), x (T · h), the saved H
    // (T · 2r), the fresh dx (T · h) and the factor pieces dA_gu (2r · h at 0) and dB_gu
    // (2I · r at `b_start`), disjoint and aligned as for down's: all inside their allocations,
    // with the same supported f32 C; ordered on the runtime's stream, borrowed until queued.
    unsafe {
        for g in 0..2 {
            gemm.matmul(
                &p_g,
                ad.plus(sb_, b_gu + g * inter * r),
                ad.plus(dga, g * inter),
                ad.plus(dga, 2 * inter + g * r),
                s_gu,
                0.0,
            )
            .map_err(crate::Error::into_candle)?;
        }
        if let Some(dx) = &dx {
            let dxa = ad.at(OP_BWD, dx, 0, stream)?;
            gemm.matmul(&p_dx, wgu, dga, dxa, 1.0, 0.0)
                .map_err(crate::Error::into_candle)?;
        }
        gemm.matmul(&p_dagu, xa, ad.plus(dga, 2 * inter), f_at(0), 1.0, 0.0)
            .map_err(crate::Error::into_candle)?;
        for g in 0..2 {
            gemm.matmul(
                &p_db,
                ad.plus(hgua, g * r),
                ad.plus(dga, g * inter),
                f_at(d.b_start() + g * inter * r),
                1.0,
                0.0,
            )
            .map_err(crate::Error::into_candle)?;
        }
    }
    Ok(Grads { dx, factors })
}
