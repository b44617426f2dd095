//! RMSNorm, and the fused residual-add + RMSNorm of a transformer block, with backward.
//!
//! Forward, per row of `x` (length `n` = last dim), with weight `w`:
//!   `r = 1 / sqrt(mean(x²) + eps)`, `y = x · r ⊙ w`
//! accumulated in f32 (f64 for f64). [`add_rms_norm`] computes `h = x + residual` and
//! `y = rms_norm(h)` in one pass and returns both: the block's next residual stream and the
//! normalised input of its next sub-layer.
//!
//! Backward, with `x̂ = x · r` and `g = dy ⊙ w`:
//!   `dx = r · (g − x̂ · mean(g ⊙ x̂))`,  `dw = Σ_rows dy ⊙ x̂`
//! Candle's `bwd` receives only the inputs, the output and its gradient, so the backward
//! recomputes `r` from `x` (one extra reduction over the row, no stored statistics). `dw` is
//! skipped when the weight is frozen. The backward op returns `dx` and `dw` packed in one
//! tensor of shape `[rows + 1, n]` (last row `dw`) which is split by views.

use crate::ops::StorageSlot;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::cpu::{dispatch_float2, dispatch_float3};
use super::{check_dtype, check_rank, check_same, contiguous_range, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use cpu::{add_rms_norm_rows, rms_norm_bwd_rows, rms_norm_rows};

const OP: &str = "rms_norm";
const OP_ADD: &str = "add_rms_norm";
const OP_BWD: &str = "rms_norm_bwd";

/// The forward op `(x, w) -> y`.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a0, a1) = contiguous_range(OP, l1)?;
        let (b0, b1) = contiguous_range(OP, l2)?;
        let eps = self.eps as f64;
        let out = dispatch_float2!(OP, s1, s2, |x, w| rms_norm_rows(
            &x[a0..a1],
            &w[b0..b1],
            eps
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
        cuda::fwd(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, dy, self.eps, x.track_op(), w.track_op())?;
        Ok((dx, dw))
    }
}

/// Runs the fused backward of `rms_norm(x, w)` and splits its packed output: `dx` when
/// `need_dx`, `dw` when `need_dw` (the caller decides, from what takes part in autograd).
fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    need_dx: bool,
    need_dw: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    if !need_dx && !need_dw {
        return Ok((None, None));
    }
    let cols = w.elem_count();
    let rows = x.elem_count() / cols.max(1);
    let dy = dy.contiguous()?;
    let packed = x.apply_op3_arc(
        w,
        &dy,
        std::sync::Arc::new(Box::new(RmsNormBwd { eps, need_dw })),
    )?;
    let dx = if need_dx {
        Some(packed.narrow(0, 0, rows)?.reshape(x.shape())?)
    } else {
        None
    };
    let dw = if need_dw {
        Some(packed.narrow(0, rows, 1)?.reshape(w.shape())?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The backward op `(x, w, dy) -> [dx; dw]` packed as `[rows + 1, cols]`.
struct RmsNormBwd {
    eps: f32,
    need_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a0, a1) = contiguous_range(OP_BWD, l1)?;
        let (b0, b1) = contiguous_range(OP_BWD, l2)?;
        let (c0, c1) = contiguous_range(OP_BWD, l3)?;
        let (eps, need_dw) = (self.eps as f64, self.need_dw);
        let out = dispatch_float3!(OP_BWD, s1, s2, s3, |x, w, dy| rms_norm_bwd_rows(
            &x[a0..a1],
            &w[b0..b1],
            &dy[c0..c1],
            eps,
            need_dw
        ))?;
        Ok((out, packed_bwd_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(s1, l1, s2, l2, s3, l3, self.eps, self.need_dw)
    }
}

fn packed_bwd_shape(l: &Layout) -> Shape {
    let cols = l.dims().last().copied().unwrap_or(1);
    let rows = l.shape().elem_count() / cols.max(1);
    Shape::from((rows + 1, cols))
}

/// The fused op `(x, residual, w) -> h = x + residual`; it also computes
/// `y = rms_norm(h) * w` in the same pass and leaves it in the slot for [`StashedNorm`]. Its
/// backward passes `h`'s whole gradient (the norm's part included, which Candle has added by
/// then) to `x` and `residual`, and nothing to `w` ([`StashedNorm`] gives `w` its gradient).
struct AddRmsNorm {
    eps: f32,
    stash: std::sync::Arc<StorageSlot>,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        OP_ADD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a0, a1) = contiguous_range(OP_ADD, l1)?;
        let (b0, b1) = contiguous_range(OP_ADD, l2)?;
        let (c0, c1) = contiguous_range(OP_ADD, l3)?;
        let eps = self.eps as f64;
        let n = a1 - a0;
        let both = dispatch_float3!(OP_ADD, s1, s2, s3, |x, r, w| add_rms_norm_rows(
            &x[a0..a1],
            &r[b0..b1],
            &w[c0..c1],
            eps
        ))?;
        let (y, h) = split_cpu(both, n)?;
        self.stash.put(candle_core::Storage::Cpu(y));
        Ok((h, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, h) = cuda::add_fwd(s1, l1, s2, l2, s3, l3, self.eps)?;
        self.stash.put(candle_core::Storage::Cuda(y));
        Ok((h, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        _w: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| dh.clone());
        let dr = r.track_op().then(|| dh.clone());
        Ok((dx, dr, None))
    }
}

/// `(h, w) -> y = rms_norm(h) * w`, returning the `y` [`AddRmsNorm`] already computed (no work
/// of its own); its backward is [`rms_norm`]'s, on `h` (no recomputed sum).
struct StashedNorm {
    eps: f32,
    stash: std::sync::Arc<StorageSlot>,
}

impl CustomOp2 for StashedNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm_norm"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.stash.take_cpu(OP_ADD)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.stash.take_cuda(OP_ADD)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        backward(h, w, dy, self.eps, h.track_op(), w.track_op())
    }
}

/// Splits a CPU buffer `[y; h]` of `2n` elements into its two halves.
fn split_cpu(both: CpuStorage, n: usize) -> candle_core::Result<(CpuStorage, CpuStorage)> {
    use candle_core::CpuStorage as S;
    macro_rules! split {
        ($v:expr, $variant:ident) => {{
            let mut y = $v;
            let h = y.split_off(n);
            Ok((S::$variant(y), S::$variant(h)))
        }};
    }
    match both {
        S::F32(v) => split!(v, F32),
        S::F64(v) => split!(v, F64),
        S::F16(v) => split!(v, F16),
        S::BF16(v) => split!(v, BF16),
        other => candle_core::bail!(
            "{OP_ADD}: internal error: unexpected dtype {:?}",
            candle_core::backend::BackendStorage::dtype(&other)
        ),
    }
}

/// Checks `x` against `weight` (and `eps`) for the RMSNorm ops.
fn check(op: &'static str, x: &Tensor, weight: &Tensor, eps: f32) -> Result<()> {
    check_rank(op, x, 1)?;
    check_same(op, x, weight)?;
    check_dtype(op, x)?;
    let n = x.dims()[x.rank() - 1];
    if weight.rank() != 1 || weight.dims()[0] != n {
        return Err(Error::ShapeMismatch {
            op,
            msg: "weight must be 1-D with the length of x's last dim",
            lhs: x.dims().to_vec(),
            rhs: weight.dims().to_vec(),
        });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("eps must be finite and >= 0, got {eps}"),
        });
    }
    Ok(())
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * weight`, with a fused backward for
/// `x` and `weight`.
///
/// `weight` is 1-D with the length of `x`'s last dim, same dtype and device. f32, f16, bf16
/// (f32 accumulation), and f64 on CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.]], &Device::Cpu)?;
/// let w = Tensor::new(&[1f32, 2.], &Device::Cpu)?;
/// let y = flare::ops::rms_norm(&x, &w, 0.0)?.to_vec2::<f32>()?;
/// let r = (12.5f32).sqrt(); // sqrt(mean(9, 16))
/// assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    check(OP, x, weight, eps)?;
    if !native(x.device()) {
        return rms_norm_reference(x, weight, eps);
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })?)
}

/// The residual pattern of a transformer block in one pass: returns
/// `(rms_norm(x + residual, weight, eps), x + residual)`.
///
/// Both outputs are differentiable; gradients reach `x`, `residual` and `weight`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, 2.]], &Device::Cpu)?;
/// let r = Tensor::new(&[[2f32, 2.]], &Device::Cpu)?;
/// let w = Tensor::new(&[1f32, 1.], &Device::Cpu)?;
/// let (y, h) = flare::ops::add_rms_norm(&x, &r, &w, 1e-6)?;
/// assert_eq!(h.to_vec2::<f32>()?, vec![vec![3., 4.]]);
/// let y2 = flare::ops::rms_norm(&h, &w, 1e-6)?;
/// assert_eq!(y.to_vec2::<f32>()?, y2.to_vec2::<f32>()?);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    check(OP_ADD, x, weight, eps)?;
    check_same(OP_ADD, x, residual)?;
    if x.dims() != residual.dims() {
        return Err(Error::ShapeMismatch {
            op: OP_ADD,
            msg: "x and residual must have the same shape",
            lhs: x.dims().to_vec(),
            rhs: residual.dims().to_vec(),
        });
    }
    if !native(x.device()) {
        return add_rms_norm_reference(x, residual, weight, eps);
    }
    let (x, residual, weight) = (
        x.contiguous()?,
        residual.contiguous()?,
        weight.contiguous()?,
    );
    let stash = std::sync::Arc::new(StorageSlot::default());
    // The sum first (its op runs the fused kernel and stashes y), then y as a function of h: in
    // the backward h's gradient is the norm's part plus the next layers' (one add), and the
    // sum's op hands that one tensor to both x and residual (no add, no recomputed sum).
    let h = x.apply_op3(
        &residual,
        &weight,
        AddRmsNorm {
            eps,
            stash: stash.clone(),
        },
    )?;
    let y = h.apply_op2(&weight, StashedNorm { eps, stash })?;
    Ok((y, h))
}

/// The composite reference from plain Candle ops (with their backward), computed in f32 for
/// half types (f64 for f64). Used by tests, benchmarks and as the fallback on other devices.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let dt = x.dtype();
    let up = |t: &Tensor| -> Result<Tensor> {
        Ok(if dt == DType::F64 {
            t.clone()
        } else {
            t.to_dtype(DType::F32)?
        })
    };
    let xf = up(x)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let y = xf.broadcast_mul(&r)?.broadcast_mul(&up(weight)?)?;
    Ok(y.to_dtype(dt)?)
}

/// The composite reference of [`add_rms_norm`].
pub fn add_rms_norm_reference(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let h = (x + residual)?;
    Ok((rms_norm_reference(&h, weight, eps)?, h))
}
