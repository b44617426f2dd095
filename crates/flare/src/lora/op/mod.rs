//! The fused LoRA linear `y = x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ`, whose backward never computes
//! the frozen weight's gradient.
//!
//! Shapes: `x: [..., in]`, `W: [out, in]` (frozen), `bias: [out]`, `A: [r, in]`, `B: [out, r]`,
//! `y: [..., out]`. Let `T` be the number of tokens (the product of `x`'s leading dims).
//!
//! # Forward
//! [`lora_linear`] is one Candle custom op on `(x, A, B)`; `W`, the bias and `s` are captured
//! in the op, so `W` is not an autograd input: no gradient of `W`'s size is ever allocated or
//! computed, whether or not `W` is a `Var`. `A` and `B` enter in their own dtype (see Dtypes):
//! no cast node sits between them and the op.
//! - CUDA: three cuBLASLt GEMMs through the runtime's one entry point
//!   (`flare::runtime::gemm::Gemm::matmul`, with the `cuda` feature): `H = X Aᵀ` into a
//!   `[T, r]` buffer, `Y = s · H Bᵀ` (`alpha = s`, `beta = 0`), then the base GEMM
//!   `Y = X Wᵀ + 1 · Y` (`beta = 1`): the big, compute-bound GEMM absorbs the low-rank part in
//!   its epilogue, where reading `C` overlaps its compute, instead of the memory-bound low-rank
//!   GEMM doing a read-modify-write pass over `Y`. cuBLASLt's bias epilogue is not part of the
//!   entry point, so with a bias `Y` is first filled with the bias broadcast over the rows (one
//!   copy kernel, Candle's `copy2d` with a source row stride of 0) and the low-rank GEMM runs
//!   with `beta = 1` on top of it. `H` is kept (in the op, `T · r` elements) for the backward.
//!   `x` of any rank is read in place as `[T, in]` and `y` comes out `[..., out]`: no reshape
//!   nodes in the graph (each would cost a zero fill and an add over its gradient).
//! - CPU: Candle's CPU gemm for the three products, then one pass adding `s · low + bias` in
//!   f64 and rounding once to the dtype. f64 is supported (for finite-difference checks).
//! - Other devices (Metal): the composite of [`crate::ops::matmul()`] calls (`W` detached).
//!
//! # Backward
//! With upstream `dy: [T, out]`, `G = s · dy B` (`[T, r]`) and `H = x Aᵀ` (the CUDA forward's,
//! kept by the op; recomputed on the CPU):
//!   `dx = dy W + G A`, `dA = Gᵀ x`, `dB = s · dyᵀ H`.
//! On CUDA, `dx` is two GEMMs into one buffer: `G A` first (`beta = 0`), then the big `dy W`
//! accumulating onto it in its epilogue (`beta = 1`). Each gradient is
//! computed only when its input takes part in autograd (`Tensor::track_op`): a frozen input
//! (`x` of the first layer, say) costs nothing, and `G` / `H` are only formed when a gradient
//! needs them. The gradients come out of one backward op packed in a flat buffer and are split
//! by views (each piece starts on a 16-element boundary); with f32 factors on a half base, `dA`
//! and `dB` come in a second, f32 buffer, handed from the backward op to the graph by a
//! second op (`lora_linear_bwd_factors`, no computation, applied to `A` so that the factor
//! gradients, kept until the optimizer step, hold no reference to the dx buffer). The
//! backward ops have no backward of their own: a second derivative returns Candle's
//! `BackwardNotSupported`.
//!
//! # Groups
//! [`lora_linear_grouped`] runs `G` projections of one input (q/k/v, gate/up) as this one op:
//! `W` and the bias stacked (`[out_1 + ... + out_G, in]`), `A` stacked (`[G · r, in]`), `B`
//! stacked (`[out, r]`), one rank and scale. Then `H = x Aᵀ` is `[T, G · r]` (one GEMM: `x` read
//! once), the low-rank term is one `[T, r] x [r, out_g]` GEMM per block into its columns of `y`,
//! and the base GEMM covers every block. Backward: `G = s · dy B` is one GEMM per block into its
//! `r` columns of `G [T, G · r]`, and then `dx = dy W + G A` is the same two GEMMs as for one
//! projection (no per-projection `dx` to sum), `dA = Gᵀ x` one GEMM (`x` read once), `dB` one
//! GEMM per block. The CPU path forms `B`'s block-diagonal `[out, G · r]` and runs the
//! one-projection products with `r = G · r` (the zero blocks add exact zeros); `dB` is taken
//! from its diagonal blocks.
//!
//! # Dtypes
//! `x`, `W` and the bias share one dtype (f32, f16, bf16; f64 on CPU). `A` and `B` share one
//! dtype, either the base dtype or f32 while the base is f16/bf16 (PEFT keeps adapters in f32
//! on a half-precision base). In the mixed case `A` and `B` are the op's autograd inputs as
//! they are (f32): no Candle cast node, forward or backward. Inside the op:
//! - forward: `A` and `B` are converted to the base dtype at storage level (Candle's
//!   `BackendStorage::to_dtype`: one small cast launch each on CUDA, rounding to nearest), and
//!   the GEMMs run in the base dtype with f32 accumulation, as under PyTorch's autocast. On
//!   CUDA the converted pair is kept by the op (like `H`) for the backward, which then casts
//!   nothing.
//! - backward: `G = s · dy B` uses the converted `B` and is rounded to the base dtype, `dx` is
//!   in the base dtype, and `dA = Gᵀ x`, `dB = s · dyᵀ H` are computed from the half-precision
//!   `G`, `x`, `dy`, `H` with f32 accumulation and come out **in f32, never rounded to the half
//!   type** (on CUDA the cuBLASLt GEMMs write their f32 accumulator directly: bf16/f16 `A`/`B`,
//!   f32 `C`/`D`; on the CPU the products run in f32 on the half values widened exactly).
//!   Before, they were rounded to bf16/f16 and widened by the cast's backward; the f32
//!   optimizer now sees about 8 (bf16) or 11 (f16) more bits of each factor gradient.
//!
//! # Dropout
//! LoRA dropout (`dropout(x)` on the input of the low-rank path only) is not fused yet: a layer
//! with dropout in training mode ([`crate::lora::LoraLinear`]) runs the composite of
//! [`crate::ops::matmul()`] calls with a mask multiply on `x` for the low-rank path. The mask
//! comes from [`crate::lora::dropout`]: seeded inside [`crate::lora::with_dropout_seed`] (what
//! the transformer's layers run in), else from Candle's unseeded generator.

