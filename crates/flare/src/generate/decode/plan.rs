//! When the decode engine applies ([`unsupported`]), the sizes of its kernels' work
//! ([`Geometry`]) and, on CUDA, its launch plan ([`Plan`]): the buffers it allocates, the
//! device pointers it takes, and the fixed list of launches that makes one decode step.
//!
//! Nothing here runs a kernel; [`super::engine`] captures, replays and profiles the plan.

use super::{KvCache, Transformer};
use crate::models::ModelConfig;

/// Shared memory a kernel may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;

/// The attention block's shared memory in floats (decode.cu's split kernel).
fn attn_smem_floats(g: usize, d: usize, chunk: usize) -> usize {
    g * d + chunk * (d + 1) + chunk * d + g * chunk
}

/// Keys per attention block for a cache of `max_len` positions and `g` query heads per kv head
/// of width `d`, if any fits: 16 up to 2048 positions (many small blocks: a block's work is a
/// few round trips), growing to 64 for long caches (fewer idle blocks), halved while the
/// block's shared memory does not fit.
fn attn_chunk(g: usize, d: usize, max_len: usize) -> Option<usize> {
    let mut chunk = max_len.div_ceil(128).next_power_of_two().clamp(16, 64);
    while attn_smem_floats(g, d, chunk) * 4 > SMEM_LIMIT {
        if chunk <= 8 {
            return None;
        }
        chunk /= 2;
    }
    Some(chunk)
}

/// `None` when the engine applies to `model` and `cache` (see the [module docs](super)), else
/// why not, in words.
pub(super) fn unsupported(model: &Transformer, cache: &KvCache) -> Option<String> {
    if !cfg!(feature = "cuda") {
        return Some("flare was built without the `cuda` feature".into());
    }
    if !model.device().is_cuda() {
        return Some("the model is not on a CUDA device".into());
    }
    let dtype = model.dtype();
    if !matches!(
        dtype,
        candle_core::DType::F32 | candle_core::DType::F16 | candle_core::DType::BF16
    ) {
        return Some(format!("dtype {dtype:?} (f32, f16 or bf16 only)"));
    }
    let c = model.config();
    if cache.batch() != 1 {
        return Some(format!("batch {} (batch 1 only)", cache.batch()));
    }
    if cache.pads().is_some() {
        return Some("the cache holds a padded batch".into());
    }
    if cache.layers().len() != c.num_hidden_layers {
        return Some(format!(
            "the cache has {} layers, the model {}",
            cache.layers().len(),
            c.num_hidden_layers
        ));
    }
    let parts = match model.decode_parts() {
        Ok(p) => p,
        Err(msg) => return Some(msg),
    };
    if let Some(l) = cache.layers().first() {
        let want = [1, c.num_key_value_heads, cache.max_len(), c.head_dim];
        if l.k.dims() != want || l.k.dtype() != dtype || !l.k.device().same_device(model.device()) {
            return Some("the cache's shape, dtype or device is not the model's".into());
        }
    }
    let table = parts.rope_cos.dims().first().copied().unwrap_or(0);
    if cache.max_len() > table {
        return Some(format!(
            "the cache's {} positions exceed the RoPE table's {table}",
            cache.max_len()
        ));
    }
    if let Some(w) = c.sliding_window {
        if cache.max_len() > w {
            return Some(format!(
                "the cache's {} positions exceed the sliding window {w}",
                cache.max_len()
            ));
        }
    }
    let v = 16 / dtype.size_in_bytes();
    let (h, q, i) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.intermediate_size,
    );
    if h % v != 0 || q % v != 0 || i % v != 0 {
        return Some(format!(
            "hidden {h}, heads x head_dim {q} and intermediate {i} must be multiples of {v}"
        ));
    }
    if h.max(q).max(i) * 4 > SMEM_LIMIT {
        return Some(format!(
            "a projection input of {} elements exceeds the gemv's shared memory",
            h.max(q).max(i)
        ));
    }
    if c.head_dim % 2 != 0 || c.num_key_value_heads == 0 {
        return Some("odd head_dim or no kv heads".into());
    }
    if attn_chunk(
        c.num_attention_heads / c.num_key_value_heads,
        c.head_dim,
        cache.max_len(),
    )
    .is_none()
    {
        return Some("the attention heads do not fit the kernel's shared memory".into());
    }
    if c.vocab_size >= i32::MAX as usize || cache.max_len() >= i32::MAX as usize {
        return Some("vocabulary or cache too large".into());
    }
    None
}

