//! RoPE (rotary position embedding) of the projection layout `[batch, seq, heads, head_dim]`,
//! in two output layouts: [`rope_heads`] fuses the transposition to the attention layout
//! `[batch, heads, seq, head_dim]` in (one pass instead of Candle's reshape/transpose/copy,
//! narrow, neg, cat, two multiplies and an add), [`rope_tokens`] keeps the input's axis order
//! (for [`flash_attention`](fn@crate::ops::flash_attention), which takes token rows
//! `[tokens, heads, head_dim]`: a reshape of its output, no copy). One op, `Rope`, serves
//! both: its `RopeLayout` says which axis order it reads and writes.
//!
//! Forward, per head vector `x` (head_dim `d`, `half = d / 2`) at position `t`, with
//! `c = cos[t]`, `s = sin[t]` of shape `[half]` (the frequencies, not repeated):
//!   `y[i] = (x[i] c[i] - x[i + half] s[i]) · scale`,
//!   `y[i + half] = (x[i + half] c[i] + x[i] s[i]) · scale`,
//! which is transformers' `x * cos + rotate_half(x) * sin` (with its `cos`, `sin` of width `d`
//! being these halves repeated). `scale` lets the attention fold `1/sqrt(head_dim)` into the
//! queries.
//!
//! Backward: the rotation is orthogonal, so `dx = scale · R(-θ) dy`, the same kernel with the
//! sign of `sin` flipped and the layout reversed (output order read, input order written).
//! Nothing is saved from the forward. `cos` and `sin` are constant tables and take no gradient
//! (a tracked table is an error, not a silently cut gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu::dispatch_float3;
use super::{check_dtype, check_same, native};
use crate::{Error, Result};

mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod plan;

use cpu::{rope_cpu, rope_cpu_into};
use plan::{RopeLayout, RopePlan, OP, OP_TOKENS};

/// The op: reads `layout.input`, writes `layout.output` (contiguous), rotating by `+θ`, or by
/// `-θ` when `inverse` (the backward of the pass with the reversed layout).
struct Rope {
    scale: f64,
    layout: RopeLayout,
    inverse: bool,
}

