//! `flare train` and `flare merge`: flags and/or a TOML file turned into a validated
//! [`TrainConfig`], a [`Trainer`] run with a progress bar (or, when stderr is not a terminal,
//! periodic progress lines), and the merge of an adapter into its base model.
//!
//! The TOML file of `--config` is flat and its keys are exactly the long flags, written with
//! `_` or `-` (`skip_bad_lines = true` or `skip-bad-lines = true` for `--skip-bad-lines`; both
//! spellings of one key is an error). Each key is turned into its flag and parsed by the same
//! clap definition as the command line, so the file accepts what the flags accept and nothing
//! else; an unknown key or a bad value is an error naming the file, the line and the key.
//! Relative paths in the file resolve against the file's directory, not the working directory.
//! Flags given on the command line override the file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Arg, ArgAction, Args, FromArgMatches, ValueHint};
use flare::train::distributed::ENV_LOCAL_WORLD_SIZE;
use flare::train::{
    BadLines, Checkpointing, Collective, Event, Rendezvous, Schedule, StepMetrics, TrainConfig,
    Trainer, World,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::output::elog;

/// `flare train`: every setting of a run as a flag; `--config FILE.toml` sets them from a file
/// (keys as the long flags), and the flags given override it.
///
/// The fields named like a [`TrainConfig`] field have that field's default, which
/// [`show_defaults`] appends to their help. (Serialize/Deserialize serve [`build_config`]'s
/// merge of the command line over the file.)
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A TOML file with the run's settings: keys as the long flags (`lora_r` or `lora-r`),
    /// relative paths from the file's directory; flags given here override it.
    #[arg(long, value_hint = ValueHint::FilePath)]
    pub config: Option<PathBuf>,
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_hint = ValueHint::DirPath)]
    pub model: Option<PathBuf>,
    /// Training data, JSONL: {"text"}, {"prompt","completion"} or {"messages":[...]} per line.
    #[arg(long, value_hint = ValueHint::FilePath)]
    pub data: Option<PathBuf>,
    /// Eval data (JSONL); otherwise --eval-fraction of --data is held out.
    #[arg(long, value_hint = ValueHint::FilePath)]
    pub eval_data: Option<PathBuf>,
    /// Output directory (checkpoints, metrics.jsonl, loss.png, the final adapter).
    #[arg(long, value_hint = ValueHint::DirPath)]
    pub output_dir: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (the adapters' scale is alpha / r).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated module names to adapt.
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
    /// AdamW decoupled weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1.
    #[arg(long = "adam-beta1")]
    pub beta1: Option<f64>,
    /// AdamW beta2.
    #[arg(long = "adam-beta2")]
    pub beta2: Option<f64>,
    /// AdamW epsilon.
    #[arg(long = "adam-epsilon")]
    pub eps: Option<f64>,
    /// Passes over the training data (when --max-steps is not given).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Optimizer steps in total; overrides --epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Gradient clipping: the largest global gradient norm; 0 turns clipping off.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Append EOS to `text` and `completion` examples (true or false).
    #[arg(long, value_name = "BOOL")]
    pub append_eos: Option<bool>,
    /// Pack whole examples into micro-batches of up to batch-size × max-seq-len tokens, each
    /// attending only to itself (true), instead of padding batch-size examples to the longest
    /// (false). Same loss and prompt masking; no padding computed.
    #[arg(long, value_name = "BOOL")]
    pub packing: Option<bool>,
    /// The same as --packing false.
    #[arg(long, conflicts_with = "packing")]
    pub no_packing: bool,
    /// Eval every N steps (0: at the end only).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Fraction of --data held out for eval (0: none, unless --eval-data).
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Checkpoint every N steps (0: none).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Seed of the adapters' initialisation, the eval split and the batch order.
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
    /// Activation checkpointing: recompute each decoder layer in the backward instead of
    /// keeping its activations (less memory, about one more forward of compute). offload: on,
    /// with each layer's input kept in host memory (for the longest contexts). auto: on when
    /// the memory estimate without it exceeds the GPU's free memory, offload when the estimate
    /// with it does too (off on the CPU).
    #[arg(long, value_name = "off|on|offload|auto", value_parser = ["off", "on", "offload", "auto"])]
    pub gradient_checkpointing: Option<String>,
    /// Resume from a checkpoint directory, or (no value, or `latest`) the newest one in the
    /// output dir. The checkpoint must be of this run: same model, tokenizer and data (by
    /// content) and same settings wherever they change the result (lr, schedule, warmup,
    /// max-steps/epochs, batch size, grad-accum, LoRA r/alpha/dropout/targets, seed, dtype,
    /// ...); else the run is refused, naming each field that differs. The length
    /// (--max-steps, --epochs) can change only with --schedule constant: a decaying schedule
    /// spans the whole run, so extending a finished run would make the lr jump back up.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_hint = ValueHint::DirPath)]
    pub resume: Option<PathBuf>,
    /// Resume from this checkpoint directory (the same checks as --resume).
    #[arg(long, value_name = "CHECKPOINT", conflicts_with = "resume")]
    pub resume_from: Option<PathBuf>,
    /// Checkpoints kept in the output dir: after each save, all but the newest N are deleted
    /// (0: keep all).
    #[arg(long, value_name = "N")]
    pub save_total_limit: Option<usize>,
    /// No progress bar: a progress line per step (or per --log-every steps) instead.
    #[arg(long)]
    pub no_progress: bool,
    /// Without a progress bar (stderr not a terminal, or --no-progress), a progress line
    /// every N steps [default: every step with --no-progress; else every 5% of the run and
    /// at least every 10 s].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: Option<u64>,
    /// GPUs to train on, data parallel: N > 1 starts N processes of this command, rank k on
    /// cuda:k, each running its share of every step's --grad-accum micro-batches (at least N),
    /// gradients summed over NCCL; the run's result is the one-GPU run's. Needs a build with
    /// the nccl feature. [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub gpus: Option<u64>,
}

