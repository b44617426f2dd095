//! CUDA launchers of the fused LoRA linear ([`super`]): cuBLASLt GEMMs through the
//! runtime's one entry point, [`crate::runtime::gemm::Gemm::matmul`].
//!
//! Candle's tensors are row-major and cuBLASLt is column-major: a row-major `[rows, cols]`
//! buffer read column-major is the transpose, `[cols, rows]` with leading dimension `cols`. So
//! a row-major `C = P · Q` is issued as the column-major `Cᵀ = Qᵀ · Pᵀ`, and an operand that
//! appears transposed in the row-major formula (`Wᵀ` in `x Wᵀ`) is read with the transpose
//! flag set. Each call below states the column-major product it issues.
//!
//! Every operand is contiguous (the op makes them so) and every size is at least 1 (the public
//! function sends degenerate shapes to the composite path); both are checked here again.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};

use super::plan::{Needs, Packed, OP};
use crate::ops::contiguous_range;
use crate::ops::cuda::rows::input;
use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};
use crate::runtime::gemm::GemmParams;

const OP_FWD: &str = "lora_linear (cuda)";
const OP_BWD: &str = "lora_linear backward (cuda)";

/// The forward's operands: `x: [T, in]`, `a: [G · r, in]`, `b: [out, r]`, `w: [out, in]`,
/// `bias: [out]`, all of one dtype, contiguous; `splits` the `G` output blocks (summing to
/// `out`), block `g` taking `A`'s rows `g · r ..` (see [`super::lora_linear_grouped`]).
pub(crate) struct FwdArgs<'a> {
    pub x: (&'a CudaStorage, &'a Layout),
    pub a: (&'a CudaStorage, &'a Layout),
    pub b: (&'a CudaStorage, &'a Layout),
    pub w: (&'a CudaStorage, &'a Layout),
    pub bias: Option<(&'a CudaStorage, &'a Layout)>,
    pub scale: f64,
    /// The output blocks, one per projection (`[out]` for one).
    pub splits: &'a [usize],
}

/// The backward's operands: `x: [T, in]`, `dy: [T, out]`, `a: [G · r, in]`, `w: [out, in]`,
/// `b: [out, r]` (`splits` as in [`FwdArgs`]), all of one dtype (`A` and `B` already converted
/// to it when the factors are f32 on a half base), contiguous; which gradients to compute and
/// where they go.
pub(crate) struct BwdArgs<'a> {
    pub x: (&'a CudaStorage, &'a Layout),
    pub dy: (&'a CudaStorage, &'a Layout),
    pub a: (&'a CudaStorage, &'a Layout),
    pub w: (&'a CudaStorage, &'a Layout),
    pub b: (&'a CudaStorage, &'a Layout),
    pub scale: f64,
    pub need: Needs,
    /// Where the gradients go. When it is split (f32 factors on an f16/bf16 base), `dA` and `dB`
    /// are written in f32 straight from their GEMMs into a second, f32 buffer.
    pub packed: Packed,
    /// `H = x Aᵀ` (`[T, G · r]`, contiguous, the dtype of `x`) as the forward computed it, if it
    /// kept it; recomputed when `None` and `dB` is needed.
    pub h: Option<&'a CudaStorage>,
    /// The factors' gradients are f32 in a buffer of their own (see `packed`).
    pub split: bool,
    /// The output blocks, one per projection (`[out]` for one).
    pub splits: &'a [usize],
}

fn internal(op: &str, msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: internal error: {msg}"))
}

/// `(rows, cols)` of a contiguous 2-D operand, and its start offset; errors name `what`.
fn matrix(op: &'static str, what: &str, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (start, _) = contiguous_range(op, l)?;
    match *l.dims() {
        [rows, cols] if rows > 0 && cols > 0 => Ok((rows, cols, start)),
        _ => Err(internal(
            op,
            format!("{what} must be a non-empty matrix, got {:?}", l.dims()),
        )),
    }
}

/// Checks that `what` is `[rows, cols]`.
fn expect(
    op: &str,
    what: &str,
    got: (usize, usize),
    want: (usize, usize),
) -> candle_core::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(internal(
            op,
            format!("{what} is {got:?}, expected {want:?}"),
        ))
    }
}

