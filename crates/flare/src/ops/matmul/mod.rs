//! Batched matrix product `a @ b` with a backward, routed to cuBLASLt on CUDA (small products
//! to flare's own `gemm_small` kernel, where cuBLASLt's host overhead would dominate).
//!
//! `a: [..., m, k]`, `b: [..., k, n]` → `[..., m, n]`, batch dims broadcast as in NumPy.
//! Transposed operands (`x.t()`) are passed to the GEMM as transpose flags with their leading
//! dimension, never copied. A 2-D `b` with a batched `a` (the linear-layer case) is run as one
//! 2-D GEMM over all of `a`'s rows. On CPU the product is Candle's gemm; on CUDA it is
//! cuBLASLt with the algorithm chosen once per shape by its heuristic and cached
//! (`runtime::gemm`, with the `cuda` feature). f32 may use TF32 on CUDA, see [`crate::runtime::set_allow_tf32`].
//!
//! Backward, with `c = a @ b` and upstream gradient `dc`:
//!   `da = dc @ bᵀ`, `db = aᵀ @ dc`
//! each computed only when that input takes part in autograd (a frozen weight gets no gradient
//! and none is computed). Broadcast batch dims are summed by the broadcast's own backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{check_dtype, check_rank, check_same, native};
use crate::{Error, Result};

#[cfg(feature = "cuda")]
mod cuda;
mod plan;

pub use plan::MatLayout;

const OP: &str = "matmul";

/// The product as a Candle custom op. Inputs have rank 2 or 3 with equal batch dims.
struct MatMul;

impl MatMul {
    /// `(batch, m, n, k)` of a product whose operands have already been checked.
    fn bmnk(l1: &Layout, l2: &Layout) -> (usize, usize, usize, usize) {
        let d1 = l1.dims();
        let d2 = l2.dims();
        let r = d1.len();
        let batch = if r == 3 { d1[0] } else { 1 };
        (batch, d1[r - 2], d2[r - 1], d1[r - 1])
    }

    fn out_shape(l1: &Layout, l2: &Layout) -> Shape {
        let mut dims = l1.dims().to_vec();
        let r = dims.len();
        dims[r - 1] = l2.dims()[r - 1];
        Shape::from(dims)
    }
}