/// Appends `[default: X]` to the help of each flag of `flare train` that sets a
/// [`TrainConfig`] field, X read from [`TrainConfig::default`]: the help shows the defaults
/// the run really uses, with no second copy of them to drift.
pub fn show_defaults(mut cmd: clap::Command) -> clap::Command {
    let serde_json::Value::Object(defaults) =
        serde_json::to_value(TrainConfig::default()).unwrap_or_default()
    else {
        return cmd;
    };
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        let text = match defaults.get(&id) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Array(v)) => v
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v.to_string(),
            _ => continue,
        };
        cmd = cmd.mut_arg(&id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            let a = a.help(format!("{help} [default: {text}]"));
            match a.get_long_help().map(|h| h.to_string()) {
                Some(long) => a.long_help(format!("{long}\n\n[default: {text}]")),
                None => a,
            }
        });
    }
    cmd
}

/// The `flare train` arguments as a clap command of their own (no binary name), to parse a
/// TOML file's keys exactly as the command line's flags.
fn train_command() -> clap::Command {
    TrainArgs::augment_args(clap::Command::new("flare train").no_binary_name(true))
}

/// The first line of a clap error, without its `error: ` prefix and usage tips.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// The 1-based line of a byte offset of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The command-line tokens that set `arg` (long name `long`) to a TOML value; relative paths
/// are joined to `base`, the TOML file's directory.
fn toml_tokens(arg: &Arg, long: &str, v: &toml::Value, base: &Path) -> Result<Vec<OsString>> {
    let flag = format!("--{long}");
    let with = |s: &str| vec![OsString::from(format!("{flag}={s}"))];
    Ok(match v {
        // A flag (`skip_bad_lines = true`), or `resume = true` for a bare --resume.
        toml::Value::Boolean(b)
            if matches!(arg.get_action(), ArgAction::SetTrue) || long == "resume" =>
        {
            if *b {
                vec![flag.into()]
            } else {
                Vec::new()
            }
        }
        toml::Value::Boolean(b) => with(&b.to_string()),
        toml::Value::Integer(i) => with(&i.to_string()),
        toml::Value::Float(f) => with(&f.to_string()),
        toml::Value::String(s) => {
            let is_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
            // `resume = "latest"` names the newest checkpoint, not a path.
            let keyword = long == "resume" && s == "latest";
            if is_path && !keyword && Path::new(s).is_relative() {
                let mut t = OsString::from(format!("{flag}="));
                t.push(base.join(s));
                vec![t]
            } else {
                with(s)
            }
        }
        toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            let items = items
                .iter()
                .map(|x| x.as_str().context("expected an array of strings"))
                .collect::<Result<Vec<_>>>()?;
            with(&items.join(","))
        }
        toml::Value::Array(_) => bail!("expected a single value, got an array"),
        toml::Value::Table(_) => {
            bail!("expected a value, got a table (the file is flat: no [sections])")
        }
        toml::Value::Datetime(_) => bail!("expected a value, got a date"),
    })
}