/// One plain (batch 1) column-major GEMM: `C[m, n] = alpha · op(A) op(B) + beta · C`, `C` of
/// the operands' dtype.
#[allow(clippy::too_many_arguments)]
fn params(
    dtype: DType,
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
) -> GemmParams {
    GemmParams {
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
    }
}

/// The output blocks `(g, first row of B, rows)` of `splits`, checked to be at least one
/// nonempty block and to sum to `out`.
fn blocks(
    op: &str,
    splits: &[usize],
    out: usize,
) -> candle_core::Result<Vec<(usize, usize, usize)>> {
    let mut start = 0;
    let mut v = Vec::with_capacity(splits.len());
    for (g, &n) in splits.iter().enumerate() {
        if n == 0 {
            return Err(internal(op, format!("empty output block in {splits:?}")));
        }
        v.push((g, start, n));
        start += n;
    }
    if start != out || v.is_empty() {
        return Err(internal(
            op,
            format!("output blocks {splits:?} do not sum to {out}"),
        ));
    }
    Ok(v)
}

fn slice<T: CudaDType>(s: &CudaStorage) -> candle_core::Result<&CudaSlice<T>> {
    s.as_cuda_slice::<T>()
}

/// `y = x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ` as a fresh contiguous `[T, out]` storage, and `H = x Aᵀ`
/// (`[T, r]`), which the backward reuses instead of recomputing it.
///
/// Order: `H = X Aᵀ` first, then the low-rank product written into `Y` (`beta = 0`; with a bias,
/// accumulated onto `Y` filled with the bias), and last the base GEMM `Y = X Wᵀ + 1 · Y`: the
/// big GEMM reads `C` in its epilogue, where the read overlaps its compute, instead of a
/// separate read-modify-write pass of `Y` by the (memory-bound) low-rank GEMM.
pub(crate) fn fwd(args: FwdArgs<'_>) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    let dtype = args.x.0.dtype();
    for (what, s) in [
        ("lora_a", args.a.0),
        ("lora_b", args.b.0),
        ("weight", args.w.0),
    ]
    .into_iter()
    .chain(args.bias.map(|b| ("bias", b.0)))
    {
        if s.dtype() != dtype {
            return Err(internal(
                OP_FWD,
                format!("{what} is {:?}, x is {dtype:?}", s.dtype()),
            ));
        }
    }
    match dtype {
        DType::F32 => fwd_t::<f32>(DType::F32, &args),
        DType::F16 => fwd_t::<half::f16>(DType::F16, &args),
        DType::BF16 => fwd_t::<half::bf16>(DType::BF16, &args),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP}: unsupported dtype {dt:?} on CUDA (f32, f16 and bf16 are)"
        ))),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr>(
    dtype: DType,
    args: &FwdArgs<'_>,
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    let (t, inf, x_off) = matrix(OP_FWD, "x", args.x.1)?;
    let (ra, a_in, a_off) = matrix(OP_FWD, "lora_a", args.a.1)?;
    let (out, r, b_off) = matrix(OP_FWD, "lora_b", args.b.1)?;
    let (w_out, w_in, w_off) = matrix(OP_FWD, "weight", args.w.1)?;
    let groups = blocks(OP_FWD, args.splits, out)?;
    expect(OP_FWD, "lora_a", (ra, a_in), (groups.len() * r, inf))?;
    expect(OP_FWD, "weight", (w_out, w_in), (out, inf))?;
    if let Some((_, lbias)) = args.bias {
        contiguous_range(OP_FWD, lbias)?;
        if lbias.dims() != [out] {
            return Err(internal(
                OP_FWD,
                format!("bias is {:?}, expected [{out}]", lbias.dims()),
            ));
        }
    }

    let dev = &args.x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let size = std::mem::size_of::<T>() as u64;
    let (xs, as_, bs, ws) = (
        slice::<T>(args.x.0)?,
        slice::<T>(args.a.0)?,
        slice::<T>(args.b.0)?,
        slice::<T>(args.w.0)?,
    );

    // SAFETY: every element of `y` is written before it is read: with a bias, by the broadcast
    // copy below (then the low-rank GEMM reads it with beta = 1); without, by the low-rank GEMM
    // with beta = 0, which does not read C. The base GEMM (beta = 1) comes after either.
    let y = unsafe { dev.alloc::<T>(t * out) }?;
    let mut y = CudaStorage::wrap_cuda_slice(y, dev.clone());
    let beta_low = match args.bias {
        Some((bias, lbias)) => {
            // Y starts as the bias broadcast over the rows, and the low-rank GEMM accumulates
            // onto it. The copy is Candle's `copy2d` kernel with a source row stride of 0 (one
            // launch, no host-to-device transfer of strides); it indexes with u32, so a larger
            // output takes Candle's general strided copy. Both run on Candle's stream, which
            // is the runtime's.
            if t.checked_mul(out).is_some_and(|n| n <= u32::MAX as usize) {
                bias.copy2d(&mut y, t, out, 0, out, lbias.start_offset(), 0)?;
            } else {
                bias.copy_strided_src(&mut y, 0, &lbias.broadcast_as((t, out))?)?;
            }
            1.0
        }
        None => 0.0,
    };
    // SAFETY: every element of `h` is written by the first GEMM (beta = 0) before the second
    // reads it (and before the backward, which may reuse it, can run).
    let mut h = unsafe { dev.alloc::<T>(t * ra) }?;
    {
        let ys = y.as_cuda_slice_mut::<T>()?;
        let (xp, _gx) = xs.device_ptr(stream);
        let (ap, _ga) = as_.device_ptr(stream);
        let (bp, _gb) = bs.device_ptr(stream);
        let (wp, _gw) = ws.device_ptr(stream);
        let (yp, _gy) = ys.device_ptr_mut(stream);
        let (hp, _gh) = h.device_ptr_mut(stream);
        let (xp, ap, bp, wp) = (
            xp + x_off as u64 * size,
            ap + a_off as u64 * size,
            bp + b_off as u64 * size,
            wp + w_off as u64 * size,
        );
        let gemm = rt.gemm();
        // Hᵀ[ra, T] = A[ra, in] · Xᵀ[in, T]: A's buffer is Aᵀ (in × ra, ld in), so transa; X's
        // buffer is Xᵀ (in × T, ld in). Both operands are K-major (the "TN" layout). One GEMM
        // for every group (ra = G · r): x is read once.
        let p_h = params(dtype, true, false, ra, t, inf, inf, inf, ra);
        // SAFETY: A (ra·in elements from `a_off`), X (T·in from `x_off`) and H (T·ra, fresh,
        // disjoint from both) are contiguous buffers of `T` on this runtime's device, exactly
        // covering what the params address (checked dims above). All are ordered on the
        // runtime's stream (Candle's), and the guards keep them borrowed until the GEMM has
        // been queued.
        unsafe { gemm.matmul(&p_h, ap, xp, hp, 1.0, 0.0) }.map_err(crate::Error::into_candle)?;
        for &(g, first, n) in &groups {
            // Yᵀ[first.., T] (+)= s · B_g[n, r] · H_gᵀ[r, T]: B's rows `first..` read as Bᵀ
            // (r × n, ld r), so transa; H's columns `g·r..` as H_gᵀ (r × T, ld ra); Y's columns
            // `first..` as rows of Yᵀ (ld out). beta = 0 (or 1 onto the bias).
            let p_low = params(dtype, true, false, n, t, r, r, ra, out);
            let (bg, hg, yg) = (
                bp + (first * r) as u64 * size,
                hp + (g * r) as u64 * size,
                yp + first as u64 * size,
            );
            // SAFETY: B's rows first..first+n (n·r elements from `b_off + first·r`), H's columns
            // g·r..g·r+r of its T rows (ld ra, written by the GEMM queued before on the same
            // stream) and Y's columns first..first+n of its T rows (ld out; fresh, disjoint from
            // B and H; with beta = 1 it holds the bias copy queued before) on this device,
            // inside the buffers (the blocks sum to out, checked); guards held.
            unsafe { gemm.matmul(&p_low, bg, hg, yg, args.scale as f32, beta_low) }
                .map_err(crate::Error::into_candle)?;
        }
        // Yᵀ[out, T] = W[out, in] · Xᵀ[in, T] + 1 · Yᵀ: W's buffer read column-major is Wᵀ
        // (in × out, ld in), so transa; X's buffer is Xᵀ (in × T, ld in). The low-rank part
        // (and the bias) already in Y is added in the epilogue.
        let p_base = params(dtype, true, false, out, t, inf, inf, inf, out);
        // SAFETY: W (out·in from `w_off`), X (T·in) and Y (T·out, disjoint from both, fully
        // written by the GEMM queued before on this stream) on this device, covering exactly
        // what the params address; same stream, guards held.
        unsafe { gemm.matmul(&p_base, wp, xp, yp, 1.0, 1.0) }.map_err(crate::Error::into_candle)?;
    }
    Ok((y, CudaStorage::wrap_cuda_slice(h, dev.clone())))
}

