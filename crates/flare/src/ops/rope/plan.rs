//! [`RopePlan`]: the shapes and strides of one RoPE call, read by the CPU and CUDA forwards.

use candle_core::Layout;

/// The name of [`super::rope_heads`] (its checks and internal errors).
pub(super) const OP: &str = "rope_heads";
/// The name of [`super::rope_tokens`].
pub(super) const OP_TOKENS: &str = "rope_tokens";

/// The axis order of a RoPE operand, named by what its two middle dims hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// `[batch, seq, heads, head_dim]`: the projection's output (token rows).
    Tokens,
    /// `[batch, heads, seq, head_dim]`: the attention layout.
    Heads,
}

/// What one pass reads and writes: the input's axis order (read through any strides) and the
/// output's (written contiguous). The sign of the rotation is separate
/// ([`RopePlan::new`]'s `inverse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RopeLayout {
    /// The input's axis order.
    pub input: Order,
    /// The output's axis order.
    pub output: Order,
}

impl RopeLayout {
    /// `[b, s, h, d] -> [b, h, s, d]`: [`super::rope_heads`].
    pub const TO_HEADS: Self = Self {
        input: Order::Tokens,
        output: Order::Heads,
    };
    /// `[b, s, h, d] -> [b, s, h, d]`: [`super::rope_tokens`].
    pub const TOKENS: Self = Self {
        input: Order::Tokens,
        output: Order::Tokens,
    };

    /// The layout of the adjoint pass (the backward): output and input swapped.
    pub fn reversed(self) -> Self {
        Self {
            input: self.output,
            output: self.input,
        }
    }

    /// The op's name for errors: the public function's, `_bwd` for its backward pass.
    pub fn name(self, inverse: bool) -> &'static str {
        match (self.input, self.output, inverse) {
            (Order::Tokens, Order::Heads, false) => OP,
            (Order::Heads, Order::Tokens, true) => "rope_heads_bwd",
            (Order::Tokens, Order::Tokens, false) => OP_TOKENS,
            (Order::Tokens, Order::Tokens, true) => "rope_tokens_bwd",
            // Not built by the public functions or their backward passes.
            _ => "rope",
        }
    }
}

/// The geometry of one RoPE pass, shared by the CPU and CUDA paths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopePlan {
    /// The op's name, for errors.
    pub op: &'static str,
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
    /// Output start offset, in elements: 0 for a fresh output; a part's place in a shared
    /// buffer for the packed q/k/v pass (`super::rope_qkv`).
    pub y_off: usize,
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
    /// Plans the pass `layout` on input `l` and tables of `cos_rows` rows, rotating by `-θ`
    /// when `inverse` (the backward), by `+θ` otherwise.
    pub(super) fn new(
        l: &Layout,
        cos_rows: usize,
        scale: f64,
        layout: RopeLayout,
        inverse: bool,
    ) -> candle_core::Result<Self> {
        let op = layout.name(inverse);
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 {
            return Err(candle_core::Error::Msg(format!(
                "{op}: internal error: expected a rank-4 input, got {dims:?}"
            )));
        }
        let (b, d) = (dims[0], dims[3]);
        let (s, h, xs) = match layout.input {
            Order::Tokens => (dims[1], dims[2], [st[0], st[1], st[2], st[3]]),
            Order::Heads => (dims[2], dims[1], [st[0], st[2], st[1], st[3]]),
        };
        let cos_bs = if cos_rows == s {
            0
        } else if cos_rows == b * s {
            s
        } else {
            return Err(candle_core::Error::Msg(format!(
                "{op}: internal error: {cos_rows} table rows for batch {b} and seq {s}"
            )));
        };
        let (ys, out_dims) = match layout.output {
            Order::Tokens => ([s * h * d, h * d, d], [b, s, h, d]),
            Order::Heads => ([h * s * d, d, s * d], [b, h, s, d]),
        };
        Ok(RopePlan {
            op,
            b,
            s,
            h,
            half: d / 2,
            xs,
            x_off: l.start_offset(),
            ys,
            y_off: 0,
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
