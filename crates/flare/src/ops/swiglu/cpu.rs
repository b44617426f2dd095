//! The CPU forward and backward of SwiGLU.

use super::plan::SwiGluPlan;
use crate::ops::cpu::Elem;

fn sig<A: num_traits::Float>(g: A) -> A {
    A::one() / (A::one() + (-g).exp())
}

/// The rows of `silu(g) · u`, `p.ldy` apart (zeros after each row's `cols` in a padded plan).
pub(super) fn fwd_cpu<T: Elem>(g: &[T], u: &[T], p: &SwiGluPlan) -> Vec<T> {
    let mut y = Vec::with_capacity(p.rows * p.ldy);
    for r in 0..p.rows {
        for c in 0..p.cols {
            let gv = g[p.g_off + r * p.ldg + c].up();
            let uv = u[p.u_off + r * p.ldu + c].up();
            y.push(T::down(gv * sig(gv) * uv));
        }
        y.resize(y.len() + (p.ldy - p.cols), T::down(T::acc(0.0)));
    }
    y
}

pub(super) fn bwd_cpu<T: Elem>(g: &[T], u: &[T], dy: &[T], p: &SwiGluPlan) -> Vec<T> {
    let one = T::acc(1.0);
    let mut out = vec![T::down(T::acc(0.0)); p.grad_len];
    for r in 0..p.rows {
        for c in 0..p.cols {
            let gv = g[p.g_off + r * p.ldg + c].up();
            let uv = u[p.u_off + r * p.ldu + c].up();
            let d = dy[r * p.cols + c].up();
            let sg = sig(gv);
            out[r * p.ldo + c] = T::down(d * uv * sg * (one + gv * (one - sg)));
            out[p.du_off + r * p.ldo + c] = T::down(d * gv * sg);
        }
    }
    out
}
