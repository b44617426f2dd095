//! The CPU forwards and backward of RMSNorm: one rayon task per block of rows, accumulated in
//! `Elem::A`.

use num_traits::Float;
use rayon::prelude::*;

use crate::ops::cpu::{rows_per_task, Elem};

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline]
pub(super) fn rinv<T: Elem>(x: &[T], eps: T::A) -> T::A {
    // Eight independent partial sums so the loop vectorises.
    let mut lanes = [T::acc(0.0); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let v = c[i].up();
            lanes[i] += v * v;
        }
    }
    let mut ss = T::acc(0.0);
    for l in lanes {
        ss += l;
    }
    for &v in rest {
        let v = v.up();
        ss += v * v;
    }
    (ss / T::acc(x.len() as f64) + eps).sqrt().recip()
}

pub(super) fn rms_norm_rows<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let cols = w.len();
    let mut y = vec![T::down(T::acc(0.0)); x.len()];
    if cols == 0 {
        return y;
    }
    let eps = T::acc(eps);
    let chunk = rows_per_task(cols) * cols;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(cols).zip(xc.chunks(cols)) {
                let r = rinv(xr, eps);
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = T::down(v.up() * r * g.up());
                }
            }
        });
    y
}

/// The normalised sum and the sum `h = x + residual` (rounded to `T`; the norm is computed from
/// the rounded `h`, so it equals `rms_norm` of the returned sum), as one buffer `[y; h]`.
pub(super) fn add_rms_norm_rows<T: Elem>(x: &[T], res: &[T], w: &[T], eps: f64) -> Vec<T> {
    let cols = w.len();
    let n = x.len();
    let mut out = vec![T::down(T::acc(0.0)); 2 * n];
    if cols == 0 {
        return out;
    }
    let eps = T::acc(eps);
    let chunk = rows_per_task(cols) * cols;
    let (ys, hs) = out.split_at_mut(n);
    ys.par_chunks_mut(chunk)
        .zip(hs.par_chunks_mut(chunk))
        .zip(x.par_chunks(chunk).zip(res.par_chunks(chunk)))
        .for_each(|((yc, hc), (xc, rc))| {
            for (h, (&a, &b)) in hc.iter_mut().zip(xc.iter().zip(rc)) {
                *h = T::down(a.up() + b.up());
            }
            for (yr, hr) in yc.chunks_mut(cols).zip(hc.chunks(cols)) {
                let r = rinv(hr, eps);
                for ((o, &v), &g) in yr.iter_mut().zip(hr.iter()).zip(w) {
                    *o = T::down(v.up() * r * g.up());
                }
            }
        });
    out
}

/// Packed `[rows + 1, cols]`: `dx`, then `dw` (zeros when `need_dw` is false).
pub(super) fn rms_norm_bwd_rows<T: Elem>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    need_dw: bool,
) -> Vec<T> {
    let cols = w.len();
    let n = x.len();
    let mut out = vec![T::down(T::acc(0.0)); n + cols];
    if cols == 0 {
        return out;
    }
    let eps = T::acc(eps);
    let rows_chunk = rows_per_task(cols);
    let chunk = rows_chunk * cols;
    let (dxs, dws) = out.split_at_mut(n);
    // Each task returns its partial dw; partials are summed in task order (deterministic).
    let partials: Vec<Vec<T::A>> = dxs
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, gc))| {
            let mut dw = if need_dw {
                vec![T::acc(0.0); cols]
            } else {
                Vec::new()
            };
            for ((dxr, xr), gr) in dxc
                .chunks_mut(cols)
                .zip(xc.chunks(cols))
                .zip(gc.chunks(cols))
            {
                let r = rinv(xr, eps);
                let mut dot = T::acc(0.0);
                for ((&v, &g), &wv) in xr.iter().zip(gr).zip(w) {
                    dot += g.up() * wv.up() * v.up() * r;
                }
                let mean = dot / T::acc(cols as f64);
                for (((o, &v), &g), &wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                    let xh = v.up() * r;
                    *o = T::down(r * (g.up() * wv.up() - xh * mean));
                }
                if need_dw {
                    for ((d, &v), &g) in dw.iter_mut().zip(xr).zip(gr) {
                        *d += g.up() * v.up() * r;
                    }
                }
            }
            dw
        })
        .collect();
    if need_dw {
        let mut acc = vec![T::acc(0.0); cols];
        for p in &partials {
            for (a, &v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
        for (o, a) in dws.iter_mut().zip(acc) {
            *o = T::down(a);
        }
    }
    out
}