use crate::ops::StorageSlot;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};

use crate::error::device_name;
use crate::ops::{check_dtype, check_rank, contiguous_range, matmul, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod fold;
mod mlp;
#[cfg(feature = "cuda")]
mod mlp_cuda;
mod plan;
mod stack;

pub use mlp::{lora_swiglu_mlp, LoraMlp, MlpWeights, MLP_SPARE};
pub use stack::stack_rows;

use cpu::{block_diag, combine_fwd, diag_blocks, scaled};
use plan::{Needs, Packed, OP, OP_BWD, OP_BWD_FACTORS};

fn internal(op: &str, msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: internal error: {msg}"))
}

/// The CPU storage behind a captured tensor.
fn cpu_storage<'a>(op: &str, s: &'a Storage) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => Err(internal(op, "a captured tensor is not on the CPU".into())),
    }
}

/// Runs `$body` with `$T` the element type of `$dtype` (f32, f64, f16, bf16).
macro_rules! by_dtype {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err(candle_core::Error::Msg(format!(
                "{}: unsupported dtype {other:?}",
                $op
            ))),
        }
    };
}

/// A grouped op's `B` (`[out, r]`, contiguous, read through `l`) as its block-diagonal
/// `[out, G · r]` ([`block_diag`]), or `None` for one projection.
fn diag_b(
    op: &str,
    s: &CpuStorage,
    l: &Layout,
    splits: &[usize],
) -> candle_core::Result<Option<(CpuStorage, Layout)>> {
    if splits.len() < 2 {
        return Ok(None);
    }
    let (out, r) = l.shape().dims2()?;
    let (b0, b1) = l
        .contiguous_offsets()
        .ok_or_else(|| internal(op, "lora_b is not contiguous".into()))?;
    let m = by_dtype!(op, s.dtype(), E => Ok(E::to_cpu_storage_owned(block_diag(
        &s.as_slice::<E>()?[b0..b1],
        r,
        splits
    ))))?;
    Ok(Some((m, Layout::contiguous((out, r * splits.len())))))
}

/// The forward's `H = x Aᵀ` as kept for the backward: a CUDA `[T, r]` storage. Nothing is kept
/// on other devices (the CPU backward recomputes it), so without CUDA the type is empty.
#[cfg(feature = "cuda")]
type SavedH = Arc<candle_core::CudaStorage>;
#[cfg(not(feature = "cuda"))]
type SavedH = std::convert::Infallible;

/// `A` and `B` converted to the base dtype by the CUDA forward (f32 factors on a half base
/// only), kept for the backward so that it converts nothing. Empty without CUDA, as
/// [`SavedH`].
#[cfg(feature = "cuda")]
type SavedAb = Arc<(candle_core::CudaStorage, candle_core::CudaStorage)>;
#[cfg(not(feature = "cuda"))]
type SavedAb = std::convert::Infallible;

/// `s` (read through `l`) converted to `dtype` at storage level, as a fresh contiguous storage
/// and its layout, or `None` when it already has that dtype. No graph node: this is how the op
/// brings f32 factors to the base dtype (and, on the CPU backward, half operands to f32).
fn convert<S: BackendStorage>(
    s: &S,
    l: &Layout,
    dtype: DType,
) -> candle_core::Result<Option<(S, Layout)>> {
    if s.dtype() == dtype {
        return Ok(None);
    }
    Ok(Some((s.to_dtype(l, dtype)?, Layout::contiguous(l.shape()))))
}

/// The forward op `(x [..., in], A [r, in], B [out, r]) -> y [..., out]`, with `W` and the bias
/// captured (contiguous, same dtype and device as `x`). `x` must be contiguous; the op reads it
/// as the `[T, in]` matrix it is, so that no reshape node (whose backward is a zero fill and an
/// add over the whole gradient) enters the autograd graph on either side.
struct LoraFwd {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    /// `H = x Aᵀ` from the CUDA forward (`T · r` elements, small next to `x`), reused by the
    /// backward for `dB` instead of a second pass over `x`. Lives as long as the op, i.e. the
    /// autograd graph (or only the forward call when nothing is tracked).
    saved_h: Mutex<Option<SavedH>>,
    /// `A` and `B` in the base dtype, from a CUDA forward with f32 factors on a half base.
    saved_ab: Mutex<Option<SavedAb>>,
    /// The output blocks of a grouped op ([`lora_linear_grouped`]); `[out]` for one projection.
    splits: Vec<usize>,
}

/// `l` as the contiguous `[rows, cols]` matrix it holds: `cols` its last dim, `rows` the product
/// of the others (1 for a vector), same start offset. Errors if `l` is not contiguous or is a
/// scalar.
fn as_matrix(op: &str, l: &Layout) -> candle_core::Result<Layout> {
    let dims = l.dims();
    let Some((&cols, lead)) = dims.split_last() else {
        return Err(internal(op, "an operand is a scalar".into()));
    };
    if !l.is_contiguous() {
        return Err(internal(
            op,
            format!("an operand {dims:?} is not contiguous"),
        ));
    }
    let rows: usize = lead.iter().product();
    Ok(Layout::contiguous_with_offset(
        (rows, cols),
        l.start_offset(),
    ))
}

/// `x`'s dims with the last one replaced by `out`: the output's shape.
fn out_shape(lx: &Layout, out: usize) -> Shape {
    let mut dims = lx.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Shape::from(dims)
}

