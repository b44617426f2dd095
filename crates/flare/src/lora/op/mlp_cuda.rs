//! CUDA side of the fused LoRA MLP ([`super::lora_swiglu_mlp`]): the buffers of one call and
//! the operations [`super::fold`]'s steps are written in, on the runtime's stream (cuBLASLt
//! GEMMs through its one entry point, flare's row copy and SwiGLU kernels). Every operation
//! checks that each element it reads or writes lies inside its buffer before it launches.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout};

use super::fold::{check_reach, gemm_extents, At, Buf, Fold, FoldOps, Gemm, S};
use super::internal;
use super::mlp::MlpDims;
use crate::ops::rope::cuda::copy_rows_raw;
use crate::ops::swiglu::cuda::{bwd_raw as swiglu_bwd_raw, fwd_raw as swiglu_fwd_raw};
use crate::ops::swiglu::plan::SwiGluPlan;
use crate::runtime::cuda::{CudaRuntime, Kernel};
use crate::runtime::gemm::GemmParams;

const OP_FWD: &str = "lora_swiglu_mlp (cuda)";
const OP_BWD: &str = "lora_swiglu_mlp backward (cuda)";

/// What the forward keeps for the backward.
pub(crate) struct Saved {
    /// `x W_guᵀ` with the low-rank terms, `[T, 2I]`.
    yb: CudaStorage,
    /// `s_gu · x A_guᵀ`, `[T, 2r]`.
    h_gu: CudaStorage,
    /// `[T, I + S]`: the activation (down's input), then `s_d · act A_dᵀ`.
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

/// A fresh storage of `n` elements of `dtype` (f32, f16, bf16), uninitialized: the steps write
/// every element they later read ([`super::fold`]'s emulated test runs them on NaN-filled
/// buffers).
fn alloc(
    op: &str,
    dev: &candle_core::CudaDevice,
    dtype: DType,
    n: usize,
) -> candle_core::Result<CudaStorage> {
    // SAFETY (the three allocations): uninitialized device memory, written before it is read as
    // this function's contract states.
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

/// Elements of a whole storage.
fn len(op: &str, s: &CudaStorage) -> candle_core::Result<usize> {
    Ok(match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.len(),
        DType::F16 => s.as_cuda_slice::<half::f16>()?.len(),
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.len(),
        dt => return Err(internal(op, format!("a {dt:?} buffer in the fused MLP"))),
    })
}

/// The element offset a contiguous operand of `dims` starts at.
fn contiguous(
    op: &str,
    what: &str,
    (s, l): (&CudaStorage, &Layout),
    dims: [usize; 2],
) -> candle_core::Result<usize> {
    match l.contiguous_offsets() {
        Some((start, _)) if l.dims() == dims => Ok(start),
        _ => Err(internal(
            op,
            format!(
                "{what} is {:?} {:?} (contiguous: {}), expected a contiguous {dims:?}",
                l.dims(),
                s.dtype(),
                l.is_contiguous()
            ),
        )),
    }
}

/// The operations of [`super::fold`] on the runtime's stream, over the call's buffers.
struct CudaOps<'a> {
    rt: &'a CudaRuntime,
    op: &'static str,
    /// The base dtype.
    dtype: DType,
    /// Each buffer's storage, the element its data start at, and its length from there.
    bufs: HashMap<Buf, (&'a CudaStorage, usize, usize)>,
}

impl<'a> CudaOps<'a> {
    fn new(rt: &'a CudaRuntime, op: &'static str, dtype: DType) -> Self {
        CudaOps {
            rt,
            op,
            dtype,
            bufs: HashMap::new(),
        }
    }

    /// Registers `buf` as `s` from element `start` on.
    fn with(mut self, buf: Buf, s: &'a CudaStorage, start: usize) -> candle_core::Result<Self> {
        let n = len(self.op, s)?;
        if start > n {
            return Err(internal(
                self.op,
                format!("{buf:?} starts past its storage"),
            ));
        }
        self.bufs.insert(buf, (s, start, n - start));
        Ok(self)
    }

    /// The device address of `at`, after checking that `n` elements from it lie in the buffer
    /// and that the buffer holds `dtype`.
    fn addr(&self, at: At, n: usize, dtype: DType) -> candle_core::Result<u64> {
        let &(s, start, len) = self
            .bufs
            .get(&at.buf)
            .ok_or_else(|| internal(self.op, format!("no {:?} buffer in this pass", at.buf)))?;
        if s.dtype() != dtype {
            return Err(internal(
                self.op,
                format!("{:?} holds {:?}, expected {dtype:?}", at.buf, s.dtype()),
            ));
        }
        check_reach(self.op, at, n, len)?;
        let base = crate::runtime::offload::slice_ptr(&s.slice, self.rt.stream())
            .ok_or_else(|| internal(self.op, format!("no device address for {:?}", at.buf)))?;
        Ok(base + ((start + at.off) * dtype.size_in_bytes()) as u64)
    }

