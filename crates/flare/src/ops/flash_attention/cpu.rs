//! The CPU forward and backward of flash attention: one rayon task per (sequence, head) in the
//! forward and per (sequence, kv head) in the backward, each walking its keys in tiles of
//! [`BN`] with an online softmax, in `Elem::A` (f32 for f32 / f16 / bf16, f64 for f64). No
//! task holds more than one tile of scores; a task's K and V rows are gathered once into
//! contiguous `A` buffers (`O(s · d)`, the same size as the inputs).

use num_traits::{Float, ToPrimitive};
use rayon::prelude::*;

use super::plan::{FaPlan, BN};
use crate::ops::cpu::Elem;

#[inline(always)]
fn dot<A: Float + std::ops::AddAssign>(a: &[A], b: &[A]) -> A {
    let mut s = [A::zero(); 4];
    let ca = a.chunks_exact(4);
    let cb = b.chunks_exact(4);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            s[l] += x[l] * y[l];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (&x, &y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

/// `y += a · x`.
#[inline(always)]
fn axpy<A: Float + std::ops::AddAssign>(y: &mut [A], a: A, x: &[A]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Rows `r0..r0 + n` of head `h` of a `[rows, heads, d]` tensor, widened, as `[n, d]`.
fn gather<T: Elem>(x: &[T], r0: usize, n: usize, heads: usize, h: usize, d: usize) -> Vec<T::A> {
    let mut out = Vec::with_capacity(n * d);
    for r in r0..r0 + n {
        let at = ((r * heads) + h) * d;
        out.extend(x[at..at + d].iter().map(|v| v.up()));
    }
    out
}

/// The online softmax over keys `lo..hi` of one query row `qi`: writes `O_i` to `out` (when
/// given) and returns `L_i = logsumexp_j(scale · qi·k_j)`, `-inf` when `lo >= hi` (then `out`
/// is 0).
fn row_fwd<T: Elem>(
    qi: &[T::A],
    kh: &[T::A],
    vh: &[T::A],
    (lo, hi): (usize, usize),
    scale: T::A,
    mut out: Option<&mut [T::A]>,
    s: &mut [T::A],
) -> T::A {
    let d = qi.len();
    let zero = T::acc(0.0);
    if let Some(o) = out.as_deref_mut() {
        o.fill(zero);
    }
    if lo >= hi {
        return T::A::neg_infinity();
    }
    let (mut m, mut l) = (T::A::neg_infinity(), zero);
    let mut t0 = lo;
    while t0 < hi {
        let t1 = (t0 + BN).min(hi);
        let s = &mut s[..t1 - t0];
        let mut mt = T::A::neg_infinity();
        for (j, sj) in (t0..t1).zip(s.iter_mut()) {
            *sj = dot(qi, &kh[j * d..(j + 1) * d]) * scale;
            mt = mt.max(*sj);
        }
        let m_new = m.max(mt);
        // exp(-inf) = 0 on the first tile: nothing to rescale.
        let corr = T::exp(m - m_new);
        l = l * corr;
        if let Some(o) = out.as_deref_mut() {
            o.iter_mut().for_each(|x| *x = *x * corr);
        }
        for (j, &sj) in (t0..t1).zip(s.iter()) {
            let p = T::exp(sj - m_new);
            l += p;
            if let Some(o) = out.as_deref_mut() {
                axpy(o, p, &vh[j * d..(j + 1) * d]);
            }
        }
        m = m_new;
        t0 = t1;
    }
    if let Some(o) = out {
        let inv = l.recip();
        o.iter_mut().for_each(|x| *x = *x * inv);
    }
    m + l.ln()
}

/// The forward: `O` `[total_q, hq, d]` from contiguous `q`, `k`, `v`, and the logsumexp `L`
/// `[hq, total_q]` in f64 (`-inf` for a row that sees no key) for the backward.
pub(super) fn fwd<T: Elem>(q: &[T], k: &[T], v: &[T], p: &FaPlan) -> (Vec<T>, Vec<f64>) {
    let (hq, hkv, d, g) = (p.hq, p.hkv, p.d, p.group());
    let scale = T::acc(p.scale);
    type Part<A> = (usize, usize, Vec<A>, Vec<A>);
    let parts: Vec<Part<T::A>> = (0..p.batch() * hq)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / hq, task % hq);
            let (q0, sq, k0, sk) = p.seq(b);
            let kh = gather(k, k0, sk, hkv, h / g, d);
            let vh = gather(v, k0, sk, hkv, h / g, d);
            let qh = gather(q, q0, sq, hq, h, d);
            let mut o = vec![T::acc(0.0); sq * d];
            let mut lse = vec![T::acc(0.0); sq];
            let mut s = vec![T::acc(0.0); BN];
            for (i, (qi, oi)) in qh.chunks(d.max(1)).zip(o.chunks_mut(d.max(1))).enumerate() {
                lse[i] = row_fwd::<T>(qi, &kh, &vh, p.keys(i, sq, sk), scale, Some(oi), &mut s);
            }
            (b, h, o, lse)
        })
        .collect();
    let mut out = vec![T::down(T::acc(0.0)); p.total_q * hq * d];
    let mut lse_out = vec![f64::NEG_INFINITY; hq * p.total_q];
    for (b, h, o, lse) in parts {
        let q0 = p.cu_q[b];
        for (i, oi) in o.chunks(d.max(1)).enumerate() {
            let at = ((q0 + i) * hq + h) * d;
            for (dst, &x) in out[at..at + d].iter_mut().zip(oi) {
                *dst = T::down(x);
            }
        }
        for (i, &l) in lse.iter().enumerate() {
            lse_out[h * p.total_q + q0 + i] = l.to_f64().unwrap_or(f64::NAN);
        }
    }
    (out, lse_out)
}

