//! Flash attention for training and prefill: `softmax(scale · q kᵀ + mask) v` over packed
//! variable-length sequences, tiled with an online softmax, so the `s × s` score matrix is
//! never in memory; with a backward. On CUDA it runs `crates/flare-kernels/src/cu/
//! flash_attention.cu` (FlashAttention-2 on tensor cores, launched from `cuda.rs`); on the CPU
//! a fused rayon implementation (`cpu.rs`) with the same math, layout and conventions.
//!
//! # Math
//! Per sequence `b`, query head `h` and its kv head `hk = h / (hq / hkv)` (GQA: K and V are
//! read by every query head of the group, never repeated):
//! - forward: `S = scale · Q Kᵀ + mask`, `L = logsumexp_row(S)`, `P = exp(S − L)`, `O = P V`;
//! - backward: `D = rowsum(dO ∘ O)`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`, `dQ = scale · dS K`,
//!   `dK = scale · dSᵀ Q`, `dV = Pᵀ dO`; a kv head's `dK`, `dV` sum over its query heads.
//!
//! The mask: key `j` is visible to query `i` of a sequence with `sq` queries and `sk` keys iff
//! (with `off = sk − sq`, bottom-right aligned as FlashAttention-2) `j <= i + off` when
//! `causal`, and `j >= i + off − w` with a left window `w` (Mistral's `sliding_window` is
//! `w + 1`: a query sees itself and `w` keys before it). A query that sees no key (an empty
//! sequence of keys, the first `sq − sk` rows of a causal one with `sq > sk`) gets `O = 0` and
//! zero gradients.
//!
//! # Layout
//! Packed ("varlen", as FlashAttention's varlen API): `q: [total_q, hq, d]`,
//! `k, v: [total_k, hkv, d]`; sequence `b` is rows `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` of `q`
//! and `cu_seqlens_k[b]..cu_seqlens_k[b + 1]` of `k` and `v`, so a packed row never attends
//! across documents. [`flash_attention_padded`] is the `[B, S, H, D]` case
//! (`cu_seqlens = 0, S, 2S, …`). The fused op reads contiguous inputs: [`flash_attention`]
//! makes them so (a no-op when they already are).
//!
//! # Precision
//! Scores, softmax and accumulators in f32 for f32 / f16 / bf16 inputs (f64 for f64), each
//! output rounded once to the input dtype (on CUDA the probabilities enter the `P V` and
//! backward products as bf16 / f16, as in FlashAttention-2).
//!
//! # What the backward reuses: `L` carried in the op
//! Candle's `bwd` receives only (inputs, output, output gradient), but Candle's graph keeps the
//! op instance (`Arc<Box<dyn CustomOp3>>`) and calls `bwd(&self, ..)` on it. So the forward
//! op holds a `plan::Carry`: its `cpu_fwd` / `cuda_fwd` store `L` there (`[hq, total_q]`;
//! on CUDA with the offsets already uploaded), and the backward reads it: `L` is never
//! recomputed and needs no second output. It is read, not taken, so a second `backward()`
//! over the same graph works; it lives as long as the graph holds the op (a forward without
//! gradient tracking frees it with the op). A backward that finds no `L` (the op was never run
//! forward, which Candle does not allow) fails with a clear error, never a silent recompute.
//! `D` is computed from the op's (rounded) output. The backward is an op of its own over
//! (`q`, `k`, `v`) that holds `O` and `dO` (→ `[dQ, dK, dV]` flattened); it has no backward
//! (a second derivative returns Candle's `BackwardNotSupported`).
//!
//! # Devices and dtypes
//! - CPU: the fused op, every float dtype (f64 too).
//! - CUDA, bf16 / f16 with head dim 64 or 128: the fused op. Where cuDNN's fused attention
//!   takes the geometry (equal-length sequences of a multiple of 128 tokens, no window; cuDNN 9
//!   found at run time; `FLARE_ATTENTION_CUDNN`, on by default)
//!   it runs there (`cudnn.rs`, the engine PyTorch's SDPA uses), else on flare's kernel (tensor
//!   cores take only 16-bit inputs; the kernel is instantiated for those head dims).
//!   [`flash_attention_engine`] says which.
//! - CUDA f32, CUDA with another head dim, and Metal: [`flash_attention`] computes the same
//!   maths per sequence from flare's differentiable ops (matmul, [`softmax_masked`], matmul),
//!   a documented rule by dtype and head dim, not a fallback on error: gradients flow, but
//!   each sequence's `[hq, sq, sk]` scores are materialised. Cast to bf16 for the kernel.

use std::sync::{Arc, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};