    fn copy_kernel(&self) -> candle_core::Result<Kernel> {
        match self.dtype {
            DType::F16 => Ok(Kernel::RopeCopyRowsF16),
            DType::BF16 => Ok(Kernel::RopeCopyRowsBF16),
            dt => Err(internal(
                self.op,
                format!("dtype {dt:?} reached the fused MLP"),
            )),
        }
    }
}

impl FoldOps for CudaOps<'_> {
    fn gemm(&mut self, p: &Gemm, a: At, b: At, c: At, alpha: f32) -> candle_core::Result<()> {
        let [ea, eb, ec] = gemm_extents(p);
        let c_dtype = if p.c_f32 { DType::F32 } else { self.dtype };
        let (pa, pb, pc) = (
            self.addr(a, ea, self.dtype)?,
            self.addr(b, eb, self.dtype)?,
            self.addr(c, ec, c_dtype)?,
        );
        let params = GemmParams {
            dtype: self.dtype,
            c_dtype: p.c_f32.then_some(DType::F32),
            transa: p.transa,
            transb: p.transb,
            m: p.m,
            n: p.n,
            k: p.k,
            lda: p.lda,
            ldb: p.ldb,
            ldc: p.ldc,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        // SAFETY: every element the GEMM reads of A and B and writes of C lies inside its
        // buffer, which holds the dtype the params say (both checked by `addr`); the buffers
        // are borrowed by this `CudaOps` (the storages of the call, held by the caller until
        // the work is queued), all on the runtime's stream; the steps never have C share an
        // element with A or B (checked by the emulated test of `fold`). A f32 C is the bf16/f16
        // A, B with f32 C/D combination cuBLASLt supports with CUBLAS_COMPUTE_32F.
        unsafe { self.rt.gemm().matmul(&params, pa, pb, pc, alpha, 0.0) }
            .map_err(crate::Error::into_candle)
    }

    fn copy_rows(&mut self, src: At, dst: At, dims: [usize; 4]) -> candle_core::Result<()> {
        let [rows, width, xs, ys] = dims;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        if src.buf == dst.buf || ys < width {
            return Err(internal(
                self.op,
                format!("a row copy within {:?} or onto overlapping rows", src.buf),
            ));
        }
        let ps = self.addr(src, (rows - 1) * xs + width, self.dtype)?;
        let pd = self.addr(dst, (rows - 1) * ys + width, self.dtype)?;
        // SAFETY: the rows read and written lie inside their buffers (checked by `addr`), the
        // two are different buffers and the written rows do not overlap (ys >= width, checked
        // above); borrowed by this `CudaOps` until queued on the runtime's stream.
        unsafe { copy_rows_raw(self.rt, self.copy_kernel()?, ps, pd, dims) }
    }

    fn swiglu_fwd(
        &mut self,
        yb: At,
        act: At,
        rows: usize,
        cols: usize,
        ldy: usize,
    ) -> candle_core::Result<()> {
        if yb.buf == act.buf || ldy < cols {
            return Err(internal(self.op, "SwiGLU's output overlaps".into()));
        }
        let plan = SwiGluPlan::packed(&Layout::contiguous((rows, 2 * cols)))?.padded(ldy - cols);
        let g = self.addr(yb, rows * 2 * cols, self.dtype)?;
        let y = self.addr(act, (rows - 1) * ldy + cols, self.dtype)?;
        let u = g + (cols * self.dtype.size_in_bytes()) as u64;
        // SAFETY: gate and up are the two halves of yb's rows (rows of 2 cols, inside yb:
        // checked by `addr`), the output rows (ldy >= cols apart) lie inside act (checked),
        // a buffer other than yb; borrowed until queued on the runtime's stream.
        unsafe { swiglu_fwd_raw(self.rt, self.dtype, [g, u, y], &plan) }
    }

    fn swiglu_bwd(
        &mut self,
        yb: At,
        dact: At,
        dgu: At,
        rows: usize,
        cols: usize,
        ldo: usize,
    ) -> candle_core::Result<()> {
        if dgu.buf == yb.buf || dgu.buf == dact.buf || ldo < 2 * cols {
            return Err(internal(self.op, "SwiGLU's gradient overlaps".into()));
        }
        let plan =
            SwiGluPlan::packed(&Layout::contiguous((rows, 2 * cols)))?.padded(ldo - 2 * cols);
        let size = self.dtype.size_in_bytes() as u64;
        let g = self.addr(yb, rows * 2 * cols, self.dtype)?;
        let dy = self.addr(dact, rows * cols, self.dtype)?;
        let dg = self.addr(dgu, (rows - 1) * ldo + 2 * cols, self.dtype)?;
        let (u, du) = (g + cols as u64 * size, dg + cols as u64 * size);
        // SAFETY: gate and up are the halves of yb's rows, dact is rows x cols, d gate and d up
        // the halves of dgu's first 2 cols of each row (ldo apart): all inside their buffers
        // (checked by `addr`), dgu a buffer other than the inputs; borrowed until queued.
        unsafe { swiglu_bwd_raw(self.rt, self.dtype, [g, u, dy, dg, du], &plan) }
    }
}

/// The sizes of a call with `t` tokens on the packs `a`, `b` and the weights' scales.
fn fold(d: &MlpDims, t: usize, split: bool, (a0, b0): (usize, usize), w: &Weights<'_>) -> Fold {
    Fold {
        d: *d,
        t,
        split,
        a0,
        b0,
        s_gu: w.s_gu as f32,
        s_d: w.s_d as f32,
    }
}

/// Checks the padded weights' shapes; their data offsets.
fn weights(op: &str, w: &Weights<'_>, d: &MlpDims) -> candle_core::Result<(usize, usize)> {
    Ok((
        contiguous(
            op,
            "the gate/up weight",
            w.w_gu,
            [2 * d.inter + S, d.hidden + S],
        )?,
        contiguous(op, "the down weight", w.w_d, [d.hidden + S, d.inter + S])?,
    ))
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
    let t = x.1.dims().first().copied().unwrap_or(0);
    let x_off = contiguous(OP_FWD, "x", x, [t, d.hidden])?;
    let (wgu_off, wd_off) = weights(OP_FWD, w, d)?;
    let ab = super::cuda::cast_pair(a, b, dtype)?;
    if ab.is_none() && a.0.dtype() != dtype {
        return Err(internal(
            OP_FWD,
            format!("factors of {:?} on a {dtype:?} base", a.0.dtype()),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, ab.as_ref())?;
    let f = fold(d, t, false, (a0, b0), w);
    let dev = &x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let buf = |b: Buf| alloc(OP_FWD, dev, dtype, f.len(b));
    let (xp, h_gu, yb, actp, y) = (
        buf(Buf::Xp)?,
        buf(Buf::Hgu)?,
        buf(Buf::Yb)?,
        buf(Buf::Actp)?,
        buf(Buf::Y)?,
    );
    let z = zeros(OP_FWD, dev, dtype, f.len(Buf::Zeros))?;
    let mut ops = CudaOps::new(&rt, OP_FWD, dtype)
        .with(Buf::X, x.0, x_off)?
        .with(Buf::A, sa, 0)?
        .with(Buf::B, sb, 0)?
        .with(Buf::Wgu, w.w_gu.0, wgu_off)?
        .with(Buf::Wd, w.w_d.0, wd_off)?
        .with(Buf::Zeros, &z, 0)?
        .with(Buf::Xp, &xp, 0)?
        .with(Buf::Hgu, &h_gu, 0)?
        .with(Buf::Yb, &yb, 0)?
        .with(Buf::Actp, &actp, 0)?
        .with(Buf::Y, &y, 0)?;
    f.forward(&mut ops)?;
    drop(ops);
    Ok((y, Saved { yb, h_gu, actp, ab }))
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
    let t = x.1.dims().first().copied().unwrap_or(0);
    let x_off = contiguous(OP_BWD, "x", x, [t, d.hidden])?;
    let dy_off = contiguous(OP_BWD, "dy", dy, [t, d.hidden])?;
    let (wgu_off, wd_off) = weights(OP_BWD, w, d)?;
    let split = a.0.dtype() != dtype;
    if split && saved.ab.is_none() {
        return Err(internal(
            OP_BWD,
            "f32 factors but the forward kept no converted pair".into(),
        ));
    }
    let ((sa, a0), (sb, b0)) = packs(a, b, saved.ab.as_ref())?;
    let f = fold(d, t, split, (a0, b0), w);
    let dev = &x.0.device;
    let rt = CudaRuntime::get(dev).map_err(crate::Error::into_candle)?;
    let buf = |b: Buf| alloc(OP_BWD, dev, dtype, f.len(b));
    let (dyp, dact, dgup) = (buf(Buf::Dyp)?, buf(Buf::Dact)?, buf(Buf::Dgup)?);
    let dx = if need_dx { Some(buf(Buf::Dx)?) } else { None };
    let fdt = if split { DType::F32 } else { dtype };
    let factors = alloc(OP_BWD, dev, fdt, f.len(Buf::Factors))?;
    let mut ops = CudaOps::new(&rt, OP_BWD, dtype)
        .with(Buf::X, x.0, x_off)?
        .with(Buf::Dy, dy.0, dy_off)?
        .with(Buf::A, sa, 0)?
        .with(Buf::B, sb, 0)?
        .with(Buf::Wgu, w.w_gu.0, wgu_off)?
        .with(Buf::Wd, w.w_d.0, wd_off)?
        .with(Buf::Yb, &saved.yb, 0)?
        .with(Buf::Hgu, &saved.h_gu, 0)?
        .with(Buf::Actp, &saved.actp, 0)?
        .with(Buf::Dyp, &dyp, 0)?
        .with(Buf::Dact, &dact, 0)?
        .with(Buf::Dgup, &dgup, 0)?
        .with(Buf::Factors, &factors, 0)?;
    if let Some(dx) = &dx {
        ops = ops.with(Buf::Dx, dx, 0)?;
    }
    f.backward(&mut ops, need_dx)?;
    drop(ops);
    Ok(Grads { dx, factors })
}
