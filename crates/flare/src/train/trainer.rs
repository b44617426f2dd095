//! [`Trainer`]: LoRA fine-tuning of a [`Transformer`] on tokenised JSONL data, with AdamW,
//! a warmup + decay schedule, gradient accumulation, global-norm clipping, periodic eval,
//! atomic checkpoints and exact resumption.
//!
//! Only the LoRA matrices are trained (f32, on a base of any float dtype): the base weights are
//! frozen tensors, and the fused LoRA op never computes their gradient. One optimizer step
//! consumes `grad_accum` batches; the loss of a step is the mean over all of its counted
//! tokens (each micro-batch's summed NLL is divided by the step's total token count, so the
//! accumulated gradient is the gradient of that mean).
//!
//! Layout of `output_dir`:
//!
//! - `checkpoint-<step>/`: `adapter_config.json` + `adapter_model.safetensors` (PEFT),
//!   `optimizer.safetensors` (AdamW moments), `trainer_state.json` ([`TrainState`]: step,
//!   epoch, position in the epoch's batch order, the run's config and the fingerprints of its
//!   model, tokenizer and data) and `loss.png`. Only the newest `save_total_limit` are kept.
//! - `adapter/`: the final adapter (`adapter_config.json` + `adapter_model.safetensors`).
//! - `metrics.jsonl`: one JSON object per step (and per eval); only ever appended to.
//! - `loss.png`: the loss curve, rewritten at each checkpoint and at the end.
//! - `token-cache/`: the tokenised data ([`super::data::tokenize_cached`]).
//!
//! What the trainer guarantees:
//!
//! - Checkpoint and adapter directories are written as units ([`crate::io::write_dir_atomic`]):
//!   a kill at any point leaves the complete previous directory or the complete new one, never
//!   new weights beside an old `adapter_config.json`. What a kill leaves behind (temporary
//!   files and directories) is removed when the next run starts ([`Trainer::leftovers`]).
//! - Nothing in `output_dir` is touched before the whole run is validated: the config, the
//!   model (loaded, and run once on one token: a config the ops refuse or non-finite weights
//!   fail here) and the data.
//! - A fresh run ([`Trainer::new`]) refuses an `output_dir` that already holds a run
//!   (checkpoints, a final adapter or metrics): resume it or use another directory.
//! - A checkpoint records the run it belongs to (the fingerprints of [`RunIdentity`] and every
//!   setting that changes the result); [`Trainer::resume`] refuses a checkpoint of another run,
//!   naming each field that differs ([`super::identity::differences`]). The run's length is
//!   one of them: a decaying schedule spans the whole run, so `max_steps` can change on resume
//!   only under the constant schedule.
//! - A non-finite loss or gradient norm stops the run before the step's update
//!   ([`Error::NonFinite`]), and no adapter or checkpoint with a non-finite value is ever
//!   written: the last checkpoint and adapter stay as they were.
//! - `metrics.jsonl` is appended to, never truncated: a resume appends
//!   `{"step": N, "resumed_from": "<checkpoint>"}` and continues with step N + 1, so lines of
//!   an interrupted tail (steps after N, before that line) stay; the last line of a step is
//!   the one that counts. An eval is logged once per step: resuming a finished run does not
//!   evaluate it again.
//!
//! Micro-batches are packed by default (`packing`): whole examples concatenated up to
//! `batch_size × max_seq_len` tokens, run by [`Transformer::forward_packed`] so that each
//! attends only to itself ([`super::data::epoch_packs`]); with packing off, `batch_size`
//! examples right-padded ([`super::data::epoch_batches`]). Either way the loss, the prompt
//! masking and the `tokens` count (real tokens, never padding) mean the same.
//!
//! Determinism: on the CPU a run is a function of its config and data. The order of an epoch
//! derives from `(seed, epoch)` ([`super::data::epoch_packs`], [`super::data::epoch_batches`])
//! and the adapters' initial values from `seed`; together with the checkpointed step, epoch,
//! batch position, optimizer moments and adapter weights, that is the whole state, so a resumed run reproduces the
//! uninterrupted run's losses exactly. LoRA dropout is seeded too: the masks of micro-batch `k`
//! of step `n` derive from `(seed, n, k)` ([`Transformer::set_dropout_seed`]).
//!
//! Data parallel ([`super::distributed`]; [`Trainer::new_with`], [`Trainer::resume_with`]): a
//! run of several ranks (one process per GPU) is the same run as one rank's. Every rank
//! forms the same `grad_accum` micro-batches of each step and runs its contiguous share of
//! them ([`super::distributed::shard_range`]; dropout keeps the micro-batch's index in the
//! step); each micro-batch's NLL is divided by the token count of the whole step, which every
//! rank computes from the whole step, so the ranks' gradients and losses are shares of the
//! one-rank values and their **sum** over the ranks (one all-reduce of one bucket) is the
//! one-rank gradient and loss, up to the order of the float additions. Then every rank clips
//! and steps AdamW identically, so the adapters stay identical. The world size is not part of
//! the run's identity: a run may resume on another number of GPUs. Only rank 0 writes to
//! `output_dir` (checkpoints, metrics, plots, the final adapter) and evaluates; every rank
//! resumes from the same checkpoint.
//!
//! Gradient checkpointing ([`TrainConfig::gradient_checkpointing`], decided by
//! [`super::memory::check_memory`] and reported by [`Trainer::checkpointing`]) recomputes each
//! layer in the backward: the losses and gradients are those of the run without it, so a
//! resume may switch it (it is not part of the run's identity).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use super::config::TrainConfig;
use super::config::{invalid, io_err};
use super::data::{
    epoch_batches, epoch_packs, make_batch, make_packed_batch, pack_examples, split_eval,
    tokenize_cached, Batch, Encoder, Example,
};
use super::distributed::{shard_range, Collective, World};
use super::identity::{differences, RunIdentity};
use super::optim::{clip_scale, global_grad_norm, AdamW};
use super::plot::write_loss_png;
use crate::io::{write_dir_atomic, Leftover};
use crate::lora::dropout::mix64;
use crate::lora::{load_adapter, save_adapter, Adapter, AdapterConfig};
use crate::models::Transformer;
use crate::ops::cross_entropy::IGNORE_INDEX;
use crate::ops::linear_cross_entropy;
use crate::{Error, Result};