/// The backward: from contiguous `q`, `k`, `v`, the op's output `o`, the output gradient
/// `dout` and the forward's logsumexp `lse` (`[hq, total_q]`, carried in the op, not
/// recomputed), returns `dQ`, `dK`, `dV` flattened one after the other (`nq + 2 · nk`
/// elements). `D_i = dO_i·O_i` from the op's (rounded) output as on CUDA, then per visible key
/// `P = exp(scale · q·k − L)`, `dP = dO·v`, `dS = P (dP − D)`, `dQ += scale · dS k`,
/// `dK += scale · dS q`, `dV += P dO`. A task owns one kv head of one sequence and sums
/// `dK`, `dV` over its query heads (no atomics, a fixed order: deterministic).
pub(super) fn bwd<T: Elem>([q, k, v, o, dout]: [&[T]; 5], lse: &[f64], p: &FaPlan) -> Vec<T> {
    let (hq, hkv, d, g) = (p.hq, p.hkv, p.d, p.group());
    let nq = p.total_q * hq * d;
    let nk = p.total_k * hkv * d;
    let scale = T::acc(p.scale);
    let zero = T::acc(0.0);
    let dm = d.max(1);
    type Part<A> = (usize, usize, Vec<A>, Vec<A>, Vec<A>);
    let parts: Vec<Part<T::A>> = (0..p.batch() * hkv)
        .into_par_iter()
        .map(|task| {
            let (b, hk) = (task / hkv, task % hkv);
            let (q0, sq, k0, sk) = p.seq(b);
            let kh = gather(k, k0, sk, hkv, hk, d);
            let vh = gather(v, k0, sk, hkv, hk, d);
            let mut dk = vec![zero; sk * d];
            let mut dv = vec![zero; sk * d];
            // dQ of the group's heads, [g, sq, d].
            let mut dq = vec![zero; g * sq * d];
            for gi in 0..g {
                let h = hk * g + gi;
                let qh = gather(q, q0, sq, hq, h, d);
                let oh = gather(o, q0, sq, hq, h, d);
                let doh = gather(dout, q0, sq, hq, h, d);
                for i in 0..sq {
                    let (lo, hi) = p.keys(i, sq, sk);
                    if lo >= hi {
                        continue; // no key: O = 0, zero gradients
                    }
                    let row = i * d..(i + 1) * d;
                    let (qi, doi) = (&qh[row.clone()], &doh[row.clone()]);
                    let lse = T::acc(lse[h * p.total_q + q0 + i]);
                    let di = dot(doi, &oh[row.clone()]);
                    let dqi = &mut dq[(gi * sq + i) * d..(gi * sq + i + 1) * d];
                    for j in lo..hi {
                        let kr = j * d..(j + 1) * d;
                        let pij = T::exp(dot(qi, &kh[kr.clone()]) * scale - lse);
                        let dp = dot(doi, &vh[kr.clone()]);
                        let ds = pij * (dp - di) * scale;
                        axpy(dqi, ds, &kh[kr.clone()]);
                        axpy(&mut dk[kr.clone()], ds, qi);
                        axpy(&mut dv[kr], pij, doi);
                    }
                }
            }
            (b, hk, dq, dk, dv)
        })
        .collect();
    let mut out = vec![T::down(zero); nq + 2 * nk];
    let (dq_out, rest) = out.split_at_mut(nq);
    let (dk_out, dv_out) = rest.split_at_mut(nk);
    for (b, hk, dq, dk, dv) in parts {
        let (q0, sq, k0, _) = p.seq(b);
        for (r, x) in dq.chunks(dm).enumerate() {
            let (gi, i) = (r / sq.max(1), r % sq.max(1));
            let at = ((q0 + i) * hq + hk * g + gi) * d;
            for (dst, &x) in dq_out[at..at + d].iter_mut().zip(x) {
                *dst = T::down(x);
            }
        }
        for (dst_all, src) in [(&mut *dk_out, &dk), (&mut *dv_out, &dv)] {
            for (j, x) in src.chunks(dm).enumerate() {
                let at = ((k0 + j) * hkv + hk) * d;
                for (dst, &x) in dst_all[at..at + d].iter_mut().zip(x) {
                    *dst = T::down(x);
                }
            }
        }
    }
    out
}
