//! The CPU forward and backward of cross-entropy, one rayon task per block of rows.

use rayon::prelude::*;

use super::plan::OP;
use crate::ops::cpu::Elem;

fn bad_target(i: usize, t: u32, vocab: usize) -> candle_core::Error {
    candle_core::Error::Msg(crate::ops::cpu::bad_target(OP, i, t, vocab))
}

/// `(max, lse)` of one row, in the accumulation type.
fn row_lse<T: Elem>(row: &[T]) -> T::A {
    let mut max = T::acc(f64::NEG_INFINITY);
    for &v in row {
        let v = v.up();
        if v > max {
            max = v;
        }
    }
    let mut sum = T::acc(0.0);
    for &v in row {
        sum += T::exp(v.up() - max);
    }
    max + num_traits::Float::ln(sum)
}

pub(super) fn ce_fwd_rows<T: Elem>(
    x: &[T],
    targets: &[u32],
    vocab: usize,
    ignore: u32,
) -> candle_core::Result<Vec<T::A>> {
    x.par_chunks(vocab.max(1))
        .zip(targets.par_iter())
        .enumerate()
        .map(|(i, (row, &t))| {
            if t == ignore {
                return Ok(T::acc(0.0));
            }
            let ti = t as usize;
            if ti >= vocab {
                return Err(bad_target(i, t, vocab));
            }
            Ok(row_lse(row) - row[ti].up())
        })
        .collect()
}

pub(super) fn ce_bwd_rows<T: Elem>(
    x: &[T],
    targets: &[u32],
    dnll: &[T::A],
    vocab: usize,
    ignore: u32,
) -> candle_core::Result<Vec<T>> {
    let mut dx = vec![T::down(T::acc(0.0)); x.len()];
    if vocab == 0 {
        return Ok(dx);
    }
    dx.par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .zip(targets.par_iter().zip(dnll.par_iter()))
        .enumerate()
        .try_for_each(|(i, ((out, row), (&t, &g)))| {
            if t == ignore || g == T::acc(0.0) {
                return Ok(());
            }
            let ti = t as usize;
            if ti >= vocab {
                return Err(bad_target(i, t, vocab));
            }
            let lse = row_lse(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = T::down(g * T::exp(v.up() - lse));
            }
            out[ti] = T::down(g * (T::exp(row[ti].up() - lse) - T::acc(1.0)));
            Ok(())
        })?;
    Ok(dx)
}
