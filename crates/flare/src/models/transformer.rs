//! [`Transformer`]: the decoder-only model of the Llama family (Llama, Qwen2, Mistral), with
//! every linear projection a [`LoraLinear`] so that adapters can be injected by module path.
//!
//! Per layer: `rms_norm → attention (q/k/v/o, RoPE, GQA, causal mask) → residual → rms_norm →
//! SwiGLU MLP (gate/up/down) → residual`; then the final norm and the output projection. Norms
//! use [`crate::ops::add_rms_norm`] to fuse each residual add with the following norm, products
//! use [`crate::ops::matmul()`].
//!
//! Attention: a forward that attends to nothing cached (training, [`Transformer::forward`],
//! [`Transformer::forward_packed`], and an unpadded prefill into an empty cache) runs
//! [`crate::ops::flash_attention()`] over the sequences (or the packed documents), so no
//! `seq × seq` tensor exists anywhere, forward or backward. Steps that read a KV cache
//! (decode, prefill after a cached prefix) and left-padded prefills compute the scores
//! `[b · kv_heads, group · s, t]` and a masked softmax ([`crate::ops::softmax_masked`]), or the
//! fused [`crate::ops::attention_decode`] for one new token.

use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use super::cache::KvCache;
use super::checkpoint::{
    checkpoint_chain, checkpoint_rows, ChainBlock, CheckpointGrads, CheckpointStore,
};
use super::config::{Llama3RopeScaling, ModelConfig};
use super::weights::Weights;
use crate::error::device_name;
use crate::lora::dropout::mix64;
use crate::lora::op::stack_rows;
use crate::lora::op::{lora_swiglu_mlp, LoraMlp, MlpWeights};
use crate::lora::{lora_linear_grouped, with_dropout_seed, LoraLinear};
use crate::ops::rope::rope_tables_f32;
use crate::ops::{
    add_rms_norm, attention_decode, flash_attention, flash_attention_qkvpacked, matmul, rms_norm,
    rope_heads, rope_tokens, softmax_last_dim, softmax_masked, supported_dtypes,
    swiglu_grad_in_place, swiglu_packed, FlashAttnParams,
};
use crate::{Error, Result};

/// The MLP tile the trainer uses with checkpoint offload ([`Transformer::set_mlp_tile`]): 8,192
/// tokens (for Llama-3.1-8B, about 1.1 GiB of MLP activations per tile).
pub const MLP_TILE_TOKENS: usize = 8192;

const OP: &str = "Transformer";

/// The RoPE inverse frequencies `θ^(-2i/d)`, `i < d/2`, with the `llama3` scaling applied as
/// transformers does it.
///
/// ```
/// let f = flare::models::rope_inv_freq(4, 10000.0, None);
/// assert_eq!(f.len(), 2);
/// assert!((f[0] - 1.0).abs() < 1e-12 && (f[1] - 0.01).abs() < 1e-12);
/// ```
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let Some(s) = scaling else {
        return base;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old / s.low_freq_factor;
    let high_freq_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// `x * cos + rotate_half(x) * sin` for `x: [batch, heads, seq, head_dim]` and
/// `cos, sin: [seq, head_dim]` (the two halves of the last dim repeated, the transformers
/// convention), where `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[[[1f32, 0.]]]], &Device::Cpu)?; // [1, 1, 1, 2]
/// let (c, s) = (0.5f32, 0.75f32.sqrt());
/// let cos = Tensor::new(&[[c, c]], &Device::Cpu)?;
/// let sin = Tensor::new(&[[s, s]], &Device::Cpu)?;
/// let y = flare::models::apply_rope(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!((y[0] - c).abs() < 1e-6 && (y[1] - s).abs() < 1e-6);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, d - half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Several projections of one input stored as one weight `[Σ out, in]` (and bias), whose rows
/// the [`LoraLinear`]s hold as views: while none of them has an active adapter and their
/// weights are still those views, the group runs as one GEMM (one launch instead of one per
/// projection, one bias add). An adapter, a merge or a replaced weight sends the group back to
/// the separate projections; nothing is stored twice.
#[derive(Debug, Clone)]
struct Fused {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The ids of the member weights and biases as built (views of `weight` / `bias`).
    ids: Vec<candle_core::TensorId>,
}

impl Fused {
    /// Fuses `parts` (`(weight [out_i, in], bias [out_i])`) and returns the group and the
    /// [`LoraLinear`]s on views of it.
    fn build(parts: Vec<(Tensor, Option<Tensor>)>) -> Result<(Fused, Vec<LoraLinear>)> {
        let ws: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
        let weight = Tensor::cat(&ws, 0)?;
        let bias = if parts.iter().all(|(_, b)| b.is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|(_, b)| b.as_ref()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        let mut lins = Vec::with_capacity(parts.len());
        let mut ids = Vec::new();
        let mut row = 0;
        for (w, b) in &parts {
            let out = w.dim(0)?;
            let wv = weight.narrow(0, row, out)?;
            let bv = match (&bias, b) {
                (Some(fb), Some(_)) => Some(fb.narrow(0, row, out)?),
                (None, b) => b.clone(),
                (Some(_), None) => None,
            };
            ids.push(wv.id());
            if let Some(bv) = &bv {
                ids.push(bv.id());
            }
            lins.push(LoraLinear::new(wv, bv)?);
            row += out;
        }
        Ok((Fused { weight, bias, ids }, lins))
    }

    /// Whether `lins` still compute exactly the fused product: no active adapter, and the
    /// weights and biases built by [`build`](Self::build).
    fn applies(&self, lins: &[&LoraLinear]) -> bool {
        lins.iter().all(|l| l.active().is_none()) && self.same_weights(lins)
    }

    /// Whether the weights and biases of `lins` are still the views built by
    /// [`build`](Self::build) (none merged into or replaced).
    fn same_weights(&self, lins: &[&LoraLinear]) -> bool {
        let mut ids = Vec::with_capacity(self.ids.len());
        for l in lins {
            ids.push(l.weight().id());
            if let Some(b) = l.bias() {
                ids.push(b.id());
            }
        }
        ids == self.ids
    }

    /// Lays the group out again on `weight` (the same values in another layout, e.g. the
    /// fused MLP's padded storage): it and `lins` (the members, in order, their weights still
    /// the views [`build`](Self::build) made) then hold views of `weight`.
    fn relayout(&mut self, weight: Tensor, lins: &mut [&mut LoraLinear]) -> Result<()> {
        let mut ids = Vec::with_capacity(self.ids.len());
        let mut row = 0;
        for l in lins.iter_mut() {
            let out = l.out_features();
            l.relayout_weight(weight.narrow(0, row, out)?)?;
            ids.push(l.weight().id());
            if let Some(b) = l.bias() {
                ids.push(b.id());
            }
            row += out;
        }
        self.weight = weight;
        self.ids = ids;
        Ok(())
    }

    /// Stacks the members' current weights again (after a merge changed them), so that the
    /// group applies again and the old stacked weight is freed; nothing when they are still
    /// the group's views. The members (in order, none with a merged adapter) then hold views
    /// of the new stacked weight; the biases are unchanged.
    fn restack(&mut self, lins: &mut [&mut LoraLinear]) -> Result<()> {
        let same = {
            let views: Vec<&LoraLinear> = lins.iter().map(|l| &**l).collect();
            self.same_weights(&views)
        };
        if same {
            return Ok(());
        }
        let ws: Vec<Tensor> = lins.iter().map(|l| l.weight().clone()).collect();
        let weight = Tensor::cat(&ws, 0)?;
        drop(ws);
        self.relayout(weight, lins)
    }

    /// `x @ weight.T + bias`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul(x, &self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// The attention block of one layer.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    /// q, k and v as one projection.
    qkv: Fused,
}

/// The SwiGLU MLP of one layer.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
    /// gate and up as one projection.
    gate_up: Fused,
    /// Whether gate and up with adapters run as one grouped LoRA product
    /// ([`Transformer::set_grouped_projections`]).
    grouped: bool,
    /// Whether the grouped MLP runs as one fused LoRA op ([`Transformer::set_fused_mlp`]).
    fused: bool,
    /// The weights as the fused op reads them, while it is on and they still are the
    /// projections' (padded on CUDA: gate/up and down are then views of its storage).
    weights: Option<MlpWeights>,
}

impl Attention {
    /// The block from its four projections' `(weight, bias)`.
    fn new(
        q: (Tensor, Option<Tensor>),
        k: (Tensor, Option<Tensor>),
        v: (Tensor, Option<Tensor>),
        o: LoraLinear,
    ) -> Result<Self> {
        let (qkv, mut lins) = Fused::build(vec![q, k, v])?;
        let v_proj = lins.pop();
        let k_proj = lins.pop();
        let q_proj = lins.pop();
        match (q_proj, k_proj, v_proj) {
            (Some(q_proj), Some(k_proj), Some(v_proj)) => Ok(Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj: o,
                qkv,
            }),
            _ => Err(Error::InvalidArgument {
                op: OP,
                msg: "internal error: fused q/k/v lost a projection".into(),
            }),
        }
    }
}