use super::cpu::{dispatch_float3, Elem};
use super::{check_dtype, check_same, matmul, softmax_masked};
use crate::ops::softmax::softmax_masked_reference;
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;
mod plan;

use plan::{Carry, FaPlan, Saved, KERNEL_HEAD_DIMS, OP, OP_BWD};

/// Options of one [`flash_attention`] call: the sequence offsets, the mask and the scale.
///
/// ```
/// use flare::ops::FlashAttnParams;
/// // Two documents of 3 and 5 tokens packed in one row, causal, Mistral-style window.
/// let p = FlashAttnParams::varlen(vec![0, 3, 8], vec![0, 3, 8])
///     .causal(true)
///     .window_left(Some(4095));
/// assert_eq!(p.cu_seqlens_q, vec![0, 3, 8]);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlashAttnParams {
    /// Query offsets: `batch + 1` entries, 0 first, non-decreasing, `total_q` last.
    pub cu_seqlens_q: Vec<u32>,
    /// Key / value offsets: `batch + 1` entries, 0 first, non-decreasing, `total_k` last.
    pub cu_seqlens_k: Vec<u32>,
    /// Causal mask, bottom-right aligned when a sequence has fewer queries than keys (the
    /// queries are the last ones, as in prefill after a cached prefix).
    pub causal: bool,
    /// Sliding window: a query sees its diagonal key and at most this many keys before it
    /// (`None`: no window). Mistral's `sliding_window` is this plus one.
    pub window_left: Option<usize>,
    /// The factor of `q kᵀ`; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f64>,
}

impl FlashAttnParams {
    /// Packed sequences with these query and key offsets; no mask, the default scale.
    pub fn varlen(cu_seqlens_q: impl Into<Vec<u32>>, cu_seqlens_k: impl Into<Vec<u32>>) -> Self {
        FlashAttnParams {
            cu_seqlens_q: cu_seqlens_q.into(),
            cu_seqlens_k: cu_seqlens_k.into(),
            ..Default::default()
        }
    }

    /// `batch` sequences of `seqlen_q` queries and `seqlen_k` keys each (a padded batch):
    /// offsets `0, S, 2S, …`.
    pub fn padded(batch: usize, seqlen_q: usize, seqlen_k: usize) -> Self {
        let cu = |s: usize| (0..=batch).map(|b| (b * s) as u32).collect::<Vec<_>>();
        Self::varlen(cu(seqlen_q), cu(seqlen_k))
    }

    /// Sets the `causal` field.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the `window_left` field.
    pub fn window_left(mut self, window_left: Option<usize>) -> Self {
        self.window_left = window_left;
        self
    }

    /// Sets the `softmax_scale` field.
    pub fn softmax_scale(mut self, scale: f64) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
}

/// The forward op over `(q, k, v)`. `carry` receives the forward's `L` for the backward (see
/// the module doc).
struct FlashAttn {
    plan: Arc<FaPlan>,
    carry: Arc<Carry>,
}

impl FlashAttn {
    fn store(&self, saved: Saved) {
        *self.carry.lock().unwrap_or_else(PoisonError::into_inner) = Some(saved);
    }
}

impl CustomOp3 for FlashAttn {
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
        let p = &*self.plan;
        let [(a0, a1), (b0, b1), (c0, c1)] = p.ranges(OP, [l1, l2, l3], 0)?;
        let mut lse = Vec::new();
        let out = dispatch_float3!(OP, s1, s2, s3, |q, k, v| {
            let (o, l) = cpu::fwd(&q[a0..a1], &k[b0..b1], &v[c0..c1], p);
            lse = l;
            o
        })?;
        self.store(Saved::Host(lse));
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
        let p = &*self.plan;
        p.ranges(OP, [l1, l2, l3], 0)?;
        let (o, saved) = cuda::fwd(p, (s1, l1), (s2, l2), (s3, l3))?;
        self.store(saved);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = kernel_input(&dout.to_dtype(q.dtype())?)?;
        let g = q.apply_op3_arc(
            k,
            v,
            Arc::new(Box::new(FlashAttnBwd {
                plan: self.plan.clone(),
                carry: self.carry.clone(),
                o: kernel_input(o)?,
                dout,
            })),
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = g.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = g.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = g.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward op: `(q, k, v) -> [dQ, dK, dV]` flattened, with the forward's output `o`, the
/// output gradient `dout` (both contiguous, `q`'s dtype) and the forward's carried `L`. No
/// backward.
struct FlashAttnBwd {
    plan: Arc<FaPlan>,
    carry: Arc<Carry>,
    o: Tensor,
    dout: Tensor,
}

/// The error of a backward that finds no `L` from its forward.
fn no_lse(device: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{OP_BWD}: internal error: the forward's logsumexp is not in the op (expected the          {device} forward's); the backward never recomputes it"
    ))
}

