//! Softmax over the last dimension, numerically stable, with a backward.
//!
//! Forward: `y_i = exp(x_i - max(x)) / Σ_j exp(x_j - max(x))`, accumulated in f32 for f32 and
//! half types (f64 for f64). On CUDA each row stays in registers where it fits, so the input is
//! read once and the output written once.
//!
//! Backward: `dx = y ⊙ (dy − Σ_j dy_j y_j)`. Candle's `bwd` receives the op's output `y`, so the
//! backward needs no recomputation; it is itself a fused op (one pass over `y` and `dy`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

use super::cpu::{dispatch_float, dispatch_float2, lane_sum, row_max, rows_per_task, Elem};
use super::{check_dtype, check_rank, contiguous_range, native};
use crate::Result;

const OP: &str = "softmax_last_dim";
const OP_BWD: &str = "softmax_last_dim_bwd";

fn softmax_rows<T: Elem>(x: &[T], cols: usize) -> Vec<T> {
    let mut y = vec![T::down(T::acc(0.0)); x.len()];
    if cols == 0 {
        return y;
    }
    let chunk = rows_per_task(cols) * cols;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            // The exponentials are kept in the accumulation type so half types round once.
            let mut e = vec![T::acc(0.0); cols];
            for (yr, xr) in yc.chunks_mut(cols).zip(xc.chunks(cols)) {
                let max = row_max(xr);
                let e = &mut e[..xr.len()];
                for (ei, &v) in e.iter_mut().zip(xr) {
                    *ei = T::exp(v.up() - max);
                }
                let inv = lane_sum(e).recip();
                for (o, &ei) in yr.iter_mut().zip(e.iter()) {
                    *o = T::down(ei * inv);
                }
            }
        });
    y
}

fn softmax_bwd_rows<T: Elem>(y: &[T], dy: &[T], cols: usize) -> Vec<T> {
    let mut dx = vec![T::down(T::acc(0.0)); y.len()];
    if cols == 0 {
        return dx;
    }
    let chunk = rows_per_task(cols) * cols;
    dx.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(dxc, (yc, dyc))| {
            for ((o, yr), gr) in dxc
                .chunks_mut(cols)
                .zip(yc.chunks(cols))
                .zip(dyc.chunks(cols))
            {
                let mut dot = T::acc(0.0);
                for (&a, &b) in yr.iter().zip(gr) {
                    dot += a.up() * b.up();
                }
                for ((o, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *o = T::down(a.up() * (b.up() - dot));
                }
            }
        });
    dx
}

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
        super::cuda::softmax::fwd(s, l)
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
        super::cuda::softmax::bwd(s1, l1, s2, l2)
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
