//! Text generation with a [`Transformer`] and its [`KvCache`](crate::models::KvCache): the prompt is prefilled once,
//! then one token per step is decoded, chosen by [`sample`] (greedy or seeded sampling with
//! transformers' logits processors), until `max_new_tokens` or an EOS token.
//! [`TokenStream`] is that loop as an iterator of token ids; [`generate`] runs it to the end.
//! [`TextStream`] and [`generate_text`] work in text: a prompt string or a chat conversation in,
//! decoded text out piece by piece, with stop strings. [`HfGenerationConfig`] reads a model's
//! `generation_config.json`. [`generate_batch`] decodes several prompts at once (left-padded
//! when their lengths differ). [`DecodeGraph`] (module [`decode`]) is the batch-1 greedy decode
//! engine that [`TokenStream`] uses on CUDA where it applies.

mod config_file;
pub mod decode;
pub mod sampling;
mod stream;
mod text;

pub use config_file::HfGenerationConfig;
pub use decode::{DecodeGraph, LaunchTime, EMPTY_KERNEL};
pub use sampling::{sample, SamplingParams};
pub use stream::{StopReason, TokenStream};
pub use text::{generate_text, Generated, Prompt, TextStream};

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::models::Transformer;
use crate::{Error, Result};

const OP: &str = "generate";

/// The settings of [`generate`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationConfig {
    /// The most tokens to generate (the EOS token, when produced, is included and counts).
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Generation stops after producing any of these; empty: never stops early.
    pub eos_token_ids: Vec<u32>,
    /// The seed of the [`StdRng`] used when sampling.
    pub seed: u64,
    /// Generation stops once the decoded new text contains any of these; empty: none. Only
    /// the text-level API ([`TextStream`], [`generate_text`]), which has a tokenizer, checks
    /// them; the stop string itself is left out of the text it returns.
    pub stop_strings: Vec<String>,
}

/// The last row of logits `[1, s, vocab]` as f32.
fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let s = logits.dim(1)?;
    Ok(logits
        .narrow(1, s - 1, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

// ---- device-argmax hook ------------------------------------------------------------------------
// Greedy decoding without a repetition penalty needs only the argmax of the last row: it is
// taken on the device and only the token id (4 bytes) is copied to the host, not the
// vocabulary row. Every other processor runs on the host through `sample`.

/// Whether `params` choose the token by a plain argmax (greedy, no repetition penalty), which
/// [`greedy_on_device`] computes on the model's device.
pub fn is_plain_greedy(params: &SamplingParams) -> bool {
    !params.do_sample && params.repetition_penalty == 1.0
}

/// The greedy token of each row of `logits: [batch, seq, vocab]` at its last position, by an
/// argmax on the logits' device: `[batch]` u32 ids, still on the device (so they can feed the
/// next step without a host round trip). Same choice as [`sampling::argmax`]: the first
/// maximum, NaN skipped; a row without a non-NaN logit is an error when read back with
/// [`ids_to_host`].
pub fn greedy_on_device(logits: &Tensor) -> Result<Tensor> {
    let s = logits.dim(1)?;
    crate::ops::argmax_last_dim(&logits.narrow(1, s - 1, 1)?.squeeze(1)?)
}

/// Copies device token ids `[batch]` (from [`greedy_on_device`]) to the host, refusing the
/// marker of a row without a non-NaN logit.
pub fn ids_to_host(ids: &Tensor) -> Result<Vec<u32>> {
    let v = ids.to_vec1::<u32>()?;
    if v.contains(&u32::MAX) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "no finite logit to choose from (every logit is NaN)".into(),
        });
    }
    Ok(v)
}

/// The next token of a batch-1 generation from `logits: [1, s, vocab]`: the device argmax for
/// plain greedy decoding, else [`sample`] on the host copy of the last row.
fn next_token(
    logits: &Tensor,
    previous: &[u32],
    params: &SamplingParams,
    rng: &mut StdRng,
) -> Result<u32> {
    if is_plain_greedy(params) {
        params.validate()?;
        return Ok(ids_to_host(&greedy_on_device(logits)?)?[0]);
    }
    sample(&last_row(logits)?, previous, params, rng)
}

// ---- generation ----------------------------------------------------------------------------------

