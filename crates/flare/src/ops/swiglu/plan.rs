//! [`SwiGluPlan`]: where the gate and up halves sit (two tensors or one packed), read by the CPU
//! and CUDA sides.

use candle_core::Layout;

use crate::ops::contiguous_range;

pub(super) const OP: &str = "swiglu";
pub(super) const OP_BWD: &str = "swiglu_bwd";

/// Where the operands of one SwiGLU pass sit, in elements of their storages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwiGluPlan {
    /// Rows.
    pub rows: usize,
    /// Columns of the output (the width of one half).
    pub cols: usize,
    /// First element and row stride of the gate.
    pub g_off: usize,
    /// Row stride of the gate.
    pub ldg: usize,
    /// First element of the up half.
    pub u_off: usize,
    /// Row stride of the up half.
    pub ldu: usize,
    /// Row stride of the gradient buffer (backward).
    pub ldo: usize,
    /// Offset of `du` in the gradient buffer (backward).
    pub du_off: usize,
    /// Elements of the gradient buffer (backward).
    pub grad_len: usize,
}

impl SwiGluPlan {
    /// Separate contiguous `g` and `u` of layouts `lg`, `lu` (same element count).
    pub(super) fn separate(lg: &Layout, lu: &Layout) -> candle_core::Result<Self> {
        let (g0, g1) = contiguous_range(OP, lg)?;
        let (u0, _) = contiguous_range(OP, lu)?;
        let n = g1 - g0;
        let cols = lg.dims().last().copied().unwrap_or(1).max(1);
        Ok(SwiGluPlan {
            rows: n / cols,
            cols,
            g_off: g0,
            ldg: cols,
            u_off: u0,
            ldu: cols,
            ldo: cols,
            du_off: n,
            grad_len: 2 * n,
        })
    }

    /// A contiguous packed `gu` `[..., 2 · cols]`.
    pub(super) fn packed(l: &Layout) -> candle_core::Result<Self> {
        let (a, b) = contiguous_range(OP, l)?;
        let width = l.dims().last().copied().unwrap_or(0);
        if width % 2 != 0 || width == 0 {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: internal error: packed rows of odd width {width}"
            )));
        }
        let cols = width / 2;
        Ok(SwiGluPlan {
            rows: (b - a) / width,
            cols,
            g_off: a,
            ldg: width,
            u_off: a + cols,
            ldu: width,
            ldo: width,
            du_off: cols,
            grad_len: b - a,
        })
    }
}
