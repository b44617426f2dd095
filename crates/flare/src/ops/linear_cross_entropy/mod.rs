//! Fused linear + cross-entropy: the LM head and the loss together, in chunks of token rows,
//! so that the `[n, vocab]` logits are never allocated whole (Liger-Kernel's
//! `fused_linear_cross_entropy`, llm.c's `fused_classifier`).
//!
//! For hidden states `h: [n, hidden]`, the head's weight `w: [vocab, hidden]` (the embedding
//! matrix itself for a tied head) and targets `t: [n]` (u32):
//!
//! ```text
//! loss      = Σ_i nll_i,   nll_i = logsumexp(z_i) - z_i[t_i],   z = h wᵀ   (0 where t_i = ignore)
//! dz_i      = softmax(z_i) - onehot(t_i)                                     (0 where ignored)
//! d(h)      = g · dz w          d(w) = g · dzᵀ h          (g: the loss's upstream gradient)
//! ```
//!
//! **Chunks.** The rows are processed [`chunk_rows`] at a time (at most [`CHUNK_BYTES`] =
//! 256 MiB of logits in the inputs' dtype, see there for the rule): per chunk the logits GEMM,
//! one row pass that computes each row's log-sum-exp (f32, f64 for f64), its NLL and writes
//! `dz` over the logits, then the GEMMs `d(h_c) = dz w` and `d(w) += dzᵀ h_c`. The live
//! memory beyond the inputs is one chunk of logits, `d(h)` (`[n, hidden]`, like `h`) and
//! `d(w)` when it is computed.
//!
//! **Backward by scaling.** The gradients are computed in the forward, for an upstream gradient
//! of 1 (Liger's trick: the logits of a chunk are at hand then, and recomputing them in the
//! backward would cost a second logits GEMM); the op keeps them and its backward multiplies
//! them by the real upstream gradient `g` (in f32 for half-precision gradients, so `g`, e.g.
//! `1 / tokens`, is not rounded to bf16 first). `d(h)` is computed only when `h` takes part in
//! autograd and `d(w)` only when `w` does (a frozen head, as in LoRA training, gets none and
//! costs nothing); a forward whose result is never differentiated should pass detached inputs
//! (as the trainer's evaluation does), else it computes gradients nobody reads. The kept
//! gradients serve one backward: they are handed over (and freed) by it, and a second backward
//! through the same loss is an error.
//!
//! **Dtypes.** `h` and `w` share a dtype: f32, f16 or bf16 (f64 on the CPU). The logits and
//! `dz` are in that dtype (as the unfused `matmul` + cross-entropy holds them), the
//! reductions in f32 (f64 for f64), the loss is f32 (f64 for f64). On CUDA `d(w)` is
//! accumulated over the chunks in `w`'s dtype by the GEMM (`beta = 1`), on the CPU in f32
//! (f64) and rounded once.
//!
//! **Targets.** A target equal to `ignore_index` adds 0 to the loss and its row gets a zero
//! gradient. On the CPU a target outside `0..vocab` is an error before anything runs. On CUDA
//! the targets are not read back (a device-to-host copy would stall the stream behind the
//! whole model forward): such a target makes the loss NaN (see the kernel,
//! `crates/flare-kernels/src/cu/linear_cross_entropy.cu`); callers holding the targets on the
//! host check them there (the trainer does).

