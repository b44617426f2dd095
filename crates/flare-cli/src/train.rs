//! `flare train` and `flare merge`: flags and/or a TOML file turned into a validated
//! [`TrainConfig`], a [`Trainer`] run with a progress bar, and the merge of an adapter into its
//! base model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use flare::train::{BadLines, Event, Schedule, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::DeviceSpec;

/// `flare train`: every field of the TOML config as a flag; flags override the file.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A TOML file with the run's settings (keys as the long flags, with underscores).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data, JSONL: {"text"}, {"prompt","completion"} or {"messages":[...]} per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Eval data (JSONL); otherwise --eval-fraction of --data is held out.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory (checkpoints, metrics.jsonl, loss.png, the final adapter).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated module names to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Schedule after warmup: constant, linear or cosine.
    #[arg(long)]
    pub schedule: Option<String>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Epochs (when --max-steps is not given).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Optimizer steps in total.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Gradient clipping threshold (0: none).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Eval every N steps (0: at the end only).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Fraction of --data held out for eval.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Checkpoint every N steps (0: none).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute dtype of the base model: f32, bf16, f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: auto (CUDA when built with it and present), cpu, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Skip malformed JSONL lines (with a warning and a count) instead of stopping.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Resume from a checkpoint directory, or (no value, or `latest`) the newest one in the
    /// output dir.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<PathBuf>,
    /// No progress bar (one line per step instead).
    #[arg(long)]
    pub no_progress: bool,
}

/// The config from the file (or the defaults) with the flags applied, validated.
pub fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &a.$f { c.$f = v.clone(); } )* };
    }
    set!(
        model,
        data,
        output_dir,
        lora_r,
        lora_alpha,
        lora_dropout,
        target_modules,
        lr,
        warmup_steps,
        weight_decay,
        epochs,
        batch_size,
        grad_accum,
        max_seq_len,
        eval_every,
        eval_fraction,
        save_every,
        seed,
        dtype,
        device
    );
    if a.eval_data.is_some() {
        c.eval_data = a.eval_data.clone();
    }
    if a.max_steps.is_some() {
        c.max_steps = a.max_steps;
    }
    if let Some(m) = a.max_grad_norm {
        c.max_grad_norm = (m > 0.0).then_some(m);
    }
    if let Some(s) = &a.schedule {
        c.schedule = s.parse::<Schedule>()?;
    }
    if a.skip_bad_lines {
        c.bad_lines = BadLines::Skip;
    }
    if c.model.as_os_str().is_empty() {
        bail!("no model: pass --model DIR or set `model` in the --config file");
    }
    if c.data.as_os_str().is_empty() {
        bail!("no data: pass --data FILE.jsonl or set `data` in the --config file");
    }
    c.validate()?;
    Ok(c)
}

/// Drives a trainer to the end with a progress bar (or plain lines), printing evals and
/// checkpoints; returns the final adapter's directory.
pub fn run_with_progress(t: &mut Trainer, progress: bool) -> Result<PathBuf> {
    let stats = t.data_stats().clone();
    eprintln!(
        "data: {} train / {} eval examples{}{}{}",
        stats.train_examples,
        stats.eval_examples,
        if stats.from_cache {
            " (tokens from cache)"
        } else {
            ""
        },
        if stats.truncated > 0 {
            format!(", {} truncated", stats.truncated)
        } else {
            String::new()
        },
        if stats.dropped_empty > 0 {
            format!(", {} dropped (no loss token)", stats.dropped_empty)
        } else {
            String::new()
        },
    );
    if !stats.bad_lines.is_empty() {
        eprintln!(
            "warning: skipped {} malformed line(s):",
            stats.bad_lines.len()
        );
        for l in stats.bad_lines.iter().take(10) {
            eprintln!("  {l}");
        }
    }
    let total = t.state().total_steps;
    let bar = if progress {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(t.state().step);
        b
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut tokens = 0u64;
    let dir = t.run(|e| match e {
        Event::Step(m) => {
            tokens += m.tokens as u64;
            let tps = tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, tps);
            if progress {
                bar.set_position(m.step);
                bar.set_message(msg);
            } else {
                eprintln!("step {}/{total}: {msg}", m.step);
            }
        }
        Event::Eval { step, loss } => {
            bar.suspend(|| eprintln!("step {step}: eval loss {loss:.4}"));
        }
        Event::Checkpoint { step, dir } => {
            bar.suspend(|| eprintln!("step {step}: checkpoint {}", dir.display()));
        }
        Event::Done { .. } => bar.finish(),
    })?;
    Ok(dir)
}

/// `flare train`.
pub fn run_train(a: &TrainArgs) -> Result<()> {
    let cfg = build_config(a)?;
    let device = cfg.device.parse::<DeviceSpec>()?.open()?;
    if cfg.lora_dropout > 0.0 {
        eprintln!(
            "note: lora_dropout > 0 draws from an unseeded RNG: runs (and resumes) are not \
             bit-reproducible"
        );
    }
    let mut t = match &a.resume {
        None => Trainer::from_config(cfg.clone(), &device)?,
        Some(dir) => {
            let dir = if dir.as_os_str() == "latest" {
                Trainer::latest_checkpoint(&cfg.output_dir).with_context(|| {
                    format!("--resume: no checkpoint in {}", cfg.output_dir.display())
                })?
            } else {
                dir.clone()
            };
            eprintln!("resuming from {}", dir.display());
            Trainer::resume_from_config(cfg.clone(), &device, &dir)?
        }
    };
    eprintln!(
        "training {} ({} adapted modules, dtype {}) on {}: {} steps",
        cfg.model.display(),
        t.modules().len(),
        cfg.dtype,
        crate::device::hardware_name(&device),
        t.state().total_steps
    );
    let dir = run_with_progress(&mut t, !a.no_progress)?;
    eprintln!(
        "adapter written to {} (metrics.jsonl, loss.png beside it)",
        dir.display()
    );
    Ok(())
}

/// `flare merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype (f32, bf16, f16); default: each tensor's stored dtype.
    #[arg(long)]
    pub dtype: Option<String>,
}

/// `flare merge`.
pub fn run_merge(a: &MergeArgs) -> Result<()> {
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        Some("f16") => Some(DType::F16),
        Some(other) => bail!("--dtype: expected f32, bf16 or f16, got {other:?}"),
    };
    flare::train::merge_adapter_to_dir(&a.model, &a.adapter, &a.out, dtype)
        .with_context(|| format!("merging {} into {}", a.adapter.display(), a.model.display()))?;
    eprintln!("merged model written to {}", a.out.display());
    Ok(())
}

/// Opens a device named like `--device`.
pub fn open_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}
