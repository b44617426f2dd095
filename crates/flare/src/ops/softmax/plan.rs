//! The masked softmax's row-to-mask-row map, read by both the CPU and the CUDA forward.

use candle_core::Layout;

pub(super) const OP: &str = "softmax_last_dim";
pub(super) const OP_BWD: &str = "softmax_last_dim_bwd";
pub(super) const OP_MASKED: &str = "softmax_masked";

/// Where a masked softmax's rows find their mask rows: `x`'s rows (every dim but the last,
/// flattened) are `mb` equal blocks of `heads_s` rows, each block a whole number of `s`-row
/// groups (`x` viewed as `[mb, n, s, t]`); the mask is `[mb, s, t]`. Row `r` of `x` reads mask
/// row `(r / heads_s) * s + r % s`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaskIndex {
    /// Rows of `x` per mask batch item.
    pub heads_s: usize,
    /// Mask rows per batch item (the mask's second dim).
    pub s: usize,
}

impl MaskIndex {
    /// Checks `x`'s and the mask's dims against each other (see [`softmax_masked`]).
    pub(crate) fn from_dims(xd: &[usize], kd: &[usize]) -> std::result::Result<Self, ()> {
        if xd.len() < 2 || kd.len() != 3 {
            return Err(());
        }
        let (mb, s, t) = (kd[0], kd[1], kd[2]);
        let rows: usize = xd[..xd.len() - 1].iter().product();
        if t != xd[xd.len() - 1] || mb == 0 || s == 0 || rows % (mb * s) != 0 {
            return Err(());
        }
        Ok(MaskIndex {
            heads_s: (rows / mb).max(1),
            s,
        })
    }

    /// As [`from_dims`](Self::from_dims), on layouts, with a Candle error.
    pub(crate) fn new(lx: &Layout, lk: &Layout) -> candle_core::Result<Self> {
        Self::from_dims(lx.dims(), lk.dims()).map_err(|()| {
            candle_core::Error::Msg(format!(
                "{OP_MASKED}: mask of shape {:?} does not fit scores of shape {:?}",
                lk.dims(),
                lx.dims()
            ))
        })
    }

    /// The mask row of row `r` of `x`.
    #[inline]
    pub(crate) fn row(&self, r: usize) -> usize {
        (r / self.heads_s) * self.s + r % self.s
    }
}