use std::sync::{Arc, Mutex};

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::cpu::targets_of;
use super::{check_dtype, check_same, check_targets, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod plan;

pub use plan::{chunk_rows, CHUNK_BYTES};
use plan::{Dims, Plan, OP, OP_BWD};

/// The gradients the forward computed, for an upstream gradient of 1.
struct Saved {
    dh: Option<Storage>,
    dw: Option<Storage>,
}

/// The op `(hidden [n, h], weight [vocab, h], targets [n]) -> loss []`, which also computes
/// the gradients and keeps them for its backward.
struct LinearCrossEntropy {
    plan: Plan,
    saved: Mutex<Option<Saved>>,
}

impl LinearCrossEntropy {
    fn save(&self, dh: Option<Storage>, dw: Option<Storage>) {
        let mut s = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        *s = Some(Saved { dh, dw });
    }
}

/// `(n, h, vocab)` of the op's (checked) layouts.
fn dims_of(l1: &Layout, l2: &Layout) -> candle_core::Result<Dims> {
    match (l1.dims(), l2.dims()) {
        ([n, h], [vocab, h2]) if h == h2 => Ok(Dims {
            n: *n,
            h: *h,
            vocab: *vocab,
        }),
        (a, b) => Err(candle_core::Error::Msg(format!(
            "{OP}: internal error: hidden {a:?} and weight {b:?}"
        ))),
    }
}

impl CustomOp3 for LinearCrossEntropy {
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
        let d = dims_of(l1, l2)?;
        let t = targets_of(OP, s3, l3)?;
        if t.len() != d.n {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: {} targets for {} rows",
                t.len(),
                d.n
            )));
        }
        cpu::check_targets(t, d.vocab, self.plan.ignore)?;
        let p = self.plan;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => cpu::fwd::<f32>(s1, l1, s2, l2, t, d, p),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => cpu::fwd::<f64>(s1, l1, s2, l2, t, d, p),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => cpu::fwd::<f16>(s1, l1, s2, l2, t, d, p),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => cpu::fwd::<bf16>(s1, l1, s2, l2, t, d, p),
            _ => Err(candle_core::Error::Msg(format!(
                "{OP}: hidden and weight must be both f32, f16, bf16 or f64"
            ))),
        }?;
        self.save(out.dh.map(Storage::Cpu), out.dw.map(Storage::Cpu));
        Ok((out.loss, Shape::from(())))
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
        let d = dims_of(l1, l2)?;
        let io = cuda::Io {
            sh: s1,
            lh: l1,
            sw: s2,
            lw: l2,
            st: s3,
            lt: l3,
        };
        let out = cuda::fwd(io, d, self.plan)?;
        self.save(out.dh.map(Storage::Cuda), out.dw.map(Storage::Cuda));
        Ok((out.loss, Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{OP_BWD}: the gradients computed by the forward were already used by an \
                     earlier backward through this loss (the fused op serves one backward)"
                ))
            })?;
        let scale = |s: Option<Storage>, like: &Tensor| -> candle_core::Result<Option<Tensor>> {
            let Some(s) = s else { return Ok(None) };
            let g = Tensor::from_storage(s, like.shape().clone(), BackpropOp::none(), false);
            // On CUDA: one pass (the cast, the product and the rounding fused).
            #[cfg(feature = "cuda")]
            if let Some(scaled) = cuda::scale(&g, dloss)? {
                return Ok(Some(scaled));
            }
            let g = match g.dtype() {
                DType::F32 | DType::F64 => g.broadcast_mul(&dloss.to_dtype(g.dtype())?)?,
                dt => g
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&dloss.to_dtype(DType::F32)?)?
                    .to_dtype(dt)?,
            };
            Ok(Some(g))
        };
        Ok((scale(saved.dh, hidden)?, scale(saved.dw, weight)?, None))
    }
}

/// Checks the inputs; returns `(n, vocab)`.
fn check(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    check_dtype(OP, hidden)?;
    check_same(OP, hidden, weight)?;
    let (n, h) = hidden.dims2().map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!(
            "hidden must be [tokens, hidden] (flatten the batch first), got shape {:?}",
            hidden.dims()
        ),
    })?;
    let (vocab, hw) = weight.dims2().map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!(
            "weight must be [vocab, hidden], got shape {:?}",
            weight.dims()
        ),
    })?;
    if hw != h {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "hidden is [n, hidden] and weight must be [vocab, hidden] of the same hidden",
            lhs: hidden.dims().to_vec(),
            rhs: weight.dims().to_vec(),
        });
    }
    if h == 0 || vocab == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "the hidden size and the vocabulary must be non-empty, got weight {:?}",
                weight.dims()
            ),
        });
    }
    check_targets(
        OP,
        targets,
        hidden,
        "targets must be [n] for hidden [n, hidden]",
    )?;
    Ok((n, vocab))
}

