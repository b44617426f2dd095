//! Cross-entropy of logits against target ids, fused: the full-vocabulary log-softmax is never
//! materialised.
//!
//! Forward, per row `i` of `logits: [n, vocab]` with target `t_i`:
//! `nll_i = logsumexp(x_i) - x_i[t_i]`, computed in one pass (max, then the sum of
//! `exp(x - max)`), accumulated in f32 (f64 for f64 logits). A row whose target equals the
//! ignore index has `nll_i = 0`. The op returns the per-token `nll: [n]` (f32, or f64 for f64
//! logits); [`cross_entropy`] and [`cross_entropy_weighted`] reduce it.
//!
//! Backward: `dlogits_ij = dnll_i · (softmax(x_i)_j - [j = t_i])`, in the logits' dtype, one
//! fused op over each row. Candle's `bwd` receives only the inputs, the output and its
//! gradient, so the backward recomputes each row's log-sum-exp from the logits (one extra read
//! of the row) rather than keeping an `[n]` side output alive. Ignored rows (and rows with a
//! zero `dnll`) get a zero gradient.
//!
//! On CUDA (`crates/flare-kernels/src/cu/cross_entropy.cu`) one block owns a row; the forward
//! uses an online max/sum so each logit is read once. A target out of `0..vocab` (and not the
//! ignore index) is an error on the CPU; on CUDA, where checking would need a host round trip,
//! its `nll` is NaN (so the loss is NaN, never silently wrong).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu::targets_of;
use super::{check_dtype, check_targets, contiguous_range, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod plan;

pub use plan::IGNORE_INDEX;
use plan::{OP, OP_BWD};

use cpu::{ce_bwd_rows, ce_fwd_rows};

/// The forward op `(logits [n, vocab], targets [n] u32) -> nll [n]`.
struct CrossEntropy {
    ignore: u32,
}

impl CustomOp2 for CrossEntropy {
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
        let (a, b) = contiguous_range(OP, l1)?;
        let vocab = l1.dims()[1];
        let n = l1.dims()[0];
        let t = targets_of(OP, s2, l2)?;
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(ce_fwd_rows(&v[a..b], t, vocab, self.ignore)?),
            CpuStorage::F16(v) => CpuStorage::F32(ce_fwd_rows(&v[a..b], t, vocab, self.ignore)?),
            CpuStorage::BF16(v) => CpuStorage::F32(ce_fwd_rows(&v[a..b], t, vocab, self.ignore)?),
            CpuStorage::F64(v) => CpuStorage::F64(ce_fwd_rows(&v[a..b], t, vocab, self.ignore)?),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{OP}: logits must be f32, f16, bf16 or f64"
                )))
            }
        };
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(s1, l1, s2, l2, self.ignore)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _nll: &Tensor,
        dnll: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dnll = dnll.contiguous()?;
        let dx = logits.apply_op3_arc(
            targets,
            &dnll,
            std::sync::Arc::new(Box::new(CrossEntropyBwd {
                ignore: self.ignore,
            })),
        )?;
        Ok((Some(dx), None))
    }
}

/// The backward op `(logits, targets, dnll) -> dlogits`. It has no backward of its own.
struct CrossEntropyBwd {
    ignore: u32,
}

impl CustomOp3 for CrossEntropyBwd {
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
        let (a, b) = contiguous_range(OP_BWD, l1)?;
        let (c, d) = contiguous_range(OP_BWD, l3)?;
        let vocab = l1.dims()[1];
        let t = targets_of(OP, s2, l2)?;
        let ig = self.ignore;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(ce_bwd_rows(&x[a..b], t, &g[c..d], vocab, ig)?)
            }
            (CpuStorage::F16(x), CpuStorage::F32(g)) => {
                CpuStorage::F16(ce_bwd_rows(&x[a..b], t, &g[c..d], vocab, ig)?)
            }
            (CpuStorage::BF16(x), CpuStorage::F32(g)) => {
                CpuStorage::BF16(ce_bwd_rows(&x[a..b], t, &g[c..d], vocab, ig)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(ce_bwd_rows(&x[a..b], t, &g[c..d], vocab, ig)?)
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{OP_BWD}: unsupported dtypes (logits f32/f16/bf16 with an f32 gradient, or \
                     f64 with f64)"
                )))
            }
        };
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
        cuda::bwd(s1, l1, s2, l2, s3, l3, self.ignore)
    }
}

