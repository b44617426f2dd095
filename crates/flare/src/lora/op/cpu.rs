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

/// `B [out, r]` as the block-diagonal `[out, G · r]` of the grouped op (`splits`: the `G`
/// output blocks): rows of block `g` keep their `r` values in columns `g · r ..`, zeros
/// elsewhere, so that `H Bᵀ` with `H = x Aᵀ [T, G · r]` is every block's `H_g B_gᵀ` side by side.
pub(super) fn block_diag<T: WithDType>(b: &[T], r: usize, splits: &[usize]) -> Vec<T> {
    let ra = r * splits.len();
    let mut m = vec![T::from_f64(0.0); b.len() * splits.len()];
    let mut row = 0;
    for (g, &n) in splits.iter().enumerate() {
        for i in row..row + n {
            m[i * ra + g * r..i * ra + (g + 1) * r].copy_from_slice(&b[i * r..(i + 1) * r]);
        }
        row += n;
    }
    m
}

/// The inverse of [`block_diag`]'s layout: the `[out, r]` diagonal blocks of an `[out, G · r]`
/// matrix (the grouped op's `dB`).
pub(super) fn diag_blocks<T: WithDType>(m: &[T], r: usize, splits: &[usize]) -> Vec<T> {
    let ra = r * splits.len();
    let mut b = Vec::with_capacity(m.len() / splits.len().max(1));
    let mut row = 0;
    for (g, &n) in splits.iter().enumerate() {
        for i in row..row + n {
            b.extend_from_slice(&m[i * ra + g * r..i * ra + (g + 1) * r]);
        }
        row += n;
    }
    b
}