/// Reads a `--config` TOML file into the arguments it sets.
fn args_from_toml(path: &Path) -> Result<TrainArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cmd = train_command();
    let mut entries: Vec<_> = table.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut argv: Vec<OsString> = Vec::new();
    for (key, value) in &entries {
        let at = format!("{}:{}", path.display(), line_of(&text, key.span().start));
        let key = key.get_ref();
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| {
                let table = if value.get_ref().is_table() {
                    " (a table: the file is flat, without [sections])"
                } else {
                    ""
                };
                anyhow!(
                    "{at}: unknown key `{key}`{table}: the keys are the long flags of \
                     `flare train` (see `flare train --help`), e.g. `lora_r` or `lora-r` for \
                     --lora-r"
                )
            })?;
        if let Some(prev) = seen.insert(long.clone(), key.clone()) {
            bail!("{at}: `{key}` sets --{long} again (already set by `{prev}`)");
        }
        let tokens = toml_tokens(arg, &long, value.get_ref(), &base)
            .with_context(|| format!("{at}: key `{key}`"))?;
        // Parsing each key alone reports a bad value with its line.
        cmd.clone()
            .try_get_matches_from(&tokens)
            .map_err(|e| anyhow!("{at}: key `{key}`: {}", clap_message(&e)))?;
        argv.extend(tokens);
    }
    let m = cmd
        .try_get_matches_from(&argv)
        .map_err(|e| anyhow!("{}: {}", path.display(), clap_message(&e)))?;
    Ok(TrainArgs::from_arg_matches(&m)?)
}

/// `cli` over `file`: each argument given on the command line (a value, or a flag set)
/// replaces the file's.
fn merge_over(cli: &TrainArgs, file: TrainArgs) -> Result<TrainArgs> {
    let serde_json::Value::Object(mut merged) = serde_json::to_value(file)? else {
        bail!("internal: TrainArgs is not a JSON object");
    };
    let serde_json::Value::Object(given) = serde_json::to_value(cli)? else {
        bail!("internal: TrainArgs is not a JSON object");
    };
    // An unset switch reads `false`, as does a valued boolean set to false (`--packing false`),
    // which must override the file.
    let switches: Vec<String> = train_command()
        .get_arguments()
        .filter(|a| matches!(a.get_action(), ArgAction::SetTrue))
        .map(|a| a.get_id().to_string())
        .collect();
    for (k, v) in given {
        let unset = v.is_null() || (v == serde_json::Value::Bool(false) && switches.contains(&k));
        if !unset {
            merged.insert(k, v);
        }
    }
    Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
}

/// The arguments of the run: those of the `--config` file with the command line's over them
/// (`config` is then `None`: the file is applied).
pub fn effective_args(a: &TrainArgs) -> Result<TrainArgs> {
    let mut merged = match &a.config {
        Some(p) => merge_over(a, args_from_toml(p)?)
            .with_context(|| format!("applying the flags over {}", p.display()))?,
        None => a.clone(),
    };
    merged.config = None;
    Ok(merged)
}

/// The config: the defaults, then the `--config` file, then the flags; validated.
pub fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let a = effective_args(a)?;
    let mut c = TrainConfig::default();
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
        beta1,
        beta2,
        eps,
        epochs,
        batch_size,
        grad_accum,
        max_seq_len,
        append_eos,
        eval_every,
        eval_fraction,
        save_every,
        save_total_limit,
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
        if !(m >= 0.0 && m.is_finite()) {
            bail!("--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got {m}");
        }
        c.max_grad_norm = (m > 0.0).then_some(m);
    }
    if let Some(s) = &a.schedule {
        c.schedule = s.parse::<Schedule>()?;
    }
    if a.skip_bad_lines {
        c.bad_lines = BadLines::Skip;
    }
    if let Some(p) = a.packing {
        c.packing = p;
    }
    if a.no_packing {
        c.packing = false;
    }
    if let Some(g) = &a.gradient_checkpointing {
        c.gradient_checkpointing = g.parse::<Checkpointing>()?;
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

/// How a run reports its steps on stderr.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// No progress bar, even on a terminal (`--no-progress`).
    pub no_bar: bool,
    /// A progress line every this many steps (`--log-every`) when there is no bar.
    pub log_every: Option<u64>,
}

impl Progress {
    /// The progress options of `flare train`'s flags.
    pub fn of(a: &TrainArgs) -> Self {
        Progress {
            no_bar: a.no_progress,
            log_every: a.log_every,
        }
    }
}

