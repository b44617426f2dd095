//! SwiGLU, the gate of the Llama-family MLP: `y = silu(g) ⊙ u = g · σ(g) ⊙ u`, one pass
//! instead of Candle's `silu` then `mul` (two launches and an intermediate).
//!
//! Two forms: [`swiglu`] of separate `gate` and `up` tensors, and [`swiglu_packed`] of one
//! fused gate/up projection `[..., 2 · I]` whose rows hold the gate then the up half (the
//! model's decode path runs gate and up as one GEMM). Both read through row strides, so the
//! halves are never copied apart.
//!
//! Backward, with `σ = sigmoid(g)` and upstream gradient `dy`:
//!   `dg = dy ⊙ u ⊙ σ ⊙ (1 + g ⊙ (1 − σ))`, `du = dy ⊙ g ⊙ σ`.
//! It recomputes `σ` from `g` (Candle's `bwd` gets the inputs) and writes both gradients in one
//! pass into one buffer: `[dg; du]` split into two views for [`swiglu`], the packed
//! `[..., 2 · I]` gradient for [`swiglu_packed`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp3, Layout, Shape, Tensor};

use super::cpu::{dispatch_float, dispatch_float2, dispatch_float3};
use super::{check_dtype, check_rank, check_same, contiguous_range, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod plan;

use cpu::{bwd_cpu, fwd_cpu};
use plan::{SwiGluPlan, OP, OP_BWD};

/// The forward of separate `(g, u) -> y`; with `grad_in_place`, its backward on CUDA writes
/// the gradients over `g` and `u` ([`swiglu_grad_in_place`]).
struct SwiGlu {
    grad_in_place: bool,
}

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
        let p = SwiGluPlan::separate(l1, l2)?;
        let out = dispatch_float2!(OP, s1, s2, |g, u| fwd_cpu(g, u, &p))?;
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
        let p = SwiGluPlan::separate(l1, l2)?;
        Ok((cuda::fwd(s1, s2, &p)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        if self.grad_in_place && g.device().is_cuda() {
            g.inplace_op3(u, &dy, &SwiGluBwdInPlace)?;
            return Ok((Some(g.detach()), Some(u.detach())));
        }
        let both = g.apply_op3_arc(u, &dy, std::sync::Arc::new(Box::new(SwiGluBwd)))?;
        let n = g.elem_count();
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(g.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// The backward of separate inputs, `(g, u, dy) -> [dg; du]` (flat, `2n` elements). No
/// backward of its own.
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
        let p = SwiGluPlan::separate(l1, l2)?;
        let (d0, d1) = contiguous_range(OP_BWD, l3)?;
        let out = dispatch_float3!(OP_BWD, s1, s2, s3, |g, u, dy| bwd_cpu(
            g,
            u,
            &dy[d0..d1],
            &p
        ))?;
        Ok((out, Shape::from(p.grad_len)))
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
        let p = SwiGluPlan::separate(l1, l2)?;
        let out = cuda::bwd(s1, s2, s3, l3, &p)?;
        Ok((out, Shape::from(p.grad_len)))
    }
}

/// The backward of separate inputs written over them, `(g, u, dy)`: `g <- dg`, `u <- du`
/// (CUDA only; [`swiglu_grad_in_place`]).
struct SwiGluBwdInPlace;

impl InplaceOp3 for SwiGluBwdInPlace {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        // `SwiGlu::bwd` takes this op on CUDA only; the CPU keeps the allocating backward.
        Err(candle_core::Error::Msg(format!(
            "{OP_BWD}: internal error: the in-place backward runs on CUDA only"
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let p = SwiGluPlan::separate(l1, l2)?;
        cuda::bwd_in_place(s1, s2, s3, l3, &p)
    }
}

/// The forward of a packed `gu -> y`.
struct SwiGluPacked;

fn half_shape(l: &Layout) -> Shape {
    let mut d = l.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last /= 2;
    }
    Shape::from(d)
}

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu_packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = SwiGluPlan::packed(l)?;
        let out = dispatch_float!(OP, s, |v| fwd_cpu(v, v, &p))?;
        Ok((out, half_shape(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = SwiGluPlan::packed(l)?;
        Ok((cuda::fwd(s, s, &p)?, half_shape(l)))
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(gu.apply_op2_arc(
            &dy,
            std::sync::Arc::new(Box::new(SwiGluPackedBwd)),
        )?))
    }
}

/// The backward of a packed input, `(gu, dy) -> d(gu)`. No backward of its own.
struct SwiGluPackedBwd;

impl CustomOp2 for SwiGluPackedBwd {
    fn name(&self) -> &'static str {
        "swiglu_packed_bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = SwiGluPlan::packed(l1)?;
        let (d0, d1) = contiguous_range(OP_BWD, l2)?;
        let out = dispatch_float2!(OP_BWD, s1, s2, |gu, dy| bwd_cpu(gu, gu, &dy[d0..d1], &p))?;
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
        let p = SwiGluPlan::packed(l1)?;
        Ok((cuda::bwd(s1, s1, s2, l2, &p)?, l1.shape().clone()))
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
    swiglu_op(gate, up, false)
}

/// [`swiglu`] whose backward, on CUDA, writes `d gate` over `gate` and `d up` over `up` instead
/// of into a fresh buffer, as Liger-Kernel's does: two `[..., I]` buffers fewer at the MLP's
/// memory peak (0.9 GiB per 16,384 tokens at Llama-3.1-8B's I = 14,336). The values are
/// [`swiglu`]'s, bit for bit.
///
/// The contract: nothing may read `gate` or `up` (or a view of their storage) after the
/// backward reaches this op, and the two must not share a storage (Candle refuses the in-place
/// op then). The model's MLP keeps it: `gate` and `up` are fresh projection outputs read only
/// here (a projection's backward reads its input, not its output). On CPU and Metal this is
/// [`swiglu`].
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let g = Var::new(&[0.5f32, -1.0], &Device::Cpu)?;
/// let u = Var::new(&[2f32, 3.0], &Device::Cpu)?;
/// // Fresh tensors in front of the op (never the variables themselves, which the optimizer
/// // reads after the backward), as the contract asks.
/// let (gate, up) = (g.as_tensor().affine(1.0, 0.0)?, u.as_tensor().affine(1.0, 0.0)?);
/// let y = flare::ops::swiglu_grad_in_place(&gate, &up)?;
/// let grads = y.sum_all()?.backward()?;
/// let du = grads.get(u.as_tensor()).unwrap().to_vec1::<f32>()?;
/// let silu = |x: f32| x / (1.0 + (-x).exp());
/// assert!((du[0] - silu(0.5)).abs() < 1e-6 && (du[1] - silu(-1.0)).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn swiglu_grad_in_place(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    swiglu_op(gate, up, true)
}

fn swiglu_op(gate: &Tensor, up: &Tensor, grad_in_place: bool) -> Result<Tensor> {
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
    Ok(gate.contiguous()?.apply_op2_arc(
        &up.contiguous()?,
        std::sync::Arc::new(Box::new(SwiGlu { grad_in_place })),
    )?)
}

/// [`swiglu`] of the two halves of the last dim of `gate_up: [..., 2 · I]` (gate first, then
/// up, as a fused gate/up projection writes them), returning `[..., I]`, with a backward to
/// `gate_up`. The halves are read in place, never copied apart.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let gu = Tensor::new(&[[1f32, -2.0, 2.0, 1.0]], &Device::Cpu)?; // gate [1, -2], up [2, 1]
/// let y = flare::ops::swiglu_packed(&gu)?;
/// let want = flare::ops::swiglu(&gu.narrow(1, 0, 2)?, &gu.narrow(1, 2, 2)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn swiglu_packed(gate_up: &Tensor) -> Result<Tensor> {
    check_rank(OP, gate_up, 1)?;
    check_dtype(OP, gate_up)?;
    let width = gate_up.dims()[gate_up.rank() - 1];
    if width % 2 != 0 || width == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "gate_up's last dim must be even and positive (gate then up), got shape {:?}",
                gate_up.dims()
            ),
        });
    }
    if !native(gate_up.device()) {
        let d = gate_up.rank() - 1;
        return swiglu_reference(
            &gate_up.narrow(d, 0, width / 2)?,
            &gate_up.narrow(d, width / 2, width / 2)?,
        );
    }
    Ok(gate_up
        .contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(SwiGluPacked)))?)
}

/// The composite reference `silu(gate) * up` from plain Candle ops (with their backward).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}