/// The summed negative log-likelihood `Σ_i [t_i ≠ ignore] (logsumexp(h_i wᵀ) - h_i · w_{t_i})`
/// of `targets: [n]` (u32) under the logits `hidden [n, hidden] @ weight [vocab, hidden]ᵀ`,
/// without ever holding the `[n, vocab]` logits (see the module docs), with a backward. A
/// scalar, f32 (f64 for f64 inputs). The chunk size is [`chunk_rows`]'s.
///
/// Errors, before anything runs: shapes that do not fit, different dtypes or devices, an
/// unsupported dtype, non-u32 targets, and (on the CPU) a target outside the vocabulary that
/// is not `ignore_index`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use flare::ops::{cross_entropy::IGNORE_INDEX, linear_cross_entropy};
/// let h = Tensor::new(&[[1f32, 0.], [0., 2.], [1., 1.]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 0.], [0., 1.], [0., 0.]], &Device::Cpu)?; // vocab 3
/// let t = Tensor::new(&[0u32, 1, IGNORE_INDEX], &Device::Cpu)?;
/// let loss = linear_cross_entropy(&h, &w, &t, IGNORE_INDEX)?.to_scalar::<f32>()?;
/// // Row 0: logits [1, 0, 0], target 0; row 1: logits [0, 2, 0], target 1; row 2 ignored.
/// let lse = |z: [f32; 3]| z.iter().map(|v| v.exp()).sum::<f32>().ln();
/// let want = (lse([1., 0., 0.]) - 1.) + (lse([0., 2., 0.]) - 2.);
/// assert!((loss - want).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<Tensor> {
    let (n, vocab) = check(hidden, weight, targets)?;
    let chunk = chunk_rows(n, vocab, hidden.dtype());
    linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, chunk)
}

/// [`linear_cross_entropy`] with `chunk` token rows per chunk instead of [`chunk_rows`]'s
/// choice (at least 1; more than `n` is one chunk). For tests of the chunk boundaries and for
/// measuring the chunk size; the result does not depend on it beyond rounding (the order of
/// the loss's sum and, for `d(weight)`, of its accumulation).
pub fn linear_cross_entropy_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    chunk: usize,
) -> Result<Tensor> {
    let (n, vocab) = check(hidden, weight, targets)?;
    if chunk == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "chunk must be at least one token row".into(),
        });
    }
    if targets.device().is_cpu() {
        let t = targets.to_vec1::<u32>()?;
        if let Some((i, &bad)) = t
            .iter()
            .enumerate()
            .find(|&(_, &v)| v != ignore_index && v as usize >= vocab)
        {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "target {bad} of row {i} is outside the vocabulary (0..{vocab}) and is not \
                     the ignore index {ignore_index}"
                ),
            });
        }
    }
    if !native(hidden.device()) {
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index);
    }
    let op = LinearCrossEntropy {
        plan: Plan {
            ignore: ignore_index,
            chunk: chunk.min(n.max(1)),
            need_dh: hidden.track_op(),
            need_dw: weight.track_op(),
        },
        saved: Mutex::new(None),
    };
    Ok(hidden.contiguous()?.apply_op3_arc(
        &weight.contiguous()?,
        &targets.contiguous()?,
        Arc::new(Box::new(op)),
    )?)
}

/// The composite reference of [`linear_cross_entropy`] from plain Candle ops: the whole
/// logits `hidden @ weightᵀ` (Candle's matmul), then
/// [`cross_entropy_reference`](super::cross_entropy::cross_entropy_reference) (log-softmax in
/// f32, f64 for f64) summed, with Candle's backward. For tests, benchmarks and devices without
/// flare kernels.
pub fn linear_cross_entropy_reference(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<Tensor> {
    check(hidden, weight, targets)?;
    let logits = hidden.matmul(&weight.t()?)?;
    let nll = super::cross_entropy::cross_entropy_reference(&logits, targets, ignore_index)?;
    Ok(nll.sum_all()?)
}