/// Without a bar and without --log-every, a progress line at least this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `h:mm:ss`, or `m:ss` under an hour.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The plain progress line of a step: `step 40/200 (20%): loss .., lr .., N tok/s, elapsed
/// m:ss, ETA m:ss`. `first` is the step the run (or the resume) started at; the ETA is the
/// time per step since then times the steps left.
fn progress_line(m: &StepMetrics, total: u64, first: u64, elapsed: Duration, tps: f64) -> String {
    let done = m.step.saturating_sub(first).max(1);
    let eta = elapsed.mul_f64(total.saturating_sub(m.step) as f64 / done as f64);
    format!(
        "step {}/{total} ({:.0}%): loss {:.4}, lr {:.2e}, {tps:.0} tok/s, elapsed {}, ETA {}",
        m.step,
        100.0 * m.step as f64 / total.max(1) as f64,
        m.loss,
        m.lr,
        clock(elapsed),
        clock(eta)
    )
}

/// Drives a trainer to the end, reporting on stderr: a progress bar when stderr is a
/// terminal, else plain progress lines (every step with `--no-progress`, every `--log-every`
/// steps, or by default every 5% of the run and at least every 10 s), the evals and the
/// checkpoints. Returns the final adapter's directory.
pub fn run_with_progress(t: &mut Trainer, progress: Progress) -> Result<PathBuf> {
    for l in t.leftovers() {
        elog!("cleanup: {l} (left by an interrupted run)");
    }
    let stats = t.data_stats().clone();
    elog!(
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
        elog!(
            "warning: skipped {} malformed line(s):",
            stats.bad_lines.len()
        );
        for l in stats.bad_lines.iter().take(10) {
            elog!("  {l}");
        }
    }
    let total = t.state().total_steps;
    let first = t.state().step;
    // indicatif draws only on a terminal (not a pipe, a file or TERM=dumb).
    let bar_shown = !progress.no_bar && !ProgressDrawTarget::stderr().is_hidden();
    let bar = if bar_shown {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(first);
        b
    } else {
        ProgressBar::hidden()
    };
    let every = progress.log_every.unwrap_or(if progress.no_bar {
        1
    } else {
        (total / 20).max(1)
    });
    let timed = progress.log_every.is_none();
    let start = Instant::now();
    let mut last_line = start;
    let mut tokens = 0u64;
    let dir = t.run(|e| match e {
        Event::Step(m) => {
            tokens += m.tokens as u64;
            let elapsed = start.elapsed();
            let tps = tokens as f64 / elapsed.as_secs_f64().max(1e-9);
            if bar_shown {
                bar.set_position(m.step);
                bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", m.loss, m.lr));
            } else if m.step == first + 1
                || m.step % every == 0
                || m.step == total
                || (timed && last_line.elapsed() >= LOG_INTERVAL)
            {
                last_line = Instant::now();
                elog!("{}", progress_line(m, total, first, elapsed, tps));
            }
        }
        Event::Eval { step, loss } => {
            bar.suspend(|| elog!("step {step}: eval loss {loss:.4}"));
        }
        Event::Checkpoint { step, dir } => {
            bar.suspend(|| elog!("step {step}: checkpoint {}", dir.display()));
        }
        Event::Done { .. } => bar.finish(),
    })?;
    Ok(dir)
}