/// `o`, `dout` of the backward op must have `q`'s planned shape, contiguous.
fn check_o_dout(p: &FaPlan, lo: &Layout, ld: &Layout) -> candle_core::Result<()> {
    let want = [p.total_q, p.hq, p.d];
    for (what, l) in [("o", lo), ("the output gradient", ld)] {
        if l.dims() != want {
            return Err(candle_core::Error::Msg(format!(
                "{OP_BWD}: internal error: {what} is {:?}, planned {want:?}",
                l.dims()
            )));
        }
    }
    Ok(())
}

/// The CPU backward at one dtype over the five tensors' storages and element ranges.
fn cpu_bwd_t<T: Elem + WithDType>(
    s: [&CpuStorage; 5],
    r: [(usize, usize); 5],
    lse: &[f64],
    p: &FaPlan,
) -> candle_core::Result<CpuStorage> {
    let mut x: [&[T]; 5] = [&[]; 5];
    for ((xi, si), (a, b)) in x.iter_mut().zip(s).zip(r) {
        *xi = &si.as_slice::<T>()?[a..b];
    }
    Ok(T::to_cpu_storage_owned(cpu::bwd(x, lse, p)))
}

impl CustomOp3 for FlashAttnBwd {
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
        let p = &*self.plan;
        let [rq, rk, rv] = p.ranges(OP_BWD, [l1, l2, l3], 0)?;
        let (so, lo) = self.o.storage_and_layout();
        let (sd, ld) = self.dout.storage_and_layout();
        check_o_dout(p, lo, ld)?;
        let (ro, rd) = (
            crate::ops::contiguous_range(OP_BWD, lo)?,
            crate::ops::contiguous_range(OP_BWD, ld)?,
        );
        let (Storage::Cpu(so), Storage::Cpu(sd)) = (&*so, &*sd) else {
            return Err(candle_core::Error::Msg(format!(
                "{OP_BWD}: internal error: o and the output gradient are not on the cpu"
            )));
        };
        let carry = self.carry.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(Saved::Host(lse)) = &*carry else {
            return Err(no_lse("cpu"));
        };
        let (s, r) = ([s1, s2, s3, so, sd], [rq, rk, rv, ro, rd]);
        let out = match s1.dtype() {
            DType::F32 => cpu_bwd_t::<f32>(s, r, lse, p),
            DType::F64 => cpu_bwd_t::<f64>(s, r, lse, p),
            DType::F16 => cpu_bwd_t::<half::f16>(s, r, lse, p),
            DType::BF16 => cpu_bwd_t::<half::bf16>(s, r, lse, p),
            dt => Err(candle_core::Error::Msg(format!(
                "{OP_BWD}: unsupported dtype {dt:?} on cpu"
            ))),
        }?;
        let n = p.total_q * p.hq * p.d + 2 * p.total_k * p.hkv * p.d;
        Ok((out, Shape::from(n)))
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
        let p = &*self.plan;
        p.ranges(OP_BWD, [l1, l2, l3], 0)?;
        let (so, lo) = self.o.storage_and_layout();
        let (sd, ld) = self.dout.storage_and_layout();
        check_o_dout(p, lo, ld)?;
        let (Storage::Cuda(so), Storage::Cuda(sd)) = (&*so, &*sd) else {
            return Err(candle_core::Error::Msg(format!(
                "{OP_BWD}: internal error: o and the output gradient are not on the cuda device"
            )));
        };
        let carry = self.carry.lock().unwrap_or_else(PoisonError::into_inner);
        let x = cuda::BwdInputs {
            q: (s1, l1),
            k: (s2, l2),
            v: (s3, l3),
            o: (so, lo),
            dout: (sd, ld),
        };
        let out = match &*carry {
            Some(Saved::Device { lse, cu }) => cuda::bwd(p, &x, lse, cu)?,
            Some(Saved::Cudnn { stats }) => {
                // The forward ran on cuDNN, so its geometry is one cuDNN takes.
                let g = cudnn::geometry(p, s1.dtype()).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{OP_BWD}: internal error: cuDNN statistics for a geometry cuDNN does \
                         not run"
                    ))
                })?;
                let rt = crate::runtime::cuda::CudaRuntime::get(&s1.device)
                    .map_err(crate::Error::into_candle)?;
                cudnn::bwd(&rt, g, p, &x, stats)?
            }
            _ => return Err(no_lse("cuda")),
        };
        let n = p.total_q * p.hq * p.d + 2 * p.total_k * p.hkv * p.d;
        Ok((out, Shape::from(n)))
    }
}