impl Rope {
    fn plan(&self, x: &Layout, cos: &Layout) -> candle_core::Result<RopePlan> {
        RopePlan::new(x, cos.dims()[0], self.scale, self.layout, self.inverse)
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        self.layout.name(self.inverse)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = self.plan(l1, l2)?;
        let (c0, c1) = super::contiguous_range(p.op, l2)?;
        let (d0, d1) = super::contiguous_range(p.op, l3)?;
        let out = dispatch_float3!(p.op, s1, s2, s3, |x, c, s| rope_cpu(
            x,
            &c[c0..c1],
            &s[d0..d1],
            &p
        ))?;
        Ok((out, Shape::from(p.out_dims.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = self.plan(l1, l2)?;
        let out = cuda::fwd(s1, s2, l2, s3, l3, &p)?;
        Ok((out, Shape::from(p.out_dims.to_vec())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        if self.inverse {
            return Err(candle_core::Error::BackwardNotSupported { op });
        }
        if cos.track_op() || sin.track_op() {
            return Err(candle_core::Error::Msg(format!(
                "{op}: cos and sin are constant tables and take no gradient, but one of them \
                 takes part in autograd"
            )));
        }
        // The pass reads any strides: `dy` goes in as it comes (e.g. a reshape of flash
        // attention's contiguous dq), no copy.
        let dx = dy.apply_op3_arc(
            cos,
            sin,
            std::sync::Arc::new(Box::new(Rope {
                scale: self.scale,
                layout: self.layout.reversed(),
                inverse: true,
            })),
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The packed q/k/v pass of [`crate::ops::flash_attention_qkvpacked`]. Forward: `qkv: [b, s,
/// hq + 2 hkv, d]` (contiguous) to the flat planar buffer `[q' | k' | v]` of the same `n`
/// elements, `q' = rope(q) · q_scale` as `[b, s, hq, d]`, `k' = rope(k)` as `[b, s, hkv, d]`,
/// `v` copied as `[b, s, hkv, d]` (the three inputs the attention takes, one buffer). Its
/// backward (`inverse`) is the adjoint: the planar gradient back to the packed layout, the q
/// and k parts rotated by `-θ` (times the same scales) and the v part copied.
struct RopeQkv {
    /// `[b, s, hq + 2 hkv, d]`.
    dims: [usize; 4],
    hq: usize,
    hkv: usize,
    q_scale: f64,
    inverse: bool,
}

/// One part of [`RopeQkv`]'s pass: the two rotations' plans and the copy of v, as `(rows,
/// width, source stride, destination stride, source offset, destination offset)` over the
/// `b · s` token rows.
struct QkvPasses {
    q: RopePlan,
    k: RopePlan,
    v: (usize, usize, usize, usize, usize, usize),
}

impl RopeQkv {
    const OP: &'static str = "rope_qkv";

    fn n(&self) -> usize {
        self.dims.iter().product()
    }

    fn passes(&self, l: &Layout, cos_rows: usize) -> candle_core::Result<QkvPasses> {
        let [b, s, h, d] = self.dims;
        let (hq, hkv) = (self.hq, self.hkv);
        let (nq, nk) = (b * s * hq * d, b * s * hkv * d);
        let off = l.start_offset();
        if !l.is_contiguous() || l.shape().elem_count() != self.n() {
            return Err(candle_core::Error::Msg(format!(
                "{}: internal error: input {:?} is not a contiguous [{b}, {s}, {h}, {d}]",
                Self::OP,
                l.dims()
            )));
        }
        let packed = [s * h * d, h * d, d];
        Ok(if !self.inverse {
            let l4 = Layout::contiguous_with_offset((b, s, h, d), off);
            let q = RopePlan::new(
                &l4.narrow(2, 0, hq)?,
                cos_rows,
                self.q_scale,
                RopeLayout::TOKENS,
                false,
            )?;
            let mut k = RopePlan::new(
                &l4.narrow(2, hq, hkv)?,
                cos_rows,
                1.0,
                RopeLayout::TOKENS,
                false,
            )?;
            k.y_off = nq;
            let v = (
                b * s,
                hkv * d,
                h * d,
                hkv * d,
                off + (hq + hkv) * d,
                nq + nk,
            );
            QkvPasses { q, k, v }
        } else {
            let part = |o: usize, heads: usize| Layout::contiguous_with_offset((b, s, heads, d), o);
            let mut q = RopePlan::new(
                &part(off, hq),
                cos_rows,
                self.q_scale,
                RopeLayout::TOKENS,
                true,
            )?;
            q.ys = packed;
            let mut k = RopePlan::new(
                &part(off + nq, hkv),
                cos_rows,
                1.0,
                RopeLayout::TOKENS,
                true,
            )?;
            k.ys = packed;
            k.y_off = hq * d;
            let v = (
                b * s,
                hkv * d,
                hkv * d,
                h * d,
                off + nq + nk,
                (hq + hkv) * d,
            );
            QkvPasses { q, k, v }
        })
    }

    fn out_shape(&self) -> Shape {
        if self.inverse {
            Shape::from(self.dims.to_vec())
        } else {
            Shape::from(self.n())
        }
    }
}

impl CustomOp3 for RopeQkv {
    fn name(&self) -> &'static str {
        Self::OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ps = self.passes(l1, l2.dims()[0])?;
        let (c0, c1) = super::contiguous_range(Self::OP, l2)?;
        let (d0, d1) = super::contiguous_range(Self::OP, l3)?;
        let n = self.n();
        let (rows, w, ss, ds, so, d_o) = ps.v;
        if n == 0 {
            return Err(candle_core::Error::Msg(format!(
                "{}: internal error: an empty input",
                Self::OP
            )));
        }
        let out = dispatch_float3!(Self::OP, s1, s2, s3, |x, c, s| {
            let mut y = vec![x[0]; n];
            rope_cpu_into(x, &c[c0..c1], &s[d0..d1], &ps.q, &mut y);
            rope_cpu_into(x, &c[c0..c1], &s[d0..d1], &ps.k, &mut y);
            for r in 0..rows {
                y[d_o + r * ds..d_o + r * ds + w].copy_from_slice(&x[so + r * ss..so + r * ss + w]);
            }
            y
        })?;
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::{CudaStorage, DType};
        let ps = self.passes(l1, l2.dims()[0])?;
        let n = self.n();
        if n == 0 || n > u32::MAX as usize {
            return Err(candle_core::Error::Msg(format!(
                "{}: internal error: {n} elements (the copy kernel indexes at most u32::MAX)",
                Self::OP
            )));
        }
        let dev = s1.device();
        // SAFETY: the q and k rotations and the v copy below write disjoint parts that together
        // cover all n elements before anything reads them.
        let mut out = match s1.dtype() {
            DType::BF16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, dev.clone())
            }
            DType::F16 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n) }?, dev.clone())
            }
            DType::F32 => {
                CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, dev.clone())
            }
            dt => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: unsupported dtype {dt:?} on CUDA",
                    Self::OP
                )))
            }
        };
        cuda::fwd_into(s1, s2, l2, s3, l3, &ps.q, &mut out)?;
        cuda::fwd_into(s1, s2, l2, s3, l3, &ps.k, &mut out)?;
        let (rows, w, ss, ds, so, d_o) = ps.v;
        cuda::copy_rows_into(s1, &mut out, rows, w, ss, ds, so, d_o)?;
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.inverse {
            return Err(candle_core::Error::BackwardNotSupported { op: Self::OP });
        }
        let dx = dy.contiguous()?.apply_op3_arc(
            cos,
            sin,
            std::sync::Arc::new(Box::new(RopeQkv {
                inverse: true,
                ..*self
            })),
        )?;
        Ok((Some(dx), None, None))
    }
}