/// `flare train`.
pub fn run_train(a: &TrainArgs) -> Result<()> {
    // A value from the --config file is checked with the flags': an error names the file.
    let file = a.config.clone();
    let in_file = |e: anyhow::Error| match &file {
        Some(p) => e.context(format!("in the settings of {} and the flags", p.display())),
        None => e,
    };
    // The file's --resume, --no-progress and --log-every count too.
    let a = &effective_args(a)?;
    let cfg = build_config(a).map_err(in_file)?;
    let world = World::from_env()?;
    let gpus = a.gpus.unwrap_or(1) as usize;
    if gpus > 1 {
        if world.is_single() {
            // The launcher: checks what the ranks need, then starts them.
            crate::launch::check_launch(gpus, &cfg.device).map_err(in_file)?;
            let exe = std::env::current_exe().context("finding the flare executable")?;
            let args: Vec<OsString> = std::env::args_os().skip(1).collect();
            elog!("data parallel: starting {gpus} ranks, rank k on cuda:k");
            return crate::launch::launch(&exe, &args, gpus);
        }
        // A rank the launcher started carries the launch's size; any other process with
        // RANK/WORLD_SIZE set belongs to a world of someone else's making.
        if std::env::var(ENV_LOCAL_WORLD_SIZE).ok() != Some(gpus.to_string()) {
            bail!(
                "--gpus {gpus} in a process that is already rank {} of {} (RANK and WORLD_SIZE \
                 are set): either start one process per GPU yourself, without --gpus, or unset \
                 RANK and WORLD_SIZE",
                world.rank,
                world.world_size
            );
        }
    }
    let device = rank_device(&cfg.device, &world).map_err(in_file)?.open()?;
    let collective = if world.is_single() {
        Collective::single()
    } else {
        Collective::connect(world, &device, &Rendezvous::from_env()?)?
    };
    let tokenizer = || -> Result<Box<flare::text::Tokenizer>> {
        Ok(Box::new(flare::text::Tokenizer::from_dir(&cfg.model)?))
    };
    let resume = a.resume_from.as_ref().or(a.resume.as_ref());
    if world.is_main() {
        // Loading a 7-8B model and tokenizing a large data file take a while: say so first.
        elog!(
            "loading {} onto {} and reading {}",
            cfg.model.display(),
            crate::device::hardware_name(&device),
            cfg.data.display()
        );
    }
    let mut t = match resume {
        None => Trainer::new_with(cfg.clone(), &device, tokenizer()?, collective)?,
        Some(dir) => {
            let dir = if a.resume_from.is_none() && dir.as_os_str() == "latest" {
                Trainer::latest_checkpoint(&cfg.output_dir).with_context(|| {
                    format!("--resume: no checkpoint in {}", cfg.output_dir.display())
                })?
            } else {
                dir.clone()
            };
            if world.is_main() {
                elog!("resuming from {}", dir.display());
            }
            Trainer::resume_with(cfg.clone(), &device, tokenizer()?, &dir, collective)?
        }
    };
    if !world.is_main() {
        // Rank 0 reports and writes; this rank only trains (its errors still reach stderr).
        t.run(|_| {})?;
        return Ok(());
    }
    elog!(
        "training {} ({} adapted modules, dtype {}) on {}: {} steps",
        cfg.model.display(),
        t.modules().len(),
        cfg.dtype,
        crate::device::hardware_name(&device),
        t.state().total_steps
    );
    elog!("{}", t.checkpointing());
    let dir = run_with_progress(&mut t, Progress::of(a))?;
    elog!(
        "adapter written to {} (metrics.jsonl, loss.png in the output dir)",
        dir.display()
    );
    Ok(())
}

/// The device of this process: `--device` for a run of one; for rank k of a data-parallel
/// run, cuda:LOCAL_RANK (`--device` auto or cuda, or cuda:N naming that very GPU; cpu is left
/// to [`Collective::connect`] to refuse).
fn rank_device(device: &str, world: &World) -> Result<DeviceSpec> {
    if world.is_single() {
        return device.parse();
    }
    let d = device.trim().to_ascii_lowercase();
    let own = DeviceSpec::Cuda(world.local_rank);
    match d.as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        // Not `auto`'s probe of cuda:0, which would open a context there from every rank.
        "auto" | "cuda" | "gpu" => Ok(own),
        _ if device.parse::<DeviceSpec>()? == own => Ok(own),
        _ => bail!(
            "--device {device} on rank {} (LOCAL_RANK={}): a rank trains on cuda:LOCAL_RANK; \
             use --device cuda (or auto)",
            world.rank,
            world.local_rank
        ),
    }
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
    /// Where to write the merged model directory: a new or empty directory (see --force),
    /// never the model's or the adapter's; written whole or not at all, in the base model's
    /// layout (one model.safetensors, or the same shards with an index), a shard at a time.
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype (f32, bf16, f16); default: each tensor's stored dtype.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace a non-empty --out directory whole (never the model's or the adapter's own).
    #[arg(long)]
    pub force: bool,
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
    let t0 = std::time::Instant::now();
    elog!(
        "merging {} into {}: writing {}",
        a.adapter.display(),
        a.model.display(),
        a.out.display()
    );
    flare::train::merge_adapter_to_dir_with(&a.model, &a.adapter, &a.out, dtype, a.force, |p| {
        elog!(
            "[{:>6.1}s] {} ({}/{}): {} tensors, {} merged, {:.2} GB",
            t0.elapsed().as_secs_f64(),
            p.file,
            p.index,
            p.files,
            p.tensors,
            p.merged,
            p.bytes as f64 / 1e9
        )
    })
    .with_context(|| format!("merging {} into {}", a.adapter.display(), a.model.display()))?;
    elog!("merged model written to {}", a.out.display());
    Ok(())
}

