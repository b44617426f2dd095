//! Softmax over the last dimension, numerically stable, with a backward.
//!
//! Forward: `y_i = exp(x_i - max(x)) / Σ_j exp(x_j - max(x))`, accumulated in f32 for f32 and
//! half types (f64 for f64). On CUDA each row stays in registers where it fits, so the input is
//! read once and the output written once.
//!
//! Backward: `dx = y ⊙ (dy − Σ_j dy_j y_j)`. Candle's `bwd` receives the op's output `y`, so the
//! backward needs no recomputation; it is itself a fused op (one pass over `y` and `dy`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::cpu::{dispatch_float, dispatch_float2};
use super::{check_dtype, check_rank, contiguous_range, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod plan;

use cpu::{softmax_bwd_rows, softmax_masked_rows, softmax_rows};
use plan::{MaskIndex, OP, OP_BWD, OP_MASKED};

/// The forward op.
struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(OP, l)?;
        let cols = l.dims().last().copied().unwrap_or(1);
        let out = dispatch_float!(OP, s, |v| softmax_rows(&v[start..end], cols))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(y.apply_op2_arc(
            &dy,
            std::sync::Arc::new(Box::new(SoftmaxBwd)),
        )?))
    }
}

/// The backward op: `(y, dy) -> dx`. It has no backward of its own.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a0, a1) = contiguous_range(OP_BWD, l1)?;
        let (b0, b1) = contiguous_range(OP_BWD, l2)?;
        let cols = l1.dims().last().copied().unwrap_or(1);
        let out = dispatch_float2!(OP_BWD, s1, s2, |y, dy| softmax_bwd_rows(
            &y[a0..a1],
            &dy[b0..b1],
            cols
        ))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(s1, l1, s2, l2)
    }
}

/// Softmax over the last dimension, with a fused backward.
///
/// Works for any rank >= 1 and any layout (non-contiguous inputs are made contiguous first).
/// f32, f16 and bf16 (f32 accumulation), and f64 on CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu)?;
/// let y = flare::ops::softmax_last_dim(&x)?;
/// let row = y.get(1)?.to_vec1::<f32>()?;
/// assert!(row.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
/// # Ok::<(), flare::Error>(())
/// ```
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_rank(OP, x, 1)?;
    check_dtype(OP, x)?;
    if !native(x.device()) {
        return softmax_reference(x);
    }
    Ok(x.contiguous()?.apply_op1(SoftmaxLastDim)?)
}

/// The composite reference, from plain Candle ops (with their backward), computed in f32 for
/// half types. Used by tests, benchmarks and as the fallback on devices without flare kernels.
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = if matches!(dt, candle_core::DType::F64) {
        x.clone()
    } else {
        x.to_dtype(candle_core::DType::F32)?
    };
    let max = xf.max_keepdim(D::Minus1)?;
    let e = xf.broadcast_sub(&max)?.exp()?;
    let y = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(y.to_dtype(dt)?)
}

/// The masked forward op: `(x, keep) -> y`.
struct SoftmaxMasked;

impl CustomOp2 for SoftmaxMasked {
    fn name(&self) -> &'static str {
        OP_MASKED
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mi = MaskIndex::new(l1, l2)?;
        let (a0, a1) = contiguous_range(OP_MASKED, l1)?;
        let (b0, b1) = contiguous_range(OP_MASKED, l2)?;
        let keep = match s2 {
            CpuStorage::U8(k) => &k[b0..b1],
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{OP_MASKED}: the mask must be u8"
                )))
            }
        };
        let cols = l1.dims().last().copied().unwrap_or(1);
        let out = dispatch_float!(OP_MASKED, s1, |v| softmax_masked_rows(
            &v[a0..a1],
            keep,
            cols,
            mi
        ))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let mi = MaskIndex::new(l1, l2)?;
        cuda::fwd_masked(s1, l1, s2, l2, mi)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _keep: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Masked outputs are exactly 0, so `y * (dy - dot)` is 0 there: the plain softmax
        // backward on `y` is the masked one.
        let dy = dy.contiguous()?;
        let dx = y.apply_op2_arc(&dy, std::sync::Arc::new(Box::new(SoftmaxBwd)))?;
        Ok((Some(dx), None))
    }
}