/// The projections `lins` (the members of `fused`, in order) as one grouped LoRA product
/// ([`lora_linear_grouped`] on the fused weight, the adapters' factors stacked) when every one
/// runs a fused adapter ([`LoraLinear::fused_adapter`]: no training-mode dropout) of one rank,
/// scale and dtype and their weights are still the fused views; `None` otherwise.
fn grouped_product(fused: &Fused, lins: &[&LoraLinear], x: &Tensor) -> Result<Option<Tensor>> {
    if !fused.same_weights(lins) {
        return Ok(None);
    }
    let mut ads = Vec::with_capacity(lins.len());
    for l in lins {
        match l.fused_adapter() {
            Some(ad) => ads.push(ad),
            None => return Ok(None),
        }
    }
    let first = ads[0];
    if ads.iter().any(|ad| {
        ad.rank() != first.rank()
            || ad.scale() != first.scale()
            || ad.a().dtype() != first.a().dtype()
    }) {
        return Ok(None);
    }
    let a = stack_rows(&ads.iter().map(|ad| ad.a()).collect::<Vec<_>>())?;
    let b = stack_rows(&ads.iter().map(|ad| ad.b()).collect::<Vec<_>>())?;
    let splits: Vec<usize> = lins.iter().map(|l| l.out_features()).collect();
    Ok(Some(lora_linear_grouped(
        x,
        &fused.weight,
        fused.bias.as_ref(),
        &a,
        &b,
        first.scale(),
        &splits,
    )?))
}

impl Mlp {
    /// The MLP from its projections' `(weight, bias)`.
    fn new(
        gate: (Tensor, Option<Tensor>),
        up: (Tensor, Option<Tensor>),
        down: LoraLinear,
    ) -> Result<Self> {
        let (gate_up, mut lins) = Fused::build(vec![gate, up])?;
        let up_proj = lins.pop();
        let gate_proj = lins.pop();
        match (gate_proj, up_proj) {
            (Some(gate_proj), Some(up_proj)) => Ok(Mlp {
                gate_proj,
                up_proj,
                down_proj: down,
                gate_up,
                grouped: true,
                fused: false,
                weights: None,
            }),
            _ => Err(Error::InvalidArgument {
                op: OP,
                msg: "internal error: fused gate/up lost a projection".into(),
            }),
        }
    }

    /// Turns the fused MLP on or off for this layer ([`Transformer::set_fused_mlp`]). On, while
    /// gate and up are still the grouped views and down is unmerged, the weights are laid out
    /// as [`MlpWeights`] (on CUDA with a half dtype: copied once into padded storage, which
    /// the projections' weights then view, the unpadded tensors freed). Off, every weight still
    /// a strided view of it (and not merged) goes back to a contiguous tensor.
    fn set_fused(&mut self, on: bool) -> Result<()> {
        self.set_fused_with(on, MlpWeights::new)
    }