/// The sizes of one decode step's work, from the model's config, the cache's length and the
/// device's multiprocessor count.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) struct Geometry {
    /// Hidden width.
    pub h: usize,
    /// Query heads, key/value heads, head width.
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
    /// Query heads per key/value head.
    pub g: usize,
    /// MLP width.
    pub inter: usize,
    pub vocab: usize,
    /// Positions of the cache.
    pub max_len: usize,
    /// Keys per attention block ([`attn_chunk`]) and attention blocks per kv head.
    pub chunk: usize,
    pub chunks: usize,
    /// Logits per argmax block (a multiple of 256, two blocks per multiprocessor) and argmax
    /// blocks.
    pub arg_chunk: usize,
    pub arg_parts: usize,
    /// Multiprocessors of the device.
    pub sm: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Geometry {
    /// The geometry of `c` with a cache of `max_len` positions on a device of `sm_count`
    /// multiprocessors; `None` when the attention does not fit (refused by [`unsupported`]).
    pub fn new(c: &ModelConfig, max_len: usize, sm_count: u32) -> Option<Self> {
        let (h, nh, nkv, d) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let g = nh / nkv;
        let chunk = attn_chunk(g, d, max_len)?;
        let sm = sm_count.max(1) as usize;
        let vocab = c.vocab_size;
        let arg_chunk = vocab.div_ceil(2 * sm).div_ceil(256) * 256;
        Some(Geometry {
            h,
            nh,
            nkv,
            d,
            g,
            inter: c.intermediate_size,
            vocab,
            max_len,
            chunk,
            chunks: max_len.div_ceil(chunk),
            arg_chunk,
            arg_parts: vocab.div_ceil(arg_chunk),
            sm,
        })
    }

    /// Dynamic shared memory of an attention split block, in bytes.
    pub fn attn_smem(&self) -> usize {
        attn_smem_floats(self.g, self.d, self.chunk) * 4
    }
}

#[cfg(feature = "cuda")]
pub(super) use launch::{cache_ptr, Arg, Launch, Plan};