/// Whether `flash_attention` runs the fused op for `q` (see "Devices and dtypes" in the module
/// doc): always on the CPU; on CUDA for bf16 / f16 with a kernel head dim.
fn fused(q: &Tensor, d: usize) -> bool {
    match q.device() {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => {
            matches!(q.dtype(), DType::BF16 | DType::F16) && KERNEL_HEAD_DIMS.contains(&d)
        }
        _ => false,
    }
}

/// `t` contiguous and starting 16-byte aligned, as the CUDA kernel reads its rows (a no-op
/// unless `t` is strided or a view starting mid-row).
fn kernel_input(t: &Tensor) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    if (t.layout().start_offset() * t.dtype().size_in_bytes()) % 16 != 0 {
        return t.copy();
    }
    Ok(t)
}

/// Flash attention over packed variable-length sequences: `q: [total_q, hq, d]`,
/// `k, v: [total_k, hkv, d]` → `[total_q, hq, d]`, with the offsets, mask and scale of `p`
/// (see [`FlashAttnParams`] and the module doc for the exact mask). GQA when `hq` is a multiple
/// of `hkv` (K and V are never repeated). Differentiable in `q`, `k` and `v`. f32, f16, bf16
/// (f32 accumulation), and f64 on the CPU. On CUDA, bf16 / f16 with head dim 64 or 128 run the
/// flash-attention kernel; f32 and other head dims the composed path (module doc, "Devices and
/// dtypes").
///
/// Errors (before anything runs) name the tensor or offsets at fault: a rank other than 3,
/// different dtypes or devices, `k` and `v` of different shapes, a head dim that differs from
/// `q`'s, `hq` not a multiple of `hkv`, offsets that do not start at 0, decrease, differ in
/// length or do not end at the tensor's row count, a scale that is not finite.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flare::ops::{flash_attention, FlashAttnParams};
/// let dev = Device::Cpu;
/// // Two documents (2 and 1 tokens), 2 query heads sharing 1 kv head, head dim 4.
/// let q = Tensor::randn(0f32, 1., (3, 2, 4), &dev)?;
/// let k = Tensor::randn(0f32, 1., (3, 1, 4), &dev)?;
/// let v = Tensor::randn(0f32, 1., (3, 1, 4), &dev)?;
/// let p = FlashAttnParams::varlen(vec![0, 2, 3], vec![0, 2, 3]).causal(true);
/// let o = flash_attention(&q, &k, &v, &p)?;
/// assert_eq!(o.dims(), &[3, 2, 4]);
/// // The first token of each document sees only itself: its output is its value row.
/// let o0 = o.get(2)?.get(0)?.to_vec1::<f32>()?;
/// assert_eq!(o0, v.get(2)?.get(0)?.to_vec1::<f32>()?);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, p: &FlashAttnParams) -> Result<Tensor> {
    let plan = check(q, k, v, p)?;
    if !fused(q, plan.d) {
        return composed(q, k, v, &plan, false);
    }
    Ok(kernel_input(q)?.apply_op3_arc(
        &kernel_input(k)?,
        &kernel_input(v)?,
        Arc::new(Box::new(FlashAttn {
            plan: Arc::new(plan),
            carry: Arc::new(Carry::default()),
        })),
    )?)
}