/// The gradient buffers of the backward: the base-dtype one (`dx`, and `dA`, `dB` unless split)
/// and the f32 one (`dA`, `dB` when split), each made only when it holds something.
pub(crate) struct BwdOut {
    pub base: Option<CudaStorage>,
    pub factors: Option<CudaStorage>,
}

/// The backward: `dx = dy W + G A`, `dA = Gᵀ x`, `dB = s · dyᵀ H` with `G = s · dy B` and
/// `H = x Aᵀ` (the forward's, or recomputed), each computed only when needed, into fresh
/// buffers laid out as `args.packed`.
pub(crate) fn bwd(args: BwdArgs<'_>) -> candle_core::Result<BwdOut> {
    let dtype = args.x.0.dtype();
    for (what, s) in [
        ("dy", args.dy.0),
        ("lora_a", args.a.0),
        ("weight", args.w.0),
        ("lora_b", args.b.0),
    ]
    .into_iter()
    .chain(args.h.map(|h| ("saved H", h)))
    {
        if s.dtype() != dtype {
            return Err(internal(
                OP_BWD,
                format!("{what} is {:?}, x is {dtype:?}", s.dtype()),
            ));
        }
    }
    match dtype {
        DType::F32 => bwd_t::<f32>(DType::F32, &args),
        DType::F16 => bwd_t::<half::f16>(DType::F16, &args),
        DType::BF16 => bwd_t::<half::bf16>(DType::BF16, &args),
        dt => Err(candle_core::Error::Msg(format!(
            "{OP}: unsupported dtype {dt:?} on CUDA (f32, f16 and bf16 are)"
        ))),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr>(
    dtype: DType,
    args: &BwdArgs<'_>,
) -> candle_core::Result<BwdOut> {
    let (t, inf, x_off) = matrix(OP_BWD, "x", args.x.1)?;
    let (dy_t, out, dy_off) = matrix(OP_BWD, "dy", args.dy.1)?;
    let (ra, a_in, a_off) = matrix(OP_BWD, "lora_a", args.a.1)?;
    let (w_out, w_in, w_off) = matrix(OP_BWD, "weight", args.w.1)?;
    let (b_out, r, b_off) = matrix(OP_BWD, "lora_b", args.b.1)?;
    let groups = blocks(OP_BWD, args.splits, out)?;
    expect(OP_BWD, "dy", (dy_t, out), (t, out))?;
    expect(OP_BWD, "lora_a", (ra, a_in), (groups.len() * r, inf))?;
    expect(OP_BWD, "weight", (w_out, w_in), (out, inf))?;
    expect(OP_BWD, "lora_b", (b_out, r), (out, r))?;
    let (need, p, s, split) = (args.need, args.packed, args.scale as f32, args.split);
    if p != Packed::new(t, inf, out, (ra, r), need, split) || p.total + p.factor_total == 0 {
        return Err(internal(
            OP_BWD,
            format!("packed layout {p:?} does not fit"),
        ));
    }
    if split && dtype == DType::F32 {
        return Err(internal(
            OP_BWD,
            "f32 factor gradients split from an f32 base".into(),
        ));
    }

    let dev = &args.x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let size = std::mem::size_of::<T>() as u64;
    let (xs, dys, as_, ws, bs) = (
        slice::<T>(args.x.0)?,
        slice::<T>(args.dy.0)?,
        slice::<T>(args.a.0)?,
        slice::<T>(args.w.0)?,
        slice::<T>(args.b.0)?,
    );
    // The forward's H, when it kept one: a whole `[T, ra]` buffer of this dtype.
    let saved_h = match args.h {
        Some(h) if need.db => {
            let h = slice::<T>(h)?;
            if h.len() != t * ra {
                return Err(internal(
                    OP_BWD,
                    format!("saved H has {} elements, expected {t} x {ra}", h.len()),
                ));
            }
            Some(h)
        }
        _ => None,
    };
    let need_g = need.dx || need.da;
    // SAFETY (both buffers): the pieces `p` lays out (dx, dA, dB, those requested) are each
    // written in full below by a GEMM with beta = 0 before anything reads them (dx's second
    // GEMM accumulates onto its first); the padding between pieces is never read (the op's
    // caller only takes the pieces, as views). A buffer is only made when it holds a piece.
    let mut packed = if p.total > 0 {
        Some(unsafe { dev.alloc::<T>(p.total) }?)
    } else {
        None
    };
    // The f32 buffer of `dA` and `dB` when split.
    // SAFETY: as for `packed` above: dA and dB are each written in full by their GEMM
    // (beta = 0, f32 C/D) before anything reads them; the padding is never read.
    let mut packed_f = if p.factor_total > 0 {
        Some(unsafe { dev.alloc::<f32>(p.factor_total) }?)
    } else {
        None
    };
    // SAFETY: written in full by the G GEMMs (beta = 0; one per group, each its r columns)
    // before the dx / dA GEMMs read it.
    let mut g = if need_g {
        Some(unsafe { dev.alloc::<T>(t * ra) }?)
    } else {
        None
    };
    // SAFETY: written in full by the H GEMM (beta = 0) before the dB GEMM reads it. Only
    // allocated when the forward's H is not at hand.
    let mut h = if need.db && saved_h.is_none() {
        Some(unsafe { dev.alloc::<T>(t * ra) }?)
    } else {
        None
    };
    {
        let (xp, _gx) = xs.device_ptr(stream);
        let (dyp, _gdy) = dys.device_ptr(stream);
        let (ap, _ga) = as_.device_ptr(stream);
        let (wp, _gw) = ws.device_ptr(stream);
        let (bp, _gb) = bs.device_ptr(stream);
        let outs = packed.as_mut().map(|b| b.device_ptr_mut(stream));
        let outs_f = packed_f.as_mut().map(|b| b.device_ptr_mut(stream));
        let gs = g.as_mut().map(|g| g.device_ptr_mut(stream));
        let hs = h.as_mut().map(|h| h.device_ptr_mut(stream));
        let saved = saved_h.map(|h| h.device_ptr(stream));
        let (xp, dyp, ap, wp, bp) = (
            xp + x_off as u64 * size,
            dyp + dy_off as u64 * size,
            ap + a_off as u64 * size,
            wp + w_off as u64 * size,
            bp + b_off as u64 * size,
        );
        // The device address of element `off` of the base buffer, and of the buffer (with its
        // element size) that holds `dA` and `dB`.
        let base_at = |off: usize| -> candle_core::Result<u64> {
            match &outs {
                Some((ptr, _)) => Ok(ptr + off as u64 * size),
                None => Err(internal(OP_BWD, "no base-dtype gradient buffer".into())),
            }
        };
        let factor_at = |off: Option<usize>| -> candle_core::Result<u64> {
            let Some(off) = off else {
                return Err(internal(OP_BWD, "no place for a factor gradient".into()));
            };
            match (split, &outs_f) {
                (true, Some((ptr, _))) => Ok(ptr + off as u64 * 4),
                (true, None) => Err(internal(OP_BWD, "no f32 gradient buffer".into())),
                (false, _) => base_at(off),
            }
        };
        // dA and dB are written in f32 when split: the GEMMs read the half-precision operands,
        // accumulate in f32 (CUBLAS_COMPUTE_32F) and store the f32 accumulator, unrounded.
        let factor_c = split.then_some(DType::F32);
        let gemm = rt.gemm();
        let gp = gs.as_ref().map(|(ptr, _)| *ptr);

        if let Some(gp) = gp {
            for &(g, first, n) in &groups {
                // G_gᵀ[r, T] = s · B_gᵀ[r, n] · dy_gᵀ[n, T]: B's rows `first..` read column-major
                // are B_gᵀ (r × n, ld r), dy's columns `first..` are dy_gᵀ (n × T, ld out); G's
                // columns `g·r..` are rows of Gᵀ (ld ra); no transposes.
                let pg = params(dtype, false, false, r, t, n, r, out, ra);
                let (bg, dyg, gg) = (
                    bp + (first * r) as u64 * size,
                    dyp + first as u64 * size,
                    gp + (g * r) as u64 * size,
                );
                // SAFETY: B's rows first..first+n (from `b_off`), dy's columns first..first+n of
                // its T rows (ld out, from `dy_off`) and G's columns g·r..g·r+r of its T rows
                // (ld ra; fresh, disjoint) are inside contiguous buffers of `T` on this
                // runtime's device (the blocks sum to out, checked); all ordered on the
                // runtime's stream, guards held until queued.
                unsafe { gemm.matmul(&pg, bg, dyg, gg, s, 0.0) }
                    .map_err(crate::Error::into_candle)?;
            }
        }
        if let (Some(off), Some(gp)) = (p.dx, gp) {
            let dxp = base_at(off)?;
            // The low-rank part first, then the big GEMM accumulates onto it in its epilogue
            // (where reading C overlaps its compute), rather than a separate read-modify-write
            // pass of dx by the memory-bound low-rank GEMM.
            // dxᵀ[in, T] = Aᵀ[in, ra] · Gᵀ[ra, T]: A's buffer is Aᵀ (in × ra, ld in), G's is
            // Gᵀ (every group at once).
            let p_low = params(dtype, false, false, inf, t, ra, inf, ra, inf);
            // SAFETY: A (ra·in from `a_off`), G (T·ra, written by the GEMMs queued above on this
            // stream) and the dx piece (T·in elements from `off` inside `packed`, which
            // `Packed::new` sized; disjoint from the inputs) on this device; same stream,
            // guards held. beta = 0: dx is written, not read.
            unsafe { gemm.matmul(&p_low, ap, gp, dxp, 1.0, 0.0) }
                .map_err(crate::Error::into_candle)?;
            // dxᵀ[in, T] += Wᵀ[in, out] · dyᵀ[out, T]: W's buffer is Wᵀ (in × out, ld in).
            let p_base = params(dtype, false, false, inf, t, out, inf, out, inf);
            // SAFETY: W (out·in from `w_off`), dy (T·out) and the dx piece as above (beta = 1
            // reads what the previous GEMM on this stream wrote in full); guards held.
            unsafe { gemm.matmul(&p_base, wp, dyp, dxp, 1.0, 1.0) }
                .map_err(crate::Error::into_candle)?;
        }
        if let (true, Some(gp)) = (need.da, gp) {
            // dAᵀ[in, ra] = Xᵀ[in, T] · G[T, ra]: X's buffer is Xᵀ (in × T, ld in); G's buffer
            // is Gᵀ (ra × T, ld ra), so transb. Every group at once: x is read once.
            let pa = GemmParams {
                c_dtype: factor_c,
                ..params(dtype, false, true, inf, ra, t, inf, ra, inf)
            };
            // SAFETY: X (T·in from `x_off`), G (T·ra, written above) and the dA piece (ra·in
            // elements of `pa.c_type()` from `off` inside its buffer, `packed` or, when split,
            // the f32 `packed_f`; disjoint from the inputs, aligned to 64 bytes or more: the
            // pool's allocation plus a multiple of 16 elements) on this device; same stream,
            // guards held. With `c_dtype` f32 the params are bf16/f16 A and B into f32 C/D,
            // a combination cuBLASLt supports with CUBLAS_COMPUTE_32F (see `GemmParams`).
            unsafe { gemm.matmul(&pa, xp, gp, factor_at(p.da)?, 1.0, 0.0) }
                .map_err(crate::Error::into_candle)?;
        }
        if need.db {
            let hp = match (&saved, &hs) {
                (Some((hp, _)), _) => *hp,
                (None, Some((hp, _))) => {
                    // Hᵀ[ra, T] = A[ra, in] · Xᵀ[in, T]: A's buffer is Aᵀ, so transa (as in the
                    // forward).
                    let ph = params(dtype, true, false, ra, t, inf, inf, inf, ra);
                    // SAFETY: A (ra·in), X (T·in) and H (T·ra, fresh, disjoint) on this device;
                    // same stream, guards held.
                    unsafe { gemm.matmul(&ph, ap, xp, *hp, 1.0, 0.0) }
                        .map_err(crate::Error::into_candle)?;
                    *hp
                }
                (None, None) => {
                    return Err(internal(OP_BWD, "dB needed but no H buffer".into()));
                }
            };
            let db_at = factor_at(p.db)?;
            let c_size = if split { 4 } else { size };
            for &(g, first, n) in &groups {
                // dB_gᵀ[r, n] = s · H_gᵀ[r, T] · dy_g[T, n]: H's columns `g·r..` are H_gᵀ (r × T,
                // ld ra); dy's columns `first..` read column-major are dy_gᵀ (n × T, ld out), so
                // transb; dB's rows `first..` are columns of dBᵀ (ld r).
                let pb = GemmParams {
                    c_dtype: factor_c,
                    ..params(dtype, false, true, r, n, t, ra, out, r)
                };
                let (hg, dyg, dbg) = (
                    hp + (g * r) as u64 * size,
                    dyp + first as u64 * size,
                    db_at + (first * r) as u64 * c_size,
                );
                // SAFETY: H (T·ra: the forward's, written on this stream before this op could
                // run, or the one written just above; its columns g·r..g·r+r), dy (its columns
                // first..first+n of T rows) and the dB piece's rows first..first+n (out·r
                // elements of `pb.c_type()` from `off` inside its buffer, `packed` or the f32
                // `packed_f` when split; disjoint, aligned as for dA, the blocks summing to out) on this device; guards held. The mixed
                // types are the supported bf16/f16 A and B with f32 C/D, as for dA.
                unsafe { gemm.matmul(&pb, hg, dyg, dbg, s, 0.0) }
                    .map_err(crate::Error::into_candle)?;
            }
        }
    }
    Ok(BwdOut {
        base: packed.map(|b| CudaStorage::wrap_cuda_slice(b, dev.clone())),
        factors: packed_f.map(|b| CudaStorage::wrap_cuda_slice(b, dev.clone())),
    })
}

/// Threads per block of `lora_factors.cu` (`FACTORS_THREADS`).
const FACTORS_THREADS: u32 = flare_kernels::launch::FACTORS_THREADS;

/// Blocks for a grid-stride pass over `n` elements: enough to cover them, at most 8 per SM.
fn factor_blocks(rt: &CudaRuntime, n: usize) -> u32 {
    n.div_ceil(FACTORS_THREADS as usize)
        .clamp(1, 8 * rt.sm_count.max(1) as usize) as u32
}

/// `parts` (two or three contiguous storages of one dtype, f32 / f16 / bf16) one after the
/// other in a fresh storage: one `lora_factors_stack_*` launch (see [`super::stack_rows`]).
pub(crate) fn stack_rows(parts: &[(&CudaStorage, &Layout)]) -> candle_core::Result<CudaStorage> {
    const OPS: &str = "stack_rows (cuda)";
    let Some(&(first, _)) = parts.first() else {
        return Err(internal(OPS, "no parts".into()));
    };
    if parts.len() > 3 || parts.iter().any(|(s, _)| s.dtype() != first.dtype()) {
        return Err(internal(
            OPS,
            format!("{} parts, or parts of different dtypes", parts.len()),
        ));
    }
    match first.dtype() {
        DType::F32 => stack_t::<f32>(parts, Kernel::StackRowsB32),
        DType::F16 => stack_t::<half::f16>(parts, Kernel::StackRowsB16),
        DType::BF16 => stack_t::<half::bf16>(parts, Kernel::StackRowsB16),
        dt => Err(candle_core::Error::Msg(format!(
            "{OPS}: unsupported dtype {dt:?} (f32, f16 and bf16 are)"
        ))),
    }
}

fn stack_t<T: CudaDType + DeviceRepr>(
    parts: &[(&CudaStorage, &Layout)],
    kernel: Kernel,
) -> candle_core::Result<CudaStorage> {
    const OPS: &str = "stack_rows (cuda)";
    let views = parts
        .iter()
        .map(|(s, l)| input::<T>(OPS, s, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let lens: Vec<usize> = parts.iter().map(|(_, l)| l.shape().elem_count()).collect();
    let n: usize = lens.iter().sum();
    let dev = &parts[0].0.device;
    // SAFETY: the kernel writes every one of the n elements (nothing to write when n == 0).
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let stream = rt.stream();
    let mut ptrs = [0u64; 3];
    let mut ns = [0i64; 3];
    let guards: Vec<_> = views
        .iter()
        .zip(&lens)
        .enumerate()
        .map(|(i, (v, &len))| {
            let (p, g) = v.device_ptr(stream);
            ptrs[i] = p;
            ns[i] = len as i64;
            g
        })
        .collect();
    // An absent third part: 0 elements (its pointer is never read).
    if parts.len() < 3 {
        ptrs[2] = ptrs[0];
    }
    let (op, _gout) = out.device_ptr_mut(stream);
    let mut b = stream.launch_builder(rt.function(kernel));
    b.arg(&ptrs[0])
        .arg(&ns[0])
        .arg(&ptrs[1])
        .arg(&ns[1])
        .arg(&ptrs[2])
        .arg(&ns[2])
        .arg(&op);
    // SAFETY: lora_factors_stack_b32 / _b16(const E *s0, long long n0, const E *s1, long long n1,
    // const E *s2, long long n2, E *dst), E of T's size: part i holds ns[i] contiguous elements
    // from ptrs[i] (checked by `input`; a missing part has ns = 0 and is never read), dst
    // is a fresh allocation of their sum, disjoint from every part; the guards keep the
    // buffers borrowed until the launch is queued on the runtime's (Candle's) stream.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (factor_blocks(&rt, n), 1, 1),
            block_dim: (FACTORS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .cuda_ctx("launching lora_factors_stack")
    .map_err(crate::Error::into_candle)?;
    drop(_gout);
    drop(guards);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `a` and `b` (f32, contiguous) cast to `dtype` (f16 or bf16) by one `lora_factors_cast_*`
/// launch, rounded to nearest even as Candle's cast rounds: the op's f32 factors brought to a
/// half base dtype. `None` for any other pair of dtypes (the caller converts them one by one).
pub(crate) fn cast_pair(
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
    dtype: DType,
) -> candle_core::Result<Option<(CudaStorage, CudaStorage)>> {
    if sa.dtype() != DType::F32
        || sb.dtype() != DType::F32
        || !la.is_contiguous()
        || !lb.is_contiguous()
    {
        return Ok(None);
    }
    match dtype {
        DType::F16 => {
            cast_pair_t::<half::f16>((sa, la), (sb, lb), Kernel::CastPairF32F16).map(Some)
        }
        DType::BF16 => {
            cast_pair_t::<half::bf16>((sa, la), (sb, lb), Kernel::CastPairF32BF16).map(Some)
        }
        _ => Ok(None),
    }
}

fn cast_pair_t<T: CudaDType + DeviceRepr>(
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
    kernel: Kernel,
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    const OPC: &str = "lora factor cast (cuda)";
    let av = input::<f32>(OPC, sa, la)?;
    let bv = input::<f32>(OPC, sb, lb)?;
    let (na, nb) = (la.shape().elem_count(), lb.shape().elem_count());
    let dev = &sa.device;
    // SAFETY: the kernel writes every element of both outputs (nothing when the sizes are 0).
    let mut oa = unsafe { dev.alloc::<T>(na.max(1)) }?;
    // SAFETY: as above.
    let mut ob = unsafe { dev.alloc::<T>(nb.max(1)) }?;
    if na + nb > 0 {
        let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
        let (na64, nb64) = (na as i64, nb as i64);
        let mut b = rt.stream().launch_builder(rt.function(kernel));
        b.arg(&av)
            .arg(&na64)
            .arg(&bv)
            .arg(&nb64)
            .arg(&mut oa)
            .arg(&mut ob);
        // SAFETY: lora_factors_cast_<t>(const float *a, long long na, const float *b,
        // long long nb, T *oa, T *ob): a and b hold na and nb contiguous f32 elements (checked
        // by `input`), oa and ob are fresh allocations of na and nb elements of T, on the
        // runtime's (Candle's) stream.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (factor_blocks(&rt, na + nb), 1, 1),
                block_dim: (FACTORS_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .cuda_ctx("launching lora_factors_cast")
        .map_err(crate::Error::into_candle)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(oa, dev.clone()),
        CudaStorage::wrap_cuda_slice(ob, dev.clone()),
    ))
}
