//! The CPU forward of RoPE (the backward is the forward with the opposite sign).

use super::plan::RopePlan;
use crate::ops::cpu::Elem;

pub(super) fn rope_cpu<T: Elem>(x: &[T], cos: &[T], sin: &[T], p: &RopePlan) -> Vec<T> {
    let mut y = vec![T::down(T::acc(0.0)); p.len()];
    rope_cpu_into(x, cos, sin, p, &mut y);
    y
}

/// [`rope_cpu`] into `y`, from `p.y_off` through `p.ys`.
pub(super) fn rope_cpu_into<T: Elem>(x: &[T], cos: &[T], sin: &[T], p: &RopePlan, y: &mut [T]) {
    let (sign, scale) = (T::acc(p.sign), T::acc(p.scale));
    for bb in 0..p.b {
        for t in 0..p.s {
            let cr = (bb * p.cos_bs + t) * p.half;
            for hh in 0..p.h {
                let xo = p.x_off + bb * p.xs[0] + t * p.xs[1] + hh * p.xs[2];
                let yo = p.y_off + bb * p.ys[0] + t * p.ys[1] + hh * p.ys[2];
                for i in 0..p.half {
                    let x1 = x[xo + i * p.xs[3]].up();
                    let x2 = x[xo + (i + p.half) * p.xs[3]].up();
                    let c = cos[cr + i].up();
                    let s = sign * sin[cr + i].up();
                    y[yo + i] = T::down((x1 * c - x2 * s) * scale);
                    y[yo + i + p.half] = T::down((x2 * c + x1 * s) * scale);
                }
            }
        }
    }
}
