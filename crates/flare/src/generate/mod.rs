//! Text generation with a [`Transformer`] and its [`KvCache`](crate::models::KvCache): the prompt is prefilled once,
//! then one token per step is decoded, chosen by [`sample`] (greedy or seeded sampling with
//! transformers' logits processors), until `max_new_tokens` or an EOS token.
//! [`TokenStream`] is that loop as an iterator of token ids; [`generate`] runs it to the end.
//! [`TextStream`] and [`generate_text`] work in text: a prompt string or a chat conversation in,
//! decoded text out piece by piece, with stop strings. [`HfGenerationConfig`] reads a model's
//! `generation_config.json`. [`generate_batch`] decodes several prompts of one length at once.

mod config_file;
pub mod sampling;
mod stream;
mod text;

pub use config_file::HfGenerationConfig;
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

/// [`generate`] for a batch of prompts of one length (no padding), decoded together with one
/// [`KvCache`](crate::models::KvCache) of batch `prompts.len()`. Returns each row's new tokens; a row stops after one of
/// its EOS tokens (later steps still run for the others, their outputs for it discarded).
/// `on_token(row, id)` is called for each new token of each running row. When sampling, one
/// [`StdRng`] seeded with `config.seed` draws for the rows in order at every step.
///
/// Errors: no prompt, prompts of different lengths, plus those of [`generate`].
pub fn generate_batch(
    model: &Transformer,
    prompts: &[&[u32]],
    config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    config.sampling.validate()?;
    let Some(first) = prompts.first() else {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "no prompt given".into(),
        });
    };
    let len = first.len();
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != len) {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "prompts must share one length (no padding): prompt 0 has {len} tokens, prompt {i} has {}",
                p.len()
            ),
        });
    }
    if len == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "the prompts are empty".into(),
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
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = model.new_cache(b, len + config.max_new_tokens - 1)?;
    let mut all: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut done = vec![false; b];
    let flat: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, (b, len), model.device())?;
    let mut logits = model.prefill(&ids, &mut cache)?;
    for step in 0..config.max_new_tokens {
        let mut next = vec![0u32; b];
        for row in 0..b {
            let last = if done[row] {
                *all[row].last().unwrap_or(&0)
            } else {
                let t = sample(
                    &last_row(&logits.narrow(0, row, 1)?)?,
                    &all[row],
                    &config.sampling,
                    &mut rng,
                )?;
                all[row].push(t);
                out[row].push(t);
                on_token(row, t);
                done[row] = config.eos_token_ids.contains(&t);
                t
            };
            next[row] = last;
        }
        if done.iter().all(|d| *d) || step + 1 == config.max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(next, (b, 1), model.device())?;
        logits = model.decode_step(&ids, &mut cache)?;
    }
    Ok(out)
}
