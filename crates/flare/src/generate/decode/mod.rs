//! [`DecodeGraph`]: the batch-1 greedy decode engine. One decode step of a [`Transformer`] runs
//! as a fixed sequence of flare's own kernels (`crates/flare-kernels/src/cu/decode.cu`) over
//! static buffers, captured once as a CUDA graph and replayed every step.
//!
//! Why: at batch 1 a decode step reads ~1 GB of weights (Qwen2-0.5B, bf16) in ~0.35 ms of HBM
//! time, but the per-op path issues ~13 launches per layer from the host and pays a launch gap
//! for each. Here a step is 6 launches per layer (RMSNorm fused into the input staging of the
//! q/k/v and gate/up projections, the bias and the residual add into their epilogues, SwiGLU into
//! the down projection's staging, RoPE and the KV-cache write fused into the attention) plus 4, replayed as one
//! graph: the host issues one graph launch, one 4-byte copy and one synchronisation per token.
//!
//! How the same graph serves every step: no kernel argument changes from step to step. The
//! token id and the position live in device memory; the first kernel embeds the token, every
//! kernel that needs the position reads it, and the last one (the argmax) writes the next token
//! id and increments the position. The engine holds clones of the model's weight tensors and of
//! the cache's tensors (Candle tensors share their buffers, so the device pointers taken once
//! stay valid), and allocates its buffers (token, position, residual, q/k/v, attention output,
//! gate/up, logits, attention and argmax workspaces) once.
//!
//! Rounding follows [`Transformer::decode_step`]: each intermediate the per-op path rounds to
//! the model dtype is rounded here too, with f32 accumulation, and the projections reduce in the
//! order of the per-op path's gemv; the greedy tokens agree with the per-op path's, and the
//! logits agree to the dtype's rounding (the attention's key chunks and the RMSNorm's sums are
//! split differently).
//!
//! When it applies (see [`DecodeGraph::unsupported`]): a CUDA device (the `cuda` feature), f32,
//! f16 or bf16 weights, a cache of batch 1 without padding whose `max_len` fits the model's RoPE
//! table (and its sliding window, if any), no active LoRA adapter and no replaced projection
//! weight, projection widths that are multiples of 16 bytes and fit the kernels' shared memory.
//! [`crate::generate::TokenStream`] (hence `generate` and `generate_text`) uses it for plain
//! greedy decoding whenever it applies (`FLARE_DECODE_ENGINE=0` turns that off), else the
//! per-op path. `FLARE_DECODE_GRAPH=0` launches the same kernels one by one instead of replaying
//! the graph (for debugging and comparison). `FLARE_DECODE_PDL=0` launches without programmatic
//! dependent launch (see [`pdl_enabled`]). [`DecodeGraph::profile_step`] times each launch of a
//! step (`flare bench decode --profile` prints the table).
//!
//! Streams: the engine launches on a stream of its own. Before each step it waits (an event)
//! for the work queued on Candle's stream (the prefill's cache writes), and each step ends with
//! a host synchronisation of its stream, so Candle work issued afterwards sees the engine's
//! writes (the cache's new positions, the logits).

use candle_core::Tensor;

use super::{KvCache, Transformer};
#[cfg(feature = "cuda")]
use crate::Error;
use crate::Result;

#[cfg(feature = "cuda")]
const OP: &str = "DecodeGraph";

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

/// Whether `FLARE_DECODE_GRAPH` asks for graph replay (anything but `0`; the default).
pub fn graph_enabled() -> bool {
    std::env::var("FLARE_DECODE_GRAPH").map_or(true, |v| v.trim() != "0")
}

/// Whether `FLARE_DECODE_PDL` asks for programmatic dependent launch (anything but `0`; the
/// default): each kernel of a step after the first may start while the one before finishes,
/// and waits for it (`griddepcontrol.wait`) before reading its results; the gemvs issue their
/// first weight loads before that wait.
pub fn pdl_enabled() -> bool {
    std::env::var("FLARE_DECODE_PDL").map_or(true, |v| v.trim() != "0")
}

/// Whether generation may use the engine (`FLARE_DECODE_ENGINE` is not `0`; the default).
pub fn engine_enabled() -> bool {
    std::env::var("FLARE_DECODE_ENGINE").map_or(true, |v| v.trim() != "0")
}

/// The [`LaunchTime::name`] of the empty kernel that ends a profiled step: the cost of a launch
/// between two events by itself, included in every other launch's time.
pub const EMPTY_KERNEL: &str = "(empty kernel)";