/// [`RopeQkv`]'s forward on `qkv: [b, s, hq + 2 hkv, d]` (made contiguous) with the tables of
/// [`rope_tokens`]: the planar `[q' | k' | v]` buffer, flat, with its backward.
pub(crate) fn rope_qkv_planar(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    q_scale: f64,
    hq: usize,
    hkv: usize,
) -> Result<Tensor> {
    let (b, s, h, d) = qkv.dims4()?;
    let q = qkv.narrow(2, 0, hq)?;
    check(OP_TOKENS, &q, cos, sin)?;
    if h != hq + 2 * hkv {
        return Err(Error::InvalidArgument {
            op: RopeQkv::OP,
            msg: format!("{h} heads are not {hq} query heads and twice {hkv} key/value heads"),
        });
    }
    let op = RopeQkv {
        dims: [b, s, h, d],
        hq,
        hkv,
        q_scale,
        inverse: false,
    };
    Ok(qkv.contiguous()?.apply_op3_arc(
        &cos.contiguous()?,
        &sin.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )?)
}

/// Checks the operands of [`rope_heads`] and [`rope_tokens`] (named `op` in the errors);
/// returns `half`.
fn check(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<usize> {
    check_same(op, x, cos)?;
    check_same(op, x, sin)?;
    check_dtype(op, x)?;
    let bad = |msg: String| Error::InvalidArgument { op, msg };
    let (b, s, _, d) = x.dims4().map_err(|_| {
        bad(format!(
            "x must be [batch, seq, heads, head_dim], got {:?}",
            x.dims()
        ))
    })?;
    if d % 2 != 0 || d == 0 {
        return Err(bad(format!("head_dim must be even and positive, got {d}")));
    }
    let half = d / 2;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        let ok = matches!(t.dims2(), Ok((r, c)) if c == half && (r == s || r == b * s));
        if !ok {
            return Err(bad(format!(
                "{name} must be [seq, head_dim / 2] or [batch * seq, head_dim / 2] = [{s} or {}, {half}], got {:?}",
                b * s,
                t.dims()
            )));
        }
    }
    if cos.dims() != sin.dims() {
        return Err(bad(format!(
            "cos {:?} and sin {:?} differ in shape",
            cos.dims(),
            sin.dims()
        )));
    }
    Ok(half)
}

/// RoPE of `x: [batch, seq, heads, head_dim]` (any layout, e.g. a projection's output
/// reshaped), returned in the attention layout `[batch, heads, seq, head_dim]`, contiguous, and
/// multiplied by `scale`.
///
/// `cos, sin: [seq, head_dim / 2]` (one table for every batch row) or
/// `[batch * seq, head_dim / 2]` (row `b * seq + t`: per-row positions, e.g. left-padded
/// batches), in `x`'s dtype: `cos[t, i] = cos(pos_t · inv_freq_i)`. The maths is in f32 (f64
/// for f64) with one rounding. Has a backward for `x`; the tables take no gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[[[1f32, 0.]]]], &Device::Cpu)?; // [1, 1, 1, 2]
/// let (c, s) = (0.5f32, 0.75f32.sqrt());
/// let y = flare::ops::rope_heads(&x, &Tensor::new(&[[c]], &Device::Cpu)?,
///     &Tensor::new(&[[s]], &Device::Cpu)?, 1.0)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!((y[0] - c).abs() < 1e-6 && (y[1] - s).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    check(OP, x, cos, sin)?;
    if !native(x.device()) {
        return rope_heads_reference(x, cos, sin, scale);
    }
    apply(x, cos, sin, scale, RopeLayout::TO_HEADS)
}