/// The adapter name flare trains under (PEFT's default).
pub const ADAPTER_NAME: &str = "default";
const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";
const PLOT_FILE: &str = "loss.png";
/// The directory of the final adapter in `output_dir`.
pub const ADAPTER_DIR: &str = "adapter";
/// The token cache's directory in `output_dir`.
const CACHE_DIR: &str = "token-cache";

/// The resumable state of a run, saved as `trainer_state.json` in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// The epoch the next batch comes from.
    pub epoch: u64,
    /// Index of the next batch in that epoch's order.
    pub batch_in_epoch: usize,
    /// Real input tokens consumed so far.
    pub tokens_seen: u64,
    /// The seed the batch order and initialisation derive from (the RNG state: the order of
    /// an epoch is a pure function of `(seed, epoch)`).
    pub seed: u64,
    /// The learning rate of the next step.
    pub next_lr: f64,
    /// The config the run was started with.
    pub config: TrainConfig,
    /// The fingerprints of the run's model, tokenizer and data (absent in checkpoints of
    /// flare versions before run identities, which cannot be resumed).
    #[serde(default)]
    pub identity: Option<RunIdentity>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step number (1-based: the count of steps done).
    pub step: u64,
    /// Mean loss over the step's counted tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real input tokens of the step.
    pub tokens: usize,
    /// Epoch (fractional: epochs done + position in the current one).
    pub epoch: f64,
    /// Seconds the step took.
    pub seconds: f64,
}

/// What the trainer reports while running.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An optimizer step finished.
    Step(StepMetrics),
    /// An eval pass finished: (step, mean eval loss).
    Eval {
        /// Steps done.
        step: u64,
        /// Mean loss over the eval tokens.
        loss: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Steps done.
        step: u64,
        /// Its directory.
        dir: PathBuf,
    },
    /// The run finished and the final adapter was written to `dir`.
    Done {
        /// Where the final adapter is.
        dir: PathBuf,
    },
}

/// Data statistics, for the report at the start of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataStats {
    /// Training examples.
    pub train_examples: usize,
    /// Eval examples.
    pub eval_examples: usize,
    /// Malformed lines skipped, as `file:line: message`.
    pub bad_lines: Vec<String>,
    /// Examples truncated to `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped for having no loss token.
    pub dropped_empty: usize,
    /// Whether the tokenised data came from the cache.
    pub from_cache: bool,
}

/// A LoRA fine-tuning run.
pub struct Trainer {
    config: TrainConfig,
    model: Transformer,
    encoder: Box<dyn Encoder>,
    opt: AdamW,
    /// Module path of each adapted layer, in the optimizer's parameter order (A then B each).
    modules: Vec<String>,
    train: Vec<Example>,
    eval: Vec<Example>,
    lengths: Vec<usize>,
    batches_per_epoch: usize,
    order: Vec<Vec<usize>>,
    order_epoch: u64,
    state: TrainState,
    pad_id: u32,
    stats: DataStats,
    train_curve: Vec<(u64, f64)>,
    eval_curve: Vec<(u64, f64)>,
    leftovers: Vec<Leftover>,
    checkpointing: super::memory::CheckpointDecision,
    collective: Collective,
    /// The captured forward and backward passes, by batch shape.
    graphs: super::step_graph::StepGraphs,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("state", &self.state)
            .field("collective", &self.collective)
            .finish()
    }
}

/// What in `dir` shows that a run already wrote there (empty: nothing).
fn run_traces(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then_some(step)
        })
        .collect();
    steps.sort_unstable();
    match steps.as_slice() {
        [] => {}
        [one] => found.push(format!("checkpoint-{one}")),
        [first, .., last] => found.push(format!(
            "{} checkpoints, checkpoint-{first} to checkpoint-{last}",
            steps.len()
        )),
    }
    if dir.join(ADAPTER_DIR).exists() {
        found.push(format!("a final adapter in {ADAPTER_DIR}/"));
    }
    if dir.join("adapter_config.json").exists() || dir.join("adapter_model.safetensors").exists() {
        found.push("an adapter (adapter_config.json, adapter_model.safetensors)".into());
    }
    if std::fs::metadata(dir.join(METRICS_FILE)).is_ok_and(|m| m.len() > 0) {
        found.push(METRICS_FILE.into());
    }
    found
}

/// Reads a checkpoint's `trainer_state.json`; errors name the file.
fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let state_path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(io_err(format!("reading {}", state_path.display())))?;
    let bad = |e: serde_json::Error| Error::Io {
        context: state_path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
    // Checkpoints of flare versions before packing record no `packing`: their runs were padded
    // (the config's default, `true`, would pass them for packed runs).
    let unpacked = value
        .get("config")
        .is_some_and(|c| c.is_object() && c.get("packing").is_none());
    let mut state: TrainState = serde_json::from_value(value).map_err(bad)?;
    if unpacked {
        state.config.packing = false;
    }
    Ok(state)
}

/// `Err` naming `what` unless every value of `t` is finite.
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let sum = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} holds non-finite values (sum {sum}): refusing to write it"
        )))
    }
}

/// The summed NLL over `b`'s counted targets (a scalar, f32 or f64): one micro-batch's
/// forward and loss exactly as [`Trainer::step`] computes them. A packed batch (with
/// `cu_seqlens`) runs [`Transformer::forward_hidden_packed`], a padded one
/// [`Transformer::forward_hidden`]; the LM head and the loss are one fused op
/// ([`linear_cross_entropy()`]), so the `[tokens, vocab]` logits are never held whole. With
/// `grad`, autograd reaches the adapters (the caller runs `loss.backward()`, then
/// [`Transformer::merge_checkpoint_grads`] when the model checkpoints its layers); without,
/// the hidden states are detached and the fused loss computes no gradient. Public so that
/// `flare bench train` times the trainer's own path.
///
/// Errors: a target outside the model's vocabulary (checked here, on the host: the fused op
/// does not read device targets back), and the model's own errors.
pub fn batch_nll_sum(model: &Transformer, b: &Batch, grad: bool) -> Result<Tensor> {
    check_targets(model, b)?;
    let dev = model.device();
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.batch, b.seq), dev)?;
    let targets = Tensor::from_vec(b.targets.clone(), b.batch * b.seq, dev)?;
    // The inputs above are made first: under the cache, small host data is keyed by content.
    let _params = crate::runtime::cache_launch_params(dev);
    nll_sum_of(model, &ids, &targets, b.cu_seqlens.as_deref(), grad)
}