/// Flash attention on one packed q/k/v projection, with RoPE fused in: `qkv: [b, s, hq + 2 hkv,
/// d]` holds each token's query heads, then its key heads, then its value heads (one fused
/// q/k/v projection's output reshaped); `cos`, `sin` are [`rope_tokens`](crate::ops::rope_tokens)'s
/// tables. Returns `[b · s, hq, d]`: the value of
/// `flash_attention(rope_tokens(q, cos, sin, q_scale), rope_tokens(k, cos, sin, 1), v, p)` with
/// `q`, `k`, `v` the three head ranges of `qkv` as token rows (`p`'s offsets count the `b · s`
/// rows).
///
/// What it saves over that composition: its backward returns the gradient of `qkv` in one
/// buffer, in the packed layout. Three narrows of `qkv` would each hand back a zero-padded
/// gradient of `qkv`'s size, and autograd would sum the three. Inside, one pass writes the
/// rotated `q`, `k` and a copy of `v` into one buffer that the attention reads as its three
/// inputs, and the attention's backward writes the three gradients into one buffer that one
/// pass rotates back into the packed layout. The model runs its q/k/v projections through
/// [`lora_linear_grouped`](crate::lora::lora_linear_grouped) into it.
///
/// Where the fused attention does not run (the composed paths of [`flash_attention`]), it is
/// that composition. Errors: those of [`flash_attention`] and [`rope_tokens`](crate::ops::rope_tokens)
/// on the three parts, and [`Error::InvalidArgument`] when `qkv`'s heads are not `hq + 2 hkv`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flare::ops::{flash_attention, flash_attention_qkvpacked, rope_tokens, FlashAttnParams};
/// let dev = Device::Cpu;
/// // One sequence of 5 tokens, 2 query heads, 1 key/value head, head dim 4.
/// let qkv = Tensor::randn(0f32, 1., (1, 5, 4, 4), &dev)?;
/// let cos = Tensor::randn(0f32, 1., (5, 2), &dev)?;
/// let sin = Tensor::randn(0f32, 1., (5, 2), &dev)?;
/// let p = FlashAttnParams::varlen(vec![0, 5], vec![0, 5]).causal(true);
/// let o = flash_attention_qkvpacked(&qkv, &cos, &sin, 0.5, 2, 1, &p)?;
/// let q = rope_tokens(&qkv.narrow(2, 0, 2)?, &cos, &sin, 0.5)?.reshape((5, 2, 4))?;
/// let k = rope_tokens(&qkv.narrow(2, 2, 1)?, &cos, &sin, 1.0)?.reshape((5, 1, 4))?;
/// let v = qkv.narrow(2, 3, 1)?.contiguous()?.reshape((5, 1, 4))?;
/// let want = flash_attention(&q, &k, &v, &p)?;
/// let err = (&o - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 1e-5);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn flash_attention_qkvpacked(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    q_scale: f64,
    hq: usize,
    hkv: usize,
    p: &FlashAttnParams,
) -> Result<Tensor> {
    let (b, s, h, d) = qkv.dims4().map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!(
            "qkv must be [batch, seq, q_heads + 2 * kv_heads, head_dim], got {:?}",
            qkv.dims()
        ),
    })?;
    if h != hq + 2 * hkv || hq == 0 || hkv == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("qkv has {h} heads, not {hq} query heads and twice {hkv} key/value heads"),
        });
    }
    let rows = b * s;
    let part = |t: &Tensor, heads: usize| t.reshape((rows, heads, d));
    let (q, k, v) = (
        qkv.narrow(2, 0, hq)?,
        qkv.narrow(2, hq, hkv)?,
        qkv.narrow(2, hq + hkv, hkv)?,
    );
    let n = qkv.elem_count();
    // The plan, checked on token-row views of the three parts (no copies: shapes only).
    let flat = qkv.reshape((rows, h, d))?;
    let plan = check(
        &flat.narrow(1, 0, hq)?,
        &flat.narrow(1, hq, hkv)?,
        &flat.narrow(1, hq + hkv, hkv)?,
        p,
    )?;
    if !fused(qkv, d) || n == 0 || n > u32::MAX as usize {
        let q = part(&crate::ops::rope_tokens(&q, cos, sin, q_scale)?, hq)?;
        let k = part(&crate::ops::rope_tokens(&k, cos, sin, 1.0)?, hkv)?;
        let v = part(&v.contiguous()?, hkv)?;
        return flash_attention(&q, &k, &v, p);
    }
    let planar = crate::ops::rope::rope_qkv_planar(qkv, cos, sin, q_scale, hq, hkv)?;
    Ok(planar.apply_op1_arc(Arc::new(Box::new(FlashAttnPlanar {
        fa: FlashAttn {
            plan: Arc::new(plan),
            carry: Arc::new(Carry::default()),
        },
        parts: Parts { rows, hq, hkv, d },
    })))?)
}