fn check(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    check_dtype(OP, logits)?;
    let (n, vocab) = logits.dims2().map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!("logits must be [n, vocab], got shape {:?}", logits.dims()),
    })?;
    check_targets(
        OP,
        targets,
        logits,
        "targets must be [n] for logits [n, vocab]",
    )?;
    if vocab == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "the vocabulary is empty".into(),
        });
    }
    Ok((n, vocab))
}

/// Per-token negative log-likelihood `nll: [n]` of `targets: [n]` (u32) under
/// `logits: [n, vocab]` (f32, f16, bf16; f64 on CPU), fused (see the module docs), with a fused
/// backward. Rows whose target is `ignore_index` give 0 and get no gradient. The result is f32
/// (f64 for f64 logits).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.], [1., 3.]], &Device::Cpu)?;
/// let t = Tensor::new(&[1u32, flare::ops::cross_entropy::IGNORE_INDEX], &Device::Cpu)?;
/// let nll = flare::ops::cross_entropy_per_token(&logits, &t, flare::ops::cross_entropy::IGNORE_INDEX)?;
/// let v = nll.to_vec1::<f32>()?;
/// assert!((v[0] - 2f32.ln()).abs() < 1e-6 && v[1] == 0.0);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn cross_entropy_per_token(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<Tensor> {
    check(logits, targets)?;
    if !native(logits.device()) {
        return cross_entropy_reference(logits, targets, ignore_index);
    }
    Ok(logits.contiguous()?.apply_op2_arc(
        &targets.contiguous()?,
        std::sync::Arc::new(Box::new(CrossEntropy {
            ignore: ignore_index,
        })),
    )?)
}

/// The mean cross-entropy over the tokens whose target is not `ignore_index` (a scalar, f32 or
/// f64 for f64 logits; 0 when every token is ignored).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.], [0., 0.]], &Device::Cpu)?;
/// let t = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// let loss = flare::ops::cross_entropy(&logits, &t, u32::MAX)?.to_scalar::<f32>()?;
/// assert!((loss - 2f32.ln()).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
    let nll = cross_entropy_per_token(logits, targets, ignore_index)?;
    let counted = targets
        .ne(ignore_index)?
        .to_dtype(nll.dtype())?
        .sum_all()?
        .maximum(1.0)?;
    Ok(nll.sum_all()?.broadcast_div(&counted)?)
}

/// `Σ_i w_i · nll_i` with per-token weights `w: [n]` (f32, or f64 for f64 logits), the targets of
/// zero-weight tokens are not read (pass [`IGNORE_INDEX`] or any id). With `w_i = 1 / count` on
/// counted tokens this is the mean; a trainer with gradient accumulation uses
/// `1 / (tokens in the whole optimizer step)` so that micro-batches add up to the step's mean.
pub fn cross_entropy_weighted(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let nll = cross_entropy_per_token(logits, targets, IGNORE_INDEX)?;
    if weights.dims() != nll.dims() {
        return Err(Error::ShapeMismatch {
            op: OP,
            msg: "weights must be [n] for logits [n, vocab]",
            lhs: logits.dims().to_vec(),
            rhs: weights.dims().to_vec(),
        });
    }
    Ok((nll * weights.to_dtype(nll_dtype(logits.dtype()))?)?.sum_all()?)
}

fn nll_dtype(logits: DType) -> DType {
    if logits == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The composite reference of [`cross_entropy_per_token`] from plain Candle ops (log-softmax
/// in f32, or f64 for f64, then a gather), with Candle's backward. Used by tests, benchmarks
/// and as the fallback on devices without flare kernels.
pub fn cross_entropy_reference(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<Tensor> {
    let (n, _) = check(logits, targets)?;
    let x = logits.to_dtype(nll_dtype(logits.dtype()))?;
    let lsm = candle_nn::ops::log_softmax(&x, 1)?;
    let keep = targets.ne(ignore_index)?;
    let safe = keep.where_cond(targets, &targets.zeros_like()?)?;
    let picked = lsm.gather(&safe.unsqueeze(1)?, 1)?.reshape(n)?;
    let zero = picked.zeros_like()?;
    Ok(keep.where_cond(&picked.neg()?, &zero)?)
}
