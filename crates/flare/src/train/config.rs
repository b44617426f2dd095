//! [`TrainConfig`]: everything a training run is configured by, its defaults, its TOML form and
//! its validation. Its own file so that the trainer and the run's identity
//! ([`super::identity`]) both read it without importing each other.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::data::{BadLines, DataConfig};
use super::optim::{AdamWConfig, Schedule};
use crate::lora::LoraConfig;
use crate::{Error, Result};

// Errors read as the trainer's, as before the split.
const OP: &str = "Trainer";

/// An invalid-argument error of the trainer (also used by `trainer.rs`).
pub(super) fn invalid(msg: String) -> Error {
    Error::InvalidArgument { op: OP, msg }
}

/// Maps an I/O error into [`Error::Io`] with `context` (also used by `trainer.rs`).
pub(super) fn io_err(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io { context, source: e }
}

/// Everything a training run is configured by; loadable from TOML (missing keys take the
/// defaults below, unknown keys are an error).
///
/// ```
/// let cfg: flare::train::TrainConfig = toml::from_str(r#"
///     model = "models/tiny"
///     data = "data/train.jsonl"
///     output_dir = "out"
///     lr = 1e-3
///     lora_r = 8
/// "#).unwrap();
/// assert_eq!(cfg.lora_r, 8);
/// assert_eq!(cfg.batch_size, 4); // a default
/// cfg.validate()?;
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model directory (config.json, safetensors, tokenizer files).
    pub model: PathBuf,
    /// Training data (JSONL).
    pub data: PathBuf,
    /// Eval data (JSONL); when absent, `eval_fraction` of `data` is held out.
    pub eval_data: Option<PathBuf>,
    /// Where checkpoints, metrics, the plot and the final adapter go.
    pub output_dir: PathBuf,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha (scaling `alpha / r`).
    pub lora_alpha: f64,
    /// LoRA dropout on the low-rank path's input.
    pub lora_dropout: f32,
    /// Module names that get an adapter.
    pub target_modules: Vec<String>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Passes over the training data (when `max_steps` is not set).
    pub epochs: u64,
    /// Optimizer steps in total, overriding `epochs`.
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clipping threshold (none when absent or 0).
    pub max_grad_norm: Option<f64>,
    /// Examples are truncated to this many tokens.
    pub max_seq_len: usize,
    /// Eval every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Fraction of `data` held out for eval when `eval_data` is absent (0: no eval).
    pub eval_fraction: f64,
    /// Checkpoint every this many steps (0: none but the final adapter).
    pub save_every: u64,
    /// Checkpoints kept: after each save, all but the newest this many are deleted (0: keep
    /// every one).
    pub save_total_limit: usize,
    /// Seed of the adapters' initialisation, the eval split and the batch order.
    pub seed: u64,
    /// Compute dtype of the base model: `f32`, `bf16` or `f16` (the adapters are f32).
    pub dtype: String,
    /// Device, for the CLI: `auto`, `cpu`, `cuda`, `cuda:N` (the library takes a `Device`).
    pub device: String,
    /// Malformed JSONL lines: `error` (stop) or `skip` (warn and count).
    pub bad_lines: BadLines,
    /// Append EOS to `text` and `completion` examples.
    pub append_eos: bool,
    /// Sequence packing: examples are concatenated up to `max_seq_len` tokens per row, each
    /// attending only to itself (positions restart per document), instead of padded batches.
    pub packing: bool,
    /// Activation checkpointing: each decoder layer's activations are recomputed in the
    /// backward instead of kept from the forward.
    pub gradient_checkpointing: Checkpointing,
}

/// When decoder layers are recomputed in the backward ([`TrainConfig::gradient_checkpointing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Never: every activation is kept until the backward (fastest when it fits).
    Off,
    /// Always, each layer's input kept on the device.
    On,
    /// Always, each layer's input kept in host memory (offloaded): the device holds one
    /// layer's activations and no per-layer inputs, for two copies per layer and step.
    Offload,
    /// When the memory estimate of the run without it exceeds the device's free memory: on,
    /// or offload when the estimate with on-device checkpointing exceeds it too (CUDA).
    #[default]
    Auto,
}

impl std::str::FromStr for Checkpointing {
    type Err = Error;

    /// `off`, `on`, `offload` or `auto`.
    ///
    /// ```
    /// use flare::train::Checkpointing;
    /// assert_eq!("on".parse::<Checkpointing>()?, Checkpointing::On);
    /// assert!("yes".parse::<Checkpointing>().is_err());
    /// # Ok::<(), flare::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Checkpointing::Off),
            "on" => Ok(Checkpointing::On),
            "offload" => Ok(Checkpointing::Offload),
            "auto" => Ok(Checkpointing::Auto),
            other => Err(invalid(format!(
                "gradient_checkpointing must be off, on, offload or auto, got {other:?}"
            ))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            eval_data: None,
            output_dir: PathBuf::from("flare-out"),
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: crate::lora::config::KNOWN_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            lr: 2e-4,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            max_seq_len: 1024,
            eval_every: 0,
            eval_fraction: 0.0,
            save_every: 0,
            save_total_limit: 3,
            seed: 42,
            dtype: "f32".into(),
            device: "auto".into(),
            bad_lines: BadLines::Error,
            append_eos: true,
            packing: true,
            gradient_checkpointing: Checkpointing::Auto,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; the error names the file and the key.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(io_err(format!("reading config {}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Io {
            context: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }

    /// The LoRA part.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: false,
            target_modules: self.target_modules.clone(),
        }
    }

    /// The AdamW part.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The tokenisation part.
    pub fn data_config(&self) -> DataConfig {
        DataConfig {
            max_seq_len: self.max_seq_len,
            append_eos: self.append_eos,
            bad_lines: self.bad_lines,
        }
    }

    /// The compute dtype named by `dtype`.
    pub fn parsed_dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => Err(invalid(format!(
                "dtype must be f32, bf16 or f16, got {other:?}"
            ))),
        }
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.lora().validate()?;
        self.adamw().validate()?;
        self.parsed_dtype()?;
        let bad = |m: &str| Err(invalid(m.to_string()));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be > 0");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be >= 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be >= 1");
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len must be >= 2");
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("nothing to train: epochs and max_steps are 0");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("eval_fraction must be in [0, 1)");
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m >= 0.0) {
                return bad("max_grad_norm must be >= 0");
            }
        }
        Ok(())
    }
}