/// The three parts of a planar `[q | k | v]` buffer: `[rows, hq, d]`, then `[rows, hkv, d]`
/// twice.
#[derive(Debug, Clone, Copy)]
struct Parts {
    rows: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl Parts {
    /// The parts' layouts inside the buffer `l` (contiguous, of exactly their elements).
    fn layouts(&self, op: &str, l: &Layout) -> candle_core::Result<[Layout; 3]> {
        let Parts { rows, hq, hkv, d } = *self;
        let (nq, nk) = (rows * hq * d, rows * hkv * d);
        if !l.is_contiguous() || l.shape().elem_count() != nq + 2 * nk {
            return Err(candle_core::Error::Msg(format!(
                "{op}: internal error: a planar buffer {:?} is not [{nq} + 2 x {nk}] contiguous",
                l.dims()
            )));
        }
        let o = l.start_offset();
        Ok([
            Layout::contiguous_with_offset((rows, hq, d), o),
            Layout::contiguous_with_offset((rows, hkv, d), o + nq),
            Layout::contiguous_with_offset((rows, hkv, d), o + nq + nk),
        ])
    }
}

/// [`FlashAttn`] on a planar `[q | k | v]` buffer (one input, so one gradient): the forward and
/// backward of the three-input op on the buffer's three parts.
struct FlashAttnPlanar {
    fa: FlashAttn,
    parts: Parts,
}

impl CustomOp1 for FlashAttnPlanar {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [lq, lk, lv] = self.parts.layouts(OP, l)?;
        self.fa.cpu_fwd(s, &lq, s, &lk, s, &lv)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let [lq, lk, lv] = self.parts.layouts(OP, l)?;
        self.fa.cuda_fwd(s, &lq, s, &lk, s, &lv)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dout = kernel_input(&grad.to_dtype(arg.dtype())?)?;
        let g = arg.apply_op1_arc(Arc::new(Box::new(FlashAttnPlanarBwd {
            bwd: FlashAttnBwd {
                plan: self.fa.plan.clone(),
                carry: self.fa.carry.clone(),
                o: kernel_input(res)?,
                dout,
            },
            parts: self.parts,
        })))?;
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// [`FlashAttnBwd`] on a planar buffer: `[dQ | dK | dV]`, the buffer's own layout. No backward.
struct FlashAttnPlanarBwd {
    bwd: FlashAttnBwd,
    parts: Parts,
}

impl CustomOp1 for FlashAttnPlanarBwd {
    fn name(&self) -> &'static str {
        OP_BWD
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [lq, lk, lv] = self.parts.layouts(OP_BWD, l)?;
        self.bwd.cpu_fwd(s, &lq, s, &lk, s, &lv)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let [lq, lk, lv] = self.parts.layouts(OP_BWD, l)?;
        self.bwd.cuda_fwd(s, &lq, s, &lk, s, &lv)
    }
}

/// Which implementation [`flash_attention`] runs for these inputs and options: `"cpu"` (the
/// fused CPU op), `"cudnn"` (cuDNN's fused attention: see the module doc), `"kernel"` (flare's
/// CUDA kernel) or `"composed"` (flare's differentiable ops, for dtypes and head dims the fused
/// paths do not take). Checks the inputs as [`flash_attention`] does; on CUDA it may open cuDNN.
pub fn flash_attention_engine(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &FlashAttnParams,
) -> Result<&'static str> {
    let plan = check(q, k, v, p)?;
    if !fused(q, plan.d) {
        return Ok("composed");
    }
    match q.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            let rt = crate::runtime::cuda::CudaRuntime::get(dev)?;
            Ok(if cudnn::applies(&rt, &plan, q.dtype()).is_some() {
                "cudnn"
            } else {
                "kernel"
            })
        }
        _ => Ok("cpu"),
    }
}

/// [`flash_attention`] on a padded batch: `q: [B, Sq, hq, d]`, `k, v: [B, Sk, hkv, d]` →
/// `[B, Sq, hq, d]`. The offsets come from the shapes; `p`'s `cu_seqlens_*` must be empty (or
/// equal to `FlashAttnParams::padded(B, Sq, Sk)`'s).
pub fn flash_attention_padded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &FlashAttnParams,
) -> Result<Tensor> {
    let dims4 = |t: &Tensor, name: &str, rows: &str, heads: &str| {
        t.dims4().map_err(|_| Error::InvalidArgument {
            op: OP,
            msg: format!(
                "{name} must be [batch, {rows}, {heads}, head_dim] (padded), got {:?}",
                t.dims()
            ),
        })
    };
    let (b, sq, hq, d) = dims4(q, "q", "seqlen_q", "q_heads")?;
    let (bk, sk, hkv, dk) = dims4(k, "k", "seqlen_k", "kv_heads")?;
    dims4(v, "v", "seqlen_k", "kv_heads")?;
    if bk != b {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "q and k must have the same batch (q, k)",
            lhs: q.dims().to_vec(),
            rhs: k.dims().to_vec(),
        });
    }
    let mut pp = FlashAttnParams::padded(b, sq, sk);
    if !(p.cu_seqlens_q.is_empty() && p.cu_seqlens_k.is_empty())
        && (p.cu_seqlens_q != pp.cu_seqlens_q || p.cu_seqlens_k != pp.cu_seqlens_k)
    {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "flash_attention_padded takes its cu_seqlens from the shapes: leave them empty"
                .into(),
        });
    }
    pp.causal = p.causal;
    pp.window_left = p.window_left;
    pp.softmax_scale = p.softmax_scale;
    let o = flash_attention(
        &q.reshape((b * sq, hq, d))?,
        &k.reshape((b * sk, hkv, dk))?,
        &v.reshape((b * sk, v.dim(2)?, v.dim(3)?))?,
        &pp,
    )?;
    Ok(o.reshape((b, sq, hq, d))?)
}

