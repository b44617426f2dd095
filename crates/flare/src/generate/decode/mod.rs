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
//! greedy decoding whenever it applies (`FLARE_DECODE_ENGINE=0`, i.e.
//! [`Settings::decode_engine`](crate::runtime::Settings::decode_engine), turns that off), else
//! the per-op path. [`DecodeGraph::with_graph`] with `graph: false` launches the same kernels one
//! by one instead of replaying the graph (for debugging and comparison; `flare bench decode`
//! times both). Every kernel of a step after the first is launched with programmatic dependent
//! launch: it may start while the one before finishes, and waits for it
//! (`griddepcontrol.wait`) before reading its results; the gemvs issue their first weight loads
//! before that wait. [`DecodeGraph::profile_step`] times each launch of a step
//! (`flare bench decode --profile` prints the table).
//!
//! Streams: the engine launches on a stream of its own. Before each step it waits (an event)
//! for the work queued on Candle's stream (the prefill's cache writes), and each step ends with
//! a host synchronisation of its stream, so Candle work issued afterwards sees the engine's
//! writes (the cache's new positions, the logits).

#[cfg(feature = "cuda")]
mod engine;
mod plan;

use candle_core::Tensor;

use crate::models::{KvCache, Transformer};
use crate::Result;

/// The op name of the engine's errors.
const OP: &str = "DecodeGraph";

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
/// use flare::generate::DecodeGraph;
/// use flare::models::Transformer;
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
    inner: engine::Engine,
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
        plan::unsupported(model, cache)
    }

    /// Builds the engine for `model` and `cache` (batch 1, normally filled by
    /// [`Transformer::prefill`]), replaying a CUDA graph.
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) with the reason when the engine
    /// does not apply ([`unsupported`](Self::unsupported)).
    pub fn new(model: &Transformer, cache: &KvCache) -> Result<Self> {
        Self::with_graph(model, cache, true)
    }

    /// [`new`](Self::new) with the mode given: `graph` replays one CUDA graph per step, else the
    /// same kernels are launched one by one (bitwise the same results).
    pub fn with_graph(model: &Transformer, cache: &KvCache, graph: bool) -> Result<Self> {
        if let Some(why) = Self::unsupported(model, cache) {
            return Err(crate::Error::InvalidArgument {
                op: OP,
                msg: format!("the decode engine does not apply: {why}"),
            });
        }
        #[cfg(feature = "cuda")]
        {
            Ok(DecodeGraph {
                inner: engine::Engine::new(model, cache, graph)?,
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