/// One launch of a profiled step ([`DecodeGraph::profile_step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchTime {
    /// What the launch computes: `embed`, `gemv qkv`, `attn_split` (with RoPE and the
    /// KV-cache append), `attn_combine`, `gemv o`, `gemv gate_up`, `gemv down`, `gemv lm_head`, `argmax_part`,
    /// `argmax_final`.
    pub name: &'static str,
    /// Output rows of a gemv (0 for the other kernels).
    pub n: usize,
    /// Input width of a gemv (0 for the other kernels).
    pub k: usize,
    /// Weight bytes a gemv reads, `n * k * dtype size` (0 for the other kernels).
    pub bytes: usize,
    /// Microseconds between the events recorded before and after the launch.
    pub us: f64,
}

/// The batch-1 greedy decode engine of a [`Transformer`] and one of its [`KvCache`]s; see the
/// [module docs](self).
///
/// ```no_run
/// # use candle_core::{DType, Device, Tensor};
/// use flare::models::{DecodeGraph, Transformer};
/// let dev = Device::new_cuda(0)?;
/// let model = Transformer::from_dir("qwen2-0.5b", DType::BF16, &dev)?;
/// let mut cache = model.new_cache(1, 256)?;
/// let logits = model.prefill(&Tensor::new(&[[9707u32, 11, 1879]], &dev)?, &mut cache)?;
/// let first = flare::generate::ids_to_host(&flare::generate::greedy_on_device(&logits)?)?[0];
/// let mut engine = DecodeGraph::new(&model, &cache)?;
/// engine.start(first, &cache)?;
/// let tokens: Vec<u32> = (0..16).map(|_| engine.step(&mut cache)).collect::<Result<_, _>>()?;
/// # Ok::<(), flare::Error>(())
/// ```
pub struct DecodeGraph {
    #[cfg(feature = "cuda")]
    inner: cuda::Engine,
    #[cfg(not(feature = "cuda"))]
    _never: std::convert::Infallible,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("DecodeGraph");
        #[cfg(feature = "cuda")]
        d.field("graph", &self.inner.uses_graph())
            .field("position", &self.inner.position());
        d.finish()
    }
}

impl DecodeGraph {
    /// `None` when the engine applies to `model` and `cache` (see the [module docs](self)),
    /// else why not, in words.
    pub fn unsupported(model: &Transformer, cache: &KvCache) -> Option<String> {
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
            if l.k.dims() != want
                || l.k.dtype() != dtype
                || !l.k.device().same_device(model.device())
            {
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

    /// Builds the engine for `model` and `cache` (batch 1, normally filled by
    /// [`Transformer::prefill`]), replaying a CUDA graph unless `FLARE_DECODE_GRAPH=0`.
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) with the reason when the engine
    /// does not apply ([`unsupported`](Self::unsupported)).
    pub fn new(model: &Transformer, cache: &KvCache) -> Result<Self> {
        Self::with_graph(model, cache, graph_enabled())
    }

    /// [`new`](Self::new) with the mode given: `graph` replays one CUDA graph per step, else the
    /// same kernels are launched one by one (bitwise the same results).
    pub fn with_graph(model: &Transformer, cache: &KvCache, graph: bool) -> Result<Self> {
        if let Some(why) = Self::unsupported(model, cache) {
            return Err(crate::Error::InvalidArgument {
                op: "DecodeGraph",
                msg: format!("the decode engine does not apply: {why}"),
            });
        }
        #[cfg(feature = "cuda")]
        {
            Ok(DecodeGraph {
                inner: cuda::Engine::new(model, cache, graph)?,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = graph;
            unreachable!("unsupported() refuses every model without the cuda feature")
        }
    }

    /// Whether steps replay a CUDA graph (else the kernels are launched one by one).
    pub fn uses_graph(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.inner.uses_graph();
        #[cfg(not(feature = "cuda"))]
        match self._never {}
    }

    /// The position the next step writes (the cache length the engine expects).
    pub fn position(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.inner.position();
        #[cfg(not(feature = "cuda"))]
        match self._never {}
    }

    /// Sets the token the next [`step`](Self::step) feeds (e.g. the greedy choice from the
    /// prefill's logits) and takes the position from `cache.len()`. Call it again after the
    /// cache was advanced by anything but this engine.
    pub fn start(&mut self, token: u32, cache: &KvCache) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.inner.start(token, cache);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (token, cache);
            match self._never {}
        }
    }

    /// One greedy decode step: feeds the current token at position `cache.len()`, writes its
    /// keys and values into `cache` (whose length then grows by one) and returns the argmax of
    /// the logits, which the next step feeds. Errors: not [`start`](Self::start)ed, another
    /// cache, a cache whose length moved, a full cache, a position past the RoPE table, and an
    /// all-NaN row of logits.
    pub fn step(&mut self, cache: &mut KvCache) -> Result<u32> {
        #[cfg(feature = "cuda")]
        return self.inner.step(cache);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = cache;
            match self._never {}
        }
    }

