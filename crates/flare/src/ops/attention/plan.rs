//! [`AttnPlan`]: the shapes of one decode-attention call, read by the CPU and CUDA forwards.

use candle_core::Layout;

pub(super) const OP: &str = "attention_decode";

/// Geometry of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnPlan {
    /// Batches.
    pub b: usize,
    /// Query rows per batch.
    pub g: usize,
    /// Keys per batch.
    pub t: usize,
    /// Head dim.
    pub d: usize,
    /// Offsets, batch strides and row strides of `k` and `v`.
    pub k: (usize, usize, usize),
    /// Same for `v`.
    pub v: (usize, usize, usize),
    /// Offset of the contiguous `q`.
    pub q_off: usize,
}

impl AttnPlan {
    pub(super) fn new(lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Self> {
        let (q, k, v) = (lq.dims(), lk.dims(), lv.dims());
        let bad = || {
            candle_core::Error::Msg(format!(
                "{OP}: internal error: shapes q {q:?}, k {k:?}, v {v:?}"
            ))
        };
        if q.len() != 3 || k.len() != 3 || v.len() != 3 || k != v || q[0] != k[0] || q[2] != k[2] {
            return Err(bad());
        }
        let strides = |l: &Layout| -> candle_core::Result<(usize, usize, usize)> {
            let s = l.stride();
            if s[2] != 1 && l.dims()[2] > 1 {
                return Err(bad());
            }
            Ok((l.start_offset(), s[0], s[1]))
        };
        Ok(AttnPlan {
            b: q[0],
            g: q[1],
            t: k[1],
            d: q[2],
            k: strides(lk)?,
            v: strides(lv)?,
            q_off: crate::ops::contiguous_range(OP, lq)?.0,
        })
    }
}