/// `(T, in, r, out)` of the forward's inputs, `lx` being the `[T, in]` matrix.
fn fwd_dims(lx: &Layout, la: &Layout, lb: &Layout) -> (usize, usize, usize, usize) {
    (lx.dims()[0], lx.dims()[1], la.dims()[0], lb.dims()[0])
}

impl CustomOp3 for LoraFwd {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = out_shape(lx, lb.dims()[0]);
        let lx = &as_matrix(OP, lx)?;
        let (t, inf, ra, out) = fwd_dims(lx, la, lb);
        // f32 factors on a half base: converted here, at storage level.
        let (ca, cb) = (convert(sa, la, sx.dtype())?, convert(sb, lb, sx.dtype())?);
        let (sa, la) = ca.as_ref().map_or((sa, la), |(s, l)| (s, l));
        let (sb, lb) = cb.as_ref().map_or((sb, lb), |(s, l)| (s, l));
        // A grouped op's B as its block-diagonal [out, G · r].
        let bd = diag_b(OP, sb, lb, &self.splits)?;
        let (sb, lb) = bd.as_ref().map_or((sb, lb), |(s, l)| (s, l));
        let (ws, wl) = self.w.storage_and_layout();
        let wc = cpu_storage(OP, &ws)?;
        let base = sx.matmul(wc, (1, t, out, inf), lx, &wl.transpose(0, 1)?)?;
        let h = sx.matmul(sa, (1, t, ra, inf), lx, &la.transpose(0, 1)?)?;
        let low = h.matmul(
            sb,
            (1, t, out, ra),
            &Layout::contiguous((t, ra)),
            &lb.transpose(0, 1)?,
        )?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((s, l)) => Some((cpu_storage(OP, s)?, contiguous_range(OP, l)?)),
            None => None,
        };
        let s = self.scale;
        let y = by_dtype!(OP, sx.dtype(), E => {
            let bias = match bias {
                Some((st, (b0, b1))) => Some(&st.as_slice::<E>()?[b0..b1]),
                None => None,
            };
            Ok(E::to_cpu_storage_owned(combine_fwd(
                base.as_slice::<E>()?,
                low.as_slice::<E>()?,
                bias,
                s,
                out,
            )))
        })?;
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let wc = cuda_storage(OP, &ws)?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((s, l)) => Some((cuda_storage(OP, s)?, *l)),
            None => None,
        };
        let shape = out_shape(lx, lb.dims()[0]);
        let lx2 = as_matrix(OP, lx)?;
        // f32 factors on a half base: both cast by one launch (no graph node), kept for the
        // backward.
        let conv = match cuda::cast_pair((sa, la), (sb, lb), sx.dtype())? {
            Some((a, b)) => Some((
                Arc::new((a, b)),
                Layout::contiguous(la.shape()),
                Layout::contiguous(lb.shape()),
            )),
            None => match (convert(sa, la, sx.dtype())?, convert(sb, lb, sx.dtype())?) {
                (Some((a, la)), Some((b, lb))) => Some((Arc::new((a, b)), la, lb)),
                (None, None) => None,
                _ => return Err(internal(OP, "lora_a and lora_b differ in dtype".into())),
            },
        };
        let (a, b) = match &conv {
            Some((ab, la, lb)) => ((&ab.0, la), (&ab.1, lb)),
            None => ((sa, la), (sb, lb)),
        };
        let (y, h) = cuda::fwd(cuda::FwdArgs {
            x: (sx, &lx2),
            a,
            b,
            w: (wc, wl),
            bias,
            scale: self.scale,
            splits: &self.splits,
        })?;
        *self.saved_h.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(h));
        *self.saved_ab.lock().unwrap_or_else(|e| e.into_inner()) = conv.map(|(ab, _, _)| ab);
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Needs {
            dx: x.track_op(),
            da: a.track_op(),
            db: b.track_op(),
        };
        if !(need.dx || need.da || need.db) {
            return Ok((None, None, None));
        }
        let inf = x.dims().last().copied().unwrap_or(1);
        let t = x.elem_count() / inf.max(1);
        let (out, r) = b.dims2()?;
        let ra = a.dims()[0];
        let dy = dy.contiguous()?;
        let split = a.dtype() != x.dtype();
        let p = Packed::new(t, inf, out, (ra, r), need, split);
        let side = Arc::new(StorageSlot::default());
        let op = LoraBwd {
            w: self.w.clone(),
            b: b.detach(),
            scale: self.scale,
            need,
            h: self
                .saved_h
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .cloned(),
            ab: self
                .saved_ab
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .cloned(),
            side: side.clone(),
            splits: self.splits.clone(),
        };
        // Tracked (not `apply_op3_no_bwd`), so that a second derivative through it errors with
        // `BackwardNotSupported` instead of silently stopping.
        let packed = x.apply_op3_arc(&dy, a, Arc::new(Box::new(op)))?;
        // With two buffers (dx in the base dtype, dA and dB in f32), the second comes out of
        // the backward op through `side` and into the graph by a second op, applied to `A`
        // (which it ignores) rather than to the dx buffer: `dA` and `dB` are kept until the
        // optimizer step, and a graph edge to the dx buffer would keep that alive as long (it
        // is freed once `x`'s gradient has been passed on).
        let factors = if p.two_buffers() {
            let take = LoraBwdFactors {
                side,
                len: p.factor_total,
            };
            a.apply_op1_arc(Arc::new(Box::new(take)))?
        } else {
            packed.clone()
        };
        // Views of the packed buffers: no copies.
        let piece = |buf: &Tensor, off: Option<usize>, dims: &[usize]| {
            off.map(|o| buf.narrow(0, o, dims.iter().product())?.reshape(dims))
                .transpose()
        };
        Ok((
            piece(&packed, p.dx, x.dims())?,
            piece(&factors, p.da, &[ra, inf])?,
            piece(&factors, p.db, &[out, r])?,
        ))
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage<'a>(op: &str, s: &'a Storage) -> candle_core::Result<&'a candle_core::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => Err(internal(op, "a captured tensor is not on CUDA".into())),
    }
}