    /// [`step`](Self::step) with the kernels launched one by one (whatever the mode), each
    /// between two timing events, queued behind a short spin kernel so that they run back to
    /// back as in the graph: the step's token and the time of each launch, in launch order, then
    /// that of an empty kernel ([`EMPTY_KERNEL`]: the events' and the launch's own cost, part of
    /// every time). For profiling (`flare bench decode --profile`); slower than `step`.
    pub fn profile_step(&mut self, cache: &mut KvCache) -> Result<(u32, Vec<LaunchTime>)> {
        #[cfg(feature = "cuda")]
        return self.inner.profile_step(cache);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = cache;
            match self._never {}
        }
    }

    /// A copy of the logits of the last step, `[1, 1, vocab]` in the model's dtype (those of
    /// [`Transformer::decode_step`] up to rounding).
    pub fn step_logits(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.inner.logits();
        #[cfg(not(feature = "cuda"))]
        match self._never {}
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA layer of the engine: buffers, the launch list, the graph.

    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{
        result, sys, CudaEvent, CudaGraph, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use candle_core::{DType, Storage, Tensor};

    use super::{attn_chunk, attn_smem_floats, Error, KvCache, Result, Transformer, OP};
    use crate::runtime::cuda::{CudaResultExt, CudaRuntime, Kernel};

    /// Gemv threads per block (`DG_GEMV_THREADS`), output rows per block (`DG_GEMV_WARPS *
    /// DG_GEMV_ROWS`) of decode.cu.
    const GEMV_THREADS: u32 = 128;
    const GEMV_ROWS_PER_BLOCK: usize = 8;
    /// Warps per gemv block (`DG_GEMV_WARPS`): the k split of long rows.
    const GEMV_WARPS: usize = 4;
    /// Threads of the small kernels (`DG_THREADS`), of the attention (`DG_ATTN_THREADS`) and of
    /// argmax.cu's `argmax_part_*` (`ARGMAX_PART_THREADS`).
    const THREADS: u32 = 256;
    const ATTN_THREADS: u32 = 128;
    const ARGMAX_THREADS: u32 = 256;

    /// One kernel argument, by value.
    #[derive(Debug, Clone, Copy)]
    enum Arg {
        Ptr(u64),
        I32(i32),
        I64(i64),
        F32(f32),
    }

    /// One launch of the step.
    #[derive(Debug)]
    struct Launch {
        /// What it computes (the profile's row name).
        name: &'static str,
        /// Output rows and input width of a gemv (0 otherwise).
        n: usize,
        k: usize,
        /// Launched with programmatic stream serialisation (decode.cu: the kernel waits for the
        /// one before with `griddepcontrol.wait`).
        pdl: bool,
        kernel: Kernel,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        args: Vec<Arg>,
    }

    /// The engine behind [`super::DecodeGraph`].
    pub(super) struct Engine {
        rt: Arc<CudaRuntime>,
        stream: Arc<CudaStream>,
        /// Recorded on Candle's stream, waited for by `stream`, before each step.
        event: CudaEvent,
        graph: Option<CudaGraph>,
        launches: Vec<Launch>,
        /// Every tensor whose pointer a launch holds (weights, cache, buffers).
        _keep: Vec<Tensor>,
        logits: Tensor,
        token_ptr: u64,
        pos_ptr: u64,
        /// The pointer of the cache's first key tensor: which cache this engine writes.
        cache_ptr: u64,
        pos: usize,
        max_len: usize,
        table_len: usize,
        vocab: usize,
        /// Launches use programmatic dependent launch ([`super::pdl_enabled`]).
        pdl: bool,
        /// Bytes per element of the model's dtype.
        elem: usize,
        started: bool,
    }

    /// The device address of the first element of contiguous `t`.
    fn ptr(t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
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

    /// [`ptr`], refusing an address that is not 16-byte aligned (weights and cache tensors, read
    /// with 16-byte loads).
    fn ptr16(t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
        let p = ptr(t, stream)?;
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

    /// The per-dtype kernels: (embed, gemv, attn_split, attn_combine, argmax_part).
    fn kernels(dtype: DType) -> [Kernel; 5] {
        use Kernel::*;
        match dtype {
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
        }
    }

    impl Engine {
        /// Takes the pointers, allocates the buffers, builds the launch list and, with `graph`,
        /// captures it. The caller checked that the engine applies.
        pub(super) fn new(model: &Transformer, cache: &KvCache, graph: bool) -> Result<Self> {
            let candle_core::Device::Cuda(cdev) = model.device() else {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: "the model is not on a CUDA device".into(),
                });
            };
            let rt = CudaRuntime::get(cdev)?;
            let parts = model
                .decode_parts()
                .map_err(|msg| Error::InvalidArgument { op: OP, msg })?;
            let stream = rt
                .stream()
                .context()
                .new_stream()
                .cuda_ctx("creating the decode engine's stream")?;
            let event = rt
                .stream()
                .context()
                .new_event(None)
                .cuda_ctx("creating the decode engine's event")?;
            let c = model.config();
            let dtype = model.dtype();
            let dev = model.device();
            let (h, nh, nkv, d, inter, vocab) = (
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.intermediate_size,
                c.vocab_size,
            );
            let g = nh / nkv;
            let max_len = cache.max_len();
            let chunk = attn_chunk(g, d, max_len).ok_or_else(|| Error::InvalidArgument {
                op: OP,
                msg: "the attention heads do not fit the kernel's shared memory".into(),
            })?;
            let chunks = max_len.div_ceil(chunk);
            let sm = rt.sm_count.max(1) as usize;
            let arg_chunk = vocab.div_ceil(2 * sm).div_ceil(256) * 256;
            let parts_n = vocab.div_ceil(arg_chunk);

            let zeros =
                |n: usize, dt: DType| -> Result<Tensor> { Ok(Tensor::zeros(n.max(1), dt, dev)?) };
            let x = zeros(h, dtype)?;
            let qkv = zeros((nh + 2 * nkv) * d, dtype)?;
            let attn = zeros(nh * d, dtype)?;
            let gu = zeros(2 * inter, dtype)?;
            let logits = Tensor::zeros((1, 1, vocab), dtype, dev)?;
            let ws_o = zeros(nkv * chunks * g * d, DType::F32)?;
            let ws_ml = zeros(nkv * chunks * g * 2, DType::F32)?;
            let pv = zeros(parts_n, DType::F32)?;
            let pi = zeros(parts_n, DType::U32)?;
            let token = zeros(1, DType::U32)?;
            let pos = zeros(1, DType::U32)?;

            let mut keep: Vec<Tensor> = Vec::new();
            let p = |t: &Tensor, keep: &mut Vec<Tensor>| -> Result<u64> {
                let v = ptr(t, &stream)?;
                keep.push(t.clone());
                Ok(v)
            };
            let opt = |t: &Option<Tensor>, keep: &mut Vec<Tensor>| -> Result<u64> {
                match t {
                    Some(t) => p(t, keep),
                    None => Ok(0),
                }
            };
            let pw = |t: &Tensor, keep: &mut Vec<Tensor>| -> Result<u64> {
                let v = ptr16(t, &stream)?;
                keep.push(t.clone());
                Ok(v)
            };
            // The gemv's inputs and norm weights are read as 16-byte packs too.
            let (x_p, qkv_p, attn_p, gu_p, logits_p) = (
                pw(&x, &mut keep)?,
                p(&qkv, &mut keep)?,
                pw(&attn, &mut keep)?,
                pw(&gu, &mut keep)?,
                p(&logits, &mut keep)?,
            );
            let (ws_o_p, ws_ml_p, pv_p, pi_p, token_p, pos_p) = (
                p(&ws_o, &mut keep)?,
                p(&ws_ml, &mut keep)?,
                p(&pv, &mut keep)?,
                p(&pi, &mut keep)?,
                p(&token, &mut keep)?,
                p(&pos, &mut keep)?,
            );
            let (cos_p, sin_p) = (
                p(&parts.rope_cos, &mut keep)?,
                p(&parts.rope_sin, &mut keep)?,
            );
            let cache_ptr = match cache.layers().first() {
                Some(l) => ptr(&l.k, &stream)?,
                None => 0,
            };

            let [k_embed, k_gemv, k_split, k_combine, k_argmax] = kernels(dtype);
            let eps = c.rms_norm_eps as f32;
            let i32_of = |n: usize| n as i32;
            // One wave of resident gemv blocks (decode.cu: each block stages its input once).
            let gemv_occ = |k: usize| -> usize {
                rt.function(k_gemv)
                    .occupancy_max_active_blocks_per_multiprocessor(GEMV_THREADS, k * 4, None)
                    .map_or(4, |b| b.max(1) as usize)
            };
            let gemv = |name: &'static str,
                        input: u64,
                        norm: u64,
                        in_mode: i32,
                        w: u64,
                        b: u64,
                        y: u64,
                        n: usize,
                        k: usize,
                        out_mode: i32|
             -> Launch {
                // Long rows (k > 2048: down_proj) split k over the block's warps, so that a
                // weight of few rows still keeps enough loads in flight.
                let ksplit = if k > 2048 { GEMV_WARPS } else { 1 };
                let rows_per_block = GEMV_ROWS_PER_BLOCK / ksplit;
                let blocks = n.div_ceil(rows_per_block).clamp(1, sm * gemv_occ(k));
                Launch {
                    name,
                    n,
                    k,
                    pdl: true,
                    kernel: k_gemv,
                    grid: (blocks as u32, 1),
                    block: GEMV_THREADS,
                    smem: (k * 4) as u32,
                    args: vec![
                        Arg::Ptr(input),
                        Arg::Ptr(norm),
                        Arg::F32(eps),
                        Arg::I32(in_mode),
                        Arg::Ptr(w),
                        Arg::Ptr(b),
                        Arg::Ptr(y),
                        Arg::I32(i32_of(n)),
                        Arg::I32(i32_of(k)),
                        Arg::I32(out_mode),
                        Arg::I32(ksplit as i32),
                    ],
                }
            };
            let small_grid = |n: usize| n.div_ceil(THREADS as usize).max(1) as u32;

            let mut launches = Vec::with_capacity(parts.layers.len() * 6 + 4);
            launches.push(Launch {
                name: "embed",
                n: 0,
                k: 0,
                pdl: false,
                kernel: k_embed,
                grid: (small_grid(h), 1),
                block: THREADS,
                smem: 0,
                args: vec![
                    Arg::Ptr(p(&parts.embed, &mut keep)?),
                    Arg::Ptr(token_p),
                    Arg::Ptr(x_p),
                    Arg::I32(i32_of(h)),
                    Arg::I32(i32_of(vocab)),
                ],
            });
            let scale = (1.0 / (d as f64).sqrt()) as f32;
            for (lp, kv) in parts.layers.iter().zip(cache.layers()) {
                let (kc, vc) = (pw(&kv.k, &mut keep)?, pw(&kv.v, &mut keep)?);
                let ln1 = pw(&lp.input_norm, &mut keep)?;
                let (wqkv, bqkv) = (pw(&lp.qkv.0, &mut keep)?, opt(&lp.qkv.1, &mut keep)?);
                launches.push(gemv(
                    "gemv qkv",
                    x_p,
                    ln1,
                    1,
                    wqkv,
                    bqkv,
                    qkv_p,
                    (nh + 2 * nkv) * d,
                    h,
                    0,
                ));
                launches.push(Launch {
                    name: "attn_split",
                    n: 0,
                    k: 0,
                    pdl: true,
                    kernel: k_split,
                    grid: (chunks as u32, nkv as u32),
                    block: ATTN_THREADS,
                    smem: (attn_smem_floats(g, d, chunk) * 4) as u32,
                    args: vec![
                        Arg::Ptr(qkv_p),
                        Arg::Ptr(kc),
                        Arg::Ptr(vc),
                        Arg::Ptr(cos_p),
                        Arg::Ptr(sin_p),
                        Arg::Ptr(ws_o_p),
                        Arg::Ptr(ws_ml_p),
                        Arg::Ptr(pos_p),
                        Arg::I32(i32_of(g)),
                        Arg::I32(i32_of(d)),
                        Arg::I32(i32_of(chunk)),
                        Arg::I64((max_len * d) as i64),
                        Arg::F32(scale),
                    ],
                });
                launches.push(Launch {
                    name: "attn_combine",
                    n: 0,
                    k: 0,
                    pdl: true,
                    kernel: k_combine,
                    grid: (g as u32, nkv as u32),
                    block: ATTN_THREADS,
                    smem: 0,
                    args: vec![
                        Arg::Ptr(ws_o_p),
                        Arg::Ptr(ws_ml_p),
                        Arg::Ptr(attn_p),
                        Arg::Ptr(pos_p),
                        Arg::I32(i32_of(g)),
                        Arg::I32(i32_of(d)),
                        Arg::I32(i32_of(chunk)),
                        Arg::I32(i32_of(chunks)),
                    ],
                });
                let (wo, bo) = (pw(&lp.o.0, &mut keep)?, opt(&lp.o.1, &mut keep)?);
                launches.push(gemv("gemv o", attn_p, 0, 0, wo, bo, x_p, h, nh * d, 1));
                let ln2 = pw(&lp.post_norm, &mut keep)?;
                let (wgu, bgu) = (
                    pw(&lp.gate_up.0, &mut keep)?,
                    opt(&lp.gate_up.1, &mut keep)?,
                );
                launches.push(gemv(
                    "gemv gate_up",
                    x_p,
                    ln2,
                    1,
                    wgu,
                    bgu,
                    gu_p,
                    2 * inter,
                    h,
                    0,
                ));
                let (wd, bd) = (pw(&lp.down.0, &mut keep)?, opt(&lp.down.1, &mut keep)?);
                launches.push(gemv("gemv down", gu_p, 0, 2, wd, bd, x_p, h, inter, 1));
            }
            let (norm_p, head_p) = (pw(&parts.norm, &mut keep)?, pw(&parts.lm_head, &mut keep)?);
            launches.push(gemv(
                "gemv lm_head",
                x_p,
                norm_p,
                1,
                head_p,
                0,
                logits_p,
                vocab,
                h,
                0,
            ));
            launches.push(Launch {
                name: "argmax_part",
                n: 0,
                k: 0,
                pdl: false,
                kernel: k_argmax,
                grid: (parts_n as u32, 1),
                block: ARGMAX_THREADS,
                smem: 0,
                args: vec![
                    Arg::Ptr(logits_p),
                    Arg::Ptr(pv_p),
                    Arg::Ptr(pi_p),
                    Arg::I32(i32_of(vocab)),
                    Arg::I32(i32_of(arg_chunk)),
                ],
            });
            launches.push(Launch {
                name: "argmax_final",
                n: 0,
                k: 0,
                pdl: false,
                kernel: Kernel::DecodeArgmaxFinal,
                grid: (1, 1),
                block: THREADS,
                smem: 0,
                args: vec![
                    Arg::Ptr(pv_p),
                    Arg::Ptr(pi_p),
                    Arg::I32(i32_of(parts_n)),
                    Arg::Ptr(token_p),
                    Arg::Ptr(pos_p),
                ],
            });
            // The buffers were zeroed on Candle's stream: done before the engine's stream uses
            // them (and before a capture, which runs nothing).
            rt.stream()
                .synchronize()
                .cuda_ctx("synchronizing before the decode engine")?;
            let table_len = parts.rope_cos.dims().first().copied().unwrap_or(0);
            let mut engine = Engine {
                rt,
                stream,
                event,
                graph: None,
                launches,
                _keep: keep,
                logits,
                token_ptr: token_p,
                pos_ptr: pos_p,
                cache_ptr,
                pos: cache.len(),
                max_len,
                table_len,
                vocab,
                pdl: super::pdl_enabled(),
                elem: dtype.size_in_bytes(),
                started: false,
            };
            if graph {
                engine.graph = Some(engine.capture()?);
            }
            Ok(engine)
        }

        /// Captures the launch list into a graph (nothing runs).
        fn capture(&self) -> Result<CudaGraph> {
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .cuda_ctx("beginning the decode graph's capture")?;
            let launched = self.launch_all();
            // End the capture whatever happened, so the stream is usable again.
            let graph = self
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .cuda_ctx("ending the decode graph's capture");
            launched?;
            let graph = graph?.ok_or_else(|| Error::Cuda {
                context: "capturing the decode graph",
                msg: "the capture produced no graph".into(),
            })?;
            graph.upload().cuda_ctx("uploading the decode graph")?;
            Ok(graph)
        }

        /// Launches the step's kernels on the engine's stream.
        fn launch_all(&self) -> Result<()> {
            for l in &self.launches {
                self.launch_one(l, self.pdl)?;
            }
            Ok(())
        }

        /// Launches one kernel of the step on the engine's stream, with programmatic stream
        /// serialisation where the launch allows it and `pdl` asks for it.
        fn launch_one(&self, l: &Launch, pdl: bool) -> Result<()> {
            let mut params: Vec<*mut std::ffi::c_void> = l
                .args
                .iter()
                .map(|a| match a {
                    Arg::Ptr(v) => v as *const u64 as *mut std::ffi::c_void,
                    Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
                    Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
                    Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
                })
                .collect();
            // SAFETY: CUlaunchAttribute is plain data (an id and a union of integers); all
            // zeros is a valid value, then the id and its field are set.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: l.grid.0,
                gridDimY: l.grid.1,
                gridDimZ: 1,
                blockDimX: l.block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: l.smem,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: u32::from(pdl && l.pdl),
            };
            self.stream
                .context()
                .bind_to_thread()
                .cuda_ctx("binding the decode engine's context")?;
            // SAFETY: each launch's arguments match its kernel's signature in decode.cu or
            // argmax.cu (pointers as 64-bit addresses, `int`, `long long`, `float`), as built in
            // `new`; `params` points at them (in `self.launches`, alive for the call) in order.
            // Every pointer is the address of a live tensor held in `_keep` (weights, the
            // cache's tensors, the engine's buffers), sized for what the kernel addresses: the
            // gemv reads n rows of k and writes n outputs; the RoPE/append kernel writes cache
            // row `pos` < max_len (checked on the host before every step); the attention reads
            // rows 0..=pos and writes its workspace of kv_heads x chunks x G rows; the argmax
            // writes `parts` pairs, the token and the position. Grid, block and dynamic shared
            // memory respect the kernels' launch bounds and the 48 KiB default (checked by
            // `unsupported`). A launch marked `pdl` is of a decode.cu kernel that calls
            // `griddepcontrol.wait` before touching anything but weights. `cfg` and `attr`
            // outlive the call.
            unsafe {
                sys::cuLaunchKernelEx(
                    &cfg,
                    self.rt.function(l.kernel).cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .cuda_ctx("launching a decode engine kernel")?;
            Ok(())
        }

        pub(super) fn uses_graph(&self) -> bool {
            self.graph.is_some()
        }

        pub(super) fn position(&self) -> usize {
            self.pos
        }

        fn check_cache(&self, cache: &KvCache) -> Result<()> {
            let p = match cache.layers().first() {
                Some(l) => ptr(&l.k, &self.stream)?,
                None => 0,
            };
            if p != self.cache_ptr {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: "the cache is not the one the engine was built for".into(),
                });
            }
            Ok(())
        }

        pub(super) fn start(&mut self, token: u32, cache: &KvCache) -> Result<()> {
            self.check_cache(cache)?;
            if token as usize >= self.vocab {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!("token id {token} out of the vocabulary ({})", self.vocab),
                });
            }
            let pos = cache.len();
            let host_token = [token];
            let host_pos = [pos as u32];
            self.event
                .record(self.rt.stream())
                .cuda_ctx("recording Candle's stream")?;
            self.stream
                .wait(&self.event)
                .cuda_ctx("waiting for Candle's stream")?;
            // SAFETY: token_ptr and pos_ptr address live 4-byte device buffers (held in
            // `_keep`); the host arrays outlive the copies, which complete before the
            // synchronisation below returns; no step is in flight (each one synchronises).
            unsafe {
                result::memcpy_htod_async(self.token_ptr, &host_token, self.stream.cu_stream())
                    .cuda_ctx("setting the decode engine's token")?;
                result::memcpy_htod_async(self.pos_ptr, &host_pos, self.stream.cu_stream())
                    .cuda_ctx("setting the decode engine's position")?;
            }
            self.stream
                .synchronize()
                .cuda_ctx("synchronizing the decode engine")?;
            self.pos = pos;
            self.started = true;
            Ok(())
        }

        pub(super) fn step(&mut self, cache: &mut KvCache) -> Result<u32> {
            self.step_with(cache, false).map(|(t, _)| t)
        }

        pub(super) fn profile_step(
            &mut self,
            cache: &mut KvCache,
        ) -> Result<(u32, Vec<super::LaunchTime>)> {
            self.step_with(cache, true)
        }

        /// Queues the step's launches behind a spin kernel, each between two timing events;
        /// returns the events (launch i runs between events i and i + 1).
        fn launch_timed(&self) -> Result<Vec<CudaEvent>> {
            let ctx = self.stream.context();
            let events = (0..self.launches.len() + 2)
                .map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .cuda_ctx("creating the profiler's events")?;
            // Long enough for the host to queue every launch (a few microseconds each).
            let spin = |ns: u64| -> Result<()> {
                let mut lb = self
                    .stream
                    .launch_builder(self.rt.function(Kernel::DecodeSpin));
                lb.arg(&ns);
                let cfg = LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: decode_spin takes one `unsigned long long` and touches no memory.
                unsafe { lb.launch(cfg) }.cuda_ctx("launching the profiler's spin kernel")?;
                Ok(())
            };
            spin(10_000 * self.launches.len() as u64)?;
            for (l, ev) in self.launches.iter().zip(&events) {
                ev.record(&self.stream)
                    .cuda_ctx("recording a profiler event")?;
                self.launch_one(l, false)?;
            }
            // Last, an empty kernel: what a launch between two events costs by itself.
            let n = self.launches.len();
            events[n]
                .record(&self.stream)
                .cuda_ctx("recording a profiler event")?;
            spin(0)?;
            events[n + 1]
                .record(&self.stream)
                .cuda_ctx("recording a profiler event")?;
            Ok(events)
        }

        fn step_with(
            &mut self,
            cache: &mut KvCache,
            profile: bool,
        ) -> Result<(u32, Vec<super::LaunchTime>)> {
            if !self.started {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: "step before start: no token to feed".into(),
                });
            }
            self.check_cache(cache)?;
            if cache.len() != self.pos {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!(
                        "the cache holds {} positions, the engine expects {}: call start again",
                        cache.len(),
                        self.pos
                    ),
                });
            }
            if self.pos >= self.max_len {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!(
                        "cache full: position {} >= max_len {}",
                        self.pos, self.max_len
                    ),
                });
            }
            if self.pos >= self.table_len {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!(
                        "position {} is past the RoPE table ({} positions)",
                        self.pos, self.table_len
                    ),
                });
            }
            self.event
                .record(self.rt.stream())
                .cuda_ctx("recording Candle's stream")?;
            self.stream
                .wait(&self.event)
                .cuda_ctx("waiting for Candle's stream")?;
            let events = if profile {
                Some(self.launch_timed()?)
            } else {
                match &self.graph {
                    Some(g) => g.launch().cuda_ctx("launching the decode graph")?,
                    None => self.launch_all()?,
                }
                None
            };
            let mut host = [0u32];
            // SAFETY: token_ptr addresses a live 4-byte device buffer; `host` outlives the copy,
            // which completes before the synchronisation below returns.
            unsafe {
                result::memcpy_dtoh_async(&mut host, self.token_ptr, self.stream.cu_stream())
                    .cuda_ctx("copying the decode engine's token")?;
            }
            self.stream
                .synchronize()
                .cuda_ctx("synchronizing the decode engine")?;
            // The step wrote position `pos` of every layer.
            cache.advance(1);
            self.pos += 1;
            let mut times = Vec::new();
            if let Some(ev) = events {
                for (i, l) in self.launches.iter().enumerate() {
                    let ms = ev[i]
                        .elapsed_ms(&ev[i + 1])
                        .cuda_ctx("reading a profiler event")?;
                    times.push(super::LaunchTime {
                        name: l.name,
                        n: l.n,
                        k: l.k,
                        bytes: l.n * l.k * self.elem,
                        us: ms as f64 * 1e3,
                    });
                }
                let n = self.launches.len();
                let ms = ev[n]
                    .elapsed_ms(&ev[n + 1])
                    .cuda_ctx("reading a profiler event")?;
                times.push(super::LaunchTime {
                    name: super::EMPTY_KERNEL,
                    n: 0,
                    k: 0,
                    bytes: 0,
                    us: ms as f64 * 1e3,
                });
            }
            let t = host[0];
            if t as usize >= self.vocab {
                self.started = false;
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: "the logits have no maximum (all NaN)".into(),
                });
            }
            Ok((t, times))
        }

        pub(super) fn logits(&self) -> Result<Tensor> {
            Ok(self.logits.copy()?)
        }
    }

    impl Drop for Engine {
        fn drop(&mut self) {
            // Nothing of the engine's may still run when its buffers go back to Candle's pool.
            let _ = self.stream.synchronize();
        }
    }
}