/// RoPE of `x: [batch, seq, heads, head_dim]` (any layout, e.g. a projection's output
/// reshaped, or a narrow of a fused q/k/v projection), returned in the same axis order
/// `[batch, seq, heads, head_dim]`, contiguous, and multiplied by `scale`: the layout
/// [`flash_attention`](fn@crate::ops::flash_attention) takes after a reshape to
/// `[batch * seq, heads, head_dim]` (a view). The same maths, tables and checks as
/// [`rope_heads`], which writes the attention layout `[batch, heads, seq, head_dim]` instead;
/// `rope_tokens(x, ..)` equals `rope_heads(x, ..).transpose(1, 2)`. Has a backward for `x`
/// (in the same layout); the tables take no gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // [1, 2, 1, 2]: two positions of one head; position 0 rotated by 0, position 1 by 60°.
/// let x = Tensor::new(&[[[[1f32, 0.]], [[1., 0.]]]], &Device::Cpu)?;
/// let (c, s) = (0.5f32, 0.75f32.sqrt());
/// let cos = Tensor::new(&[[1f32], [c]], &Device::Cpu)?;
/// let sin = Tensor::new(&[[0f32], [s]], &Device::Cpu)?;
/// let y = flare::ops::rope_tokens(&x, &cos, &sin, 2.0)?;
/// assert_eq!(y.dims(), &[1, 2, 1, 2]);
/// let y = y.flatten_all()?.to_vec1::<f32>()?;
/// let want = [2.0, 0.0, 2.0 * c, 2.0 * s];
/// assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
/// # Ok::<(), flare::Error>(())
/// ```
pub fn rope_tokens(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    check(OP_TOKENS, x, cos, sin)?;
    if !native(x.device()) {
        return rope_tokens_reference(x, cos, sin, scale);
    }
    apply(x, cos, sin, scale, RopeLayout::TOKENS)
}

/// Applies [`Rope`] (the operands have been checked).
fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64, layout: RopeLayout) -> Result<Tensor> {
    let cos = cos.contiguous()?;
    let sin = sin.contiguous()?;
    Ok(x.apply_op3_arc(
        &cos,
        &sin,
        std::sync::Arc::new(Box::new(Rope {
            scale,
            layout,
            inverse: false,
        })),
    )?)
}

/// The composite reference of [`rope_heads`] from plain Candle ops (with their backward):
/// transformers' `x * cos + rotate_half(x) * sin` on the transposed `x`, times `scale`.
pub fn rope_heads_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    check(OP, x, cos, sin)?;
    let (b, s, _, _) = x.dims4()?;
    let x = x.transpose(1, 2)?; // [b, h, s, d]
    let full = |t: &Tensor| -> Result<Tensor> {
        let t = Tensor::cat(&[t, t], 1)?; // [rows, d]
        let rows = t.dim(0)?;
        Ok(if rows == s {
            t.unsqueeze(0)?.unsqueeze(0)?
        } else {
            t.reshape((b, 1, s, t.dim(1)?))?
        })
    };
    let (c, sn) = (full(cos)?, full(sin)?);
    let d = x.dim(3)?;
    let half = d / 2;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    let y = (x.broadcast_mul(&c)? + rotated.broadcast_mul(&sn)?)?;
    Ok((y * scale)?.contiguous()?)
}

/// The composite reference of [`rope_tokens`]: [`rope_heads_reference`] transposed back to
/// `[batch, seq, heads, head_dim]`.
pub fn rope_tokens_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    check(OP_TOKENS, x, cos, sin)?;
    Ok(rope_heads_reference(x, cos, sin, scale)?
        .transpose(1, 2)?
        .contiguous()?)
}

/// The RoPE tables for `positions`: `(cos, sin)`, each `[positions.len(), inv_freq.len()]`,
/// with the angle `pos · inv_freq` formed in f32 (as transformers does) and its cosine and sine
/// taken in f64 and rounded to f32. For [`rope_heads`] after conversion to the model's dtype.
pub fn rope_tables_f32(positions: &[u32], inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = positions.len() * inv_freq.len();
    let (mut c, mut s) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for &p in positions {
        for &f in inv_freq {
            let angle = f64::from(p as f32 * f);
            c.push(angle.cos() as f32);
            s.push(angle.sin() as f32);
        }
    }
    (c, s)
}