/// Generates up to `config.max_new_tokens` tokens after `prompt_ids` (batch 1) and returns
/// them (the prompt excluded); `on_token` is called with each new token id as it is chosen.
/// A loop over [`TokenStream`], which callers that may stop early use directly.
///
/// The KV cache is allocated once for `prompt + max_new_tokens` positions. Errors: an empty
/// prompt, a token id outside the vocabulary, invalid sampling parameters.
///
/// ```no_run
/// # use candle_core::{DType, Device};
/// use flare::generate::{generate, GenerationConfig};
/// let model = flare::models::Transformer::from_dir("qwen2-0.5b", DType::F32, &Device::Cpu)?;
/// let cfg = GenerationConfig { max_new_tokens: 16, eos_token_ids: vec![151643], ..Default::default() };
/// let out = generate(&model, &[9707, 11, 1879], &cfg, |t| print!("{t} "))?;
/// # Ok::<(), flare::Error>(())
/// ```
pub fn generate(
    model: &Transformer,
    prompt_ids: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut stream = TokenStream::new(model, prompt_ids, config)?;
    while let Some(next) = stream.next_token()? {
        on_token(next);
    }
    Ok(stream.tokens().to_vec())
}

/// [`generate`] for a batch of prompts, decoded together with one [`KvCache`](crate::models::KvCache) of batch
/// `prompts.len()`. Prompts of different lengths are left-padded and prefilled with
/// [`Transformer::prefill_padded`], so each row's tokens are those of its prompt generated
/// alone (up to rounding). Returns each row's new tokens; a row stops after one of its EOS
/// tokens (later steps still run for the others, their outputs for it discarded).
/// `on_token(row, id)` is called for each new token of each running row. Plain greedy decoding
/// takes the argmax of every row on the device and feeds the ids back without a host copy of
/// the logits; otherwise one [`StdRng`] seeded with `config.seed` draws for the rows in order
/// at every step.
///
/// Errors: no prompt, an empty prompt, plus those of [`generate`].
pub fn generate_batch(
    model: &Transformer,
    prompts: &[&[u32]],
    config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    config.sampling.validate()?;
    if prompts.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "no prompt given".into(),
        });
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("prompt {i} is empty"),
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(t) = prompts
        .iter()
        .flat_map(|p| p.iter())
        .find(|&&t| t as usize >= vocab)
    {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("prompt token id {t} out of the vocabulary ({vocab})"),
        });
    }
    let b = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(config.max_new_tokens); b];
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = model.new_cache(b, len + config.max_new_tokens - 1)?;
    let mut all: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut done = vec![false; b];
    // Left padding with token 0 (any valid id: padding is masked out).
    let flat: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(0, len - p.len()).chain(p.iter().copied()))
        .collect();
    let ids = Tensor::from_vec(flat, (b, len), model.device())?;
    let mut logits = model.prefill_padded(&ids, &lengths, &mut cache)?;
    let greedy = is_plain_greedy(&config.sampling);
    for step in 0..config.max_new_tokens {
        let (chosen, device_ids) = if greedy {
            let d = greedy_on_device(&logits)?;
            (ids_to_host(&d)?, Some(d))
        } else {
            let mut next = vec![0u32; b];
            for (row, t) in next.iter_mut().enumerate() {
                *t = if done[row] {
                    *all[row].last().unwrap_or(&0)
                } else {
                    sample(
                        &last_row(&logits.narrow(0, row, 1)?)?,
                        &all[row],
                        &config.sampling,
                        &mut rng,
                    )?
                };
            }
            (next, None)
        };
        for (row, &t) in chosen.iter().enumerate() {
            if done[row] {
                continue;
            }
            all[row].push(t);
            out[row].push(t);
            on_token(row, t);
            done[row] = config.eos_token_ids.contains(&t);
        }
        if done.iter().all(|d| *d) || step + 1 == config.max_new_tokens {
            break;
        }
        // Finished rows keep decoding (their tokens are discarded): the batch stays whole.
        let ids = match device_ids {
            Some(d) => d.reshape((b, 1))?,
            None => Tensor::from_vec(chosen, (b, 1), model.device())?,
        };
        logits = model.decode_step(&ids, &mut cache)?;
    }
    Ok(out)
}
