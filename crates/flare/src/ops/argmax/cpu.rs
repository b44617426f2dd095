//! The CPU argmax: the first index of the largest element of each row.

use num_traits::Float;

use crate::ops::cpu::Elem;

/// The index of the first maximum of `row` (NaN skipped), `u32::MAX` if none.
fn argmax_row<T: Elem>(row: &[T]) -> u32 {
    let mut best: Option<(usize, T::A)> = None;
    for (i, v) in row.iter().enumerate() {
        let v = v.up();
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(u32::MAX, |(i, _)| i as u32)
}

pub(super) fn argmax_cpu<T: Elem>(x: &[T], cols: usize) -> Vec<u32> {
    if cols == 0 {
        return Vec::new();
    }
    x.chunks(cols).map(argmax_row).collect()
}