/// Softmax over the last dimension of `scores` with the positions where `keep` is 0 masked out,
/// with a fused backward. The mask is broadcast over the batch and head dims by index
/// arithmetic, never materialised at the scores' shape.
///
/// `keep` is u8 `[mb, s, t]`; `scores` (f32, f16 or bf16, and f64 on CPU) has rank >= 2, last
/// dim `t`, and its rows (every other dim, flattened) must be `mb` equal blocks of whole
/// `s`-row groups: `scores` is read as `[mb, n, s, t]` and block `i` uses mask `i` for each of
/// its `n` groups. So `[b, heads, s, t]` scores take a `[b, s, t]` or `[1, s, t]` mask, and so
/// do GQA-shaped `[b · kv_heads, group · s, t]` ones (no reshape needed).
///
/// A kept position's output is `exp(x - m) / Σ_kept exp(x - m)` (m the kept maximum), a masked
/// one's exactly 0, so gradients never reach masked scores. A row with nothing kept (or only
/// `-inf` kept) is all zeros, with a zero gradient; masking with the dtype's minimum instead
/// would give such a row a uniform distribution, but the model never produces one (a padding
/// query attends to itself).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 0.]]], &Device::Cpu)?;
/// let keep = Tensor::new(&[[[1u8, 1, 0], [0, 0, 0]]], &Device::Cpu)?;
/// let y = flare::ops::softmax_masked(&x, &keep)?.to_vec3::<f32>()?;
/// assert_eq!(y[0][0][2], 0.0);
/// assert!((y[0][0][0] + y[0][0][1] - 1.0).abs() < 1e-6);
/// assert_eq!(y[0][1], vec![0.0; 3]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn softmax_masked(scores: &Tensor, keep: &Tensor) -> Result<Tensor> {
    check_rank(OP_MASKED, scores, 2)?;
    check_dtype(OP_MASKED, scores)?;
    if !scores.device().same_device(keep.device()) {
        return Err(Error::DeviceMismatch {
            op: OP_MASKED,
            lhs: crate::error::device_name(scores.device()),
            rhs: crate::error::device_name(keep.device()),
        });
    }
    if keep.dtype() != DType::U8 {
        return Err(Error::DTypeMismatch {
            op: OP_MASKED,
            lhs: DType::U8,
            rhs: keep.dtype(),
        });
    }
    if MaskIndex::from_dims(scores.dims(), keep.dims()).is_err() {
        return Err(Error::ShapeMismatch {
            op: OP_MASKED,
            msg: "the mask [mb, s, t] must split the scores' rows into mb blocks of whole s-row \
                  groups, with the same last dim (scores, mask)",
            lhs: scores.dims().to_vec(),
            rhs: keep.dims().to_vec(),
        });
    }
    if !native(scores.device()) {
        return softmax_masked_reference(scores, keep);
    }
    Ok(scores
        .contiguous()?
        .apply_op2(&keep.contiguous()?, SoftmaxMasked)?)
}

/// The composite reference of [`softmax_masked`] from plain Candle ops (with their backward),
/// in f32 for half types: masked scores set to -inf, a softmax, and rows with nothing kept
/// zeroed.
pub fn softmax_masked_reference(scores: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let dt = scores.dtype();
    let xf = if matches!(dt, DType::F64) {
        scores.clone()
    } else {
        scores.to_dtype(DType::F32)?
    };
    let xd = xf.dims().to_vec();
    let (mb, s, t) = keep.dims3()?;
    let rows: usize = xd[..xd.len() - 1].iter().product();
    let shape = (mb, rows / (mb * s).max(1), s, t);
    let xf = xf.reshape(shape)?;
    let k = keep.reshape((mb, 1, s, t))?.broadcast_as(shape)?;
    let neg = Tensor::new(f64::NEG_INFINITY, xf.device())?
        .to_dtype(xf.dtype())?
        .broadcast_as(shape)?;
    let masked = k.where_cond(&xf, &neg)?;
    let max = masked.max_keepdim(D::Minus1)?;
    // Rows with nothing kept: max = -inf; shift by 0 there so exp gives 0, not NaN.
    let finite = max.ne(f64::NEG_INFINITY)?;
    let shift = finite.where_cond(&max, &max.zeros_like()?)?;
    let e = masked.broadcast_sub(&shift)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let sum = finite.where_cond(&sum, &sum.ones_like()?)?;
    Ok(e.broadcast_div(&sum)?.reshape(xd)?.to_dtype(dt)?)
}