#[cfg(feature = "cuda")]
mod launch {
    //! The launch plan on CUDA: buffers, pointers and the list of launches of one step.

    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr};
    use candle_core::{DType, Device, Storage, Tensor};

    use super::{Geometry, KvCache, Transformer};
    use crate::models::transformer::{DecodeParts, LayerParts};
    use crate::runtime::cuda::{CudaRuntime, Kernel};
    use crate::{Error, Result};

    const OP: &str = super::super::OP;

    use flare_kernels::launch;

    /// decode.cu's launch constants (its `#define`s, read by flare-kernels' build script): gemv
    /// threads per block, output rows per block, warps per block (the k split of long rows);
    /// threads of the small kernels and of the attention; argmax.cu's `argmax_part_*` threads.
    const GEMV_THREADS: u32 = launch::DG_GEMV_THREADS;
    const GEMV_ROWS_PER_BLOCK: usize = (launch::DG_GEMV_WARPS * launch::DG_GEMV_ROWS) as usize;
    const GEMV_WARPS: usize = launch::DG_GEMV_WARPS as usize;
    const THREADS: u32 = launch::DG_THREADS;
    const ATTN_THREADS: u32 = launch::DG_ATTN_THREADS;
    const ARGMAX_THREADS: u32 = launch::ARGMAX_PART_THREADS;

    /// decode.cu's gemv `in_mode`: how the input is staged.
    const IN_PLAIN: i32 = 0;
    const IN_RMS_NORM: i32 = 1;
    const IN_SWIGLU: i32 = 2;
    /// decode.cu's gemv `out_mode`: store, or add into the residual.
    const OUT_STORE: i32 = 0;
    const OUT_ADD: i32 = 1;

    /// One kernel argument, by value.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::generate::decode) enum Arg {
        Ptr(u64),
        I32(i32),
        I64(i64),
        F32(f32),
    }

    /// One launch of the step.
    #[derive(Debug)]
    pub(in crate::generate::decode) struct Launch {
        /// What it computes (the profile's row name).
        pub name: &'static str,
        /// Output rows and input width of a gemv (0 otherwise).
        pub n: usize,
        pub k: usize,
        /// Launched with programmatic stream serialisation (decode.cu: the kernel waits for the
        /// one before with `griddepcontrol.wait`).
        pub pdl: bool,
        pub kernel: Kernel,
        pub grid: (u32, u32),
        pub block: u32,
        pub smem: u32,
        pub args: Vec<Arg>,
    }

    impl Launch {
        /// A launch of a kernel that is not a gemv (no `n`, `k`).
        fn other(name: &'static str, kernel: Kernel, pdl: bool) -> Self {
            Launch {
                name,
                n: 0,
                k: 0,
                pdl,
                kernel,
                grid: (1, 1),
                block: THREADS,
                smem: 0,
                args: Vec::new(),
            }
        }
    }

    /// The step as planned: the launches, the tensors whose pointers they hold, and the
    /// pointers the engine reads and writes between steps.
    pub(in crate::generate::decode) struct Plan {
        pub launches: Vec<Launch>,
        /// Every tensor whose pointer a launch holds (weights, cache, buffers).
        pub keep: Vec<Tensor>,
        pub logits: Tensor,
        pub token_ptr: u64,
        pub pos_ptr: u64,
        /// The pointer of the cache's first key tensor: which cache the plan writes.
        pub cache_ptr: u64,
    }

    /// The device address of the first element of contiguous `t`.
    pub(in crate::generate::decode) fn ptr(t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
        if !t.is_contiguous() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("internal: a non-contiguous tensor of shape {:?}", t.dims()),
            });
        }
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "a tensor is not on a CUDA device".into(),
            });
        };
        let base = match t.dtype() {
            DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
            DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
            DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
            DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
            other => {
                return Err(Error::UnsupportedDType {
                    op: OP,
                    dtype: other,
                    device: "cuda".into(),
                })
            }
        };
        Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
    }

    /// The pointer of the cache's first key tensor (0 for a cache without layers): which cache
    /// a plan writes.
    pub(in crate::generate::decode) fn cache_ptr(
        cache: &KvCache,
        stream: &Arc<CudaStream>,
    ) -> Result<u64> {
        match cache.layers().first() {
            Some(l) => ptr(&l.k, stream),
            None => Ok(0),
        }
    }

    /// Takes the device pointers of tensors and keeps the tensors alive beside them.
    struct Pins<'a> {
        stream: &'a Arc<CudaStream>,
        keep: Vec<Tensor>,
    }

    impl Pins<'_> {
        /// The pointer of `t`.
        fn any(&mut self, t: &Tensor) -> Result<u64> {
            let p = ptr(t, self.stream)?;
            self.keep.push(t.clone());
            Ok(p)
        }

        /// The pointer of `t`, refusing an address that is not 16-byte aligned (what the kernels
        /// read with 16-byte loads: weights, cache tensors, the gemv's inputs).
        fn aligned(&mut self, t: &Tensor) -> Result<u64> {
            let p = self.any(t)?;
            if p % 16 != 0 {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!(
                        "internal: a tensor of shape {:?} is not 16-byte aligned",
                        t.dims()
                    ),
                });
            }
            Ok(p)
        }

        /// The pointer of an optional bias, 0 for none.
        fn opt(&mut self, t: &Option<Tensor>) -> Result<u64> {
            t.as_ref().map_or(Ok(0), |t| self.any(t))
        }

        /// The pointers of a weight (aligned) and its optional bias.
        fn linear(&mut self, (w, b): &(Tensor, Option<Tensor>)) -> Result<(u64, u64)> {
            Ok((self.aligned(w)?, self.opt(b)?))
        }
    }

    /// The engine's own buffers, allocated once (zeroed on Candle's stream).
    struct Buffers {
        /// The residual stream, `[hidden]`.
        x: Tensor,
        /// q, k, v of the current token.
        qkv: Tensor,
        /// The attention's output, `[heads * head_dim]`.
        attn: Tensor,
        /// gate then up.
        gate_up: Tensor,
        /// `[1, 1, vocab]`.
        logits: Tensor,
        /// The attention's per-chunk partial outputs and (max, sum) statistics, f32.
        ws_o: Tensor,
        ws_ml: Tensor,
        /// The argmax's per-block (value, index) pairs.
        arg_v: Tensor,
        arg_i: Tensor,
        /// The token to feed and the position to write, u32 on the device.
        token: Tensor,
        pos: Tensor,
    }

    impl Buffers {
        fn alloc(geo: &Geometry, dtype: DType, dev: &Device) -> Result<Self> {
            let zeros =
                |n: usize, dt: DType| -> Result<Tensor> { Ok(Tensor::zeros(n.max(1), dt, dev)?) };
            let Geometry {
                h,
                nh,
                nkv,
                d,
                g,
                inter,
                chunks,
                arg_parts,
                ..
            } = *geo;
            Ok(Buffers {
                x: zeros(h, dtype)?,
                qkv: zeros((nh + 2 * nkv) * d, dtype)?,
                attn: zeros(nh * d, dtype)?,
                gate_up: zeros(2 * inter, dtype)?,
                logits: Tensor::zeros((1, 1, geo.vocab), dtype, dev)?,
                ws_o: zeros(nkv * chunks * g * d, DType::F32)?,
                ws_ml: zeros(nkv * chunks * g * 2, DType::F32)?,
                arg_v: zeros(arg_parts, DType::F32)?,
                arg_i: zeros(arg_parts, DType::U32)?,
                token: zeros(1, DType::U32)?,
                pos: zeros(1, DType::U32)?,
            })
        }
    }

    /// The device pointers of [`Buffers`] and of the RoPE tables.
    struct Ptrs {
        x: u64,
        qkv: u64,
        attn: u64,
        gate_up: u64,
        logits: u64,
        ws_o: u64,
        ws_ml: u64,
        arg_v: u64,
        arg_i: u64,
        token: u64,
        pos: u64,
        cos: u64,
        sin: u64,
    }

    impl Ptrs {
        fn take(b: &Buffers, parts: &DecodeParts, pins: &mut Pins) -> Result<Self> {
            // The gemv's inputs are read as 16-byte packs too.
            Ok(Ptrs {
                x: pins.aligned(&b.x)?,
                qkv: pins.any(&b.qkv)?,
                attn: pins.aligned(&b.attn)?,
                gate_up: pins.aligned(&b.gate_up)?,
                logits: pins.any(&b.logits)?,
                ws_o: pins.any(&b.ws_o)?,
                ws_ml: pins.any(&b.ws_ml)?,
                arg_v: pins.any(&b.arg_v)?,
                arg_i: pins.any(&b.arg_i)?,
                token: pins.any(&b.token)?,
                pos: pins.any(&b.pos)?,
                cos: pins.any(&parts.rope_cos)?,
                sin: pins.any(&parts.rope_sin)?,
            })
        }
    }

    /// The per-dtype kernels of a plan.
    struct Kernels {
        embed: Kernel,
        gemv: Kernel,
        attn_split: Kernel,
        attn_combine: Kernel,
        argmax_part: Kernel,
    }

    impl Kernels {
        fn of(dtype: DType) -> Self {
            use Kernel::*;
            let [embed, gemv, attn_split, attn_combine, argmax_part] = match dtype {
                DType::F16 => [
                    DecodeEmbedF16,
                    DecodeGemvF16,
                    DecodeAttnSplitF16,
                    DecodeAttnCombineF16,
                    ArgmaxPartF16,
                ],
                DType::BF16 => [
                    DecodeEmbedBF16,
                    DecodeGemvBF16,
                    DecodeAttnSplitBF16,
                    DecodeAttnCombineBF16,
                    ArgmaxPartBF16,
                ],
                _ => [
                    DecodeEmbedF32,
                    DecodeGemvF32,
                    DecodeAttnSplitF32,
                    DecodeAttnCombineF32,
                    ArgmaxPartF32,
                ],
            };
            Kernels {
                embed,
                gemv,
                attn_split,
                attn_combine,
                argmax_part,
            }
        }
    }

    /// One gemv of the step: `y = stage(input) · wᵀ (+ bias)`, stored or added into `y`.
    struct Gemv {
        name: &'static str,
        input: u64,
        /// The RMSNorm weight when `in_mode` is [`IN_RMS_NORM`], else 0.
        norm: u64,
        in_mode: i32,
        /// Weight `[n, k]` and bias (0: none).
        w: (u64, u64),
        y: u64,
        n: usize,
        k: usize,
        out_mode: i32,
    }

    /// Builds the launch list, one launch at a time, in step order.
    struct Builder<'a> {
        rt: &'a CudaRuntime,
        geo: &'a Geometry,
        kernels: Kernels,
        ptrs: Ptrs,
        eps: f32,
        launches: Vec<Launch>,
    }

    /// A size as a kernel's `int` argument ([`super::unsupported`] refused larger ones).
    fn int(n: usize) -> Arg {
        Arg::I32(n as i32)
    }

    impl Builder<'_> {
        /// One wave of resident gemv blocks for an input of `k` (decode.cu: each block stages
        /// its input once).
        fn gemv_blocks_per_sm(&self, k: usize) -> usize {
            self.rt
                .function(self.kernels.gemv)
                .occupancy_max_active_blocks_per_multiprocessor(GEMV_THREADS, k * 4, None)
                .map_or(4, |b| b.max(1) as usize)
        }

        fn gemv(&mut self, g: Gemv) {
            // Long rows (k > 2048: down_proj) split k over the block's warps, so that a weight
            // of few rows still keeps enough loads in flight.
            let ksplit = if g.k > 2048 { GEMV_WARPS } else { 1 };
            let rows_per_block = GEMV_ROWS_PER_BLOCK / ksplit;
            let blocks =
                g.n.div_ceil(rows_per_block)
                    .clamp(1, self.geo.sm * self.gemv_blocks_per_sm(g.k));
            self.launches.push(Launch {
                name: g.name,
                n: g.n,
                k: g.k,
                pdl: true,
                kernel: self.kernels.gemv,
                grid: (blocks as u32, 1),
                block: GEMV_THREADS,
                smem: (g.k * 4) as u32,
                args: vec![
                    Arg::Ptr(g.input),
                    Arg::Ptr(g.norm),
                    Arg::F32(self.eps),
                    Arg::I32(g.in_mode),
                    Arg::Ptr(g.w.0),
                    Arg::Ptr(g.w.1),
                    Arg::Ptr(g.y),
                    int(g.n),
                    int(g.k),
                    Arg::I32(g.out_mode),
                    Arg::I32(ksplit as i32),
                ],
            });
        }

        /// The token's embedding row into the residual.
        fn embed(&mut self, table: u64) {
            let (h, p) = (self.geo.h, &self.ptrs);
            let mut l = Launch::other("embed", self.kernels.embed, false);
            l.grid = (h.div_ceil(THREADS as usize).max(1) as u32, 1);
            l.args = vec![
                Arg::Ptr(table),
                Arg::Ptr(p.token),
                Arg::Ptr(p.x),
                int(h),
                int(self.geo.vocab),
            ];
            self.launches.push(l);
        }

        /// One layer: qkv (with the input RMSNorm), the attention (with RoPE and the cache
        /// append) in two kernels, o (added into the residual), gate/up (with the post-attention
        /// RMSNorm), down (with SwiGLU, added into the residual).
        fn layer(&mut self, lp: &LayerParts, (kc, vc): (u64, u64), pins: &mut Pins) -> Result<()> {
            let geo = *self.geo;
            let (x, qkv, attn, gate_up) = (
                self.ptrs.x,
                self.ptrs.qkv,
                self.ptrs.attn,
                self.ptrs.gate_up,
            );
            self.gemv(Gemv {
                name: "gemv qkv",
                input: x,
                norm: pins.aligned(&lp.input_norm)?,
                in_mode: IN_RMS_NORM,
                w: pins.linear(&lp.qkv)?,
                y: qkv,
                n: (geo.nh + 2 * geo.nkv) * geo.d,
                k: geo.h,
                out_mode: OUT_STORE,
            });
            self.attention(kc, vc);
            self.gemv(Gemv {
                name: "gemv o",
                input: attn,
                norm: 0,
                in_mode: IN_PLAIN,
                w: pins.linear(&lp.o)?,
                y: x,
                n: geo.h,
                k: geo.nh * geo.d,
                out_mode: OUT_ADD,
            });
            self.gemv(Gemv {
                name: "gemv gate_up",
                input: x,
                norm: pins.aligned(&lp.post_norm)?,
                in_mode: IN_RMS_NORM,
                w: pins.linear(&lp.gate_up)?,
                y: gate_up,
                n: 2 * geo.inter,
                k: geo.h,
                out_mode: OUT_STORE,
            });
            self.gemv(Gemv {
                name: "gemv down",
                input: gate_up,
                norm: 0,
                in_mode: IN_SWIGLU,
                w: pins.linear(&lp.down)?,
                y: x,
                n: geo.h,
                k: geo.inter,
                out_mode: OUT_ADD,
            });
            Ok(())
        }

        /// The flash-decoding attention of one layer over the cache tensors `kc`, `vc`: the
        /// split kernel (RoPE, the cache append, per-chunk scores) then the combine.
        fn attention(&mut self, kc: u64, vc: u64) {
            let (geo, p) = (*self.geo, &self.ptrs);
            let scale = (1.0 / (geo.d as f64).sqrt()) as f32;
            let mut split = Launch::other("attn_split", self.kernels.attn_split, true);
            split.grid = (geo.chunks as u32, geo.nkv as u32);
            split.block = ATTN_THREADS;
            split.smem = geo.attn_smem() as u32;
            split.args = vec![
                Arg::Ptr(p.qkv),
                Arg::Ptr(kc),
                Arg::Ptr(vc),
                Arg::Ptr(p.cos),
                Arg::Ptr(p.sin),
                Arg::Ptr(p.ws_o),
                Arg::Ptr(p.ws_ml),
                Arg::Ptr(p.pos),
                int(geo.g),
                int(geo.d),
                int(geo.chunk),
                Arg::I64((geo.max_len * geo.d) as i64),
                Arg::F32(scale),
            ];
            let mut combine = Launch::other("attn_combine", self.kernels.attn_combine, true);
            combine.grid = (geo.g as u32, geo.nkv as u32);
            combine.block = ATTN_THREADS;
            combine.args = vec![
                Arg::Ptr(p.ws_o),
                Arg::Ptr(p.ws_ml),
                Arg::Ptr(p.attn),
                Arg::Ptr(p.pos),
                int(geo.g),
                int(geo.d),
                int(geo.chunk),
                int(geo.chunks),
            ];
            self.launches.extend([split, combine]);
        }

        /// The final RMSNorm and the LM head (one gemv), then the argmax in two kernels: the
        /// second writes the next token and increments the position.
        fn head(&mut self, norm: u64, lm_head: u64) {
            let (geo, x, logits) = (*self.geo, self.ptrs.x, self.ptrs.logits);
            self.gemv(Gemv {
                name: "gemv lm_head",
                input: x,
                norm,
                in_mode: IN_RMS_NORM,
                w: (lm_head, 0),
                y: logits,
                n: geo.vocab,
                k: geo.h,
                out_mode: OUT_STORE,
            });
            let p = &self.ptrs;
            let mut part = Launch::other("argmax_part", self.kernels.argmax_part, false);
            part.grid = (geo.arg_parts as u32, 1);
            part.block = ARGMAX_THREADS;
            part.args = vec![
                Arg::Ptr(p.logits),
                Arg::Ptr(p.arg_v),
                Arg::Ptr(p.arg_i),
                int(geo.vocab),
                int(geo.arg_chunk),
            ];
            let mut fin = Launch::other("argmax_final", Kernel::DecodeArgmaxFinal, false);
            fin.args = vec![
                Arg::Ptr(p.arg_v),
                Arg::Ptr(p.arg_i),
                int(geo.arg_parts),
                Arg::Ptr(p.token),
                Arg::Ptr(p.pos),
            ];
            self.launches.extend([part, fin]);
        }
    }

    impl Plan {
        /// Allocates the buffers, takes the pointers of the weights, the cache and the buffers,
        /// and lists the step's launches: embed, 6 per layer, lm_head, argmax (2).
        pub fn build(
            rt: &CudaRuntime,
            stream: &Arc<CudaStream>,
            model: &Transformer,
            cache: &KvCache,
            parts: &DecodeParts,
            geo: &Geometry,
        ) -> Result<Self> {
            let buffers = Buffers::alloc(geo, model.dtype(), model.device())?;
            let mut pins = Pins {
                stream,
                keep: Vec::new(),
            };
            let ptrs = Ptrs::take(&buffers, parts, &mut pins)?;
            let (token_ptr, pos_ptr) = (ptrs.token, ptrs.pos);
            let mut b = Builder {
                rt,
                geo,
                kernels: Kernels::of(model.dtype()),
                ptrs,
                eps: model.config().rms_norm_eps as f32,
                launches: Vec::with_capacity(parts.layers.len() * 6 + 4),
            };
            b.embed(pins.any(&parts.embed)?);
            for (lp, kv) in parts.layers.iter().zip(cache.layers()) {
                let kv = (pins.aligned(&kv.k)?, pins.aligned(&kv.v)?);
                b.layer(lp, kv, &mut pins)?;
            }
            b.head(pins.aligned(&parts.norm)?, pins.aligned(&parts.lm_head)?);
            Ok(Plan {
                launches: b.launches,
                keep: pins.keep,
                logits: buffers.logits,
                token_ptr,
                pos_ptr,
                cache_ptr: cache_ptr(cache, stream)?,
            })
        }
    }
}