/// Opens a device named like `--device`.
pub fn open_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `flare train` arguments as the command line gives them.
    fn parse(args: &[&str]) -> std::result::Result<TrainArgs, clap::Error> {
        let m = train_command().try_get_matches_from(args)?;
        TrainArgs::from_arg_matches(&m)
    }

    #[test]
    fn gradient_checkpointing_flag_and_toml_key() {
        let base = ["--model", "m", "--data", "d.jsonl"];
        let cfg = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            build_config(&parse(&args).unwrap()).unwrap()
        };
        assert_eq!(cfg(&[]).gradient_checkpointing, Checkpointing::Auto);
        for (v, want) in [
            ("on", Checkpointing::On),
            ("off", Checkpointing::Off),
            ("offload", Checkpointing::Offload),
            ("auto", Checkpointing::Auto),
        ] {
            assert_eq!(
                cfg(&["--gradient-checkpointing", v]).gradient_checkpointing,
                want
            );
        }
        let err = parse(&["--gradient-checkpointing", "sometimes"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sometimes") && err.contains("[possible values: off, on, offload, auto]"),
            "{err}"
        );
        // The TOML key, and the flag over it.
        let dir = std::env::temp_dir().join(format!("flare-ckpt-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("run.toml");
        std::fs::write(
            &toml,
            "model = \"m\"\ndata = \"d.jsonl\"\ngradient_checkpointing = \"on\"\n",
        )
        .unwrap();
        let file = toml.to_str().unwrap();
        let c = build_config(&parse(&["--config", file]).unwrap()).unwrap();
        assert_eq!(c.gradient_checkpointing, Checkpointing::On);
        let a = parse(&["--config", file, "--gradient-checkpointing", "off"]).unwrap();
        assert_eq!(
            build_config(&a).unwrap().gradient_checkpointing,
            Checkpointing::Off
        );
        std::fs::write(&toml, "gradient_checkpointing = \"maybe\"\n").unwrap();
        let err = format!(
            "{:#}",
            build_config(&parse(&["--config", file]).unwrap()).unwrap_err()
        );
        assert!(err.contains("run.toml:1") && err.contains("maybe"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn packing_is_on_by_default_and_the_flags_override_the_file() {
        let parse = |args: &[&str]| -> clap::error::Result<TrainArgs> {
            TrainArgs::from_arg_matches(&train_command().try_get_matches_from(args)?)
        };
        let dir = std::env::temp_dir().join(format!("flare-packing-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("run.toml");
        let file = toml.to_str().unwrap();
        let packing = |args: &[&str]| build_config(&parse(args).unwrap()).unwrap().packing;
        assert!(packing(&["--model", "m", "--data", "d.jsonl"]));
        std::fs::write(
            &toml,
            "model = \"m\"\ndata = \"d.jsonl\"\npacking = false\n",
        )
        .unwrap();
        assert!(!packing(&["--config", file]));
        assert!(packing(&["--config", file, "--packing", "true"]));
        std::fs::write(&toml, "model = \"m\"\ndata = \"d.jsonl\"\npacking = true\n").unwrap();
        assert!(packing(&["--config", file]));
        assert!(!packing(&["--config", file, "--packing", "false"]));
        assert!(!packing(&["--config", file, "--no-packing"]));
        assert!(parse(&["--packing", "true", "--no-packing"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn progress_line_reads_well_and_its_eta_counts_from_the_resume() {
        assert_eq!(clock(Duration::from_secs(59)), "0:59");
        assert_eq!(clock(Duration::from_secs(3 * 3600 + 62)), "3:01:02");
        let m = StepMetrics {
            step: 150,
            loss: 0.123456,
            lr: 2.5e-4,
            grad_norm: 1.0,
            tokens: 64,
            epoch: 1.5,
            seconds: 0.1,
        };
        // Resumed at step 100: 50 steps in 100 s, 50 left.
        let line = progress_line(&m, 200, 100, Duration::from_secs(100), 1234.4);
        assert_eq!(
            line,
            "step 150/200 (75%): loss 0.1235, lr 2.50e-4, 1234 tok/s, elapsed 1:40, ETA 1:40"
        );
    }
}