/// Refuses a batch with a target outside the model's vocabulary, naming it.
pub(crate) fn check_targets(model: &Transformer, b: &Batch) -> Result<()> {
    let vocab = model.lm_head_weight().dim(0)?;
    if let Some((i, &t)) = b
        .targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != IGNORE_INDEX && t as usize >= vocab)
    {
        return Err(Error::InvalidArgument {
            op: "train",
            msg: format!(
                "target token id {t} (position {i} of the batch) is outside the model's \
                 vocabulary of {vocab}"
            ),
        });
    }
    Ok(())
}

/// [`batch_nll_sum`] of inputs already on the device: `ids` `[batch, seq]`, `targets`
/// `[batch · seq]` (checked against the vocabulary by the caller), `cu_seqlens` for a packed
/// row. Shared with the captured step ([`super::step_graph`]), whose inputs live in fixed
/// device buffers.
pub(crate) fn nll_sum_of(
    model: &Transformer,
    ids: &Tensor,
    targets: &Tensor,
    cu_seqlens: Option<&[u32]>,
    grad: bool,
) -> Result<Tensor> {
    let head = model.lm_head_weight();
    // The final-normed hidden states, one row per target: [tokens, hidden].
    let hidden = match cu_seqlens {
        Some(cu) => model.forward_hidden_packed(ids, cu)?,
        None => {
            let h = model.forward_hidden(ids)?;
            let (b, s, width) = h.dims3()?;
            h.reshape((b * s, width))?
        }
    };
    let (hidden, head) = if grad {
        (hidden, head.clone())
    } else {
        (hidden.detach(), head.detach())
    };
    linear_cross_entropy(&hidden, &head, targets, IGNORE_INDEX)
}

impl Trainer {
    /// Starts a run: validates the config, loads the model onto `device` (and runs it once on
    /// one token), tokenises the data (through the cache in `<output_dir>/token-cache`),
    /// injects fresh adapters (seeded) and builds the optimizer. Only then is `output_dir`
    /// touched: created if needed, and cleaned of what a killed run left behind
    /// ([`Self::leftovers`]).
    ///
    /// An `output_dir` that already holds a run (checkpoints, a final adapter, or a non-empty
    /// `metrics.jsonl`) is refused, with what it holds and whether its newest checkpoint is of
    /// this run: resume it ([`Self::resume`]), or choose another directory.
    pub fn new(config: TrainConfig, device: &Device, encoder: Box<dyn Encoder>) -> Result<Self> {
        Self::new_with(config, device, encoder, Collective::single())
    }

    /// [`new`](Self::new) as one rank of a data-parallel run: `collective` (built by
    /// [`Collective::connect`] on `device`, this rank's GPU) sums the ranks' gradients each
    /// step. Only rank 0 touches `output_dir` (the token cache aside: every rank reads it, and
    /// writes it atomically on a miss). `grad_accum` must be at least the world size, so that
    /// every rank has a micro-batch in every step.
    pub fn new_with(
        config: TrainConfig,
        device: &Device,
        encoder: Box<dyn Encoder>,
        collective: Collective,
    ) -> Result<Self> {
        config.validate()?;
        let identity = RunIdentity::compute(&config, encoder.fingerprint()?)?;
        let out = &config.output_dir;
        let traces = run_traces(out);
        if !traces.is_empty() {
            let newest = match Self::latest_checkpoint(out) {
                None => String::new(),
                Some(c) => {
                    let name = c.file_name().unwrap_or_default().to_string_lossy();
                    match read_state(&c) {
                        Ok(TrainState {
                            config: saved,
                            identity: Some(id),
                            ..
                        }) => {
                            let d = differences(&config, &identity, &saved, &id);
                            if d.is_empty() {
                                format!("; its newest checkpoint, {name}, is of this very run")
                            } else {
                                let list: Vec<String> = d.iter().map(|d| d.to_string()).collect();
                                format!(
                                    "; its newest checkpoint, {name}, is of another run ({})",
                                    list.join("; ")
                                )
                            }
                        }
                        _ => format!("; its newest checkpoint, {name}, records no run identity"),
                    }
                }
            };
            return Err(Error::OutputDirInUse {
                dir: out.display().to_string(),
                holds: format!("{}{newest}", traces.join(", ")),
            });
        }
        let mut t = Self::build(config, device, encoder, identity, collective)?;
        t.prepare_output_dir()?;
        Ok(t)
    }

    /// [`new`](Self::new) with the tokenizer of the model directory
    /// ([`crate::text::Tokenizer::from_dir`]).
    pub fn from_config(config: TrainConfig, device: &Device) -> Result<Self> {
        let tok = crate::text::Tokenizer::from_dir(&config.model)?;
        Self::new(config, device, Box::new(tok))
    }

    /// [`resume`](Self::resume) with the tokenizer of the model directory.
    pub fn resume_from_config(
        config: TrainConfig,
        device: &Device,
        checkpoint: impl AsRef<Path>,
    ) -> Result<Self> {
        let tok = crate::text::Tokenizer::from_dir(&config.model)?;
        Self::resume(config, device, Box::new(tok), checkpoint)
    }

