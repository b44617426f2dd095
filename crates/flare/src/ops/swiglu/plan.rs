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
    /// Row stride of the output (forward): `cols`, or wider with [`padded`](Self::padded).
    pub ldy: usize,
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
            ldy: cols,
            ldo: cols,
            du_off: n,
            grad_len: 2 * n,
        })
    }

    /// A contiguous packed `gu` `[..., 2 · cols]`.
    pub(crate) fn packed(l: &Layout) -> candle_core::Result<Self> {
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
            ldy: cols,
            ldo: width,
            du_off: cols,
            grad_len: b - a,
        })
    }

    /// This packed plan with `spare` unwritten elements after each row of the forward's output
    /// (`ldy = cols + spare`) and of the backward's gradient (`ldo = 2 · cols + spare`): the
    /// fused LoRA MLP's GEMMs write the low-rank terms there and read them with the rows
    /// ([`crate::lora::op::lora_swiglu_mlp`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn padded(self, spare: usize) -> Self {
        SwiGluPlan {
            ldy: self.cols + spare,
            ldo: 2 * self.cols + spare,
            grad_len: self.rows * (2 * self.cols + spare),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::swiglu::cpu::{bwd_cpu, fwd_cpu};

    /// A padded plan computes the unpadded plan's values, each row `spare` elements further
    /// on: the forward's rows `ldy = cols + spare` apart, the backward's `ldo = 2 · cols +
    /// spare` apart (CPU; the CUDA launchers take the same plan).
    #[test]
    fn padded_plan_moves_rows_only() {
        let (rows, cols, spare) = (3, 5, 4);
        let l = Layout::contiguous((rows, 2 * cols));
        let plain = SwiGluPlan::packed(&l).unwrap();
        let padded = plain.padded(spare);
        assert_eq!((padded.ldy, padded.ldo), (cols + spare, 2 * cols + spare));
        let gu: Vec<f64> = (0..rows * 2 * cols)
            .map(|i| (i as f64 * 0.37).sin())
            .collect();
        let dy: Vec<f64> = (0..rows * cols).map(|i| (i as f64 * 0.91).cos()).collect();
        let (y0, y1) = (fwd_cpu(&gu, &gu, &plain), fwd_cpu(&gu, &gu, &padded));
        let (d0, d1) = (
            bwd_cpu(&gu, &gu, &dy, &plain),
            bwd_cpu(&gu, &gu, &dy, &padded),
        );
        assert_eq!((y1.len(), d1.len()), (rows * padded.ldy, padded.grad_len));
        for r in 0..rows {
            assert_eq!(y0[r * cols..(r + 1) * cols], y1[r * padded.ldy..][..cols]);
            assert_eq!(
                d0[r * 2 * cols..(r + 1) * 2 * cols],
                d1[r * padded.ldo..][..2 * cols]
            );
        }
    }
}
