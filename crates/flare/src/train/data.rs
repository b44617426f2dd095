//! Training data: JSONL files tokenised once (and cached), split into train and eval, and cut
//! into length-bucketed, right-padded batches.
//!
//! Each line of a JSONL file is one example, in one of three shapes:
//!
//! - `{"text": "..."}`: loss on every token;
//! - `{"prompt": "...", "completion": "..."}`: prompt and completion tokenised separately and
//!   concatenated; loss only on the completion;
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the model's chat
//!   template; loss only on the assistant turns, whose token spans are found by rendering the
//!   conversation's prefixes (up to a turn with the generation prompt, and through it).
//!
//! With `append_eos`, the EOS token is appended to `text` and `completion` examples (chat
//! templates end assistant turns themselves). Examples longer than `max_seq_len` are truncated;
//! examples left with no loss token are dropped and counted. A malformed line (not UTF-8, bad
//! JSON, a missing or mistyped field) is an [`Error::Data`] naming the file and line: with
//! [`BadLines::Error`] the load fails on it, with [`BadLines::Skip`] it is skipped and reported
//! in [`Tokenized::bad_lines`] (the trainer prints a warning and the count). Blank lines are
//! not examples and are ignored.
//!
//! Tokenisation runs once per (data file, tokenizer, settings): the result is cached in a file
//! named by a hash of the three, written atomically, and reused while none of them changes.
//!
//! Micro-batches come in two forms:
//!
//! - packed ([`epoch_packs`], [`make_packed_batch`]; the trainer's default): whole examples
//!   concatenated into one row of at most `batch_size × max_seq_len` tokens, with the document
//!   offsets (`cu_seqlens`) that [`crate::models::Transformer::forward_packed`] needs so that
//!   each document restarts its positions and attends only to itself. No padding at all.
//! - padded ([`epoch_batches`], [`make_batch`]): `batch_size` examples right-padded to the
//!   longest. Right padding is exact for a causal model (a real token never attends to the
//!   padding after it), so padded positions only need their loss masked. Batches are formed
//!   from length-sorted windows of a seeded shuffle (so each batch holds similar lengths and
//!   little padding), then shuffled again.
//!
//! In both, the targets of uncounted tokens (prompt, padding) are [`IGNORE_INDEX`], no target
//! crosses an example's end, and the order of an epoch is a function of `(seed, epoch)` alone,
//! which is what makes resuming exact.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::ops::cross_entropy::IGNORE_INDEX;
use crate::{Error, Result};

/// A conversation turn of a `messages` example (`{"role": ..., "content": ...}`).
pub use crate::text::ChatMessage as Message;

/// What the data pipeline needs from a tokenizer.
pub trait Encoder {
    /// Token ids of `text`, without added special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The conversation rendered with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String>;
    /// The end-of-sequence token, if any.
    fn eos_token_id(&self) -> Option<u32>;
    /// A string that changes whenever the tokenisation could (vocabulary, merges, template),
    /// for the cache key.
    fn fingerprint(&self) -> Result<String>;
}

impl Encoder for crate::text::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::text::Tokenizer::encode(self, text, false)
    }

    fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template(messages, add_generation_prompt)
    }

    fn eos_token_id(&self) -> Option<u32> {
        crate::text::Tokenizer::eos_token_id(self)
    }

    fn fingerprint(&self) -> Result<String> {
        let bytes = std::fs::read(self.file()).map_err(|e| Error::Io {
            context: format!("reading {}", self.file().display()),
            source: e,
        })?;
        let template = self.chat_template().map(|t| t.source()).unwrap_or("");
        let eos = crate::text::Tokenizer::eos_token_id(self);
        Ok(format!(
            "{:016x}/{:016x}/{eos:?}",
            fnv1a(&[&bytes]),
            fnv1a(&[template.as_bytes()])
        ))
    }
}

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BadLines {
    /// Fail the load on the first malformed line.
    #[default]
    Error,
    /// Skip it, and report it in [`Tokenized::bad_lines`].
    Skip,
}

/// Settings of the tokenisation (all part of the cache key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Examples are truncated to this many tokens (>= 2).
    pub max_seq_len: usize,
    /// Append EOS to `text` and `completion` examples.
    pub append_eos: bool,
    /// What to do with a malformed line.
    pub bad_lines: BadLines,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            max_seq_len: 1024,
            append_eos: true,
            bad_lines: BadLines::Error,
        }
    }
}