    /// Continues the run saved in checkpoint directory `checkpoint` (see [`Self::save_checkpoint`]):
    /// the adapter weights, optimizer moments, step, epoch and batch position are restored.
    ///
    /// `config` must describe the checkpoint's run: the same model, tokenizer and data (by
    /// fingerprint, not path) and the same settings wherever they change the result (see
    /// [`super::identity`]); otherwise [`Error::RunMismatch`] lists every field that differs,
    /// before anything is loaded or written. The output settings, device, eval and checkpoint
    /// frequency may change, and so may `max_steps` under the constant schedule.
    ///
    /// `metrics.jsonl` is appended to: a line `{"step": N, "resumed_from": "<checkpoint>"}`
    /// marks the resume; the loss curve keeps the steps up to N.
    pub fn resume(
        config: TrainConfig,
        device: &Device,
        encoder: Box<dyn Encoder>,
        checkpoint: impl AsRef<Path>,
    ) -> Result<Self> {
        Self::resume_with(config, device, encoder, checkpoint, Collective::single())
    }

    /// [`resume`](Self::resume) as one rank of a data-parallel run (see [`Self::new_with`]):
    /// every rank reads the same checkpoint (on several hosts, at the same path on each), so
    /// all restart with the same adapters, moments and data position; only rank 0 appends the
    /// resume line to `metrics.jsonl`. The checkpoint may come from a run on another number of
    /// GPUs.
    pub fn resume_with(
        config: TrainConfig,
        device: &Device,
        encoder: Box<dyn Encoder>,
        checkpoint: impl AsRef<Path>,
        collective: Collective,
    ) -> Result<Self> {
        let dir = checkpoint.as_ref();
        config.validate()?;
        let saved = read_state(dir)?;
        let Some(saved_identity) = &saved.identity else {
            return Err(invalid(format!(
                "cannot resume from {}: its {STATE_FILE} records no run identity (written by \
                 an older flare), so it cannot be checked to belong to this run; start a new \
                 run in another output directory",
                dir.display()
            )));
        };
        let identity = RunIdentity::compute(&config, encoder.fingerprint()?)?;
        let diffs = differences(&config, &identity, &saved.config, saved_identity);
        if !diffs.is_empty() {
            return Err(Error::RunMismatch {
                checkpoint: dir.display().to_string(),
                differences: diffs.iter().map(|d| d.to_string()).collect(),
            });
        }
        // The run goes on in `output_dir`, whose old checkpoints it rotates away: they must be
        // this run's too.
        let own = dir.canonicalize().ok();
        for (_, c) in Self::checkpoints(&config.output_dir) {
            if c.canonicalize().ok() == own {
                continue;
            }
            let why = match read_state(&c) {
                Ok(TrainState {
                    config: sc,
                    identity: Some(si),
                    ..
                }) => {
                    let d = differences(&config, &identity, &sc, &si);
                    if d.is_empty() {
                        continue;
                    }
                    d.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                }
                _ => "it records no run identity".into(),
            };
            return Err(invalid(format!(
                "cannot resume into {}: it holds {}, a checkpoint of another run ({why}), which \
                 this run's checkpoints would rotate away; use another output directory",
                config.output_dir.display(),
                c.display()
            )));
        }
        let mut t = Self::build(config, device, encoder, identity, collective)?;
        if t.state.total_steps < saved.step {
            return Err(invalid(format!(
                "cannot resume from {}: it is at step {}, past this run's {} steps",
                dir.display(),
                saved.step,
                t.state.total_steps
            )));
        }
        let adapter = load_adapter(dir, device)?;
        for (path, (a, b)) in &adapter.tensors {
            let layer = t.model.lora_module_mut(path).ok_or_else(|| {
                invalid(format!(
                    "checkpoint adapter has a module `{path}` the model lacks"
                ))
            })?;
            layer.set_adapter_weights(ADAPTER_NAME, a, b)?;
        }
        let optim_path = dir.join(OPTIM_FILE);
        crate::safetensors_header::read_safetensors_header(&optim_path)?;
        let tensors = candle_core::safetensors::load(&optim_path, device)?;
        t.opt
            .load_state(&tensors.into_iter().collect(), saved.step)
            .map_err(|e| crate::hf_json::bad_file(&optim_path, e.to_string()))?;
        t.state.step = saved.step;
        t.state.epoch = saved.epoch;
        t.state.batch_in_epoch = saved.batch_in_epoch;
        t.state.tokens_seen = saved.tokens_seen;
        t.state.next_lr = t.config.schedule.lr(
            t.config.lr,
            saved.step,
            t.state.total_steps,
            t.config.warmup_steps,
        );
        t.load_curves(saved.step);
        t.prepare_output_dir()?;
        if t.world().is_main() {
            t.append_metric(&serde_json::json!({
                "step": saved.step,
                "resumed_from": dir.display().to_string(),
            }))?;
        }
        Ok(t)
    }