/// The backward op `(x [..., in], dy [..., out], A [r, in]) -> [dx | dA | dB]` packed flat
/// (see [`Packed`]), with `W` and `B` captured (contiguous, same device); `x` and `dy`
/// contiguous, read as `[T, in]` and `[T, out]`. `A` and `B` are in the base dtype or f32 on a
/// half base; then `dx` is the op's output (when needed) and `dA`, `dB` go, in f32, into a
/// second buffer that [`LoraBwdFactors`] takes out of `side` (or, without `dx`, are the op's
/// output).
struct LoraBwd {
    w: Tensor,
    b: Tensor,
    scale: f64,
    need: Needs,
    /// The forward's `H = x Aᵀ` (CUDA), when it kept one.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    h: Option<SavedH>,
    /// The forward's `A` and `B` in the base dtype (CUDA, f32 factors on a half base).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ab: Option<SavedAb>,
    /// Where the op leaves the factor-gradient buffer when it makes two (see [`Packed`]).
    side: Arc<StorageSlot>,
    /// The forward's output blocks ([`LoraFwd::splits`]).
    splits: Vec<usize>,
}

impl LoraBwd {
    /// Returns the op's output, the base-dtype buffer (or the factor one when it is the only
    /// one), and leaves the factor buffer in `side` when there are both.
    fn finish<S>(
        &self,
        base: Option<S>,
        factors: Option<S>,
        wrap: fn(S) -> Storage,
    ) -> candle_core::Result<S> {
        match (base, factors) {
            (Some(base), Some(factors)) => {
                self.side.put(wrap(factors));
                Ok(base)
            }
            (Some(one), None) | (None, Some(one)) => Ok(one),
            (None, None) => Err(internal(OP_BWD, "no gradient buffer was made".into())),
        }
    }
}

/// The op's output length for the packed layout `p`.
fn main_len(p: &Packed) -> usize {
    if p.total > 0 {
        p.total
    } else {
        p.factor_total
    }
}

/// Writes `dA` (as is) and `dB` (times `s`, in f64, rounded once) into `v` at their offsets.
fn put_factor_grads<E: WithDType>(
    v: &mut [E],
    p: &Packed,
    da: Option<&CpuStorage>,
    db: Option<&CpuStorage>,
    s: f64,
) -> candle_core::Result<()> {
    if let (Some(o), Some(da)) = (p.da, da) {
        let da = da.as_slice::<E>()?;
        v[o..o + da.len()].copy_from_slice(da);
    }
    if let (Some(o), Some(db)) = (p.db, db) {
        let db = db.as_slice::<E>()?;
        for (d, &u) in v[o..o + db.len()].iter_mut().zip(db) {
            *d = E::from_f64(s * u.to_f64());
        }
    }
    Ok(())
}

impl CustomOp3 for LoraBwd {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sdy: &CpuStorage,
        ldy: &Layout,
        sa: &CpuStorage,
        la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (lx, ldy) = (&as_matrix(OP_BWD, lx)?, &as_matrix(OP_BWD, ldy)?);
        let (t, inf) = (lx.dims()[0], lx.dims()[1]);
        let (out, ra) = (ldy.dims()[1], la.dims()[0]);
        let (ws, wl) = self.w.storage_and_layout();
        let wc = cpu_storage(OP_BWD, &ws)?;
        let (bs, bl) = self.b.storage_and_layout();
        let bc = cpu_storage(OP_BWD, &bs)?;
        let r = bl.dims()[1];
        let need = self.need;
        let s = self.scale;
        // The factors' dtype: the gradients of A and B come out in it (f32 on a half base).
        let (dt, gdt) = (sx.dtype(), sa.dtype());
        let split = gdt != dt;
        let p = Packed::new(t, inf, out, (ra, r), need, split);
        let tr = Layout::contiguous((t, ra));
        // A and B in the base dtype (converted when the factors are f32); a grouped op's B as
        // its block-diagonal [out, G · r], so that every product below is the ungrouped one
        // with r = G · r (dB comes out block-diagonal and its blocks are taken at the end).
        let (ca, cb) = (convert(sa, la, dt)?, convert(bc, bl, dt)?);
        let (sa, la) = ca.as_ref().map_or((sa, la), |(s, l)| (s, l));
        let (bc, bl) = match &cb {
            Some((s, l)) => (s, l),
            None => (bc, bl),
        };
        let bd = diag_b(OP_BWD, bc, bl, &self.splits)?;
        let (bc, bl) = bd.as_ref().map_or((bc, bl), |(s, l)| (s, l));

        // G = s · dy B, rounded to the base dtype (it feeds two products).
        let g = if need.dx || need.da {
            let g = sdy.matmul(bc, (1, t, ra, out), ldy, bl)?;
            Some(
                by_dtype!(OP_BWD, g.dtype(), E => Ok(E::to_cpu_storage_owned(scaled(
                    g.as_slice::<E>()?,
                    s
                ))))?,
            )
        } else {
            None
        };
        let (dx_w, dx_a) = match (&g, need.dx) {
            (Some(g), true) => (
                Some(sdy.matmul(wc, (1, t, inf, out), ldy, wl)?),
                Some(g.matmul(sa, (1, t, inf, ra), &tr, la)?),
            ),
            _ => (None, None),
        };
        // dA = Gᵀ x and dB = dyᵀ H (scaled when packed) in the factors' dtype: with f32 factors
        // the half operands are widened (exactly) and multiplied in f32, as the CUDA GEMMs
        // accumulate in f32 and write f32.
        let da = match (&g, need.da) {
            (Some(g), true) => {
                let (cg, cx) = (convert(g, &tr, gdt)?, convert(sx, lx, gdt)?);
                let (g, lg) = cg.as_ref().map_or((g, &tr), |(s, l)| (s, l));
                let (x, lxg) = cx.as_ref().map_or((sx, lx), |(s, l)| (s, l));
                Some(g.matmul(x, (1, ra, inf, t), &lg.transpose(0, 1)?, lxg)?)
            }
            _ => None,
        };
        let db = if need.db {
            let h = sx.matmul(sa, (1, t, ra, inf), lx, &la.transpose(0, 1)?)?;
            let (cdy, ch) = (convert(sdy, ldy, gdt)?, convert(&h, &tr, gdt)?);
            let (dy, ldyg) = cdy.as_ref().map_or((sdy, ldy), |(s, l)| (s, l));
            let (h, lh) = ch.as_ref().map_or((&h, &tr), |(s, l)| (s, l));
            let db = dy.matmul(h, (1, out, ra, t), &ldyg.transpose(0, 1)?, lh)?;
            Some(if self.splits.len() > 1 {
                by_dtype!(OP_BWD, db.dtype(), E => Ok(E::to_cpu_storage_owned(diag_blocks(
                    db.as_slice::<E>()?,
                    r,
                    &self.splits
                ))))?
            } else {
                db
            })
        } else {
            None
        };