/// One tokenised example: `ids` and, per token, whether it is a loss target (predicted from the
/// tokens before it). `labels[0]` is never used (nothing predicts the first token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per token: counted in the loss.
    pub labels: Vec<bool>,
}

impl Example {
    /// The number of loss targets (`labels[1..]` set).
    pub fn targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&b| b).count()
    }
}

/// A malformed line that was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub msg: String,
}

/// The tokenised contents of one JSONL file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokenized {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Malformed lines skipped (only with [`BadLines::Skip`]).
    pub bad_lines: Vec<BadLine>,
    /// Examples dropped because no loss token was left (after truncation, or an empty
    /// completion / no assistant turn).
    pub dropped_empty: usize,
    /// Examples longer than `max_seq_len`, truncated.
    pub truncated: usize,
}

/// One line, parsed.
#[derive(Debug, Deserialize)]
struct Line {
    text: Option<String>,
    prompt: Option<String>,
    completion: Option<String>,
    messages: Option<Vec<Message>>,
}

fn data_err(file: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        file: file.display().to_string(),
        line,
        msg: msg.into(),
    }
}

/// The length of the common prefix of two id sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenises one line into an example (before truncation). `Err(msg)` is a malformed line,
/// and so is a conversation the chat template cannot render or text the tokenizer refuses
/// (the error names the line rather than nothing).
fn tokenize_line(
    line: &str,
    enc: &dyn Encoder,
    cfg: &DataConfig,
) -> std::result::Result<Example, String> {
    tokenize_line_inner(line, enc, cfg).unwrap_or_else(|e| Err(e.to_string()))
}

fn tokenize_line_inner(
    line: &str,
    enc: &dyn Encoder,
    cfg: &DataConfig,
) -> Result<std::result::Result<Example, String>> {
    let parsed: Line = match serde_json::from_str(line) {
        Ok(l) => l,
        Err(e) => return Ok(Err(format!("not a valid example: {e}"))),
    };
    let eos = if cfg.append_eos {
        enc.eos_token_id()
    } else {
        None
    };
    match parsed {
        Line {
            text: Some(text),
            prompt: None,
            completion: None,
            messages: None,
        } => {
            let mut ids = enc.encode(&text)?;
            ids.extend(eos);
            let labels = vec![true; ids.len()];
            Ok(Ok(Example { ids, labels }))
        }
        Line {
            text: None,
            prompt: Some(prompt),
            completion: Some(completion),
            messages: None,
        } => {
            let mut ids = enc.encode(&prompt)?;
            let p = ids.len();
            ids.extend(enc.encode(&completion)?);
            ids.extend(eos);
            let labels = (0..ids.len()).map(|i| i >= p).collect();
            Ok(Ok(Example { ids, labels }))
        }
        Line {
            text: None,
            prompt: None,
            completion: None,
            messages: Some(messages),
        } => {
            if messages.is_empty() {
                return Ok(Err("`messages` is empty".into()));
            }
            let full = enc.encode(&enc.render_chat(&messages, false)?)?;
            let mut labels = vec![false; full.len()];
            for (k, m) in messages.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                let before = enc.encode(&enc.render_chat(&messages[..k], true)?)?;
                let through = enc.encode(&enc.render_chat(&messages[..=k], false)?)?;
                let start = common_prefix(&before, &full);
                let end = common_prefix(&through, &full);
                for l in labels.iter_mut().take(end).skip(start) {
                    *l = true;
                }
            }
            Ok(Ok(Example { ids: full, labels }))
        }
        _ => Ok(Err(
            "an example must have exactly one of: `text`; `prompt` and `completion`; `messages`"
                .into(),
        )),
    }
}

/// The text of one line (its bytes up to the `\n`), without a trailing `\r`; `Err(msg)` when it
/// is not UTF-8 (a malformed line, which `--skip-bad-lines` can skip like any other).
fn line_text(raw: &[u8]) -> std::result::Result<&str, String> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    std::str::from_utf8(raw).map_err(|e| {
        format!(
            "not valid UTF-8 (byte {} of the line); JSONL must be UTF-8",
            e.valid_up_to() + 1
        )
    })
}