impl CustomOp2 for MatMul {
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
        use candle_core::backend::BackendStorage;
        let bmnk = Self::bmnk(l1, l2);
        let out = s1.matmul(s2, bmnk, l1, l2)?;
        Ok((out, Self::out_shape(l1, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = if a.track_op() {
            Some(matmul(dc, &b.t()?).map_err(Error::into_candle)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(matmul(&a.t()?, dc).map_err(Error::into_candle)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// Checks the operands of `a @ b` and returns the broadcast batch dims.
fn check(a: &Tensor, b: &Tensor) -> Result<Vec<usize>> {
    check_rank(OP, a, 2)?;
    check_rank(OP, b, 2)?;
    check_same(OP, a, b)?;
    check_dtype(OP, a)?;
    let (ad, bd) = (a.dims(), b.dims());
    let k = ad[ad.len() - 1];
    if bd[bd.len() - 2] != k {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "inner dimensions differ (a is [..., m, k], b must be [..., k, n])",
            lhs: ad.to_vec(),
            rhs: bd.to_vec(),
        });
    }
    let (ab, bb) = (&ad[..ad.len() - 2], &bd[..bd.len() - 2]);
    let rank = ab.len().max(bb.len());
    let mut batch = vec![0; rank];
    for i in 0..rank {
        let x = if i + ab.len() >= rank {
            ab[i + ab.len() - rank]
        } else {
            1
        };
        let y = if i + bb.len() >= rank {
            bb[i + bb.len() - rank]
        } else {
            1
        };
        batch[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    msg: "batch dimensions do not broadcast",
                    lhs: ad.to_vec(),
                    rhs: bd.to_vec(),
                })
            }
        };
    }
    Ok(batch)
}

/// Makes `t` readable in place by a GEMM (see [`MatLayout`]), copying only if it is not.
fn gemm_ready(t: Tensor) -> Result<Tensor> {
    if MatLayout::of(t.layout()).is_some() {
        Ok(t)
    } else {
        Ok(t.contiguous()?)
    }
}

/// Batched matrix product `a @ b` with broadcasting of batch dims.
///
/// `a: [..., m, k]`, `b: [..., k, n]`, same dtype (f32, f16, bf16; also f64 on CPU) and device.
/// Errors, without running anything, on rank < 2, mismatched inner dims, batch dims that do not
/// broadcast, different dtypes or devices, or an unsupported dtype.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::randn(0f32, 1.0, (2, 3, 4), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
/// let y = flare::ops::matmul(&a, &w.t()?)?; // a linear layer without bias
/// assert_eq!(y.dims(), &[2, 3, 5]);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let batch = check(a, b)?;
    if !native(a.device()) {
        return Ok(a.broadcast_matmul(b)?);
    }
    let (ad, bd) = (a.dims(), b.dims());
    let (m, k, n) = (ad[ad.len() - 2], ad[ad.len() - 1], bd[bd.len() - 1]);
    // A 2-D right operand (a linear layer): one 2-D GEMM over all rows of `a`. A rank-3 `a`
    // that is not contiguous (e.g. a transposed view) goes through the batched path instead,
    // which reads it in place.
    if bd.len() == 2 && ad.len() > 2 && (a.is_contiguous() || ad.len() > 3) {
        let rows: usize = ad[..ad.len() - 1].iter().product();
        let a2 = a.contiguous()?.reshape((rows, k))?;
        let c = a2.apply_op2(&gemm_ready(b.clone())?, MatMul)?;
        let mut out = ad.to_vec();
        *out.last_mut().unwrap_or(&mut 0) = n;
        return Ok(c.reshape(out)?);
    }
    let nb: usize = batch.iter().product();
    let mut a_full = batch.clone();
    a_full.extend([m, k]);
    let mut b_full = batch.clone();
    b_full.extend([k, n]);
    // Broadcast only where needed: each broadcast is a node in the autograd graph whose
    // backward costs a pass over the gradient.
    let a = if a.dims() == a_full.as_slice() {
        a.clone()
    } else {
        a.broadcast_as(a_full)?
    };
    let b = if b.dims() == b_full.as_slice() {
        b.clone()
    } else {
        b.broadcast_as(b_full)?
    };
    let (a3, b3) = if batch.len() == 1 || batch.is_empty() {
        (a, b)
    } else {
        // More than one batch dim: the GEMM takes one batch stride, so collapse them (a view
        // when the batch is contiguous or broadcast, a copy otherwise).
        (a.reshape((nb, m, k))?, b.reshape((nb, k, n))?)
    };
    let (a3, b3) = (gemm_ready(a3)?, gemm_ready(b3)?);
    // Candle 0.11's CPU gemm folds the batches of `a` into one tall matrix whenever `b` is
    // batch-invariant (batch stride 0), without checking that `a`'s rows are contiguous; a
    // transposed `a` would then be read wrongly. Give it a row-major `a` in that case.
    let b_broadcast =
        MatLayout::of(b3.layout()).is_some_and(|l| l.batch > 1 && l.batch_stride == 0);
    let a3 = if a3.device().is_cpu() && b_broadcast && !a3.is_contiguous() {
        a3.contiguous()?
    } else {
        a3
    };
    let c = a3.apply_op2(&b3, MatMul)?;
    if batch.len() > 1 {
        let mut out = batch;
        out.extend([m, n]);
        Ok(c.reshape(out)?)
    } else {
        Ok(c)
    }
}

/// The reference product from Candle's own `broadcast_matmul`, for tests and benchmarks.
pub fn matmul_reference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_matmul(b)?)
}