        let base = if p.total > 0 {
            Some(by_dtype!(OP_BWD, dt, E => {
                let mut v = vec![E::from_f64(0.0); p.total];
                if let (Some(o), Some(pw), Some(pa)) = (p.dx, &dx_w, &dx_a) {
                    let (pw, pa) = (pw.as_slice::<E>()?, pa.as_slice::<E>()?);
                    for (d, (&u, &w)) in v[o..o + t * inf].iter_mut().zip(pw.iter().zip(pa)) {
                        *d = E::from_f64(u.to_f64() + w.to_f64());
                    }
                }
                if !split {
                    put_factor_grads(&mut v, &p, da.as_ref(), db.as_ref(), s)?;
                }
                Ok(E::to_cpu_storage_owned(v))
            })?)
        } else {
            None
        };
        let factors = if p.factor_total > 0 {
            Some(by_dtype!(OP_BWD, gdt, E => {
                let mut v = vec![E::from_f64(0.0); p.factor_total];
                put_factor_grads(&mut v, &p, da.as_ref(), db.as_ref(), s)?;
                Ok(E::to_cpu_storage_owned(v))
            })?)
        } else {
            None
        };
        let main = self.finish(base, factors, Storage::Cpu)?;
        Ok((main, Shape::from(main_len(&p))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sdy: &candle_core::CudaStorage,
        ldy: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let wc = cuda_storage(OP_BWD, &ws)?;
        let (bs, bl) = self.b.storage_and_layout();
        let bc = cuda_storage(OP_BWD, &bs)?;
        let (lx, ldy) = (&as_matrix(OP_BWD, lx)?, &as_matrix(OP_BWD, ldy)?);
        let (t, inf) = (lx.dims()[0], lx.dims()[1]);
        let (out, ra, r) = (ldy.dims()[1], la.dims()[0], bl.dims()[1]);
        let split = sa.dtype() != sx.dtype();
        let p = Packed::new(t, inf, out, (ra, r), self.need, split);
        // A and B in the base dtype: the forward's converted pair, else converted here.
        let converted;
        let (a, b) = match (&self.ab, split) {
            (_, false) => ((sa, la), (bc, bl)),
            (Some(ab), true) => {
                let (lab, lbb) = (
                    Layout::contiguous(la.shape()),
                    Layout::contiguous(bl.shape()),
                );
                converted = (lab, lbb);
                ((&ab.0, &converted.0), (&ab.1, &converted.1))
            }
            (None, true) => {
                return Err(internal(
                    OP_BWD,
                    "f32 factors but the forward kept no converted pair".into(),
                ))
            }
        };
        let outs = cuda::bwd(cuda::BwdArgs {
            x: (sx, lx),
            dy: (sdy, ldy),
            a,
            w: (wc, wl),
            b,
            scale: self.scale,
            need: self.need,
            packed: p,
            h: self.h.as_deref(),
            split,
            splits: &self.splits,
        })?;
        let main = self.finish(outs.base, outs.factors, Storage::Cuda)?;
        Ok((main, Shape::from(main_len(&p))))
    }
}

/// Hands the f32 factor-gradient buffer that [`LoraBwd`] left in `side` to the graph, as a
/// tensor of `len` elements; computes nothing. Applied to `A` right after the backward op ran
/// (Candle runs ops eagerly, in program order), whose input it ignores: an edge to `A`, which
/// lives as long as the adapter anyway, instead of one to the backward op's dx buffer, which
/// the factor gradients would then keep alive until the optimizer step. Its own backward is
/// Candle's default, `BackwardNotSupported`.
struct LoraBwdFactors {
    side: Arc<StorageSlot>,
    len: usize,
}

impl CustomOp1 for LoraBwdFactors {
    fn name(&self) -> &'static str {
        OP_BWD_FACTORS
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.side.take_cpu(OP_BWD_FACTORS)?, Shape::from(self.len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.side.take_cuda(OP_BWD_FACTORS)?, Shape::from(self.len)))
    }
}

// ---- checks ----------------------------------------------------------------------------------

/// Refuses a tensor that is not 2-D: [`Error::Rank`] below 2, [`Error::ShapeMismatch`] above.
fn check_matrix(t: &Tensor, msg: &'static str, other: &Tensor) -> Result<()> {
    check_rank(OP, t, 2)?;
    if t.rank() != 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg,
            lhs: t.dims().to_vec(),
            rhs: other.dims().to_vec(),
        });
    }
    Ok(())
}

fn check_device(t: &Tensor, x: &Tensor) -> Result<()> {
    if t.device().same_device(x.device()) {
        Ok(())
    } else {
        Err(Error::DeviceMismatch {
            op: OP,
            lhs: device_name(x.device()),
            rhs: device_name(t.device()),
        })
    }
}

/// Whether adapters of `adapter` dtype may run on a base of `base` dtype: the same dtype, or
/// f32 adapters on an f16/bf16 base.
pub(crate) fn adapter_dtype_ok(base: DType, adapter: DType) -> bool {
    adapter == base || (adapter == DType::F32 && matches!(base, DType::F16 | DType::BF16))
}