/// Tokenises a JSONL file without the cache. See the module docs for the formats and the
/// handling of malformed lines.
pub fn tokenize_file(path: &Path, enc: &dyn Encoder, cfg: &DataConfig) -> Result<Tokenized> {
    if cfg.max_seq_len < 2 {
        return Err(Error::InvalidArgument {
            op: "data",
            msg: format!("max_seq_len must be >= 2, got {}", cfg.max_seq_len),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        context: format!("reading data file {}", path.display()),
        source: e,
    })?;
    let mut out = Tokenized {
        examples: Vec::new(),
        bad_lines: Vec::new(),
        dropped_empty: 0,
        truncated: 0,
    };
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let parsed = match line_text(raw) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => tokenize_line(line, enc, cfg),
            Err(msg) => Err(msg),
        };
        match parsed {
            Ok(mut ex) => {
                if ex.ids.len() > cfg.max_seq_len {
                    ex.ids.truncate(cfg.max_seq_len);
                    ex.labels.truncate(cfg.max_seq_len);
                    out.truncated += 1;
                }
                if ex.targets() == 0 {
                    out.dropped_empty += 1;
                } else {
                    out.examples.push(ex);
                }
            }
            Err(msg) => match cfg.bad_lines {
                BadLines::Error => return Err(data_err(path, n, msg)),
                BadLines::Skip => out.bad_lines.push(BadLine { line: n, msg }),
            },
        }
    }
    Ok(out)
}

/// A stable 64-bit FNV-1a hash (the cache key must not change between runs or builds, which
/// `DefaultHasher` does not promise).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate parts so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache file for `path` under `cache_dir`: `<stem>-<hash>.tokens.json`, the hash over the
/// file's bytes, the encoder's fingerprint and the settings.
pub fn cache_path(
    path: &Path,
    enc: &dyn Encoder,
    cfg: &DataConfig,
    cache_dir: &Path,
) -> Result<PathBuf> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        context: format!("reading data file {}", path.display()),
        source: e,
    })?;
    let settings = serde_json::to_vec(cfg).map_err(|e| Error::InvalidArgument {
        op: "data",
        msg: format!("serialising the data settings: {e}"),
    })?;
    let fp = enc.fingerprint()?;
    let h = fnv1a(&[b"flare-tokens-v1", &bytes, fp.as_bytes(), &settings]);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    Ok(cache_dir.join(format!("{stem}-{h:016x}.tokens.json")))
}

/// [`tokenize_file`] through the cache in `cache_dir` (created if needed): a cache hit reads
/// the file written by an earlier call with the same data, tokenizer and settings; a miss
/// tokenises and writes it atomically. Returns the data and whether it came from the cache.
/// With [`BadLines::Error`] a malformed line fails before anything is cached.
pub fn tokenize_cached(
    path: &Path,
    enc: &dyn Encoder,
    cfg: &DataConfig,
    cache_dir: &Path,
) -> Result<(Tokenized, bool)> {
    let file = cache_path(path, enc, cfg, cache_dir)?;
    if let Ok(bytes) = std::fs::read(&file) {
        if let Ok(t) = serde_json::from_slice::<Tokenized>(&bytes) {
            return Ok((t, true));
        }
        // A cache file that does not parse is rebuilt (it is only a cache).
    }
    let t = tokenize_file(path, enc, cfg)?;
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::Io {
        context: format!("creating the token cache directory {}", cache_dir.display()),
        source: e,
    })?;
    let bytes = serde_json::to_vec(&t).map_err(|e| Error::InvalidArgument {
        op: "data",
        msg: format!("serialising the token cache: {e}"),
    })?;
    crate::io::write_atomic(&file, &bytes)?;
    Ok((t, false))
}

/// Splits `examples` into (train, eval): a seeded shuffle, then the first
/// `round(fraction · n)` examples (at least 1 when `fraction > 0` and there are 2 or more) go
/// to eval. The order within each part is the file order.
pub fn split_eval(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    if fraction <= 0.0 || n < 2 {
        return (examples, Vec::new());
    }
    let k = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_e7a1));
    let mut is_eval = vec![false; n];
    for &i in &idx[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (ex, e) in examples.into_iter().zip(is_eval) {
        if e {
            eval.push(ex)
        } else {
            train.push(ex)
        }
    }
    (train, eval)
}

