//! CPU helpers of the fused LoRA op: the forward's epilogue and scaling, in f64, rounded once.

use candle_core::WithDType;

/// `y[i, j] = base[i, j] + s · low[i, j] + bias[j]` over rows of `out`, in f64, rounded once.
pub(super) fn combine_fwd<T: WithDType>(
    base: &[T],
    low: &[T],
    bias: Option<&[T]>,
    s: f64,
    out: usize,
) -> Vec<T> {
    let mut y = Vec::with_capacity(base.len());
    for (brow, lrow) in base.chunks(out).zip(low.chunks(out)) {
        match bias {
            Some(bias) => y.extend(
                brow.iter()
                    .zip(lrow)
                    .zip(bias)
                    .map(|((&b, &l), &c)| T::from_f64(b.to_f64() + s * l.to_f64() + c.to_f64())),
            ),
            None => y.extend(
                brow.iter()
                    .zip(lrow)
                    .map(|(&b, &l)| T::from_f64(b.to_f64() + s * l.to_f64())),
            ),
        }
    }
    y
}

/// `s · v`, rounded to `T`.
pub(super) fn scaled<T: WithDType>(v: &[T], s: f64) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(s * x.to_f64())).collect()
}