/// Checks every operand of [`lora_linear`] (ranks, devices, dtypes, shapes, scale).
pub(crate) fn check(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<()> {
    check_with(x, w, bias, a, b, scale, 1)
}

/// Checks every operand of [`lora_linear_grouped`]: its `splits`, then as [`check`] with `a`
/// holding `splits.len()` factors.
fn check_grouped(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    splits: &[usize],
) -> Result<()> {
    check_matrix(w, "the weight must be 2-D [out, in] (weight, x)", x)?;
    let out = w.dims()[0];
    if splits.is_empty() || splits.contains(&0) || splits.iter().sum::<usize>() != out {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "splits {splits:?} must be nonzero output sizes summing to the weight's {out} rows"
            ),
        });
    }
    check_with(x, w, bias, a, b, scale, splits.len())
}

/// [`check`] with `a` holding `groups` factors of `b`'s rank.
fn check_with(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    groups: usize,
) -> Result<()> {
    check_rank(OP, x, 1)?;
    check_matrix(w, "the weight must be 2-D [out, in] (weight, x)", x)?;
    check_matrix(a, "lora_a must be 2-D [r, in] (lora_a, weight)", w)?;
    check_matrix(b, "lora_b must be 2-D [out, r] (lora_b, weight)", w)?;
    if let Some(bias) = bias {
        if bias.rank() != 1 {
            return Err(Error::ShapeMismatch {
                op: OP,
                msg: "the bias must be 1-D [out] (bias, weight)",
                lhs: bias.dims().to_vec(),
                rhs: w.dims().to_vec(),
            });
        }
    }
    for t in [w, a, b].into_iter().chain(bias) {
        check_device(t, x)?;
    }
    check_dtype(OP, x)?;
    for t in [w].into_iter().chain(bias) {
        if t.dtype() != x.dtype() {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: x.dtype(),
                rhs: t.dtype(),
            });
        }
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    if !adapter_dtype_ok(x.dtype(), a.dtype()) {
        return Err(Error::DTypeMismatch {
            op: OP,
            lhs: x.dtype(),
            rhs: a.dtype(),
        });
    }
    let inf = x.dims()[x.rank() - 1];
    let (out, w_in) = (w.dims()[0], w.dims()[1]);
    let (r, a_in) = (a.dims()[0], a.dims()[1]);
    let (b_out, b_r) = (b.dims()[0], b.dims()[1]);
    let mismatch = |msg, lhs: &Tensor, rhs: &Tensor| {
        Err(Error::ShapeMismatch {
            op: OP,
            msg,
            lhs: lhs.dims().to_vec(),
            rhs: rhs.dims().to_vec(),
        })
    };
    if w_in != inf {
        return mismatch(
            "x's last dim must equal the weight's in_features (x [..., in], weight [out, in])",
            x,
            w,
        );
    }
    if a_in != inf {
        return mismatch(
            "lora_a must be [r, in] with the weight's in_features (lora_a, weight)",
            a,
            w,
        );
    }
    if b_r * groups != r {
        return mismatch(
            if groups == 1 {
                "lora_b must be [out, r] with lora_a's r (lora_b, lora_a)"
            } else {
                "a grouped op's lora_a must be [groups * r, in] for lora_b [out, r] (lora_b, lora_a)"
            },
            b,
            a,
        );
    }
    if b_out != out {
        return mismatch(
            "lora_b must be [out, r] with the weight's out_features (lora_b, weight)",
            b,
            w,
        );
    }
    if let Some(bias) = bias {
        if bias.dims()[0] != out {
            return mismatch(
                "the bias must have the weight's out_features elements (bias, weight)",
                bias,
                w,
            );
        }
    }
    if !scale.is_finite() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("scale must be finite, got {scale}"),
        });
    }
    Ok(())
}

/// `A` and `B` in the base dtype (a no-op when they already are; a tracked cast otherwise), for
/// the composite paths (the fused op converts inside, with no graph node).
fn in_base_dtype(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = x.dtype();
    Ok((a.to_dtype(dt)?, b.to_dtype(dt)?))
}

/// `s · h`, with the scaling done in f32 for half types (so that `s` itself is not rounded to
/// the half type) and the result rounded once.
fn scale_by(h: &Tensor, s: f64) -> Result<Tensor> {
    Ok(match h.dtype() {
        DType::F16 | DType::BF16 => (h.to_dtype(DType::F32)? * s)?.to_dtype(h.dtype())?,
        _ => (h * s)?,
    })
}

// ---- public API ------------------------------------------------------------------------------

/// The fused LoRA linear `y = x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ`, with a backward that computes
/// the gradients of `x`, `A` and `B` (each only when it takes part in autograd) and never
/// `W`'s or the bias's: both are frozen, captured by the op rather than autograd inputs.
///
/// `x: [..., in]`, `w: [out, in]`, `bias: [out]`, `a: [r, in]`, `b: [out, r]`; returns
/// `[..., out]`. `x`, `w` and `bias` share a dtype (f32, f16, bf16; f64 on CPU); `a` and `b`
/// share that dtype or are f32 on an f16/bf16 base, taken as they are (converted inside the
/// op, no cast node) with their gradients returned in f32, not rounded to the half type (see
/// the module doc's Dtypes). `w` and `bias` should
/// be contiguous (a non-contiguous one is copied on every call). Errors, before anything runs:
/// [`Error::Rank`] / [`Error::ShapeMismatch`] for wrong ranks and shapes,
/// [`Error::DTypeMismatch`], [`Error::DeviceMismatch`], [`Error::UnsupportedDType`], and
/// [`Error::InvalidArgument`] for a non-finite `scale`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let x = Var::randn(0f32, 1.0, (2, 3, 8), &dev)?;
/// let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?; // frozen
/// let a = Var::randn(0f32, 1.0, (2, 8), &dev)?;
/// let b = Var::randn(0f32, 1.0, (5, 2), &dev)?;
/// let y = flare::lora::lora_linear(&x, &w, None, &a, &b, 0.5)?;
/// assert_eq!(y.dims(), &[2, 3, 5]);
/// let r = flare::lora::lora_linear_reference(&x, &w, None, &a, &b, 0.5)?;
/// let err = (&y - &r)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 1e-4);
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(&w).is_none());
/// assert!(grads.get(a.as_tensor()).is_some() && grads.get(x.as_tensor()).is_some());
/// # Ok::<(), flare::Error>(())
/// ```
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    check(x, w, bias, a, b, scale)?;
    let out = w.dims()[0];
    fused(x, w, bias, a, b, scale, vec![out])
}