/// The composed float64 reference: per sequence, explicit scores `scale · q kᵀ` in f64, the
/// mask as a u8 keep matrix, a masked softmax (rows that see nothing are 0) and `P v`, from
/// plain Candle ops with their autograd; the result in the input dtype. Materialises each
/// sequence's `[hq, sq, sk]` scores: for tests.
pub fn flash_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &FlashAttnParams,
) -> Result<Tensor> {
    let plan = check(q, k, v, p)?;
    let up = |t: &Tensor| t.to_dtype(DType::F64);
    let o = composed(&up(q)?, &up(k)?, &up(v)?, &plan, true)?;
    Ok(o.to_dtype(q.dtype())?)
}

/// Attention per sequence with the scores materialised: plain Candle ops (`reference`) or
/// flare's differentiable matmul and masked softmax (the non-CPU path).
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, p: &FaPlan, reference: bool) -> Result<Tensor> {
    let (hq, hkv, d, g) = (p.hq, p.hkv, p.d, p.group());
    let dev = q.device();
    let mm = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        if reference {
            Ok(a.matmul(b)?)
        } else {
            matmul(a, b)
        }
    };
    let mut parts = Vec::with_capacity(p.batch());
    for b in 0..p.batch() {
        let (q0, sq, k0, sk) = p.seq(b);
        if sq == 0 {
            continue;
        }
        if sk == 0 {
            parts.push(Tensor::zeros((sq, hq, d), q.dtype(), dev)?);
            continue;
        }
        let mut keep = vec![0u8; sq * sk];
        for i in 0..sq {
            let (lo, hi) = p.keys(i, sq, sk);
            keep[i * sk + lo..i * sk + hi].fill(1);
        }
        let keep = Tensor::from_vec(keep, (1, sq, sk), dev)?;
        // [sq, hq, d] -> [hkv, g * sq, d]: a kv head's query heads one after the other.
        let qs = q
            .narrow(0, q0, sq)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((hkv, g * sq, d))?;
        let ks = k.narrow(0, k0, sk)?.transpose(0, 1)?.contiguous()?;
        let vs = v.narrow(0, k0, sk)?.transpose(0, 1)?.contiguous()?;
        let s = mm(&qs, &ks.t()?)?.affine(p.scale, 0.0)?;
        let probs = if reference {
            softmax_masked_reference(&s, &keep)?
        } else {
            softmax_masked(&s, &keep)?
        };
        let o = mm(&probs, &vs)?.reshape((hq, sq, d))?.transpose(0, 1)?;
        parts.push(o);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros((p.total_q, hq, d), q.dtype(), dev)?);
    }
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// Checks the inputs of [`flash_attention`] and builds the plan.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, p: &FlashAttnParams) -> Result<FaPlan> {
    for (t, name, rows, heads) in [
        (q, "q", "total_q", "q_heads"),
        (k, "k", "total_k", "kv_heads"),
        (v, "v", "total_k", "kv_heads"),
    ] {
        if t.rank() != 3 {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "{name} must be [{rows}, {heads}, head_dim] (packed), got shape {:?}",
                    t.dims()
                ),
            });
        }
    }
    check_same("flash_attention (k against q)", q, k)?;
    check_same("flash_attention (v against q)", q, v)?;
    check_dtype(OP, q)?;
    let (total_q, hq, d) = q.dims3()?;
    let (total_k, hkv, dk) = k.dims3()?;
    let shape_err = |msg, a: &Tensor, b: &Tensor| {
        Err(Error::ShapeMismatch {
            op: OP,
            msg,
            lhs: a.dims().to_vec(),
            rhs: b.dims().to_vec(),
        })
    };
    if k.dims() != v.dims() {
        return shape_err("k and v must have the same shape (k, v)", k, v);
    }
    if dk != d {
        return shape_err("q and k must have the same head_dim (q, k)", q, k);
    }
    if hkv == 0 || hq == 0 || hq % hkv != 0 {
        return shape_err(
            "q's heads must be a positive multiple of k's heads (GQA) (q, k)",
            q,
            k,
        );
    }
    if d == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("head_dim must be positive, got q {:?}", q.dims()),
        });
    }
    let cu_q = offsets("cu_seqlens_q", &p.cu_seqlens_q, total_q, "q")?;
    let cu_k = offsets("cu_seqlens_k", &p.cu_seqlens_k, total_k, "k")?;
    if cu_q.len() != cu_k.len() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "cu_seqlens_q has {} entries and cu_seqlens_k {}: both must be batch + 1",
                cu_q.len(),
                cu_k.len()
            ),
        });
    }
    let scale = p.softmax_scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !scale.is_finite() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("softmax_scale must be finite, got {scale}"),
        });
    }
    Ok(FaPlan {
        hq,
        hkv,
        d,
        total_q,
        total_k,
        cu_q,
        cu_k,
        causal: p.causal,
        window: p.window_left,
        scale,
    })
}

