//! Decode attention without a mask, in one op: `softmax(q kᵀ) v` per batch for queries that
//! see every key (the model's single-new-token step: no causal mask is needed, a sliding window
//! is a narrower view of the cache). Replaces the scores GEMM, the softmax and the second GEMM
//! (three launches and two intermediates) with one launch that reads `k` and `v` in place from
//! strided views of the KV cache.
//!
//! `q: [B, G, d]` (already scaled by `1/sqrt(d)`), `k, v: [B, t, d]` with a unit stride on `d`
//! (any batch and row strides) → `[B, G, d]`. Scores, softmax and the weighted sum are in f32
//! (f64 for f64), rounded once; transformers rounds the scores and probabilities to the model's
//! dtype in between, so half-precision results differ from it by that rounding only.
//!
//! Inference only: when any input takes part in autograd, [`attention_decode`] computes the
//! same thing from differentiable ops (flare's matmul and softmax), so gradients are never cut.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu::dispatch_float3;
use super::{check_dtype, check_same, matmul, native, softmax_last_dim};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod plan;

use cpu::attn_cpu;
use plan::{AttnPlan, OP};

/// Keys the CUDA kernel keeps in shared memory at most (with the warps' partial output rows,
/// `8 * d <= 2048` floats): 48 KiB of f32 in all.
const MAX_KEYS: usize = 10 * 1024 - 64;

struct AttentionDecode;

impl CustomOp3 for AttentionDecode {
    fn name(&self) -> &'static str {
        OP
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
        let p = AttnPlan::new(l1, l2, l3)?;
        let out = dispatch_float3!(OP, s1, s2, s3, |q, k, v| attn_cpu(q, k, v, &p))?;
        Ok((out, l1.shape().clone()))
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
        let p = AttnPlan::new(l1, l2, l3)?;
        Ok((cuda::fwd(s1, s2, s3, &p)?, l1.shape().clone()))
    }
}

/// Whether the fused op runs on CUDA: not when `FLARE_ATTENTION_DECODE=0`
/// ([`crate::runtime::Settings::attention_decode`]). History: the first kernel (one block per query
/// row, 14 blocks at batch 1) lost to the composite path on the H100 (2026-11-24, Qwen2-0.5B
/// shape, bf16: 250-261 against 297-320 tokens/s at batch 1); the flash-decoding split
/// (keys in chunks over many blocks, all query heads of a kv head per block) replaced it and is
/// the default: with 64 new tokens, 230 -> 240 tokens/s at batch 1 and 1511 -> 1663 at batch 8
/// alone, 272 -> 294 and 1730 -> 1939 on top of `gemv_*`.
#[cfg(feature = "cuda")]
fn fused_enabled() -> bool {
    crate::runtime::settings().attention_decode
}

/// `softmax(q kᵀ) v` over every key, batched: `q: [B, G, d]`, `k, v: [B, t, d]` (strided views
/// such as the KV cache's are read in place when their last dim is unit-stride) → `[B, G, d]`.
/// `q` must already carry the `1/sqrt(d)` scale. f32, f16, bf16 (f64 on CPU).
///
/// On the CPU, and on CUDA unless `FLARE_ATTENTION_DECODE=0` (see `fused_enabled`), one
/// fused op when nothing
/// takes part in autograd and `t` fits the kernel's shared memory (about 10k keys); otherwise
/// the same maths from differentiable ops (flare's matmul and softmax).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::new(&[[[1f32, 0.]]], &Device::Cpu)?; // [1, 1, 2]
/// let k = Tensor::new(&[[[1f32, 0.], [0., 1.]]], &Device::Cpu)?;
/// let v = Tensor::new(&[[[2f32, 0.], [0., 2.]]], &Device::Cpu)?;
/// let y = flare::ops::attention_decode(&q, &k, &v)?.flatten_all()?.to_vec1::<f32>()?;
/// let p = 1f32.exp() / (1f32.exp() + 1.0);
/// assert!((y[0] - 2.0 * p).abs() < 1e-6 && (y[1] - 2.0 * (1.0 - p)).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn attention_decode(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    check_same(OP, q, k)?;
    check_same(OP, q, v)?;
    check_dtype(OP, q)?;
    let (b, _, d) = q.dims3().map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!("q must be [batch, rows, head_dim], got {:?}", q.dims()),
    })?;
    let ok = |t: &Tensor| matches!(t.dims3(), Ok((tb, _, td)) if tb == b && td == d);
    if !ok(k) || k.dims() != v.dims() {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "k and v must be [batch, keys, head_dim] with q's batch and head_dim",
            lhs: k.dims().to_vec(),
            rhs: v.dims().to_vec(),
        });
    }
    let t = k.dim(1)?;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    #[cfg(feature = "cuda")]
    let off_on_cuda = q.device().is_cuda() && (!fused_enabled() || !cuda::fits(q.dim(1)?, d));
    #[cfg(not(feature = "cuda"))]
    let off_on_cuda = q.device().is_cuda();
    if !native(q.device()) || tracked || t == 0 || t > MAX_KEYS || d > 256 || off_on_cuda {
        return attention_decode_reference(q, k, v);
    }
    let unit = |x: &Tensor| -> Result<Tensor> {
        Ok(if x.stride()[2] == 1 || d == 1 {
            x.clone()
        } else {
            x.contiguous()?
        })
    };
    Ok(q.contiguous()?.apply_op3_arc(
        &unit(k)?,
        &unit(v)?,
        std::sync::Arc::new(Box::new(AttentionDecode)),
    )?)
}

/// The same maths from flare's differentiable ops: `softmax_last_dim(q @ kᵀ) @ v`.
pub fn attention_decode_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let probs = softmax_last_dim(&matmul(q, &k.t()?)?)?;
    matmul(&probs, v)
}
