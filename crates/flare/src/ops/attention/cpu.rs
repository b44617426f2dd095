//! The CPU forward of decode attention.

use super::plan::AttnPlan;
use crate::ops::cpu::Elem;

pub(super) fn attn_cpu<T: Elem>(q: &[T], k: &[T], v: &[T], p: &AttnPlan) -> Vec<T> {
    let mut out = Vec::with_capacity(p.b * p.g * p.d);
    let mut scores = vec![T::acc(0.0); p.t];
    let mut acc = vec![T::acc(0.0); p.d];
    for z in 0..p.b {
        for g in 0..p.g {
            let qo = p.q_off + (z * p.g + g) * p.d;
            let mut mx = T::acc(f64::NEG_INFINITY);
            for (j, sc) in scores.iter_mut().enumerate() {
                let ko = p.k.0 + z * p.k.1 + j * p.k.2;
                let mut s = T::acc(0.0);
                for c in 0..p.d {
                    s += q[qo + c].up() * k[ko + c].up();
                }
                *sc = s;
                if s > mx {
                    mx = s;
                }
            }
            let mut sum = T::acc(0.0);
            for sc in scores.iter_mut() {
                *sc = T::exp(*sc - mx);
                sum += *sc;
            }
            acc.iter_mut().for_each(|a| *a = T::acc(0.0));
            for (j, &pj) in scores.iter().enumerate() {
                let vo = p.v.0 + z * p.v.1 + j * p.v.2;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += pj * v[vo + c].up();
                }
            }
            out.extend(acc.iter().map(|&a| T::down(a / sum)));
        }
    }
    out
}