    /// Rebuilds the loss curves from `metrics.jsonl`, up to step `upto`: a resume line drops
    /// the points after its step (they belonged to an interrupted tail), the last line of a
    /// step wins.
    fn load_curves(&mut self, upto: u64) {
        let text =
            std::fs::read_to_string(self.config.output_dir.join(METRICS_FILE)).unwrap_or_default();
        let (mut train, mut eval) = (BTreeMap::new(), BTreeMap::new());
        // A line cut short by a kill does not parse, and is skipped.
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            if v.get("resumed_from").is_some() {
                train.retain(|&s, _| s <= step);
                eval.retain(|&s, _| s <= step);
            } else if let Some(x) = v.get("loss").and_then(|x| x.as_f64()) {
                train.insert(step, x);
            } else if let Some(x) = v.get("eval_loss").and_then(|x| x.as_f64()) {
                eval.insert(step, x);
            }
        }
        self.train_curve = train.into_iter().filter(|&(s, _)| s <= upto).collect();
        self.eval_curve = eval.into_iter().filter(|&(s, _)| s <= upto).collect();
    }

    /// Creates `output_dir` and removes what a killed run left in it and in its token cache
    /// (rank 0 only: the other ranks never write there).
    fn prepare_output_dir(&mut self) -> Result<()> {
        if !self.world().is_main() {
            return Ok(());
        }
        let out = &self.config.output_dir;
        std::fs::create_dir_all(out).map_err(io_err(format!(
            "creating output directory {}",
            out.display()
        )))?;
        self.leftovers = crate::io::remove_stale(out)?;
        self.leftovers
            .extend(crate::io::remove_stale(out.join(CACHE_DIR))?);
        Ok(())
    }

    /// What was cleaned up in `output_dir` when the run started: temporary files and
    /// directories a killed run left, and directories whose replacement a kill interrupted.
    pub fn leftovers(&self) -> &[Leftover] {
        &self.leftovers
    }

    /// The fingerprints of this run's model, tokenizer and data.
    pub fn identity(&self) -> Option<&RunIdentity> {
        self.state.identity.as_ref()
    }

    /// The newest `checkpoint-<step>` directory in `output_dir`, if any.
    pub fn latest_checkpoint(output_dir: impl AsRef<Path>) -> Option<PathBuf> {
        Self::checkpoints(output_dir.as_ref()).pop().map(|(_, p)| p)
    }

    /// The complete `checkpoint-<step>` directories of `dir`, oldest first.
    fn checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path()
                    .join(STATE_FILE)
                    .is_file()
                    .then_some((step, e.path()))
            })
            .collect();
        v.sort();
        v
    }

    fn build(
        config: TrainConfig,
        device: &Device,
        encoder: Box<dyn Encoder>,
        identity: RunIdentity,
        collective: Collective,
    ) -> Result<Self> {
        config.validate()?;
        let world = collective.world();
        if config.grad_accum < world.world_size {
            return Err(invalid(format!(
                "grad_accum is {}, below the world size {}: each of the {} ranks runs its share \
                 of a step's grad_accum micro-batches, so some would have none; set grad_accum \
                 to a multiple of {} (the global batch is batch_size x grad_accum whatever the \
                 number of GPUs)",
                config.grad_accum, world.world_size, world.world_size, world.world_size
            )));
        }
        let dtype = config.parsed_dtype()?;
        let plan = super::memory::check_memory(&config, device)?;
        let mut model = Transformer::from_dir(&config.model, dtype, device)?;
        model.set_gradient_checkpointing(plan.checkpointing.on);
        model.set_checkpoint_offload(plan.checkpointing.offload);
        // Run the model once, on one token, before anything is written: what its config makes
        // the ops refuse (a negative `rms_norm_eps`, say) fails here, not at the first step,
        // and so do weights that hold NaN or Inf.
        let probe = model.forward(&Tensor::zeros((1, 1), DType::U32, device)?)?;
        if check_finite(&probe, "").is_err() {
            return Err(invalid(format!(
                "the model in {} gives non-finite logits for a one-token input: its weights \
                 hold NaN or Inf values",
                config.model.display()
            )));
        }
        let lora = config.lora();
        let mut modules = Vec::new();
        let mut params: Vec<(String, Var)> = Vec::new();
        for (i, (path, layer)) in model.lora_modules_mut().into_iter().enumerate() {
            if !lora.targets(&path) {
                continue;
            }
            // f32 adapters on any base (f64 on an f64 base, for gradient checks).
            layer.add_adapter(ADAPTER_NAME, &lora, config.seed.wrapping_add(i as u64))?;
            layer.set_active(Some(ADAPTER_NAME))?;
            layer.set_training(true);
            let vars = layer.trainable_vars();
            params.push((format!("{path}.lora_A"), vars[0].clone()));
            params.push((format!("{path}.lora_B"), vars[1].clone()));
            modules.push(path);
        }
        if modules.is_empty() {
            return Err(invalid(format!(
                "no module of the model matches target_modules {:?}",
                config.target_modules
            )));
        }
        let opt = AdamW::new(params, config.adamw())?;

        let cache = config.output_dir.join("token-cache");
        let dcfg = config.data_config();
        let mut stats = DataStats::default();
        let note = |file: &Path, t: &super::data::Tokenized, stats: &mut DataStats| {
            stats.bad_lines.extend(
                t.bad_lines
                    .iter()
                    .map(|b| format!("{}:{}: {}", file.display(), b.line, b.msg)),
            );
            stats.truncated += t.truncated;
            stats.dropped_empty += t.dropped_empty;
        };
        let (tok, hit) = tokenize_cached(&config.data, encoder.as_ref(), &dcfg, &cache)?;
        stats.from_cache = hit;
        note(&config.data, &tok, &mut stats);
        let (train, eval) = match &config.eval_data {
            Some(f) => {
                let (e, _) = tokenize_cached(f, encoder.as_ref(), &dcfg, &cache)?;
                note(f, &e, &mut stats);
                (tok.examples, e.examples)
            }
            None => split_eval(tok.examples, config.eval_fraction, config.seed),
        };
        if train.is_empty() {
            return Err(invalid(format!(
                "{} holds no usable training example",
                config.data.display()
            )));
        }
        stats.train_examples = train.len();
        stats.eval_examples = eval.len();
        let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
        // Packed: the same count every epoch (see `epoch_packs`).
        let order = Self::epoch_order(&config, &lengths, 0);
        let batches_per_epoch = order.len();
        let total_steps = config.max_steps.unwrap_or_else(|| {
            (config.epochs * batches_per_epoch as u64).div_ceil(config.grad_accum as u64)
        });
        let pad_id = encoder.eos_token_id().unwrap_or(0);
        let state = TrainState {
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            tokens_seen: 0,
            seed: config.seed,
            next_lr: config
                .schedule
                .lr(config.lr, 0, total_steps, config.warmup_steps),
            config: config.clone(),
            identity: Some(identity),
        };
        let graphs = super::step_graph::StepGraphs::new(
            model.device(),
            config.lora_dropout,
            collective.world().world_size,
        );
        Ok(Trainer {
            config,
            model,
            encoder,
            opt,
            modules,
            train,
            eval,
            lengths,
            batches_per_epoch,
            order,
            order_epoch: 0,
            state,
            pad_id,
            stats,
            train_curve: Vec::new(),
            eval_curve: Vec::new(),
            leftovers: Vec::new(),
            checkpointing: plan.checkpointing,
            graphs,
            collective,
        })
    }

    /// Whether the run uses gradient checkpointing, and why (printable: `gradient
    /// checkpointing: on (estimate 91.20 GiB > free 78.50 GiB)`).
    pub fn checkpointing(&self) -> &super::memory::CheckpointDecision {
        &self.checkpointing
    }

    /// This process's place in the run ([`World::SINGLE`] unless data parallel).
    pub fn world(&self) -> World {
        self.collective.world()
    }

    /// The config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The run's state (step, epoch, position...).
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// What the data held.
    pub fn data_stats(&self) -> &DataStats {
        &self.stats
    }

    /// The model, with its adapters (active, in training mode).
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// The model, mutably (e.g. to switch training mode off for generation).
    pub fn model_mut(&mut self) -> &mut Transformer {
        &mut self.model
    }

    /// The encoder (tokenizer) the data was tokenised with.
    pub fn encoder(&self) -> &dyn Encoder {
        self.encoder.as_ref()
    }

    /// Whether every step has been taken.
    pub fn is_done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    /// The tokens of a packed micro-batch at most: `batch_size × max_seq_len` (see
    /// [`epoch_packs`] for why).
    fn pack_budget(config: &TrainConfig) -> usize {
        config.batch_size.saturating_mul(config.max_seq_len)
    }

    /// The micro-batches of epoch `epoch` as lists of example indices: packed or padded as the
    /// config says, a function of `(seed, epoch)`.
    fn epoch_order(config: &TrainConfig, lengths: &[usize], epoch: u64) -> Vec<Vec<usize>> {
        if config.packing {
            epoch_packs(lengths, Self::pack_budget(config), config.seed, epoch)
        } else {
            epoch_batches(lengths, config.batch_size, config.seed, epoch)
        }
    }

    /// The micro-batch of `examples`, packed or padded as the config says.
    fn make(&self, examples: &[&Example]) -> Batch {
        if self.config.packing {
            make_packed_batch(examples)
        } else {
            make_batch(examples, self.pad_id)
        }
    }

    /// The next batch of the data stream, advancing the position (epochs roll over).
    fn next_batch(&mut self) -> Batch {
        if self.state.batch_in_epoch >= self.batches_per_epoch {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
        }
        if self.order_epoch != self.state.epoch {
            self.order = Self::epoch_order(&self.config, &self.lengths, self.state.epoch);
            self.order_epoch = self.state.epoch;
        }
        let idx = &self.order[self.state.batch_in_epoch];
        let exs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
        self.state.batch_in_epoch += 1;
        self.make(&exs)
    }

    /// Summed NLL over a batch's counted targets ([`batch_nll_sum`] of the run's model).
    fn batch_nll_sum(&self, b: &Batch, grad: bool) -> Result<Tensor> {
        batch_nll_sum(&self.model, b, grad)
    }

    /// One optimizer step over `grad_accum` batches. `None` when every step is done.
    ///
    /// In a data-parallel run every rank forms all of the step's batches (to count its
    /// tokens), runs its share of them, and the gradients and the loss are summed over the
    /// ranks before the norm, the clipping and AdamW (see the module's doc); only rank 0
    /// appends the step to `metrics.jsonl`.
    pub fn step(&mut self) -> Result<Option<StepMetrics>> {
        if self.is_done() {
            return Ok(None);
        }
        let t0 = Instant::now();
        // Where the data stream was, to rewind to if the step is refused.
        let position = (self.state.epoch, self.state.batch_in_epoch);
        let batches: Vec<_> = (0..self.config.grad_accum)
            .map(|_| self.next_batch())
            .collect();
        let total: usize = batches.iter().map(|b| b.n_targets).sum();
        let tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let inv = 1.0 / total.max(1) as f64;
        let params: Vec<Var> = self.opt.params().to_vec();
        let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss = 0.0;
        let world = self.world();
        let mine = shard_range(batches.len(), world.rank, world.world_size);
        for (k, b) in batches.iter().enumerate().skip(mine.start).take(mine.len()) {
            if b.n_targets == 0 {
                continue;
            }
            let seed = mix64(self.config.seed ^ mix64(self.state.step ^ mix64(k as u64)));
            self.model.set_dropout_seed(Some(seed));
            // Forward, loss and backward: a replayed CUDA graph where that applies.
            let pass = self.graphs.pass(&self.model, &params, b, inv)?;
            loss += pass.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            // A graph's gradients are its output buffers, which the next micro-batch of the
            // same shape overwrites: the first one kept is copied when more follow.
            let more = k + 1 < mine.end;
            for (slot, g) in acc.iter_mut().zip(pass.grads) {
                if let Some(g) = g {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None if pass.graphed && more => g.copy()?,
                        None => g,
                    });
                }
            }
        }
        // Every rank's share was divided by the whole step's count: the sums are the step's
        // gradient and loss (nothing to do on one rank).
        let mut sums = [loss];
        self.collective
            .sum_gradients(&params, &mut acc, &mut sums)?;
        let [loss] = sums;
        let norm = global_grad_norm(&acc)?;
        if !(loss.is_finite() && norm.is_finite()) {
            // The update would write non-finite values into the adapter: stop before it, with
            // the weights, moments and data position of the last good step.
            (self.state.epoch, self.state.batch_in_epoch) = position;
            return Err(Error::NonFinite {
                step: self.state.step + 1,
                loss,
                grad_norm: norm,
            });
        }
        let scale = clip_scale(norm, self.config.max_grad_norm);
        let lr = self.config.schedule.lr(
            self.config.lr,
            self.state.step,
            self.state.total_steps,
            self.config.warmup_steps,
        );
        self.opt.step_with(&acc, lr, scale)?;
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        self.state.next_lr = self.config.schedule.lr(
            self.config.lr,
            self.state.step,
            self.state.total_steps,
            self.config.warmup_steps,
        );
        let m = StepMetrics {
            step: self.state.step,
            loss,
            lr,
            grad_norm: norm,
            tokens,
            epoch: self.state.epoch as f64
                + self.state.batch_in_epoch as f64 / self.batches_per_epoch as f64,
            seconds: t0.elapsed().as_secs_f64(),
        };
        self.train_curve.push((m.step, m.loss));
        if world.is_main() {
            self.append_metric(&serde_json::to_value(&m).unwrap_or_default())?;
        }
        Ok(Some(m))
    }

    /// Mean loss over the eval examples (no gradient; dropout off), or `None` without eval
    /// data. Logged to `metrics.jsonl` as `{"step", "eval_loss"}` once per step: a second
    /// eval at the same step (or one already logged before a resume) is not logged again.
    /// In a data-parallel run only rank 0 evaluates (the others return `None` at once and
    /// wait for it at the next step's all-reduce).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.eval.is_empty() || !self.world().is_main() {
            return Ok(None);
        }
        self.set_training(false);
        let r = self.eval_loss();
        self.set_training(true);
        let loss = r?;
        if self.logged_eval().is_none() {
            self.eval_curve.push((self.state.step, loss));
            self.append_metric(&serde_json::json!({"step": self.state.step, "eval_loss": loss}))?;
        }
        Ok(Some(loss))
    }

    /// The eval loss logged at the current step, if any.
    fn logged_eval(&self) -> Option<f64> {
        self.eval_curve
            .iter()
            .rev()
            .find(|(s, _)| *s == self.state.step)
            .map(|&(_, l)| l)
    }

    /// Mean NLL over every counted eval target (the same number packed or padded: only the
    /// grouping into micro-batches differs).
    fn eval_loss(&self) -> Result<f64> {
        let (mut sum, mut count) = (0.0, 0usize);
        let groups: Vec<Vec<usize>> = if self.config.packing {
            let lengths: Vec<usize> = self.eval.iter().map(|e| e.ids.len()).collect();
            let order: Vec<usize> = (0..lengths.len()).collect();
            pack_examples(&order, &lengths, Self::pack_budget(&self.config))
        } else {
            let all: Vec<usize> = (0..self.eval.len()).collect();
            all.chunks(self.config.batch_size)
                .map(<[usize]>::to_vec)
                .collect()
        };
        for group in &groups {
            let exs: Vec<&Example> = group.iter().map(|&i| &self.eval[i]).collect();
            let b = self.make(&exs);
            if b.n_targets == 0 {
                continue;
            }
            let s = self.batch_nll_sum(&b, false)?;
            sum += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            count += b.n_targets;
        }
        Ok(sum / count.max(1) as f64)
    }

    fn set_training(&mut self, on: bool) {
        for (_, l) in self.model.lora_modules_mut() {
            l.set_training(on);
        }
    }

    fn append_metric(&self, v: &serde_json::Value) -> Result<()> {
        let path = self.config.output_dir.join(METRICS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // A line cut short by a kill gets its newline, so the next line stands on its own.
        let mut line = String::new();
        if ends_mid_line(&mut f).map_err(io_err(format!("reading {}", path.display())))? {
            line.push('\n');
        }
        line.push_str(&v.to_string());
        line.push('\n');
        f.write_all(line.as_bytes())
            .map_err(io_err(format!("appending to {}", path.display())))
    }

    /// The trained adapter (copies of the current weights), in PEFT form.
    pub fn adapter(&self) -> Result<Adapter> {
        let mut config = AdapterConfig::from(&self.config.lora());
        config.base_model_name_or_path = Some(self.config.model.display().to_string());
        config.task_type = Some("CAUSAL_LM".into());
        let mut tensors = BTreeMap::new();
        for (path, layer) in self.model.lora_modules() {
            if let Some(ad) = layer.adapter(ADAPTER_NAME) {
                tensors.insert(path, (ad.a().copy()?, ad.b().copy()?));
            }
        }
        Ok(Adapter { config, tensors })
    }

    /// Writes `output_dir/checkpoint-<step>/` (adapter, optimizer state, trainer state, loss
    /// plot) as one unit ([`write_dir_atomic`]), then deletes all but the newest
    /// `save_total_limit` checkpoints; returns its path. Adapter weights or optimizer moments
    /// that are not finite are refused before anything is written. On a rank other than 0
    /// nothing is written and the path rank 0 writes is returned.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let out = &self.config.output_dir;
        let final_dir = out.join(format!("checkpoint-{}", self.state.step));
        if !self.world().is_main() {
            return Ok(final_dir);
        }
        let adapter = self.finite_adapter()?;
        let moments = self.opt.state_tensors();
        for (name, t) in &moments {
            check_finite(t, &format!("optimizer state `{name}`"))?;
        }
        write_dir_atomic(&final_dir, |tmp| {
            save_adapter(tmp, &adapter)?;
            let st: std::collections::HashMap<String, Tensor> = moments.into_iter().collect();
            candle_core::safetensors::save(&st, tmp.join(OPTIM_FILE))?;
            let json = serde_json::to_vec_pretty(&self.state)
                .map_err(|e| invalid(format!("serialising the trainer state: {e}")))?;
            crate::io::write_atomic(tmp.join(STATE_FILE), &json)?;
            self.write_plot(&tmp.join(PLOT_FILE))
        })?;
        self.write_plot(&out.join(PLOT_FILE))?;
        self.rotate_checkpoints(&final_dir)?;
        Ok(final_dir)
    }

    /// Deletes all but the newest `save_total_limit` checkpoints (never `keep`, the one just
    /// written), oldest first.
    fn rotate_checkpoints(&self, keep: &Path) -> Result<()> {
        let limit = self.config.save_total_limit;
        if limit == 0 {
            return Ok(());
        }
        let all = Self::checkpoints(&self.config.output_dir);
        let excess = all.len().saturating_sub(limit);
        for (_, dir) in all.iter().filter(|(_, d)| d != keep).take(excess) {
            std::fs::remove_dir_all(dir)
                .map_err(io_err(format!("removing old checkpoint {}", dir.display())))?;
        }
        Ok(())
    }

    /// [`Self::adapter`], refused if a value is not finite.
    fn finite_adapter(&self) -> Result<Adapter> {
        let adapter = self.adapter()?;
        for (path, (a, b)) in &adapter.tensors {
            check_finite(a, &format!("adapter `{path}.lora_A`"))?;
            check_finite(b, &format!("adapter `{path}.lora_B`"))?;
        }
        Ok(adapter)
    }

    fn write_plot(&self, path: &Path) -> Result<()> {
        let title = format!(
            "flare LoRA: loss (step {} of {})",
            self.state.step, self.state.total_steps
        );
        write_loss_png(path, &title, &self.train_curve, &self.eval_curve)
    }

    /// Writes the final adapter as one unit into `output_dir/adapter/` (replacing an earlier
    /// one whole) and the loss plot into `output_dir`; returns the adapter's directory. An
    /// adapter with a non-finite value is refused before anything is written. On a rank other
    /// than 0 nothing is written and the directory rank 0 writes is returned.
    pub fn save_final(&self) -> Result<PathBuf> {
        let out = &self.config.output_dir;
        let dir = out.join(ADAPTER_DIR);
        if !self.world().is_main() {
            return Ok(dir);
        }
        let adapter = self.finite_adapter()?;
        write_dir_atomic(&dir, |tmp| save_adapter(tmp, &adapter))?;
        self.write_plot(&out.join(PLOT_FILE))?;
        Ok(dir)
    }

    /// Runs to the end: steps, evals every `eval_every` steps, checkpoints every `save_every`
    /// steps, a final eval (unless one is logged at the last step already: a resumed finished
    /// run reports the logged one), the final adapter and plot. Every event goes to
    /// `on_event`. A non-finite loss stops the run with [`Error::NonFinite`]. On a rank other
    /// than 0 only the steps and the final `Done` are reported (it neither evaluates nor
    /// writes).
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<PathBuf> {
        while let Some(m) = self.step()? {
            on_event(&Event::Step(m.clone()));
            let step = m.step;
            let last = self.is_done();
            if self.config.eval_every > 0 && step % self.config.eval_every == 0 && !last {
                if let Some(loss) = self.evaluate()? {
                    on_event(&Event::Eval { step, loss });
                }
            }
            if self.config.save_every > 0
                && step % self.config.save_every == 0
                && self.world().is_main()
            {
                let dir = self.save_checkpoint()?;
                on_event(&Event::Checkpoint { step, dir });
            }
        }
        let last_eval = match self.logged_eval() {
            Some(loss) => Some(loss),
            None => self.evaluate()?,
        };
        if let Some(loss) = last_eval {
            on_event(&Event::Eval {
                step: self.state.step,
                loss,
            });
        }
        let dir = self.save_final()?;
        on_event(&Event::Done { dir: dir.clone() });
        Ok(dir)
    }

    /// The adapted module paths, in layer order.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }
}

