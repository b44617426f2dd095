//! The CPU forwards and backward of softmax: one rayon task per block of rows, accumulated in
//! `Elem::A`.

use num_traits::Float;
use rayon::prelude::*;

use super::plan::MaskIndex;
use crate::ops::cpu::{lane_sum, row_max, rows_per_task, Elem};

pub(super) fn softmax_rows<T: Elem>(x: &[T], cols: usize) -> Vec<T> {
    let mut y = vec![T::down(T::acc(0.0)); x.len()];
    if cols == 0 {
        return y;
    }
    let chunk = rows_per_task(cols) * cols;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            // The exponentials are kept in the accumulation type so half types round once.
            let mut e = vec![T::acc(0.0); cols];
            for (yr, xr) in yc.chunks_mut(cols).zip(xc.chunks(cols)) {
                let max = row_max(xr);
                let e = &mut e[..xr.len()];
                for (ei, &v) in e.iter_mut().zip(xr) {
                    *ei = T::exp(v.up() - max);
                }
                let inv = lane_sum(e).recip();
                for (o, &ei) in yr.iter_mut().zip(e.iter()) {
                    *o = T::down(ei * inv);
                }
            }
        });
    y
}

pub(super) fn softmax_bwd_rows<T: Elem>(y: &[T], dy: &[T], cols: usize) -> Vec<T> {
    let mut dx = vec![T::down(T::acc(0.0)); y.len()];
    if cols == 0 {
        return dx;
    }
    let chunk = rows_per_task(cols) * cols;
    dx.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(dxc, (yc, dyc))| {
            for ((o, yr), gr) in dxc
                .chunks_mut(cols)
                .zip(yc.chunks(cols))
                .zip(dyc.chunks(cols))
            {
                let mut dot = T::acc(0.0);
                for (&a, &b) in yr.iter().zip(gr) {
                    dot += a.up() * b.up();
                }
                for ((o, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *o = T::down(a.up() * (b.up() - dot));
                }
            }
        });
    dx
}

pub(super) fn softmax_masked_rows<T: Elem>(
    x: &[T],
    keep: &[u8],
    cols: usize,
    mi: MaskIndex,
) -> Vec<T> {
    let zero = T::down(T::acc(0.0));
    let mut y = vec![zero; x.len()];
    if cols == 0 {
        return y;
    }
    let rows_per = rows_per_task(cols);
    let chunk = rows_per * cols;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(ci, (yc, xc))| {
            let mut e = vec![T::acc(0.0); cols];
            for (ri, (yr, xr)) in yc.chunks_mut(cols).zip(xc.chunks(cols)).enumerate() {
                let m0 = mi.row(ci * rows_per + ri) * cols;
                let kr = &keep[m0..m0 + cols];
                let mut max = T::A::neg_infinity();
                for (&v, &k) in xr.iter().zip(kr) {
                    let v = v.up();
                    if k != 0 && v > max {
                        max = v;
                    }
                }
                if max == T::A::neg_infinity() {
                    // Nothing kept (or only -inf kept): the row is all zeros.
                    continue;
                }
                for ((ei, &v), &k) in e.iter_mut().zip(xr).zip(kr) {
                    *ei = if k != 0 {
                        T::exp(v.up() - max)
                    } else {
                        T::acc(0.0)
                    };
                }
                let inv = lane_sum(&e).recip();
                for (o, &ei) in yr.iter_mut().zip(e.iter()) {
                    *o = T::down(ei * inv);
                }
            }
        });
    y
}