/// The batches of one epoch as lists of example indices: a shuffle seeded by `(seed, epoch)`,
/// windows of `batch_size · 16` examples sorted by length and cut into batches (length
/// bucketing), then the batches shuffled. The last batch may be smaller.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, epoch));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in idx.chunks(batch_size * 16) {
        let mut w = window.to_vec();
        // Stable sort: ties keep the shuffled order.
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Packs examples into bins of at most `budget` tokens (an example longer than `budget` gets a
/// bin of its own): best-fit decreasing, examples taken longest first (a stable sort of
/// `order`, so ties keep `order`'s order), each into the open bin with the least room that
/// holds it (the oldest bin among equals), else into a new bin. Returns the bins as lists of
/// example indices, in the order they were opened, each in the order of its examples.
///
/// Best-fit decreasing fills bins nearly completely (it is within 11/9 of the optimum bin
/// count), and its bin count depends only on the multiset of lengths, not on `order`.
pub fn pack_examples(order: &[usize], lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    use std::collections::BTreeSet;
    let mut sorted = order.to_vec();
    sorted.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (room left, bin index) of the bins that can still take something.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in sorted {
        let len = lengths[i];
        match open.range((len, 0)..).next().copied() {
            Some((room, bin)) => {
                open.remove(&(room, bin));
                bins[bin].push(i);
                if room > len {
                    open.insert((room - len, bin));
                }
            }
            None => {
                bins.push(vec![i]);
                if budget > len {
                    open.insert((budget - len, bins.len() - 1));
                }
            }
        }
    }
    bins
}

/// The packed micro-batches of one epoch as lists of example indices: the examples shuffled
/// by `(seed, epoch)`, packed into bins of at most `budget` tokens by [`pack_examples`], and
/// the bins shuffled. Every example is in exactly one bin, whole; the number of bins is the
/// same in every epoch (it depends only on the lengths), which keeps the run's step count
/// fixed.
///
/// The trainer's budget is `batch_size × max_seq_len` tokens: the largest padded batch the same
/// settings could form, so a packed micro-batch never needs more memory than the padded
/// batches the memory check sizes for, while it holds about as many real tokens as a padded
/// batch of full-length examples.
pub fn epoch_packs(lengths: &[usize], budget: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, epoch) ^ 0x9ac4_1e57);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut bins = pack_examples(&idx, lengths, budget.max(1));
    bins.shuffle(&mut rng);
    bins
}

/// A 64-bit mix of two values (for per-epoch seeds).
fn mix(a: u64, b: u64) -> u64 {
    let mut h = DefaultHasher::new();
    // DefaultHasher::new() uses fixed keys, so this is stable within a build; the epoch order
    // only has to be stable between an interrupted run and its resumption.
    h.write_u64(a);
    h.write_u64(b);
    h.finish()
}

/// A micro-batch: `input_ids` and `targets`, both `[batch, seq]` row-major, where
/// `targets[b, i]` is the token that position `i` must predict, or [`IGNORE_INDEX`]. Padded
/// ([`make_batch`], `cu_seqlens` `None`) or packed ([`make_packed_batch`]: one row holding the
/// documents at the offsets `cu_seqlens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows (1 when packed).
    pub batch: usize,
    /// Columns (padded: the longest example's length minus one; packed: every input token).
    pub seq: usize,
    /// Input ids (padded: right-padded with `pad_id`).
    pub input_ids: Vec<u32>,
    /// Targets, [`IGNORE_INDEX`] where not counted (prompt, padding).
    pub targets: Vec<u32>,
    /// Counted targets.
    pub n_targets: usize,
    /// Real (non-padding) input tokens.
    pub n_tokens: usize,
    /// Packed: the documents' offsets in the row (`documents + 1` entries, 0 first, `seq`
    /// last); `None` for a padded batch.
    pub cu_seqlens: Option<Vec<u32>>,
}

