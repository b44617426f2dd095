//! [`TokenStream`]: generation of one sequence as an iterator of token ids. The prompt is
//! prefilled when the stream is made; each call to `next` feeds the previous token through one
//! decode step (none for the first) and chooses the next, so a token is handed out as soon as it
//! is chosen and the caller can stop at any time, paying for no step it does not take.
//! [`generate`](super::generate) is a loop over it.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::decode::DecodeGraph;
use super::{next_token, GenerationConfig};
use crate::models::{KvCache, Transformer};
use crate::{Error, Result};

const OP: &str = "generate";

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// It produced one of the EOS tokens (included in the output).
    Eos(u32),
    /// It produced `max_new_tokens` tokens.
    MaxNewTokens,
    /// The text contained this stop string (text-level generation only).
    StopString(String),
}

/// The tokens generated after a prompt, one per [`Iterator::next`]; see the [module
/// docs](crate::generate) and [`TokenStream::new`]. After an error the stream ends.
///
/// ```no_run
/// # use candle_core::{DType, Device};
/// use flare::generate::{GenerationConfig, TokenStream};
/// let model = flare::models::Transformer::from_dir("qwen2-0.5b", DType::F32, &Device::Cpu)?;
/// let cfg = GenerationConfig { max_new_tokens: 64, ..Default::default() };
/// for token in TokenStream::new(&model, &[9707, 11, 1879], &cfg)?.take(10) {
///     print!("{} ", token?);
/// }
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug)]
pub struct TokenStream<'a> {
    model: &'a Transformer,
    config: &'a GenerationConfig,
    cache: KvCache,
    rng: StdRng,
    /// Prompt and generated tokens.
    all: Vec<u32>,
    prompt_len: usize,
    /// The logits of the next position, when the last chosen token has been fed already.
    logits: Option<Tensor>,
    /// The last chosen token, not fed through the model yet.
    pending: Option<u32>,
    stop: Option<StopReason>,
    failed: bool,
    /// The batch-1 decode engine, for plain greedy decoding when it applies.
    engine: Option<DecodeGraph>,
    /// Whether the engine has been given its first token.
    engine_started: bool,
}

impl<'a> TokenStream<'a> {
    /// Checks the inputs, allocates the KV cache for `prompt + max_new_tokens - 1` positions
    /// and prefills the prompt (batch 1). Errors: invalid sampling parameters, an empty prompt,
    /// a token id outside the model's vocabulary, and the model's own.
    pub fn new(
        model: &'a Transformer,
        prompt_ids: &[u32],
        config: &'a GenerationConfig,
    ) -> Result<Self> {
        config.sampling.validate()?;
        if prompt_ids.is_empty() {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: "the prompt is empty".into(),
            });
        }
        let vocab = model.config().vocab_size;
        if let Some(t) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("prompt token id {t} out of the vocabulary ({vocab})"),
            });
        }
        // The last generated token is never fed back, hence `- 1`.
        let max_len = prompt_ids.len() + config.max_new_tokens.max(1) - 1;
        let mut cache = model.new_cache(1, max_len)?;
        let (logits, stop) = if config.max_new_tokens == 0 {
            (None, Some(StopReason::MaxNewTokens))
        } else {
            let ids = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
            (Some(model.prefill(&ids, &mut cache)?), None)
        };
        // Plain greedy decoding of more than one token runs on the decode engine where it
        // applies (see `DecodeGraph::unsupported`); building it where it applies must succeed.
        let engine = if config.max_new_tokens > 1
            && super::is_plain_greedy(&config.sampling)
            && crate::runtime::settings().decode_engine
            && DecodeGraph::unsupported(model, &cache).is_none()
        {
            Some(DecodeGraph::new(model, &cache)?)
        } else {
            None
        };
        let mut all = Vec::with_capacity(prompt_ids.len() + config.max_new_tokens);
        all.extend_from_slice(prompt_ids);
        Ok(TokenStream {
            model,
            config,
            cache,
            rng: StdRng::seed_from_u64(config.seed),
            all,
            prompt_len: prompt_ids.len(),
            logits,
            pending: None,
            stop,
            failed: false,
            engine,
            engine_started: false,
        })
    }

    /// The tokens generated so far (the prompt excluded).
    pub fn tokens(&self) -> &[u32] {
        &self.all[self.prompt_len..]
    }

    /// The prompt.
    pub fn prompt(&self) -> &[u32] {
        &self.all[..self.prompt_len]
    }

    /// Why the stream ended, once it has (`None` while it can go on, or after an error).
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref()
    }

    /// The next token, or `None` when the stream has ended. The same as [`Iterator::next`]
    /// with the `Option` and the `Result` the other way round.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.stop.is_some() || self.failed {
            return Ok(None);
        }
        match self.step() {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Whether plain greedy steps run on the batch-1 decode engine ([`DecodeGraph`]: CUDA,
    /// batch 1, no active adapter, ...; `FLARE_DECODE_ENGINE=0` turns it off) rather than on
    /// [`Transformer::decode_step`].
    pub fn uses_decode_engine(&self) -> bool {
        self.engine.is_some()
    }

    fn step(&mut self) -> Result<u32> {
        let pending = self.pending.take();
        let next = match (pending, self.engine.as_mut()) {
            (Some(t), Some(engine)) => {
                // The engine keeps the token it chose on the device; only the first is given.
                if !self.engine_started {
                    engine.start(t, &self.cache)?;
                    self.engine_started = true;
                }
                engine.step(&mut self.cache)?
            }
            (pending, _) => {
                if let Some(t) = pending {
                    let ids = Tensor::new(&[[t]], self.model.device())?;
                    self.logits = Some(self.model.decode_step(&ids, &mut self.cache)?);
                }
                let logits = self.logits.take().ok_or_else(|| Error::InvalidArgument {
                    op: OP,
                    msg: "internal: no logits for the next token".into(),
                })?;
                next_token(&logits, &self.all, &self.config.sampling, &mut self.rng)?
            }
        };
        self.all.push(next);
        if self.config.eos_token_ids.contains(&next) {
            self.stop = Some(StopReason::Eos(next));
        } else if self.tokens().len() >= self.config.max_new_tokens {
            self.stop = Some(StopReason::MaxNewTokens);
        } else {
            self.pending = Some(next);
        }
        Ok(next)
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Result<u32>> {
        self.next_token().transpose()
    }
}