    /// [`set_fused`](Self::set_fused) with `lay_out` building the weights' layout.
    fn set_fused_with(
        &mut self,
        on: bool,
        lay_out: impl Fn(&Tensor, &Tensor) -> Result<MlpWeights>,
    ) -> Result<()> {
        self.fused = on;
        let current = self.weights.as_ref().is_some_and(|w| self.lays_out(w));
        if on && !current {
            self.weights = None;
            if self.gate_up.same_weights(&[&self.gate_proj, &self.up_proj])
                && self.down_proj.merged().is_none()
            {
                let w = lay_out(&self.gate_up.weight, self.down_proj.weight())?;
                self.relayout(w.gate_up().clone(), w.down().clone())?;
                self.weights = Some(w);
            }
        } else if !on {
            if let Some(w) = self.weights.take() {
                let group = self.gate_up.same_weights(&[&self.gate_proj, &self.up_proj])
                    && self.gate_up.weight.id() == w.gate_up().id();
                if w.is_padded() && group {
                    self.gate_up.relayout(
                        w.gate_up().contiguous()?,
                        &mut [&mut self.gate_proj, &mut self.up_proj],
                    )?;
                }
            }
            // Whatever else is still a strided view (a group broken by a merge since, say):
            // contiguous again.
            for l in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
                if !l.weight().is_contiguous() && l.merged().is_none() {
                    let w = l.weight().contiguous()?;
                    l.relayout_weight(w)?;
                }
            }
        }
        Ok(())
    }

    /// Gate/up's group and down on `gate_up` and `down` (the same values, another layout).
    fn relayout(&mut self, gate_up: Tensor, down: Tensor) -> Result<()> {
        self.gate_up
            .relayout(gate_up, &mut [&mut self.gate_proj, &mut self.up_proj])?;
        self.down_proj.relayout_weight(down)
    }

    /// Whether the projections' weights are still the views `w` holds (none merged, replaced
    /// or laid out again since).
    fn lays_out(&self, w: &MlpWeights) -> bool {
        self.gate_up.same_weights(&[&self.gate_proj, &self.up_proj])
            && self.gate_up.weight.id() == w.gate_up().id()
            && self.down_proj.weight().id() == w.down().id()
    }

    /// The whole MLP as one fused LoRA op ([`lora_swiglu_mlp`]: on CUDA the low-rank terms run
    /// inside the frozen GEMMs' reduction, so no gate/up or down expansion reaches memory) when
    /// it is on ([`Transformer::set_fused_mlp`]) with grouping, the weights are still those it
    /// laid out, no projection has a bias, and all three run fused adapters
    /// ([`LoraLinear::fused_adapter`]) of one factor dtype, gate and up of one rank and scale;
    /// `None` otherwise.
    fn fused_lora(&self, n: &Tensor) -> Result<Option<Tensor>> {
        let (gate, up, down) = (&self.gate_proj, &self.up_proj, &self.down_proj);
        let Some(weights) = &self.weights else {
            return Ok(None);
        };
        if !(self.grouped && self.fused)
            || self.gate_up.bias.is_some()
            || down.bias().is_some()
            || !self.lays_out(weights)
        {
            return Ok(None);
        }
        let (Some(g), Some(u), Some(d)) = (
            gate.fused_adapter(),
            up.fused_adapter(),
            down.fused_adapter(),
        ) else {
            return Ok(None);
        };
        if g.rank() != u.rank()
            || g.scale() != u.scale()
            || u.a().dtype() != g.a().dtype()
            || d.a().dtype() != g.a().dtype()
        {
            return Ok(None);
        }
        let m = LoraMlp {
            weights,
            gate: (g.a(), g.b()),
            up: (u.a(), u.b()),
            down: (d.a(), d.b()),
            scale_gate_up: g.scale(),
            scale_down: d.scale(),
        };
        Ok(Some(lora_swiglu_mlp(n, &m)?))
    }

    /// `[gate | up]` (`[..., 2 · intermediate]`) as one grouped LoRA product
    /// ([`grouped_product`]) when grouping is on; `None` otherwise.
    fn grouped_gate_up(&self, n: &Tensor) -> Result<Option<Tensor>> {
        if !self.grouped {
            return Ok(None);
        }
        grouped_product(&self.gate_up, &[&self.gate_proj, &self.up_proj], n)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// A decoder-only transformer of the Llama family, loaded from a Hugging Face directory.
///
/// Linear projections are [`LoraLinear`]s at the module paths transformers and PEFT use
/// (`model.layers.{i}.self_attn.q_proj`, ..., `model.layers.{i}.mlp.down_proj`); see
/// [`lora_modules_mut`](Self::lora_modules_mut).
#[derive(Debug, Clone)]
pub struct Transformer {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[vocab, hidden]`: the embedding matrix itself when tied.
    lm_head: Tensor,
    /// RoPE inverse frequencies, `head_dim / 2` of them, f32.
    inv_freq: Vec<f32>,
    /// `cos(pos · inv_freq)`, `[table_len, head_dim / 2]` in the model's dtype, for positions
    /// `0..table_len` (computed once, so a forward takes a view of it and launches nothing).
    rope_cos: Tensor,
    /// `sin(pos · inv_freq)`, like `rope_cos`.
    rope_sin: Tensor,
    /// Whether forwards without a cache recompute each layer in the backward
    /// ([`set_gradient_checkpointing`](Self::set_gradient_checkpointing)).
    checkpointing: bool,
    /// Where checkpointing keeps the layers' inputs
    /// ([`set_checkpoint_offload`](Self::set_checkpoint_offload)).
    checkpoint_store: CheckpointStore,
    /// Tokens per tile of the MLP in checkpointed layers (`None`: untiled); see
    /// [`set_mlp_tile`](Self::set_mlp_tile).
    mlp_tile: Option<usize>,
    /// [`set_fused_mlp`](Self::set_fused_mlp) (each layer's [`Mlp`] holds a copy).
    fused_mlp: bool,
    /// [`set_grouped_projections`](Self::set_grouped_projections), read by the attention; each
    /// layer's [`Mlp`] holds a copy, since the tiled MLP's checkpoint closures run without the
    /// model.
    grouped: bool,
    /// The parameter gradients of checkpointed layers, until merged (shared by clones).
    checkpoint_grads: CheckpointGrads,
    /// The seed of the LoRA dropout masks of the next forwards (random per forward if `None`).
    dropout_seed: Option<u64>,
}

/// The tensors one batch-1 decode step reads, for the decode engine
/// ([`crate::generate::DecodeGraph`]): clones (the same device buffers) of the weights as the
/// per-op path uses them with no adapter active.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DecodeParts {
    pub embed: Tensor,
    pub layers: Vec<LayerParts>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    pub rope_cos: Tensor,
    pub rope_sin: Tensor,
}

/// One layer's tensors of [`DecodeParts`].
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct LayerParts {
    pub input_norm: Tensor,
    /// q, k, v stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`, and its bias.
    pub qkv: (Tensor, Option<Tensor>),
    pub o: (Tensor, Option<Tensor>),
    pub post_norm: Tensor,
    /// gate then up stacked: `[2 * intermediate, hidden]`, and its bias.
    pub gate_up: (Tensor, Option<Tensor>),
    pub down: (Tensor, Option<Tensor>),
}

/// Positions covered by the precomputed RoPE tables at most (longer contexts compute their
/// tables per forward): 32768 positions of a 128-wide head are 8 MiB in bf16.
const ROPE_TABLE_MAX: usize = 32768;

/// The positions of the new tokens of one forward.
enum Positions {
    /// `offset..offset + seq` for every batch row.
    Shared(usize),
    /// Row-major `[batch, seq]` positions (left-padded batches).
    PerRow(Vec<u32>),
}

/// What attention masks out in one forward, and how it is computed.
#[derive(Clone)]
struct AttnMask {
    /// u8 `[1 or batch, seq, total]`: 1 where query `i` may attend to key `j`. `None`: every
    /// cached key (within the window) is visible, which is the case of one unpadded new token.
    keep: Option<Tensor>,
    /// The first key position the queries may see (sliding window, mask-free case).
    first_key: usize,
    /// `Some(cu_seqlens)` over the `b · s` new tokens taken as rows: the queries attend only
    /// to the new keys, causally (and within the sliding window) inside each sequence
    /// `cu[i]..cu[i + 1]`, computed by [`flash_attention`]; `keep` is then `None`.
    flash: Option<Vec<u32>>,
}

impl AttnMask {
    /// Flash attention over the sequences `cu_seqlens` of the new tokens.
    fn flash(cu_seqlens: Vec<u32>) -> Self {
        AttnMask {
            keep: None,
            first_key: 0,
            flash: Some(cu_seqlens),
        }
    }
}

impl Transformer {
    /// Loads `config.json` and the weights of a model directory onto `device` in `dtype`
    /// (f32, f16, bf16; f64 on CPU), whatever dtype the files store.
    ///
    /// Errors name the file and the field or tensor concerned (see [`ModelConfig::from_dir`],
    /// [`Weights::from_dir`] and [`from_weights`](Self::from_weights)).
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::from_dir(dir)?;
        Self::from_weights(config, &weights, dtype, device)
    }

    /// Builds the model from a config and opened weights. Every tensor is checked for presence
    /// and shape; an error names the file and the tensor.
    pub fn from_weights(
        config: ModelConfig,
        weights: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !supported_dtypes(device).contains(&dtype) {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype,
                device: device_name(device),
            });
        }
        // Before the weights are allocated, so that they are allocated untracked.
        crate::runtime::init(device)?;
        let c = &config;
        let get = |name: &str, shape: &[usize]| weights.get(name, shape, dtype, device);
        let part =
            |path: &str, out: usize, inp: usize, bias: bool| -> Result<(Tensor, Option<Tensor>)> {
                let w = get(&format!("{path}.weight"), &[out, inp])?;
                let b = if bias {
                    Some(get(&format!("{path}.bias"), &[out])?)
                } else {
                    None
                };
                Ok((w, b))
            };
        let linear = |path: &str, out: usize, inp: usize, bias: bool| -> Result<LoraLinear> {
            let (w, b) = part(path, out, inp, bias)?;
            LoraLinear::new(w, b)
        };
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let embed_tokens = get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let inter = c.intermediate_size;
            layers.push(Layer {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention::new(
                    part(&format!("{a}.q_proj"), q_dim, h, c.qkv_bias)?,
                    part(&format!("{a}.k_proj"), kv_dim, h, c.qkv_bias)?,
                    part(&format!("{a}.v_proj"), kv_dim, h, c.qkv_bias)?,
                    linear(&format!("{a}.o_proj"), h, q_dim, c.o_bias)?,
                )?,
                post_attention_layernorm: get(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                mlp: Mlp::new(
                    part(&format!("{m}.gate_proj"), inter, h, c.mlp_bias)?,
                    part(&format!("{m}.up_proj"), inter, h, c.mlp_bias)?,
                    linear(&format!("{m}.down_proj"), h, inter, c.mlp_bias)?,
                )?,
            });
        }
        let norm = get("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            get("lm_head.weight", &[c.vocab_size, h])?
        };
        Self::assemble(config, embed_tokens, layers, norm, lm_head)
    }

    /// The model from its parts, with the RoPE tables computed.
    fn assemble(
        config: ModelConfig,
        embed_tokens: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Tensor,
    ) -> Result<Self> {
        let c = &config;
        let inv_freq: Vec<f32> = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling.as_ref())
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let table_len = c.max_position_embeddings.clamp(1, ROPE_TABLE_MAX);
        let positions: Vec<u32> = (0..table_len as u32).collect();
        let (rope_cos, rope_sin) = Self::tables(
            &positions,
            &inv_freq,
            embed_tokens.dtype(),
            embed_tokens.device(),
        )?;
        Ok(Transformer {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            rope_cos,
            rope_sin,
            checkpointing: false,
            checkpoint_store: CheckpointStore::Device,
            mlp_tile: None,
            grouped: true,
            fused_mlp: false,
            checkpoint_grads: CheckpointGrads::default(),
            dropout_seed: None,
        })
    }

    /// `(cos, sin)`, `[positions.len(), head_dim / 2]`, in `dtype` on `device`.
    fn tables(
        positions: &[u32],
        inv_freq: &[f32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (c, s) = rope_tables_f32(positions, inv_freq);
        let shape = (positions.len(), inv_freq.len());
        Ok((
            Tensor::from_vec(c, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(s, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// A model of `config` with random weights, for benchmarks and tests that need no files:
    /// every projection and embedding weight uniform in `±0.02·√3` (standard deviation 0.02,
    /// transformers' `initializer_range`), biases uniform in `±0.02`, norm weights one. The
    /// same `seed` gives the same weights on the same kind of device: on the CPU they come from
    /// a seeded host generator, on CUDA from the device's generator (cuRAND, reseeded with
    /// `seed`), drawn there tensor by tensor so that a model of billions of parameters is made
    /// in seconds. The two devices' weights differ.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let cfg = flare::models::ModelConfig::from_json_str(r#"{"architectures": ["Qwen2ForCausalLM"],
    ///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    ///     "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 50,
    ///     "max_position_embeddings": 64, "tie_word_embeddings": true}"#, "config.json")?;
    /// let model = flare::models::Transformer::random(cfg, DType::F32, &Device::Cpu, 0)?;
    /// let logits = model.forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?)?;
    /// assert_eq!(logits.dims(), &[1, 3, 50]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn random(config: ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        if !supported_dtypes(device).contains(&dtype) {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype,
                device: device_name(device),
            });
        }
        crate::runtime::init(device)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // On the CPU the values come from `StdRng`; elsewhere they are drawn on the device
        // (f32, then cast), one tensor at a time: an 8B model's weights drawn on the host and
        // copied over would take minutes.
        let on_host = device.is_cpu();
        if !on_host {
            device.set_seed(seed)?;
        }
        let mut uniform = |shape: &[usize], bound: f32| -> Result<Tensor> {
            if !on_host {
                return Ok(Tensor::rand(-bound, bound, shape, device)?.to_dtype(dtype)?);
            }
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let w_bound = 0.02 * 3f32.sqrt();
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut part = |out: usize, inp: usize, bias: bool| -> Result<(Tensor, Option<Tensor>)> {
            let w = uniform(&[out, inp], w_bound)?;
            let b = if bias {
                Some(uniform(&[out], 0.02)?)
            } else {
                None
            };
            Ok((w, b))
        };
        let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, dtype, device)?) };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            let inter = c.intermediate_size;
            let (q, k, v) = (
                part(q_dim, h, c.qkv_bias)?,
                part(kv_dim, h, c.qkv_bias)?,
                part(kv_dim, h, c.qkv_bias)?,
            );
            let (ow, ob) = part(h, q_dim, c.o_bias)?;
            let (g, u) = (part(inter, h, c.mlp_bias)?, part(inter, h, c.mlp_bias)?);
            let (dw, db) = part(h, inter, c.mlp_bias)?;
            layers.push(Layer {
                input_layernorm: ones(h)?,
                self_attn: Attention::new(q, k, v, LoraLinear::new(ow, ob)?)?,
                post_attention_layernorm: ones(h)?,
                mlp: Mlp::new(g, u, LoraLinear::new(dw, db)?)?,
            });
        }
        let embed_tokens = uniform(&[c.vocab_size, h], w_bound)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            uniform(&[c.vocab_size, h], w_bound)?
        };
        let norm = ones(h)?;
        Self::assemble(config, embed_tokens, layers, norm, lm_head)
    }

    /// The bytes of weights one decode step reads: every layer's projections and norms, the
    /// final norm and the output projection (the embedding gather reads one row per token,
    /// negligible). The weight-read floor of decoding is this over the memory bandwidth.
    pub fn decode_weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = bytes(&self.norm) + bytes(&self.lm_head);
        for (_, lin) in self.lora_modules() {
            total += bytes(lin.weight()) + lin.bias().map_or(0, bytes);
        }
        for l in &self.layers {
            total += bytes(&l.input_layernorm) + bytes(&l.post_attention_layernorm);
        }
        total
    }

    /// The tensors of a batch-1 decode step for the decode engine, or why the engine cannot
    /// compute what [`decode_step`](Self::decode_step) computes (an active adapter, a merged or
    /// replaced weight: the fused q/k/v or gate/up projections no longer apply).
    pub(crate) fn decode_parts(&self) -> std::result::Result<DecodeParts, String> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            if !a.qkv.applies(&[&a.q_proj, &a.k_proj, &a.v_proj])
                || !m.gate_up.applies(&[&m.gate_proj, &m.up_proj])
                || a.o_proj.active().is_some()
                || m.down_proj.active().is_some()
            {
                return Err(format!(
                    "layer {i} has an active adapter or a replaced projection weight"
                ));
            }
            if [
                &a.qkv.weight,
                a.o_proj.weight(),
                &m.gate_up.weight,
                m.down_proj.weight(),
            ]
            .iter()
            .any(|w| !w.is_contiguous())
            {
                return Err(format!(
                    "layer {i}'s weights are laid out for the fused MLP \
                     (Transformer::set_fused_mlp); the engine reads contiguous weights"
                ));
            }
            layers.push(LayerParts {
                input_norm: l.input_layernorm.clone(),
                qkv: (a.qkv.weight.clone(), a.qkv.bias.clone()),
                o: (a.o_proj.weight().clone(), a.o_proj.bias().cloned()),
                post_norm: l.post_attention_layernorm.clone(),
                gate_up: (m.gate_up.weight.clone(), m.gate_up.bias.clone()),
                down: (m.down_proj.weight().clone(), m.down_proj.bias().cloned()),
            });
        }
        Ok(DecodeParts {
            embed: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            rope_cos: self.rope_cos.clone(),
            rope_sin: self.rope_sin.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of the weights and of the logits.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Turns activation checkpointing on or off (off by default). When on, a forward without
    /// a KV cache ([`forward`](Self::forward)) keeps only each decoder layer's input for the
    /// backward and recomputes the layer in the backward ([`checkpoint_chain`]): activation memory
    /// drops from every layer's intermediates to one layer's plus an `[batch, seq, hidden]`
    /// input per layer, for about one more forward of compute. The loss and the gradients are
    /// those of the plain forward (same ops, same LoRA dropout masks).
    ///
    /// The outer graph does not reach the adapters of checkpointed layers: after each
    /// `backward()`, merge their gradients with
    /// [`merge_checkpoint_grads`](Self::merge_checkpoint_grads).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// use flare::lora::LoraConfig;
    /// # let cfg = flare::models::ModelConfig::from_json_str(r#"{"architectures": ["Qwen2ForCausalLM"],
    /// #     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    /// #     "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 50,
    /// #     "max_position_embeddings": 64, "tie_word_embeddings": true}"#, "config.json")?;
    /// let mut model = flare::models::Transformer::random(cfg, DType::F32, &Device::Cpu, 0)?;
    /// let lora = LoraConfig { r: 4, ..Default::default() };
    /// let mut vars = Vec::new();
    /// for (i, (_, layer)) in model.lora_modules_mut().into_iter().enumerate() {
    ///     layer.add_adapter("default", &lora, i as u64)?;
    ///     layer.set_active(Some("default"))?;
    ///     vars.extend(layer.trainable_vars());
    /// }
    /// model.set_gradient_checkpointing(true);
    /// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    /// let loss = model.forward(&ids)?.sqr()?.sum_all()?;
    /// let mut grads = loss.backward()?;
    /// model.merge_checkpoint_grads(&mut grads)?;
    /// assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_some()));
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether activation checkpointing is on
    /// ([`set_gradient_checkpointing`](Self::set_gradient_checkpointing)).
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// With checkpointing on, keeps the layers' inputs in host memory instead of on the device
    /// (off by default): the device then holds one layer's activations and no per-layer input
    /// (`layers × batch × seq × hidden` elements fewer, 16 GiB at 65,536 tokens of
    /// Llama-3.1-8B), for one device-to-host copy per layer in the forward and one back in the
    /// backward ([`checkpoint_chain`], [`CheckpointStore::Host`]). The values are those of
    /// on-device checkpointing, bit for bit. No effect without checkpointing.
    ///
    /// Offload is the long-context setting, so it also tiles each layer's MLP at
    /// [`MLP_TILE_TOKENS`] tokens ([`set_mlp_tile`](Self::set_mlp_tile), which can change the
    /// tile afterwards); turning offload off turns the tiling off.
    pub fn set_checkpoint_offload(&mut self, on: bool) {
        self.checkpoint_store = if on {
            CheckpointStore::Host
        } else {
            CheckpointStore::Device
        };
        self.mlp_tile = on.then_some(MLP_TILE_TOKENS);
    }

    /// With checkpointing on, runs each layer's MLP over its tokens in tiles of `tokens` rows
    /// (`None`, the default: in one piece), each tile itself checkpointed ([`checkpoint_rows`]): the
    /// MLP's `[tokens, intermediate]` activations (gate, up, their product, and their gradients:
    /// most of a layer's activation memory, 115 KiB per token of Llama-3.1-8B) then exist for
    /// one tile at a time, in the forward and in the backward's recomputation, for one more
    /// forward of the MLP per step. It is what lets long contexts fit ([`set_checkpoint_offload`](Self::set_checkpoint_offload) turns it on at
    /// [`MLP_TILE_TOKENS`]). Rows split across tiles compute the
    /// same values; LoRA dropout draws each tile's masks from a seed derived from the layer's.
    /// No effect without checkpointing, or on a pass of at most `tokens` tokens.
    pub fn set_mlp_tile(&mut self, tokens: Option<usize>) {
        self.mlp_tile = tokens.filter(|&t| t > 0);
    }

    /// Whether projections that read one input run as one grouped LoRA product when their
    /// adapters allow (on by default). When every projection of a group carries a fused adapter
    /// (active, unmerged, no training-mode dropout) of one rank, scale and dtype on the unmerged
    /// weights, the group becomes one [`lora_linear_grouped`] on the fused weight:
    /// - each layer's gate and up projections, feeding the packed SwiGLU;
    /// - each layer's q, k and v projections in a training or prefill pass without a KV cache,
    ///   feeding [`flash_attention_qkvpacked`] (RoPE and the attention on the packed output,
    ///   whose backward returns the packed gradient).
    ///
    /// The values are those of the separate projections up to the order of the sums in the
    /// input gradient, at fewer passes over memory (BENCHMARKS.md). Off runs every projection
    /// alone (for comparisons).
    pub fn set_grouped_projections(&mut self, on: bool) {
        self.grouped = on;
        for layer in &mut self.layers {
            layer.mlp.grouped = on;
        }
    }

    /// Whether each layer's MLP with adapters runs as one fused op, [`lora_swiglu_mlp`] (off by
    /// default), when grouping is on ([`set_grouped_projections`](Self::set_grouped_projections))
    /// and the three projections carry fused adapters (active, unmerged, no training-mode
    /// dropout, no bias) of one factor dtype, gate and up of one rank and scale. On CUDA with a
    /// half base the op folds the gate/up and down low-rank terms into its frozen GEMMs'
    /// reduction, so no `[tokens, 2 · intermediate]`, `[tokens, intermediate]` or
    /// `[tokens, hidden]` expansion is written and read back; elsewhere it runs the same ops as
    /// off.
    ///
    /// Turning it on lays each layer's MLP weights out as [`MlpWeights`]: on CUDA with a half
    /// dtype they are copied once, layer by layer, into storage with spare rows and columns for
    /// the factors (the projections' weights become strided views of it and the old tensors
    /// are freed: the weights' memory grows by under 1%). The decode engine reads contiguous
    /// weights only, so generation runs without it while this is on; turning it off copies the
    /// weights back to contiguous tensors. Errors: out of device memory while laying out.
    ///
    /// Off by default until measured: its first form (the low-rank terms added inside
    /// hand-written SwiGLU kernels) saved about 10 ms of GEMM work a step on an H100 at the
    /// Llama-3.1-8B shape but its kernels cost more (261.5 against 257.6 ms a step); the fold
    /// runs on the vendor GEMMs and flare's plain SwiGLU kernels instead (BENCHMARKS.md).
    pub fn set_fused_mlp(&mut self, on: bool) -> Result<()> {
        for layer in &mut self.layers {
            layer.mlp.set_fused(on)?;
        }
        self.fused_mlp = on;
        Ok(())
    }

    /// Merges every projection's active adapter into its weight for good and removes all
    /// adapters, as PEFT's `merge_and_unload` ([`LoraLinear::merge_and_unload`]): the model is
    /// then a plain model of the merged weights. The q/k/v and gate/up projections are
    /// stacked again, so they run as one GEMM each and the decode engine applies (batch-1
    /// greedy generation on CUDA, [`crate::generate::DecodeGraph`]), and the unmerged weights
    /// are freed. The fused MLP's layout, if on, is laid out again on the merged weights.
    /// Returns how many projections now hold a merged adapter.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use flare::lora::LoraConfig;
    /// # use flare::models::{ModelConfig, Transformer};
    /// # let cfg = ModelConfig::from_json_str(r#"{"architectures": ["LlamaForCausalLM"],
    /// #     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    /// #     "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 50,
    /// #     "max_position_embeddings": 64, "tie_word_embeddings": false}"#, "config.json")?;
    /// let mut model = Transformer::random(cfg, DType::F32, &Device::Cpu, 0)?;
    /// for (i, (_, layer)) in model.lora_modules_mut().into_iter().enumerate() {
    ///     layer.add_adapter("default", &LoraConfig { r: 4, ..Default::default() }, i as u64)?;
    ///     let a = layer.adapter("default").unwrap().a().clone();
    ///     let b = Tensor::randn(0f32, 0.1, (layer.out_features(), 4), &Device::Cpu)?;
    ///     layer.set_adapter_weights("default", &a, &b)?;
    ///     layer.set_active(Some("default"))?;
    /// }
    /// let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu)?;
    /// let with_adapters = model.forward(&ids)?;
    /// assert_eq!(model.merge_and_unload()?, model.lora_modules().len());
    /// let merged = model.forward(&ids)?;
    /// let err = (&with_adapters - &merged)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(err < 1e-4, "{err}");
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn merge_and_unload(&mut self) -> Result<usize> {
        let fused = self.fused_mlp;
        if fused {
            self.set_fused_mlp(false)?;
        }
        let mut n = 0;
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                n += usize::from(l.merge_and_unload()?);
            }
            a.qkv
                .restack(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
            let m = &mut layer.mlp;
            for l in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                n += usize::from(l.merge_and_unload()?);
            }
            m.gate_up.restack(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        }
        if fused {
            self.set_fused_mlp(true)?;
        }
        Ok(n)
    }

    /// Whether the fused MLP is on ([`set_fused_mlp`](Self::set_fused_mlp)).
    pub fn fused_mlp(&self) -> bool {
        self.fused_mlp
    }

    /// Whether grouping is on ([`set_grouped_projections`](Self::set_grouped_projections)).
    pub fn grouped_projections(&self) -> bool {
        self.grouped
    }

    /// The MLP tile ([`set_mlp_tile`](Self::set_mlp_tile)).
    pub fn mlp_tile(&self) -> Option<usize> {
        self.mlp_tile
    }

    /// Whether checkpointing keeps the layers' inputs in host memory
    /// ([`set_checkpoint_offload`](Self::set_checkpoint_offload)).
    pub fn checkpoint_offload(&self) -> bool {
        self.checkpoint_store == CheckpointStore::Host
    }

    /// The accumulator of the checkpointed layers' parameter gradients (shared by this model's
    /// clones): filled by each backward through a checkpointed forward.
    pub fn checkpoint_grads(&self) -> &CheckpointGrads {
        &self.checkpoint_grads
    }

    /// Moves the parameter gradients the checkpointed layers computed in the last backward(s)
    /// into `grads` (the gradients of that backward), adding to any gradient already there;
    /// returns how many parameters were merged. A no-op without checkpointing. Call it after
    /// every `backward()` of a checkpointed forward, before reading the adapters' gradients.
    pub fn merge_checkpoint_grads(&self, grads: &mut GradStore) -> Result<usize> {
        self.checkpoint_grads.merge_into(grads)
    }

    /// Seeds the LoRA dropout masks of the following forwards: layer `i` draws its masks
    /// from a stream seeded by a mix of `(seed, i)` ([`with_dropout_seed`]), so two forwards
    /// under one seed drop the same elements (on the CPU, bit for bit, with or without
    /// checkpointing). `None` (the default) draws a fresh seed per forward.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.dropout_seed = seed;
    }

    /// Every linear projection with its module path, in layer order (`q, k, v, o, gate, up,
    /// down` per layer), for injecting adapters by PEFT module name.
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device};
    /// # use flare::lora::LoraConfig;
    /// let mut model = flare::models::Transformer::from_dir("qwen2-0.5b", DType::BF16, &Device::Cpu)?;
    /// let cfg = LoraConfig { r: 8, target_modules: vec!["q_proj".into(), "v_proj".into()], ..Default::default() };
    /// for (i, (path, layer)) in model.lora_modules_mut().into_iter().enumerate() {
    ///     if path.ends_with(".q_proj") || path.ends_with(".v_proj") {
    ///         layer.add_adapter("default", &cfg, i as u64)?;
    ///         layer.set_active(Some("default"))?;
    ///     }
    /// }
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn lora_modules_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// Every linear projection with its module path, read-only; same order as
    /// [`lora_modules_mut`](Self::lora_modules_mut).
    pub fn lora_modules(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// The linear projection at a module path (`model.layers.3.mlp.up_proj`), if any.
    pub fn lora_module_mut(&mut self, path: &str) -> Option<&mut LoraLinear> {
        self.lora_modules_mut()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, l)| l)
    }

    /// A zeroed [`KvCache`] for `batch` sequences of up to `max_len` positions, in the model's
    /// dtype and on its device.
    pub fn new_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            self.dtype(),
            self.device(),
        )
    }

    /// `(cos, sin)` for the new positions: `[seq, head_dim / 2]` views of the precomputed
    /// tables for shared positions (no launch), `[batch * seq, head_dim / 2]` for per-row ones.
    fn rope_for(&self, positions: &Positions, seq: usize) -> Result<(Tensor, Tensor)> {
        let table_len = self.rope_cos.dim(0)?;
        match positions {
            Positions::Shared(offset) if offset + seq <= table_len => Ok((
                self.rope_cos.narrow(0, *offset, seq)?,
                self.rope_sin.narrow(0, *offset, seq)?,
            )),
            Positions::Shared(offset) => {
                let p: Vec<u32> = (*offset as u32..(offset + seq) as u32).collect();
                Self::tables(&p, &self.inv_freq, self.dtype(), self.device())
            }
            Positions::PerRow(p) if p.iter().all(|&i| (i as usize) < table_len) => {
                // Rows of the precomputed tables (the same values `tables` would compute).
                let idx = Tensor::new(p.as_slice(), self.device())?;
                Ok((
                    self.rope_cos.index_select(&idx, 0)?,
                    self.rope_sin.index_select(&idx, 0)?,
                ))
            }
            Positions::PerRow(p) => Self::tables(p, &self.inv_freq, self.dtype(), self.device()),
        }
    }

    /// The attention mask of `seq` new queries at cache positions `offset..offset + seq` over
    /// `offset + seq` keys, for rows left-padded by `pads` (when given): query `i` of row `r`
    /// sees key `j` when `pads[r] <= j <= i` and `i - j` is within the sliding window; a
    /// padding query sees only itself (its output is never used, and this keeps it finite).
    /// No mask at all for one unpadded new token: it sees every key, and a sliding window only
    /// moves the first visible key.
    fn attention_mask(
        &self,
        offset: usize,
        seq: usize,
        pads: Option<&[usize]>,
    ) -> Result<AttnMask> {
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let total = offset + seq;
        if seq == 1 && pads.is_none() {
            return Ok(AttnMask {
                keep: None,
                first_key: total.saturating_sub(window),
                flash: None,
            });
        }
        let rows: Vec<usize> = pads.map_or_else(|| vec![0], <[usize]>::to_vec);
        let mut mask = Vec::with_capacity(rows.len() * seq * total);
        for &pad in &rows {
            for i in offset..total {
                mask.extend((0..total).map(|j| {
                    let visible = j <= i && i - j < window && j >= pad;
                    u8::from(visible || (i < pad && j == i))
                }));
            }
        }
        let keep = Tensor::from_vec(mask, (rows.len(), seq, total), self.device())?;
        Ok(AttnMask {
            keep: Some(keep),
            first_key: 0,
            flash: None,
        })
    }

    fn check_ids(input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, s) = input_ids.dims2().map_err(|_| Error::InvalidArgument {
            op: OP,
            msg: format!(
                "input_ids must be [batch, seq], got shape {:?}",
                input_ids.dims()
            ),
        })?;
        if !matches!(input_ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "input_ids must be u8, u32 or i64, got {:?}",
                    input_ids.dtype()
                ),
            });
        }
        if s == 0 || b == 0 {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("input_ids is empty: shape {:?}", input_ids.dims()),
            });
        }
        Ok((b, s))
    }

    /// The logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u8, u32 or i64), in the
    /// model's dtype, with causal attention over the whole sequence (no KV cache), computed by
    /// [`flash_attention()`] (no `seq × seq` tensor, forward or backward).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.forward_hidden(input_ids)?)
    }

    /// The final-normed hidden states `[batch, seq, hidden]` of [`forward`](Self::forward):
    /// the logits are these times [`lm_head_weight`](Self::lm_head_weight)`ᵀ` (for a loss that
    /// fuses the output projection and never holds the logits).
    pub fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = Self::check_ids(input_ids)?;
        let mask = AttnMask::flash(Self::uniform_offsets(b, s));
        self.forward_impl(input_ids, b, s, None, &Positions::Shared(0), &mask)
    }

    /// [`forward`](Self::forward) computed the way cached and padded forwards are: the scores
    /// `[b · kv_heads, group · s, s]` materialised, an explicit causal (and sliding-window)
    /// mask and a masked softmax. The reference the flash-attention path is tested against;
    /// O(s²) memory per layer, for tests and comparisons only.
    pub fn forward_reference(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = Self::check_ids(input_ids)?;
        let mask = self.attention_mask(0, s, None)?;
        self.logits(&self.forward_impl(input_ids, b, s, None, &Positions::Shared(0), &mask)?)
    }

    /// The logits `[total, vocab]` of packed documents: `input_ids` `[total]` or `[1, total]`
    /// holds the documents one after the other, document `i` being tokens
    /// `cu_seqlens[i]..cu_seqlens[i + 1]`. Each document is computed as if alone: its positions
    /// start at 0 (RoPE) and its tokens attend only to its own earlier tokens (causal, within
    /// the sliding window if any), through [`flash_attention()`]'s variable-length offsets.
    ///
    /// Errors: `input_ids` of another shape or dtype, or empty; `cu_seqlens` with fewer than
    /// two entries, not starting at 0, decreasing, or not ending at `total`.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// let cfg = flare::models::ModelConfig::from_json_str(r#"{"architectures": ["Qwen2ForCausalLM"],
    ///     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    ///     "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 50,
    ///     "max_position_embeddings": 64, "tie_word_embeddings": true}"#, "config.json")?;
    /// let model = flare::models::Transformer::random(cfg, DType::F32, &Device::Cpu, 0)?;
    /// // Two documents, of 3 and 2 tokens.
    /// let ids = Tensor::new(&[1u32, 2, 3, 4, 5], &Device::Cpu)?;
    /// let logits = model.forward_packed(&ids, &[0, 3, 5])?;
    /// assert_eq!(logits.dims(), &[5, 50]);
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn forward_packed(&self, input_ids: &Tensor, cu_seqlens: &[u32]) -> Result<Tensor> {
        self.logits(&self.forward_hidden_packed(input_ids, cu_seqlens)?)
    }

    /// The final-normed hidden states `[total, hidden]` of
    /// [`forward_packed`](Self::forward_packed).
    pub fn forward_hidden_packed(&self, input_ids: &Tensor, cu_seqlens: &[u32]) -> Result<Tensor> {
        let total = match input_ids.dims() {
            [t] | [1, t] => *t,
            d => {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!("packed input_ids must be [total] or [1, total], got shape {d:?}"),
                })
            }
        };
        let ids = input_ids.reshape((1, total))?;
        Self::check_ids(&ids)?;
        let positions = Self::packed_positions(cu_seqlens, total)?;
        let mask = AttnMask::flash(cu_seqlens.to_vec());
        let hidden =
            self.forward_impl(&ids, 1, total, None, &Positions::PerRow(positions), &mask)?;
        Ok(hidden.reshape((total, self.config.hidden_size))?)
    }

    /// The output projection's weight `[vocab, hidden]` (the embedding matrix when tied): the
    /// logits are the final-normed hidden states times its transpose.
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// The logits of final-normed hidden states `[..., hidden]`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        matmul(hidden, &self.lm_head.t()?)
    }

    /// The offsets `0, s, 2s, …, b·s` of `b` sequences of `s` tokens.
    fn uniform_offsets(b: usize, s: usize) -> Vec<u32> {
        (0..=b).map(|i| (i * s) as u32).collect()
    }

    /// Checks packed-document offsets against `total` tokens and returns each token's position
    /// in its document.
    fn packed_positions(cu_seqlens: &[u32], total: usize) -> Result<Vec<u32>> {
        let bad = |why: String| Error::InvalidArgument {
            op: OP,
            msg: format!("cu_seqlens {cu_seqlens:?}: {why}"),
        };
        if cu_seqlens.len() < 2 {
            return Err(bad(
                "needs documents + 1 >= 2 entries (0, then each document's end)".into(),
            ));
        }
        if cu_seqlens[0] != 0 {
            return Err(bad(format!("must start at 0, starts at {}", cu_seqlens[0])));
        }
        if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
            return Err(bad(format!(
                "decreases at entry {} ({} after {})",
                i + 1,
                cu_seqlens[i + 1],
                cu_seqlens[i]
            )));
        }
        let last = cu_seqlens[cu_seqlens.len() - 1] as usize;
        if last != total {
            return Err(bad(format!(
                "must end at the number of tokens, {total}, ends at {last}"
            )));
        }
        let mut pos = Vec::with_capacity(total);
        for w in cu_seqlens.windows(2) {
            pos.extend(0..w[1] - w[0]);
        }
        Ok(pos)
    }

    /// The logits `[batch, seq, vocab]` of the new positions `offset..offset + seq` for token
    /// ids `[batch, seq]`, attending to the `offset` positions already in `cache` and to each
    /// other (causally, within the sliding window if any). The keys and values of the new
    /// positions are written into `cache`, whose length then is `offset + seq`. A cache filled
    /// by [`prefill_padded`](Self::prefill_padded) keeps each row's padding masked and its
    /// positions shifted.
    ///
    /// `offset` must equal `cache.len()`; the new positions must fit in `cache.max_len()` and
    /// the batch must be the cache's, else [`Error::InvalidArgument`] (and the cache is left
    /// unchanged).
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device, Tensor};
    /// let model = flare::models::Transformer::from_dir("qwen2-0.5b", DType::F32, &Device::Cpu)?;
    /// let mut cache = model.new_cache(1, 64)?;
    /// let prompt = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    /// let logits = model.prefill(&prompt, &mut cache)?; // [1, 3, vocab]
    /// let next = model.decode_step(&Tensor::new(&[[4u32]], &Device::Cpu)?, &mut cache)?; // [1, 1, vocab]
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn forward_with_cache(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        offset: usize,
    ) -> Result<Tensor> {
        let (b, s) = Self::check_ids(input_ids)?;
        if offset != cache.len() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "position offset {offset} differs from the cache length {}",
                    cache.len()
                ),
            });
        }
        cache.check_append(self.layers.len(), b, s)?;
        let pads = cache.pads().map(<[usize]>::to_vec);
        let positions = match &pads {
            None => Positions::Shared(offset),
            Some(p) => Positions::PerRow(
                p.iter()
                    .flat_map(|&pad| {
                        (offset..offset + s).map(move |i| i.saturating_sub(pad) as u32)
                    })
                    .collect(),
            ),
        };
        let mask = if offset == 0 && s > 1 && pads.is_none() {
            // Nothing cached to attend to: the keys are the new ones.
            AttnMask::flash(Self::uniform_offsets(b, s))
        } else {
            self.attention_mask(offset, s, pads.as_deref())?
        };
        let hidden = self.forward_impl(input_ids, b, s, Some(&mut *cache), &positions, &mask)?;
        let logits = self.logits(&hidden)?;
        cache.advance(s);
        Ok(logits)
    }

    /// [`forward_with_cache`](Self::forward_with_cache) of a prompt `[batch, seq]` into an
    /// empty cache (errors if `cache` is not empty).
    pub fn prefill(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Self::check_empty(cache)?;
        cache.set_pads(None);
        self.forward_with_cache(input_ids, cache, 0)
    }

    /// Prefills prompts of different lengths, left-padded to one length: `input_ids:
    /// [batch, seq]` where row `r` holds `seq - lengths[r]` padding tokens (any valid id) then
    /// its `lengths[r]` prompt tokens. Each row attends only to its own tokens and its positions
    /// start at 0 at its first real token, so its logits are those of the prompt run alone (up
    /// to rounding); the logits of padding positions are meaningless. The cache remembers the
    /// padding, so later [`decode_step`](Self::decode_step)s keep it masked.
    ///
    /// Errors: a non-empty cache, `lengths` not one per row, a length of 0 or above `seq`.
    pub fn prefill_padded(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = Self::check_ids(input_ids)?;
        Self::check_empty(cache)?;
        if lengths.len() != b {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("{} lengths for a batch of {b}", lengths.len()),
            });
        }
        if let Some((r, l)) = lengths.iter().enumerate().find(|(_, &l)| l == 0 || l > s) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("row {r} has length {l}, expected 1..={s}"),
            });
        }
        let pads: Vec<usize> = lengths.iter().map(|l| s - l).collect();
        cache.set_pads(if pads.iter().all(|&p| p == 0) {
            None
        } else {
            Some(pads)
        });
        let out = self.forward_with_cache(input_ids, cache, 0);
        if out.is_err() {
            cache.set_pads(None);
        }
        out
    }

    /// Refuses a non-empty cache for a prefill.
    fn check_empty(cache: &KvCache) -> Result<()> {
        if !cache.is_empty() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "prefill needs an empty cache, this one holds {} positions",
                    cache.len()
                ),
            });
        }
        Ok(())
    }

    /// [`forward_with_cache`](Self::forward_with_cache) of one new token per sequence,
    /// `[batch, 1]`, at position `cache.len()`.
    pub fn decode_step(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, s) = Self::check_ids(input_ids)?;
        if s != 1 {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "decode_step takes one token per sequence, got shape {:?}",
                    input_ids.dims()
                ),
            });
        }
        let offset = cache.len();
        self.forward_with_cache(input_ids, cache, offset)
    }

    /// The final-normed hidden states `[b, s, hidden]` of checked ids `[b, s]`, at cache
    /// positions `cache.len()..` when a cache is given (whose room has been checked; its length
    /// is not advanced here).
    fn forward_impl(
        &self,
        input_ids: &Tensor,
        b: usize,
        s: usize,
        cache: Option<&mut KvCache>,
        positions: &Positions,
        mask: &AttnMask,
    ) -> Result<Tensor> {
        let c = &self.config;
        let ids = if input_ids.rank() == 1 {
            input_ids.clone()
        } else {
            input_ids.flatten_all()?
        };
        let x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, c.hidden_size))?;
        let (cos, sin) = self.rope_for(positions, s)?;

        // LoRA dropout: each layer draws its masks from its own seeded stream, so that a
        // checkpointed layer's recomputation drops what its forward dropped.
        let dropout_base = self.dropout_seed.unwrap_or_else(rand::random);
        let layer_seed = |i: usize| mix64(dropout_base ^ mix64(i as u64));
        if self.checkpointing && cache.is_none() {
            self.layers_checkpointed(x, &cos, &sin, mask, layer_seed)
        } else {
            self.layers_plain(x, &cos, &sin, mask, cache, layer_seed)
        }
    }

    /// The decoder layers and the final norm on the embeddings `x`, each layer's residual
    /// add fused with the next norm: the normed last hidden state `[b, s, hidden]`.
    fn layers_plain(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        mut cache: Option<&mut KvCache>,
        layer_seed: impl Fn(usize) -> u64,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        let first_norm = self
            .layers
            .first()
            .map_or(&self.norm, |l| &l.input_layernorm);
        let mut normed = rms_norm(&x, first_norm, eps)?;
        let mut residual = x;
        for (i, layer) in self.layers.iter().enumerate() {
            (normed, residual) = with_dropout_seed(layer_seed(i), || -> Result<_> {
                let attn = self.attention(
                    &layer.self_attn,
                    &normed,
                    cos,
                    sin,
                    mask,
                    cache.as_deref_mut().map(|c| (c, i)),
                )?;
                let (n, r) = add_rms_norm(&attn, &residual, &layer.post_attention_layernorm, eps)?;
                let down = Self::mlp(&layer.mlp, &n)?;
                let next_norm = self
                    .layers
                    .get(i + 1)
                    .map_or(&self.norm, |l| &l.input_layernorm);
                add_rms_norm(&down, &r, next_norm, eps)
            })?;
        }
        Ok(normed)
    }

    /// The SwiGLU MLP of one layer on its normed input `n: [b, s, hidden]`.
    fn mlp(mlp: &Mlp, n: &Tensor) -> Result<Tensor> {
        if let Some(y) = mlp.fused_lora(n)? {
            return Ok(y);
        }
        let act = if mlp.gate_up.applies(&[&mlp.gate_proj, &mlp.up_proj]) {
            swiglu_packed(&mlp.gate_up.forward(n)?)?
        } else if let Some(gu) = mlp.grouped_gate_up(n)? {
            swiglu_packed(&gu)?
        } else {
            // Fresh projection outputs read only here: their gradients may overwrite them.
            swiglu_grad_in_place(&mlp.gate_proj.forward(n)?, &mlp.up_proj.forward(n)?)?
        };
        mlp.down_proj.forward(&act)
    }

    /// One decoder layer as a unit `h -> h'` (its input norm inside, no cache), as the two
    /// parts of `h' = update + residual`: the MLP's output and `h + attention`. The unit
    /// activation checkpointing recomputes; it runs the same ops in the same order as a layer
    /// of the plain loop, whose norms are fused across layer boundaries instead.
    fn layer_unit(
        &self,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
    ) -> Result<(Tensor, Tensor)> {
        let eps = self.config.rms_norm_eps as f32;
        let normed = rms_norm(h, &layer.input_layernorm, eps)?;
        let attn = self.attention(&layer.self_attn, &normed, cos, sin, mask, None)?;
        let (n, r) = add_rms_norm(&attn, h, &layer.post_attention_layernorm, eps)?;
        let rows = n.elem_count() / n.dim(D::Minus1)?.max(1);
        let update = match self.mlp_tile {
            Some(tile) if rows > tile => self.mlp_tiled(&layer.mlp, &n, tile)?,
            _ => Self::mlp(&layer.mlp, &n)?,
        };
        Ok((update, r))
    }

    /// [`mlp`](Self::mlp) over `n`'s rows in tiles of `tile`, checkpointed tile by tile into
    /// this model's accumulator ([`checkpoint_rows`]; see [`set_mlp_tile`](Self::set_mlp_tile)).
    fn mlp_tiled(&self, mlp: &Mlp, n: &Tensor, tile: usize) -> Result<Tensor> {
        let dims = n.dims().to_vec();
        let hidden = n.dim(D::Minus1)?;
        let rows = n.elem_count() / hidden.max(1);
        let flat = n.reshape((rows, hidden))?;
        let vars: Vec<Var> = [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj]
            .iter()
            .flat_map(|l| l.trainable_vars())
            .collect();
        let base = crate::lora::dropout::current_seed();
        let m = mlp.clone();
        let y = checkpoint_rows(&flat, tile, vars, &self.checkpoint_grads, move |t, x| {
            // Each tile's own dropout scope, the same every time the layer runs.
            match base.map(|s| mix64(s ^ mix64(t as u64 + 1))) {
                Some(s) => with_dropout_seed(s, || Self::mlp(&m, x)),
                None => Self::mlp(&m, x),
            }
        })?;
        Ok(y.reshape(dims)?)
    }

    /// The trainable variables (active adapters' `A` and `B`) of one layer.
    fn layer_vars(layer: &Layer) -> Vec<Var> {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
        .iter()
        .flat_map(|l| l.trainable_vars())
        .collect()
    }

    /// [`layers_plain`](Self::layers_plain) without a cache, the layers checkpointed as one
    /// chain ([`checkpoint_chain`]): only the layers' inputs stay for the backward (on the
    /// device or in host memory), which recomputes one layer at a time from the last under the
    /// layer's dropout seed.
    fn layers_checkpointed(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        layer_seed: impl Fn(usize) -> u64,
    ) -> Result<Tensor> {
        // The recomputations outlive this call (they run in the backward): they share one
        // clone of the model (its tensors are shared, not copied) and of the tables.
        let model = Arc::new(self.clone());
        let (cos, sin, mask) = (cos.clone(), sin.clone(), Arc::new(mask.clone()));
        let mut blocks = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let seed = layer_seed(i);
            let (model, cos, sin, mask) = (model.clone(), cos.clone(), sin.clone(), mask.clone());
            let block = move |x: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
                let (update, residual) = with_dropout_seed(seed, || {
                    model.layer_unit(&model.layers[i], x, &cos, &sin, &mask)
                })?;
                Ok((update, Some(residual)))
            };
            blocks.push(ChainBlock::new(Self::layer_vars(layer), block));
        }
        let h = checkpoint_chain(&x, blocks, &self.checkpoint_grads, self.checkpoint_store)?;
        rms_norm(&h, &self.norm, self.config.rms_norm_eps as f32)
    }

    /// The flash-attention options of a training or prefill pass over `cu` offsets: causal,
    /// the model's sliding window, the queries already scaled by RoPE.
    fn flash_params(c: &ModelConfig, cu: &[u32]) -> FlashAttnParams {
        FlashAttnParams::varlen(cu.to_vec(), cu.to_vec())
            .causal(true)
            // Mistral's window of `w` keys is the query and the `w - 1` before it.
            .window_left(c.sliding_window.map(|w| w.saturating_sub(1)))
            .softmax_scale(1.0)
    }

    /// Self-attention of `x: [b, s, hidden]`, returns `[b, s, hidden]`. With `(cache, layer)`,
    /// the new keys and values are written into that layer's cache and the queries attend to
    /// the cached positions in place (no copy of the cache).
    ///
    /// GQA without repeating keys: the `group = heads / kv_heads` query heads of one kv head
    /// are consecutive, so the queries `[b, heads, s, d]` are viewed as
    /// `[b · kv_heads, group · s, d]` and multiplied against the keys `[b · kv_heads, t, d]`
    /// (a strided view of the cache, read by the GEMM through its batch stride). RoPE writes
    /// the queries already scaled by `1/sqrt(d)` (so flash attention runs with scale 1).
    ///
    /// With `mask.flash`, the `b · s` new tokens are rows of packed sequences and
    /// [`flash_attention`] computes their attention to each other (the new keys are still
    /// written into the cache, when one is given: an unpadded prefill into an empty cache);
    /// there RoPE is [`rope_tokens`], which keeps the token layout the varlen op reads. Without a
    /// cache, q, k and v with adapters may run as one grouped product into
    /// [`flash_attention_qkvpacked`] instead ([`Transformer::set_grouped_projections`]).
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let group = nh / nkv;
        let q_scale = 1.0 / (hd as f64).sqrt();
        if let (Some(cu), None, true) = (&mask.flash, &cache, self.grouped) {
            // q, k and v with adapters as one grouped LoRA product, into the packed attention
            // (RoPE inside): one input-gradient pair for the three, no gradient sums.
            let lins = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
            if let Some(qkv) = grouped_product(&attn.qkv, &lins, x)? {
                let qkv = qkv.reshape((b, s, nh + 2 * nkv, hd))?;
                let p = Self::flash_params(c, cu);
                let out = flash_attention_qkvpacked(&qkv, cos, sin, q_scale, nh, nkv, &p)?;
                return attn.o_proj.forward(&out.reshape((b, s, nh * hd))?);
            }
        }
        let (q, k, v) = if attn
            .qkv
            .applies(&[&attn.q_proj, &attn.k_proj, &attn.v_proj])
        {
            // One GEMM; q, k, v are head-shaped views of its output (RoPE reads them strided).
            let qkv = attn.qkv.forward(x)?.reshape((b, s, nh + 2 * nkv, hd))?;
            (
                qkv.narrow(2, 0, nh)?,
                qkv.narrow(2, nh, nkv)?,
                qkv.narrow(2, nh + nkv, nkv)?,
            )
        } else {
            (
                attn.q_proj.forward(x)?.reshape((b, s, nh, hd))?,
                attn.k_proj.forward(x)?.reshape((b, s, nkv, hd))?,
                attn.v_proj.forward(x)?.reshape((b, s, nkv, hd))?,
            )
        };
        if let Some(cu) = &mask.flash {
            // RoPE keeps the token layout [b, s, heads, d] (contiguous), so the varlen op's rows
            // [b · s, heads, d] are a reshape (a view), forward and backward: no transposing
            // copy of q or k.
            let q = rope_tokens(&q, cos, sin, q_scale)?;
            let k = rope_tokens(&k, cos, sin, 1.0)?;
            let (qf, kf, vf) = (
                q.reshape((b * s, nh, hd))?,
                k.reshape((b * s, nkv, hd))?,
                v.reshape((b * s, nkv, hd))?,
            );
            if let Some((cache, layer)) = cache {
                // The cache takes [b, kv, s, d]: transposed views (it copies them into place).
                cache.append(layer, &k.transpose(1, 2)?, &v.transpose(1, 2)?, 0)?;
            }
            let p = Self::flash_params(c, cu);
            let out = flash_attention(&qf, &kf, &vf, &p)?.reshape((b, s, nh * hd))?;
            return attn.o_proj.forward(&out);
        }
        let q = rope_heads(&q, cos, sin, q_scale)?;
        let k = rope_heads(&k, cos, sin, 1.0)?;
        // [b, kv, s, d] for the cache (a view when s == 1 and the rows are contiguous).
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v, mask.first_key)?,
            None => (k.reshape((b * nkv, s, hd))?, v.reshape((b * nkv, s, hd))?),
        };
        let q = q.reshape((b * nkv, group * s, hd))?;
        if mask.keep.is_none() {
            // Every query sees every key of the view: one fused op (decode steps).
            let out = attention_decode(&q, &k, &v)?.reshape((b, nh, s, hd))?;
            let out = if s == 1 {
                out.reshape((b, 1, nh * hd))?
            } else {
                out.transpose(1, 2)?.reshape((b, s, nh * hd))?
            };
            return attn.o_proj.forward(&out);
        }
        let scores = matmul(&q, &k.t()?)?;
        // The scores [b · kv, group · s, t] are [b, kv · group, s, t] row for row: the fused
        // masked softmax reads the [1 or b, s, t] mask by index (no broadcast mask, no
        // where_cond, no reshapes: each would cost a score-sized pass forward and backward).
        let probs = match &mask.keep {
            Some(keep) => softmax_masked(&scores, keep)?,
            None => softmax_last_dim(&scores)?,
        };
        let out = matmul(&probs, &v)?; // [b * nkv, group * s, d] = [b, nh, s, d]
        let out = if s == 1 {
            out.reshape((b, 1, nh * hd))?
        } else {
            out.reshape((b, nh, s, hd))?
                .transpose(1, 2)?
                .reshape((b, s, nh * hd))?
        };
        attn.o_proj.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;

    /// Adds adapter `default` of `lora` to every projection with `B = b(B₀)` (non-zero, so
    /// that the low-rank terms count) and activates it.
    fn add_adapters(
        model: &mut Transformer,
        lora: &LoraConfig,
        b: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        for (i, (path, l)) in model.lora_modules_mut().into_iter().enumerate() {
            l.add_adapter("default", lora, i as u64)?;
            let ad = l.adapter("default").ok_or_else(|| Error::InvalidArgument {
                op: "test",
                msg: format!("{path}: the adapter just added is missing"),
            })?;
            let (a, b) = (ad.a().clone(), b(ad.b())?);
            l.set_adapter_weights("default", &a, &b)?;
            l.set_active(Some("default"))?;
        }
        Ok(())
    }

    /// `merge_and_unload` on a model with adapters on all seven projections, grouping on and
    /// the fused MLP's layout on: the logits are those with the adapters, no adapter is left,
    /// q/k/v and gate/up are one stacked weight each again (the members its views, holding the
    /// merged values), the fused MLP lays its weights out again, and the decode engine takes
    /// the model (it refuses it while the adapters are active).
    #[test]
    fn merge_and_unload_restacks_the_groups() -> Result<()> {
        let config = ModelConfig::from_json_str(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 30,
                "max_position_embeddings": 32, "tie_word_embeddings": false}"#,
            "config.json",
        )?;
        let dev = Device::Cpu;
        let mut model = Transformer::random(config, DType::F64, &dev, 5)?;
        let lora = LoraConfig {
            r: 3,
            alpha: 6.0,
            ..Default::default()
        };
        add_adapters(&mut model, &lora, |b| b.randn_like(0.0, 0.2))?;
        model.set_fused_mlp(true)?;
        // One projection merged beforehand: kept as merged, counted once.
        model.layers[1].self_attn.k_proj.merge()?;
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 9, 11]], &dev)?;
        let want = model.forward(&ids)?;
        let base = {
            let mut m = model.clone();
            for (_, l) in m.lora_modules_mut() {
                if l.merged().is_some() {
                    l.unmerge()?;
                }
                l.set_active(None)?;
            }
            m.forward(&ids)?
        };
        assert!(model.decode_parts().is_err());
        let n = model.merge_and_unload()?;
        assert_eq!(n, model.lora_modules().len());
        let got = model.forward(&ids)?;
        let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let moved = (&base - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(
            err < 1e-10 && moved > 1e-3,
            "err {err}, the adapters moved {moved}"
        );
        for (p, l) in model.lora_modules() {
            assert!(
                l.active().is_none() && l.merged().is_none() && l.adapter("default").is_none(),
                "{p} kept an adapter"
            );
        }
        for layer in &model.layers {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            assert!(a.qkv.applies(&[&a.q_proj, &a.k_proj, &a.v_proj]));
            assert!(m.gate_up.applies(&[&m.gate_proj, &m.up_proj]));
            let stacked = Tensor::cat(
                &[a.q_proj.weight(), a.k_proj.weight(), a.v_proj.weight()],
                0,
            )?;
            let diff = (&stacked - &a.qkv.weight)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "the stacked q/k/v is not the merged weights");
            assert!(m.weights.as_ref().is_some_and(|w| m.lays_out(w)));
        }
        assert!(model.fused_mlp());
        model.decode_parts().map_err(|e| Error::InvalidArgument {
            op: "test",
            msg: format!("the decode engine refused the merged model: {e}"),
        })?;
        Ok(())
    }

    /// The fused MLP's weight layout, its bookkeeping checked on the CPU with the padded
    /// layout forced (CUDA lays weights out so; the CPU runs the unfused ops on the strided
    /// views, so every logit stays the same bit for bit): turning it on makes the projections'
    /// weights views of the padded storage and the decode engine refuses them by name; a merge
    /// takes its layer off the fused path; turning it off gives contiguous weights of the same
    /// values back.
    #[test]
    fn fused_mlp_layout_round_trip() -> Result<()> {
        let config = ModelConfig::from_json_str(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 30,
                "max_position_embeddings": 32, "tie_word_embeddings": false}"#,
            "config.json",
        )?;
        let dev = Device::Cpu;
        let mut model = Transformer::random(config, DType::F32, &dev, 3)?;
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            ..Default::default()
        };
        add_adapters(&mut model, &lora, |b| b.ones_like()? * 0.1)?;
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 9]], &dev)?;
        let plain = model.forward(&ids)?;
        let weights = |m: &Transformer| -> Vec<Tensor> {
            m.layers
                .iter()
                .flat_map(|l| {
                    [
                        l.mlp.gate_proj.weight().clone(),
                        l.mlp.up_proj.weight().clone(),
                        l.mlp.down_proj.weight().clone(),
                    ]
                })
                .collect()
        };
        let before = weights(&model);
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
        };
        for layer in &mut model.layers {
            layer
                .mlp
                .set_fused_with(true, |gu, d| MlpWeights::laid_out(gu, d, true))?;
        }
        model.fused_mlp = true;
        for (w, b) in weights(&model).iter().zip(&before) {
            assert!(
                !w.is_contiguous(),
                "a weight is not a view of the padded storage"
            );
            assert!(same(w, b)?, "the padded layout changed a weight");
        }
        let activate = |m: &mut Transformer, on: Option<&str>| -> Result<()> {
            for (_, l) in m.lora_modules_mut() {
                l.set_active(on)?;
            }
            Ok(())
        };
        // The engine runs base weights only: without adapters it is the layout that stops it.
        activate(&mut model, None)?;
        let err = model.decode_parts().err().unwrap_or_default();
        assert!(
            err.contains("fused MLP"),
            "the decode engine took padded weights: {err:?}"
        );
        activate(&mut model, Some("default"))?;
        assert!(
            same(&model.forward(&ids)?, &plain)?,
            "logits with the padded layout"
        );
        // Merging down's adapter replaces its weight: layer 0 leaves the fused path.
        model.layers[0].mlp.down_proj.merge()?;
        let w = model.layers[0]
            .mlp
            .weights
            .clone()
            .expect("layer 0's weights");
        assert!(!model.layers[0].mlp.lays_out(&w));
        assert!(model.layers[1]
            .mlp
            .weights
            .as_ref()
            .is_some_and(|w| model.layers[1].mlp.lays_out(w)));
        model.layers[0].mlp.down_proj.unmerge()?;
        model.set_fused_mlp(false)?;
        let after = weights(&model);
        for (i, (w, b)) in after.iter().zip(&before).enumerate() {
            // Layer 0's down went through merge and unmerge: its values moved by rounding.
            if i != 2 {
                assert!(w.is_contiguous(), "weight {i} not contiguous again");
                assert!(same(w, b)?, "weight {i} changed across the round trip");
            }
        }
        activate(&mut model, None)?;
        assert!(model.decode_parts().is_ok(), "contiguous weights again");
        Ok(())
    }
}