/// Whether the file is non-empty and its last byte is not a newline.
fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::distributed::test_support::thread_collectives;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flare-dp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A run of 3 steps of 3 micro-batches (2 ranks: shares of 1 and 2), with dropout.
    fn config(dir: &Path, out: &str) -> TrainConfig {
        let data = dir.join("data.jsonl");
        let lines: Vec<String> = (0..9)
            .map(|i| {
                format!(
                    r#"{{"prompt": "question {i} about {}", "completion": " answer {}"}}"#,
                    "x".repeat(i % 4),
                    i * 7
                )
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        TrainConfig {
            model: fixture(),
            data,
            output_dir: dir.join(out),
            lora_r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            lr: 1e-2,
            max_steps: Some(3),
            batch_size: 1,
            grad_accum: 3,
            max_grad_norm: Some(1.0),
            max_seq_len: 32,
            eval_fraction: 0.0,
            seed: 11,
            ..Default::default()
        }
    }

    fn run(t: &mut Trainer) -> (Vec<f64>, Vec<f64>, Adapter) {
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        while let Some(m) = t.step().unwrap() {
            losses.push(m.loss);
            norms.push(m.grad_norm);
        }
        (losses, norms, t.adapter().unwrap())
    }

    fn values(a: &Adapter) -> Vec<f32> {
        a.tensors
            .values()
            .flat_map(|(a, b)| {
                let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                v
            })
            .collect()
    }

    #[test]
    fn two_ranks_take_the_steps_of_one() {
        let dir = scratch("two-ranks");
        let tok = || Box::new(crate::text::Tokenizer::from_dir(fixture()).unwrap());
        let (one_losses, one_norms, one) = {
            let mut t = Trainer::new(config(&dir, "one"), &Device::Cpu, tok()).unwrap();
            run(&mut t)
        };
        let cfg = config(&dir, "two");
        let ranks: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = thread_collectives(2)
                .into_iter()
                .map(|c| {
                    let cfg = cfg.clone();
                    s.spawn(move || {
                        let mut t = Trainer::new_with(cfg, &Device::Cpu, tok(), c).unwrap();
                        run(&mut t)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Both ranks report the step's whole loss and norm and end with the same adapter, bit
        // for bit (the same sums, then the same clip and AdamW).
        assert_eq!(ranks[0].0, ranks[1].0);
        assert_eq!(ranks[0].1, ranks[1].1);
        assert_eq!(values(&ranks[0].2), values(&ranks[1].2));
        // And they are the one-rank run's, up to the order of the float additions (a mean
        // instead of a sum would halve the loss and the gradient).
        assert_eq!(one_losses.len(), 3);
        for (a, b) in one_losses.iter().zip(&ranks[0].0) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "losses {one_losses:?} vs {:?}",
                ranks[0].0
            );
        }
        for (a, b) in one_norms.iter().zip(&ranks[0].1) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "norms {one_norms:?} vs {:?}",
                ranks[0].1
            );
        }
        let (x, y) = (values(&one), values(&ranks[0].2));
        let moved = x.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-3 * moved,
            "adapters differ by {diff} (largest value {moved})"
        );
        // Only rank 0 wrote metrics: one line per step.
        let metrics = std::fs::read_to_string(dir.join("two").join(METRICS_FILE)).unwrap();
        assert_eq!(metrics.lines().count(), 3, "{metrics}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_rank_needs_a_micro_batch_per_step() {
        let dir = scratch("too-few");
        let mut cfg = config(&dir, "out");
        cfg.grad_accum = 1;
        let c = thread_collectives(2).remove(1);
        let tok = Box::new(crate::text::Tokenizer::from_dir(fixture()).unwrap());
        let e = Trainer::new_with(cfg, &Device::Cpu, tok, c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("grad_accum is 1, below the world size 2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