/// Checks one offsets vector against its tensor's row count.
fn offsets(name: &str, cu: &[u32], total: usize, tensor: &str) -> Result<Vec<usize>> {
    let bad = |why: String| Error::InvalidArgument {
        op: OP,
        msg: format!("{name} {cu:?}: {why}"),
    };
    if cu.len() < 2 {
        return Err(bad("needs batch + 1 >= 2 entries".into()));
    }
    if cu[0] != 0 {
        return Err(bad("must start at 0".into()));
    }
    if let Some(w) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(bad(format!("decreases at entry {}", w + 1)));
    }
    let last = *cu.last().unwrap_or(&0) as usize;
    if last != total {
        return Err(bad(format!(
            "must end at {tensor}'s row count {total}, ends at {last}"
        )));
    }
    Ok(cu.iter().map(|&c| c as usize).collect())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The forward leaves `L` in the op, the backward reads it from there (and does not
    /// recompute it), and a backward without it fails clearly. Shifting the carried `L` by
    /// `ln 2` halves `P = exp(S − L)` and so, with `D` taken from the (unchanged) output, every
    /// gradient: `dV = Pᵀ dO`, `dS = P ∘ (dP − D)`. A backward that recomputed `L` would not
    /// see the shift.
    #[test]
    fn backward_reads_the_carried_logsumexp() -> crate::Result<()> {
        let dev = Device::Cpu;
        // Two documents: 3 queries over 4 keys, and 5 queries over 4 keys (causal, bottom-right:
        // its first query sees no key, L = -inf); 4 query heads over 2 kv heads.
        let p = FlashAttnParams::varlen(vec![0, 3, 8], vec![0, 4, 8]).causal(true);
        let (hq, hkv, d) = (4, 2, 8);
        let q = Var::from_tensor(&Tensor::randn(0f64, 1.0, (8, hq, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, (8, hkv, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f64, 1.0, (8, hkv, d), &dev)?)?;
        let plan = Arc::new(check(&q, &k, &v, &p)?);
        let carry = Arc::new(Carry::default());
        let o = q.as_tensor().apply_op3_arc(
            &k,
            &v,
            Arc::new(Box::new(FlashAttn {
                plan: plan.clone(),
                carry: carry.clone(),
            })),
        )?;

        // L is the explicit logsumexp of the visible scores.
        let lse = match &*carry.lock().unwrap() {
            Some(Saved::Host(l)) => l.clone(),
            _ => panic!("the CPU forward left no L in its op"),
        };
        let (qv, kv) = (
            q.flatten_all()?.to_vec1::<f64>()?,
            k.flatten_all()?.to_vec1::<f64>()?,
        );
        let mut minus_inf = 0;
        for b in 0..plan.batch() {
            let (q0, sq, k0, sk) = plan.seq(b);
            for h in 0..hq {
                for i in 0..sq {
                    let (lo, hi) = plan.keys(i, sq, sk);
                    let qi = &qv[((q0 + i) * hq + h) * d..][..d];
                    let s: Vec<f64> = (lo..hi)
                        .map(|j| {
                            let kj = &kv[((k0 + j) * hkv + h / 2) * d..][..d];
                            plan.scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let want = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    let got = lse[h * plan.total_q + q0 + i];
                    if s.is_empty() {
                        assert_eq!(got, f64::NEG_INFINITY, "row {b}/{h}/{i} sees no key");
                        minus_inf += 1;
                    } else {
                        assert!((got - want).abs() < 1e-12, "L {b}/{h}/{i}: {got} vs {want}");
                    }
                }
            }
        }
        assert_eq!(
            minus_inf, hq,
            "the masked first row of document 1, every head"
        );

        let r = Tensor::randn(0f64, 1.0, (8, hq, d), &dev)?;
        let loss = (&o * &r)?.sum_all()?;
        let g1 = loss.backward()?;
        if let Some(Saved::Host(l)) = &mut *carry.lock().unwrap() {
            l.iter_mut().for_each(|x| *x += std::f64::consts::LN_2);
        }
        let g2 = loss.backward()?;
        for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let a = g1
                .get(x)
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            let b = g2
                .get(x)
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(norm > 1e-3, "{name}: a vanishing gradient tests nothing");
            let err = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x / 2.0 - y).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                err < 1e-12 * norm,
                "{name}: {err} (the backward ignored the carried L)"
            );
        }

        // No L: a clear error, not a silent recompute.
        *carry.lock().unwrap() = None;
        let e = loss.backward().expect_err("a backward without L");
        assert!(e.to_string().contains("logsumexp"), "{e}");
        Ok(())
    }
}
