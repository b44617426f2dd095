//! The CPU forward of the fused linear + cross-entropy: per chunk of token rows, the logits by
//! Candle's CPU GEMM (in the inputs' dtype), then one rayon pass over the rows (log-sum-exp in
//! the accumulation type, the row's NLL and `softmax - onehot` written over the logits), then
//! the two gradient GEMMs. `d(weight)` is accumulated over the chunks in the accumulation type
//! (f32, or f64 for f64) and rounded once at the end.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::plan::{Dims, Plan, OP};
use crate::ops::contiguous_range;
use crate::ops::cpu::{bad_target, row_max, Elem};

/// What the forward returns: the summed NLL (f64 before the final cast), `d(hidden)` `[n, h]`
/// and `d(weight)` `[vocab, h]` for an upstream gradient of 1, each only where asked.
pub(super) struct Forward {
    pub loss: CpuStorage,
    pub dh: Option<CpuStorage>,
    pub dw: Option<CpuStorage>,
}

/// An element type whose `Vec` can be taken back out of a `CpuStorage`.
pub(super) trait Owned: Elem + WithDType {
    fn take(s: CpuStorage) -> candle_core::Result<Vec<Self>>;
}

macro_rules! owned {
    ($t:ty, $v:ident) => {
        impl Owned for $t {
            fn take(s: CpuStorage) -> candle_core::Result<Vec<Self>> {
                match s {
                    CpuStorage::$v(v) => Ok(v),
                    other => Err(candle_core::Error::Msg(format!(
                        "{OP}: internal error: expected {:?} from a GEMM, got {:?}",
                        <$t>::DTYPE,
                        other.dtype()
                    ))),
                }
            }
        }
    };
}
owned!(f32, F32);
owned!(f64, F64);
owned!(f16, F16);
owned!(bf16, BF16);

/// The row pass over one chunk's logits `[rows, vocab]`: returns the chunk's summed NLL (f64)
/// and, with `grad`, overwrites each row with `softmax(row) - onehot(target)` (zeros for an
/// ignored row). Targets have been checked.
fn rows_pass<T: Elem>(
    logits: &mut [T],
    targets: &[u32],
    vocab: usize,
    ignore: u32,
    grad: bool,
) -> f64 {
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == ignore {
                if grad {
                    row.fill(T::down(T::acc(0.0)));
                }
                return 0.0;
            }
            let t = t as usize;
            let max = row_max(row);
            let mut sum = T::acc(0.0);
            for &v in row.iter() {
                sum += T::exp(v.up() - max);
            }
            let lse = max + num_traits::Float::ln(sum);
            let xt = row[t].up();
            if grad {
                for v in row.iter_mut() {
                    *v = T::down(T::exp(v.up() - lse));
                }
                row[t] = T::down(T::exp(xt - lse) - T::acc(1.0));
            }
            num_traits::ToPrimitive::to_f64(&(lse - xt)).unwrap_or(f64::NAN)
        })
        .sum()
}

/// The fused forward for contiguous `hidden [n, h]`, `weight [vocab, h]` of one dtype `T` and
/// checked targets.
pub(super) fn fwd<T: Owned>(
    s_h: &CpuStorage,
    l_h: &Layout,
    s_w: &CpuStorage,
    l_w: &Layout,
    targets: &[u32],
    d: Dims,
    plan: Plan,
) -> candle_core::Result<Forward> {
    let (h_off, _) = contiguous_range(OP, l_h)?;
    let l_wt = l_w.transpose(0, 1)?;
    let mut loss = 0f64;
    let mut dh = plan.need_dh.then(|| vec![T::down(T::acc(0.0)); d.n * d.h]);
    let mut dw = plan.need_dw.then(|| vec![T::acc(0.0); d.vocab * d.h]);
    let grad = plan.need_dh || plan.need_dw;
    for (start, rows) in d.chunks(plan.chunk) {
        let l_hc = Layout::contiguous_with_offset((rows, d.h), h_off + start * d.h);
        // logits = h_c @ wᵀ: [rows, vocab].
        let logits = s_h.matmul(s_w, (1, rows, d.vocab, d.h), &l_hc, &l_wt)?;
        let mut logits = T::take(logits)?;
        loss += rows_pass(
            &mut logits,
            &targets[start..start + rows],
            d.vocab,
            plan.ignore,
            grad,
        );
        if !grad {
            continue;
        }
        let l_dl = Layout::contiguous((rows, d.vocab));
        let dl = T::to_cpu_storage_owned(logits);
        if let Some(dh) = dh.as_mut() {
            // d(h_c) = dlogits @ w: [rows, h].
            let g = T::take(dl.matmul(s_w, (1, rows, d.h, d.vocab), &l_dl, l_w)?)?;
            dh[start * d.h..(start + rows) * d.h].copy_from_slice(&g);
        }
        if let Some(dw) = dw.as_mut() {
            // d(w) += dlogitsᵀ @ h_c: [vocab, h].
            let g =
                T::take(dl.matmul(s_h, (1, d.vocab, d.h, rows), &l_dl.transpose(0, 1)?, &l_hc)?)?;
            dw.par_iter_mut()
                .zip(g.par_iter())
                .for_each(|(a, &v)| *a += v.up());
        }
    }
    let loss = if T::DTYPE == candle_core::DType::F64 {
        CpuStorage::F64(vec![loss])
    } else {
        CpuStorage::F32(vec![loss as f32])
    };
    Ok(Forward {
        loss,
        dh: dh.map(T::to_cpu_storage_owned),
        dw: dw.map(|v| T::to_cpu_storage_owned(v.into_iter().map(T::down).collect())),
    })
}

/// Refuses the first target outside `0..vocab` that is not the ignore index.
pub(super) fn check_targets(targets: &[u32], vocab: usize, ignore: u32) -> candle_core::Result<()> {
    match targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != ignore && t as usize >= vocab)
    {
        Some((i, &t)) => Err(candle_core::Error::Msg(bad_target(OP, i, t, vocab))),
        None => Ok(()),
    }
}