/// Builds the padded batch of `examples` (each of >= 2 tokens): inputs are `ids[..len-1]`,
/// targets `ids[1..]` where labelled.
pub fn make_batch(examples: &[&Example], pad_id: u32) -> Batch {
    let seq = examples
        .iter()
        .map(|e| e.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let b = examples.len();
    let mut input_ids = vec![pad_id; b * seq];
    let mut targets = vec![IGNORE_INDEX; b * seq];
    let (mut n_targets, mut n_tokens) = (0, 0);
    for (r, e) in examples.iter().enumerate() {
        let n = e.ids.len().saturating_sub(1);
        for i in 0..n {
            input_ids[r * seq + i] = e.ids[i];
            if e.labels[i + 1] {
                targets[r * seq + i] = e.ids[i + 1];
                n_targets += 1;
            }
        }
        n_tokens += n;
    }
    Batch {
        batch: b,
        seq,
        input_ids,
        targets,
        n_targets,
        n_tokens,
        cu_seqlens: None,
    }
}

/// Builds the packed batch of `examples` (each of >= 2 tokens): one row, example after
/// example, each contributing its inputs `ids[..len-1]` and targets `ids[1..]` where labelled
/// (so no target crosses into the next document), with the documents' offsets in
/// `cu_seqlens`. No padding: `n_tokens == seq`.
pub fn make_packed_batch(examples: &[&Example]) -> Batch {
    let total: usize = examples.iter().map(|e| e.ids.len().saturating_sub(1)).sum();
    let mut input_ids = Vec::with_capacity(total);
    let mut targets = Vec::with_capacity(total);
    let mut cu_seqlens = Vec::with_capacity(examples.len() + 1);
    cu_seqlens.push(0u32);
    let mut n_targets = 0;
    for e in examples {
        let n = e.ids.len().saturating_sub(1);
        input_ids.extend_from_slice(&e.ids[..n]);
        for i in 0..n {
            if e.labels[i + 1] {
                targets.push(e.ids[i + 1]);
                n_targets += 1;
            } else {
                targets.push(IGNORE_INDEX);
            }
        }
        cu_seqlens.push(input_ids.len() as u32);
    }
    Batch {
        batch: 1,
        seq: total,
        input_ids,
        targets,
        n_targets,
        n_tokens: total,
        cu_seqlens: Some(cu_seqlens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_example_once_and_are_seeded() {
        let lengths: Vec<usize> = (0..53).map(|i| (i * 7) % 31 + 2).collect();
        let a = epoch_batches(&lengths, 4, 1, 0);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..53).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&lengths, 4, 1, 0));
        assert_ne!(a, epoch_batches(&lengths, 4, 1, 1));
    }

    #[test]
    fn batch_masks_padding_and_unlabelled_tokens() {
        let e1 = Example {
            ids: vec![5, 6, 7, 8],
            labels: vec![false, false, true, true],
        };
        let e2 = Example {
            ids: vec![9, 10],
            labels: vec![true, true],
        };
        let b = make_batch(&[&e1, &e2], 0);
        assert_eq!((b.batch, b.seq), (2, 3));
        assert_eq!(b.input_ids, vec![5, 6, 7, 9, 0, 0]);
        let i = IGNORE_INDEX;
        assert_eq!(b.targets, vec![i, 7, 8, 10, i, i]);
        assert_eq!((b.n_targets, b.n_tokens), (3, 4));
    }

    #[test]
    fn packs_hold_whole_examples_within_the_budget_and_are_seeded() {
        let lengths: Vec<usize> = (0..61).map(|i| (i * 13) % 29 + 2).collect();
        let budget = 40;
        let a = epoch_packs(&lengths, budget, 7, 0);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..61).collect::<Vec<_>>());
        for bin in &a {
            assert!(bin.iter().map(|&i| lengths[i]).sum::<usize>() <= budget);
        }
        assert_eq!(a, epoch_packs(&lengths, budget, 7, 0));
        let b = epoch_packs(&lengths, budget, 7, 1);
        assert_ne!(a, b);
        // The bin count is the same in every epoch, and near the lower bound.
        assert_eq!(a.len(), b.len());
        let lower = lengths.iter().sum::<usize>().div_ceil(budget);
        assert!(
            a.len() <= lower + lower / 5 + 1,
            "{} bins, bound {lower}",
            a.len()
        );
        // An example longer than the budget gets a bin of its own.
        assert_eq!(
            pack_examples(&[0, 1, 2], &[5, 50, 5], 20),
            vec![vec![1], vec![0, 2]]
        );
    }

    #[test]
    fn packed_batch_keeps_documents_apart() {
        let e1 = Example {
            ids: vec![5, 6, 7, 8],
            labels: vec![false, false, true, true],
        };
        let e2 = Example {
            ids: vec![9, 10],
            labels: vec![true, true],
        };
        let b = make_packed_batch(&[&e1, &e2]);
        assert_eq!((b.batch, b.seq), (1, 4));
        assert_eq!(b.input_ids, vec![5, 6, 7, 9]);
        let i = IGNORE_INDEX;
        // Position 2 (token 7) predicts 8, the end of e1; nothing predicts 9 from 7.
        assert_eq!(b.targets, vec![i, 7, 8, 10]);
        assert_eq!(b.cu_seqlens, Some(vec![0, 3, 4]));
        assert_eq!((b.n_targets, b.n_tokens), (3, 4));
    }

    #[test]
    fn eval_split_is_seeded_and_disjoint() {
        let ex: Vec<Example> = (0..10)
            .map(|i| Example {
                ids: vec![i, i],
                labels: vec![true, true],
            })
            .collect();
        let (t, e) = split_eval(ex.clone(), 0.2, 3);
        assert_eq!((t.len(), e.len()), (8, 2));
        assert_eq!(split_eval(ex, 0.2, 3).1, e);
    }
}
