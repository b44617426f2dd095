//! [`RopePlan`]: the shapes and strides of one RoPE call, read by the CPU and CUDA forwards.

use candle_core::Layout;

pub(super) const OP: &str = "rope_heads";

/// The geometry of one RoPE pass, shared by the CPU and CUDA paths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopePlan {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub s: usize,
    /// Heads.
    pub h: usize,
    /// `head_dim / 2`.
    pub half: usize,
    /// Input element strides of the (batch, seq, head, dim) axes.
    pub xs: [usize; 4],
    /// Input start offset, in elements.
    pub x_off: usize,
    /// Output strides of the (batch, seq, head) axes (the dim stride is 1).
    pub ys: [usize; 3],
    /// Rows of `cos`/`sin` per batch row: 0 (one shared table) or `s`.
    pub cos_bs: usize,
    /// `+1` forward, `-1` backward.
    pub sign: f64,
    /// Output scale.
    pub scale: f64,
    /// The output's dims.
    pub out_dims: [usize; 4],
}

impl RopePlan {
    /// Plans the op on input `l` (`[b, s, h, d]`, or `[b, h, s, d]` when `inverse`) and tables
    /// of `cos_rows` rows.
    pub(super) fn new(
        l: &Layout,
        cos_rows: usize,
        scale: f64,
        inverse: bool,
    ) -> candle_core::Result<Self> {
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: internal error: expected a rank-4 input, got {dims:?}"
            )));
        }
        let (b, d) = (dims[0], dims[3]);
        let (s, h, xs) = if inverse {
            (dims[2], dims[1], [st[0], st[2], st[1], st[3]])
        } else {
            (dims[1], dims[2], [st[0], st[1], st[2], st[3]])
        };
        let cos_bs = if cos_rows == s {
            0
        } else if cos_rows == b * s {
            s
        } else {
            return Err(candle_core::Error::Msg(format!(
                "{OP}: internal error: {cos_rows} table rows for batch {b} and seq {s}"
            )));
        };
        let (ys, out_dims) = if inverse {
            ([s * h * d, h * d, d], [b, s, h, d])
        } else {
            ([h * s * d, d, s * d], [b, h, s, d])
        };
        Ok(RopePlan {
            b,
            s,
            h,
            half: d / 2,
            xs,
            x_off: l.start_offset(),
            ys,
            cos_bs,
            sign: if inverse { -1.0 } else { 1.0 },
            scale,
            out_dims,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.out_dims.iter().product()
    }
}