/// [`lora_linear`] of `G` projections of one input, as one op: `w` stacks their weights
/// `[out_1 + ... + out_G, in]` (`splits = [out_1, ..., out_G]`), `bias` their biases, `a`
/// their `A` factors `[G · r, in]` (projection `g`'s rows `g · r ..`) and `b` their `B` factors
/// `[out, r]` (its rows `out_1 + ... + out_{g-1} ..`), one rank `r` and one scale `s`; returns
/// the projections' outputs side by side, `[..., out]`:
///   `y[..., block g] = x W_gᵀ (+ bias_g) + s · (x A_gᵀ) B_gᵀ`.
///
/// The values of `G` [`lora_linear`] calls concatenated (up to the order of the sums in the
/// input gradient), for fewer passes over memory: on CUDA `x` is read once for every
/// projection's `x A_gᵀ` and once for every `dA_g`, and the input gradient is two GEMMs over all
/// projections (`G A` and `dy W`) instead of two per projection and `G − 1` sums of `[..., in]`
/// gradients. The gradients of `a` and `b` come out stacked as they went in (a [`Tensor::cat`]
/// of each projection's factors hands every one its own rows). The model runs the gate and up
/// projections of its MLP through it ([`crate::models::Transformer::set_grouped_projections`]).
///
/// Errors: those of [`lora_linear`], and [`Error::InvalidArgument`] for `splits` with a zero,
/// or not summing to `w`'s rows, or `a`'s rows not `splits.len()` times `b`'s columns.
///
/// ```
/// use candle_core::{Device, Tensor, Var, D};
/// let dev = Device::Cpu;
/// let x = Var::randn(0f64, 1.0, (3, 8), &dev)?;
/// let (w1, w2) = (Tensor::randn(0f64, 1.0, (5, 8), &dev)?, Tensor::randn(0f64, 1.0, (4, 8), &dev)?);
/// let (a1, a2) = (Var::randn(0f64, 1.0, (2, 8), &dev)?, Var::randn(0f64, 1.0, (2, 8), &dev)?);
/// let (b1, b2) = (Var::randn(0f64, 1.0, (5, 2), &dev)?, Var::randn(0f64, 1.0, (4, 2), &dev)?);
/// let w = Tensor::cat(&[&w1, &w2], 0)?;
/// let a = Tensor::cat(&[a1.as_tensor(), a2.as_tensor()], 0)?;
/// let b = Tensor::cat(&[b1.as_tensor(), b2.as_tensor()], 0)?;
/// let y = flare::lora::lora_linear_grouped(&x, &w, None, &a, &b, 0.5, &[5, 4])?;
/// let y1 = flare::lora::lora_linear(&x, &w1, None, &a1, &b1, 0.5)?;
/// let y2 = flare::lora::lora_linear(&x, &w2, None, &a2, &b2, 0.5)?;
/// let err = (&y - Tensor::cat(&[&y1, &y2], D::Minus1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
/// assert!(err < 1e-12);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(b2.as_tensor()).unwrap().dims(), &[4, 2]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn lora_linear_grouped(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    splits: &[usize],
) -> Result<Tensor> {
    check_grouped(x, w, bias, a, b, scale, splits)?;
    fused(x, w, bias, a, b, scale, splits.to_vec())
}

/// The fused op on checked operands (`splits` as [`lora_linear_grouped`]'s; `[out]` for one
/// projection), or the composite where it does not run.
fn fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    splits: Vec<usize>,
) -> Result<Tensor> {
    let (out, inf) = w.dims2()?;
    let r = a.dims()[0];
    let lead = &x.dims()[..x.rank() - 1];
    let t: usize = lead.iter().product();
    if !native(x.device()) || t == 0 || inf == 0 || out == 0 || r == 0 {
        // Other devices, and degenerate shapes (which the GEMM paths do not take): the
        // composite, whose ops handle empty tensors, on the factors cast by graph nodes.
        let (a, b) = in_base_dtype(x, a, b)?;
        return composite_grouped(x, w, bias, &a, &b, scale, &splits);
    }
    // The fused op takes `A` and `B` in their own dtype (f32 on a half base): it converts them
    // inside, without graph nodes, and returns their gradients in that dtype.
    // The op reads `x` of any rank as `[T, in]` and returns `[..., out]`: no reshape nodes.
    let op = LoraFwd {
        w: w.detach().contiguous()?,
        bias: bias.map(|b| b.detach().contiguous()).transpose()?,
        scale,
        saved_h: Mutex::new(None),
        saved_ab: Mutex::new(None),
        splits,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

/// [`composite`] of each projection of a grouped op (see [`lora_linear_grouped`]), side by side.
fn composite_grouped(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    splits: &[usize],
) -> Result<Tensor> {
    if splits.len() < 2 {
        return composite(x, w, bias, a, b, scale, None);
    }
    let r = b.dims()[1];
    let mut outs = Vec::with_capacity(splits.len());
    let mut first = 0;
    for (g, &n) in splits.iter().enumerate() {
        let bias_g = bias.map(|b| b.narrow(0, first, n)).transpose()?;
        outs.push(composite(
            x,
            &w.narrow(0, first, n)?,
            bias_g.as_ref(),
            &a.narrow(0, g * r, r)?,
            &b.narrow(0, first, n)?,
            scale,
            None,
        )?);
        first += n;
    }
    Ok(Tensor::cat(&outs, candle_core::D::Minus1)?)
}

/// The unfused composite of flare's own ops: `matmul(x, Wᵀ) + bias + matmul(s ·
/// matmul(dropout(x), Aᵀ), Bᵀ)`, `W` and the bias detached (frozen). `a` and `b` must already
/// be in `x`'s dtype. The fallback on devices without a native path, and the training path
/// with dropout (which is not fused yet).
pub(crate) fn composite(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<f32>,
) -> Result<Tensor> {
    let mut y = matmul(x, &w.detach().t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach())?;
    }
    let xl = match dropout {
        Some(p) if p > 0.0 => crate::lora::dropout::dropout(x, p)?,
        _ => x.clone(),
    };
    let h = scale_by(&matmul(&xl, &a.t()?)?, scale)?;
    let low = matmul(&h, &b.t()?)?;
    Ok((y + low)?)
}

/// [`lora_linear`] with LoRA dropout on the low-rank path's input (probability `p`, inverted
/// scaling `1 / (1 - p)`): `x Wᵀ (+ bias) + s · (dropout(x) Aᵀ) Bᵀ`. Not fused yet: the
/// composite of [`crate::ops::matmul()`] calls with a mask multiply on `x` (`W` and the bias
/// detached, so still frozen). The mask comes from [`crate::lora::dropout`] (seeded inside a
/// [`crate::lora::with_dropout_seed`] scope).
pub(crate) fn lora_linear_dropout(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    p: f32,
) -> Result<Tensor> {
    check(x, w, bias, a, b, scale)?;
    if !(p.is_finite() && (0.0..1.0).contains(&p)) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("dropout must be in [0, 1), got {p}"),
        });
    }
    let (a, b) = in_base_dtype(x, a, b)?;
    composite(x, w, bias, &a, &b, scale, Some(p))
}

