//! SwiGLU, the gate of the Llama-family MLP: `y = silu(g) ⊙ u = g · σ(g) ⊙ u`, one pass
//! instead of Candle's `silu` then `mul` (two launches and an intermediate).
//!
//! Backward, with `σ = sigmoid(g)` and upstream gradient `dy`:
//!   `dg = dy ⊙ u ⊙ σ ⊙ (1 + g ⊙ (1 − σ))`, `du = dy ⊙ g ⊙ σ`.
//! It recomputes `σ` from `g` (Candle's `bwd` gets the inputs) and writes both gradients in one
//! pass into one buffer, returned as two views.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::cpu::{dispatch_float2, dispatch_float3, Elem};
use super::{check_dtype, check_same, contiguous_range, native};
use crate::{Error, Result};

const OP: &str = "swiglu";
const OP_BWD: &str = "swiglu_bwd";

fn swiglu_cpu<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
    let one = T::acc(1.0);
    g.iter()
        .zip(u)
        .map(|(&g, &u)| {
            let g = g.up();
            T::down(g / (one + T::exp(-g)) * u.up())
        })
        .collect()
}

fn swiglu_bwd_cpu<T: Elem>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let one = T::acc(1.0);
    let mut out = vec![T::down(T::acc(0.0)); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    for i in 0..n {
        let (gv, uv, d) = (g[i].up(), u[i].up(), dy[i].up());
        let sg = one / (one + T::exp(-gv));
        dg[i] = T::down(d * uv * sg * (one + gv * (one - sg)));
        du[i] = T::down(d * gv * sg);
    }
    out
}

/// The forward op `(g, u) -> y`.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
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
        let out = dispatch_float2!(OP, s1, s2, |g, u| swiglu_cpu(&g[a0..a1], &u[b0..b1]))?;
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
        Ok((
            super::cuda::swiglu::fwd(s1, l1, s2, l2)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let both = g.apply_op3_arc(u, &dy, std::sync::Arc::new(Box::new(SwiGluBwd)))?;
        let n = g.elem_count();
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(g.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// The backward op `(g, u, dy) -> [dg; du]` (flat, `2n` elements). No backward of its own.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
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
        let out = dispatch_float3!(OP_BWD, s1, s2, s3, |g, u, dy| swiglu_bwd_cpu(
            &g[a0..a1],
            &u[b0..b1],
            &dy[c0..c1]
        ))?;
        Ok((out, Shape::from(2 * (a1 - a0))))
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
        let out = super::cuda::swiglu::bwd(s1, l1, s2, l2, s3, l3)?;
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
}

/// `silu(gate) ⊙ up`, elementwise, with a fused backward for both inputs.
///
/// `gate` and `up` have one shape and dtype (f32, f16, bf16; f64 on CPU), any layout
/// (non-contiguous inputs are copied first). Maths in f32 (f64 for f64), rounded once.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let g = Tensor::new(&[0f32, 1.0, -2.0], &Device::Cpu)?;
/// let u = Tensor::new(&[5f32, 2.0, 1.0], &Device::Cpu)?;
/// let y = flare::ops::swiglu(&g, &u)?.to_vec1::<f32>()?;
/// let silu = |x: f32| x / (1.0 + (-x).exp());
/// assert!(y[0].abs() < 1e-7 && (y[1] - 2.0 * silu(1.0)).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_same(OP, gate, up)?;
    check_dtype(OP, gate)?;
    if gate.dims() != up.dims() {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "gate and up must have the same shape",
            lhs: gate.dims().to_vec(),
            rhs: up.dims().to_vec(),
        });
    }
    if !native(gate.device()) {
        return swiglu_reference(gate, up);
    }
    Ok(gate
        .contiguous()?
        .apply_op2_arc(&up.contiguous()?, std::sync::Arc::new(Box::new(SwiGlu)))?)
}

/// The composite reference `silu(gate) * up` from plain Candle ops (with their backward).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}
