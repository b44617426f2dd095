//! [`FaPlan`]: the validated geometry of one flash-attention call (sequence offsets, heads,
//! mask), read by the CPU forward and backward, by the composed paths in `mod.rs` and, next,
//! by the CUDA launcher (`cu/flash_attention.cu` takes the same offsets, heads and mask).

use candle_core::Layout;

pub(super) const OP: &str = "flash_attention";
pub(super) const OP_BWD: &str = "flash_attention_bwd";

/// Keys per tile of the CPU loops (the CUDA kernel's `FA_BN`).
pub(super) const BN: usize = 64;

/// One call's geometry, checked by `flash_attention` before anything runs.
#[derive(Debug, Clone)]
pub(crate) struct FaPlan {
    /// Query heads.
    pub hq: usize,
    /// Key / value heads (`hq` is a multiple of it).
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
    /// Query rows of all sequences.
    pub total_q: usize,
    /// Key rows of all sequences.
    pub total_k: usize,
    /// Query offsets, `batch + 1` entries from 0 to `total_q`.
    pub cu_q: Vec<usize>,
    /// Key offsets, `batch + 1` entries from 0 to `total_k`.
    pub cu_k: Vec<usize>,
    /// Causal mask, bottom-right aligned.
    pub causal: bool,
    /// Keys visible to the left of the diagonal (`None`: all).
    pub window: Option<usize>,
    /// The factor of `q kᵀ`.
    pub scale: f64,
}

impl FaPlan {
    /// Sequences.
    pub(crate) fn batch(&self) -> usize {
        self.cu_q.len().saturating_sub(1)
    }

    /// Query heads per key / value head.
    pub(crate) fn group(&self) -> usize {
        self.hq / self.hkv.max(1)
    }

    /// `(q0, sq, k0, sk)`: where sequence `b` starts in `q` and `k` and how long it is.
    pub(crate) fn seq(&self, b: usize) -> (usize, usize, usize, usize) {
        let (q0, k0) = (self.cu_q[b], self.cu_k[b]);
        (q0, self.cu_q[b + 1] - q0, k0, self.cu_k[b + 1] - k0)
    }

    /// The keys `lo..hi` that query row `i` of a sequence of `sq` queries and `sk` keys sees
    /// (empty when `lo >= hi`). With `off = sk - sq` the diagonal of row `i` is key `i + off`
    /// (bottom-right alignment, as FlashAttention-2): causal keeps `j <= i + off`, a window `w`
    /// keeps `j >= i + off - w`. The same rule as the CUDA kernel's header.
    #[inline]
    pub(crate) fn keys(&self, i: usize, sq: usize, sk: usize) -> (usize, usize) {
        let diag = i as i64 + sk as i64 - sq as i64;
        let clamp = |x: i64| x.clamp(0, sk as i64) as usize;
        let hi = if self.causal { clamp(diag + 1) } else { sk };
        let lo = match self.window {
            Some(w) => clamp(diag - w as i64),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Checks that the kernels' inputs have the planned shapes: `q` (or `[n, total_q, hq, d]`
    /// stacked query-shaped tensors) and `k`, `v`, all contiguous. Returns the element ranges.
    pub(super) fn ranges(
        &self,
        op: &'static str,
        layouts: [&Layout; 3],
        stacked_q: usize,
    ) -> candle_core::Result<[(usize, usize); 3]> {
        let mut want_q = vec![self.total_q, self.hq, self.d];
        if stacked_q > 0 {
            want_q.insert(0, stacked_q);
        }
        let want_k = [self.total_k, self.hkv, self.d];
        let [lq, lk, lv] = layouts;
        if lq.dims() != want_q || lk.dims() != want_k || lv.dims() != want_k {
            return Err(candle_core::Error::Msg(format!(
                "{op}: internal error: planned q {want_q:?}, k/v {want_k:?}, got {:?}, {:?}, {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )));
        }
        Ok([
            crate::ops::contiguous_range(op, lq)?,
            crate::ops::contiguous_range(op, lk)?,
            crate::ops::contiguous_range(op, lv)?,
        ])
    }
}