/// The unfused LoRA linear from plain Candle ops (`broadcast_matmul`, `broadcast_add`), for
/// tests and benchmarks: same arguments, checks and result as [`lora_linear`], but `W` and the
/// bias are ordinary autograd inputs here (a `Var` weight would get a gradient).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::ones((1, 2), candle_core::DType::F32, &dev)?;
/// let w = Tensor::new(&[[1f32, 2.]], &dev)?;
/// let a = Tensor::new(&[[1f32, 1.]], &dev)?;
/// let b = Tensor::new(&[[3f32]], &dev)?;
/// let bias = Tensor::new(&[10f32], &dev)?;
/// // 1 + 2 + 10 + 0.5 * (1 + 1) * 3
/// let y = flare::lora::lora_linear_reference(&x, &w, Some(&bias), &a, &b, 0.5)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![16.0]]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn lora_linear_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    check(x, w, bias, a, b, scale)?;
    let (a, b) = in_base_dtype(x, a, b)?;
    let mut y = x.broadcast_matmul(&w.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let h = scale_by(&x.broadcast_matmul(&a.t()?)?, scale)?;
    Ok((y + h.broadcast_matmul(&b.t()?)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composite (the fallback on other devices) agrees with the fused op on the CPU,
    /// forward and backward, in f64; `W` gets no gradient from either.
    #[test]
    fn composite_matches_fused() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 3, 9), &dev)?;
        let w = Var::randn(0f64, 1.0, (5, 9), &dev)?;
        let bias = Tensor::randn(0f64, 1.0, 5, &dev)?;
        let a = Var::randn(0f64, 1.0, (3, 9), &dev)?;
        let b = Var::randn(0f64, 1.0, (5, 3), &dev)?;
        let r = Tensor::randn(0f64, 1.0, (2, 3, 5), &dev)?;
        let run = |fused: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let y = if fused {
                lora_linear(xt, w.as_tensor(), Some(&bias), at, bt, 0.7)?
            } else {
                composite(xt, w.as_tensor(), Some(&bias), at, bt, 0.7, None)?
            };
            let g = y.mul(&r)?.sum_all()?.backward()?;
            assert!(
                g.get(w.as_tensor()).is_none(),
                "W got a gradient (fused {fused})"
            );
            let gs = [xt, at, bt].map(|t| g.get(t).cloned().expect("missing gradient"));
            Ok((y, gs.to_vec()))
        };
        let (y1, g1) = run(true)?;
        let (y2, g2) = run(false)?;
        let diff = |p: &Tensor, q: &Tensor| -> Result<f64> {
            Ok((p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
        };
        assert!(diff(&y1, &y2)? < 1e-12);
        for (p, q) in g1.iter().zip(&g2) {
            assert!(diff(p, q)? < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn packed_offsets_are_aligned_and_disjoint() {
        let all = Needs {
            dx: true,
            da: true,
            db: true,
        };
        let p = Packed::new(7, 33, 5, (3, 3), all, false);
        assert_eq!(p.dx, Some(0));
        assert_eq!(p.da, Some(240)); // 231 rounded up to 16
        assert_eq!(p.db, Some(240 + 112)); // 99 rounded up
        assert_eq!(p.total, 352 + 16);
        assert_eq!(p.factor_total, 0);
        assert!(!p.two_buffers());
        let only_db = Needs {
            dx: false,
            da: false,
            db: true,
        };
        let p = Packed::new(7, 33, 5, (3, 3), only_db, false);
        assert_eq!((p.dx, p.da, p.db), (None, None, Some(0)));
        // f32 factors on a half base: dx alone in the base buffer, dA and dB in their own.
        let p = Packed::new(7, 33, 5, (3, 3), all, true);
        assert_eq!((p.dx, p.da, p.db), (Some(0), Some(0), Some(112)));
        assert_eq!((p.total, p.factor_total), (240, 112 + 16));
        assert!(p.two_buffers());
        // Without dx the factor buffer is the op's only output; without dA and dB there is none.
        let p = Packed::new(7, 33, 5, (3, 3), only_db, true);
        assert_eq!((p.db, p.total, p.factor_total), (Some(0), 0, 16));
        assert!(!p.two_buffers());
        let only_dx = Needs {
            dx: true,
            da: false,
            db: false,
        };
        let p = Packed::new(7, 33, 5, (3, 3), only_dx, true);
        assert_eq!((p.dx, p.total, p.factor_total), (Some(0), 240, 0));
        assert!(!p.two_buffers());
    }
}
