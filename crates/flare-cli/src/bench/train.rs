//! `flare bench train`: LoRA training throughput of a model shape with random weights, in the
//! rows that `bench/anchor_train.py` prints for PyTorch + PEFT: tokens/s, step time by phase,
//! peak device memory and MFU, per `batch x seq` case; and, with `--max-context`, the longest
//! batch-1 sequence that trains.
//!
//! Model: `--config`, a preset (`qwen2-0.5b`, the default; `llama-3.1-8b`; `qwen2.5-7b`; the
//! table is `bench/model_presets.json`, shared with the anchor, see [`super::presets`]) or an
//! HF `config.json`; random weights drawn on the device ([`Transformer::random`]), bf16 on
//! CUDA, f32 on the CPU. LoRA r = 16, alpha = 32 on all seven projections (f32 adapters);
//! AdamW; global-norm clipping at 1.0; random token ids, every target counted.
//!
//! A step is the trainer's: the micro-batch loss is [`flare::train::batch_nll_sum`] (the
//! function `Trainer::step` calls, under the run's `gradient_checkpointing` and `packing`,
//! which `--gradient-checkpointing` and `--packing` set), then the backward under
//! `flare::runtime::cache_launch_params`, then [`global_grad_norm`], [`clip_scale`] and the
//! multi-tensor [`AdamW`] step. Each row is one document per batch row, so `--packing` changes
//! the layout only (one row of `batch` documents), not the tokens. Phases are timed with a
//! device synchronisation between them: forward + loss (`fwd_ms`; `loss_ms` is null and
//! `fwd_includes_loss` true, as in the anchor's Liger rows), backward, optimizer. Where the
//! trainer replays a CUDA graph of the forward and backward ([`StepGraphs`]: CUDA, padded
//! batches, no checkpointing, `FLARE_STEP_GRAPH` on), the bench does too, through the
//! trainer's own [`StepGraphs::pass`]: the row says `graph`, and the forward and backward are
//! timed as one (`fwd_bwd_ms`; `fwd_ms` and `bwd_ms` null).
//!
//! Steps: warm-up then timed steps; the row reports the mean of the timed steps (the phases
//! and `step_ms`; `step_ms_median` too). Defaults: 2 warm-up steps (the second captures the
//! graph where one applies), then 3 timed steps for models of over 2e9 frozen weights and
//! `--quick`, 5 for others (`--warmup`, `--steps` override). Peak memory: the device
//! pool's high-water mark over the timed steps (reset per shape), weights included, as
//! `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. MFU: model FLOPs per
//! token ([`presets::flops_per_token`], the anchor's formula) x tokens/s over the dense bf16
//! peak of the device ([`presets::PEAKS`], `--peak-tflops`).
//!
//! `--max-context`: batch 1, doubling from `--max-context-start` until a step runs out of
//! memory (or `--max-context-limit`), then bisection on multiples of
//! `--max-context-granularity` between the longest that ran and the shortest that did not.
//! Each try is one step; an out-of-memory error is caught as an error, every tensor of the try
//! is dropped and the pool's free memory returned before the next. The longest that ran is
//! then measured like a shape row. On the CPU an allocation failure aborts the process rather
//! than returning an error: give a `--max-context-limit` there.
//!
//! A shape that runs out of memory gives a row with status `oom`; another error a row with
//! status `error: ...`; the bench goes on either way.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Var};
use clap::Args;
use flare::models::Transformer;
use flare::train::memory::{available_memory, decide_checkpointing, MemoryEstimate};
use flare::train::{
    batch_nll_sum, clip_scale, eager_grads, global_grad_norm, AdamW, Checkpointing, Example,
    StepGraphs, TrainConfig,
};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::presets::{self, LORA_R};
use crate::device::{hardware_name, DeviceSpec};
use crate::report::{median, write_json};

/// `flare bench train`.
#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// 2 layers and small cases (a smoke run, and the default on a CPU).
    #[arg(long)]
    pub quick: bool,
    /// Write the rows as JSON to this file (rewritten after each row).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The model: a preset (qwen2-0.5b, llama-3.1-8b, qwen2.5-7b) or an HF config.json (or
    /// its folder).
    #[arg(long, default_value = "qwen2-0.5b")]
    pub config: String,
    /// Override the config's num_hidden_layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Cases, batch x seq, comma-separated (default 4x512,8x1024; 1x4096,4x4096 for models
    /// over 2e9 weights; 1x128,2x256 with --quick; none with --max-context).
    #[arg(long, value_name = "BxS,...")]
    pub shapes: Option<String>,
    /// Activation checkpointing of the decoder layers: off, on, offload (on, the layers'
    /// inputs in host memory), auto (the trainer's setting).
    #[arg(long, default_value = "off", value_parser = parse_checkpointing)]
    pub gradient_checkpointing: Checkpointing,
    /// Sequence packing (the trainer's setting): true or false.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub packing: bool,
    /// Projections of one input (each layer's gate and up, and its q, k and v) with adapters as
    /// grouped LoRA products (the model's default): true or false (each projection alone, for
    /// comparisons).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub grouped_projections: bool,
    /// Each layer's MLP as one fused LoRA op (`Transformer::set_fused_mlp`: on CUDA the low-rank
    /// terms run inside the frozen GEMMs' reduction, on weights laid out with spare rows and
    /// columns): true or false (the model's default, the separate ops).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub fused_mlp: bool,
    /// Search the longest batch-1 sequence that trains (doubling, then bisection).
    #[arg(long)]
    pub max_context: bool,
    /// The first length the search tries (default 4096; 128 with --quick).
    #[arg(long)]
    pub max_context_start: Option<usize>,
    /// The bisection stops when the longest that ran and the shortest that did not are this
    /// close; tries are multiples of it.
    #[arg(long, default_value_t = 1024)]
    pub max_context_granularity: usize,
    /// The longest length the search tries.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_context_limit: usize,
    /// Stop the bisection after this many seconds of search.
    #[arg(long)]
    pub max_context_budget_s: Option<f64>,
    /// Warm-up steps per case (default 2: the first fills the caches, the second captures
    /// the CUDA graph where one applies).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Timed steps per case.
    #[arg(long)]
    pub steps: Option<usize>,
    /// The GPU's dense bf16 peak in TFLOP/s for MFU (default: from the device name).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

fn parse_checkpointing(s: &str) -> std::result::Result<Checkpointing, String> {
    match s.to_ascii_lowercase().as_str() {
        "off" | "false" => Ok(Checkpointing::Off),
        "on" | "true" => Ok(Checkpointing::On),
        "offload" => Ok(Checkpointing::Offload),
        "auto" => Ok(Checkpointing::Auto),
        other => Err(format!("{other:?} is not off, on, offload or auto")),
    }
}

/// `BxS,...` into (batch, seq) pairs.
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = part
            .to_ascii_lowercase()
            .split_once('x')
            .and_then(|(b, t)| Some((b.trim().parse().ok()?, t.trim().parse().ok()?)));
        match parsed {
            Some((b, t)) if b > 0 && t > 0 => out.push((b, t)),
            _ => bail!("--shapes: {part:?} is not BxS with B, S >= 1"),
        }
    }
    if out.is_empty() {
        bail!("--shapes: no case in {s:?}");
    }
    Ok(out)
}

/// One try of the `--max-context` search.
#[derive(Debug, Clone, Serialize)]
pub struct Try {
    /// Sequence length.
    pub seq: usize,
    /// `ok`, `oom` or `error: ...`.
    pub status: String,
    /// The step's time, s.
    pub step_s: Option<f64>,
    /// The step's peak device memory, GiB.
    pub peak_gib: Option<f64>,
}

/// One result row (the keys of bench/anchor_train.py's rows).
#[derive(Debug, Clone, Serialize)]
pub struct TrainRow {
    /// `flare`.
    pub r#impl: String,
    /// Device name.
    pub device: String,
    /// Compute dtype of the base.
    pub dtype: String,
    /// Decoder layers.
    pub layers: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Trained tokens per second (batch * seq / mean step time).
    pub tokens_per_s: Option<f64>,
    /// Peak device memory over the timed steps, GiB (None on CPU).
    pub peak_gib: Option<f64>,
    /// Mean forward + loss time, ms (null when a CUDA graph ran forward and backward as one).
    pub fwd_ms: Option<f64>,
    /// Peak device memory of the last timed step's forward + loss, GiB (op-by-op passes on
    /// CUDA; `peak_gib` is the whole step's).
    pub peak_fwd_gib: Option<f64>,
    /// Device memory in use after the last timed step's forward + loss (the activations and
    /// buffers kept for the backward, with the weights and optimizer state), GiB.
    pub held_after_fwd_gib: Option<f64>,
    /// Always null: the loss is timed with the forward (`fwd_includes_loss`).
    pub loss_ms: Option<f64>,
    /// Mean backward time, ms (null when a CUDA graph ran forward and backward as one).
    pub bwd_ms: Option<f64>,
    /// Mean forward + loss + backward time, ms.
    pub fwd_bwd_ms: Option<f64>,
    /// True when every timed step's forward and backward ran as a replayed CUDA graph
    /// (`FLARE_STEP_GRAPH`; then `fwd_ms` and `bwd_ms` are null).
    pub step_graph: bool,
    /// Mean optimizer time (norm, clipping, AdamW), ms.
    pub opt_ms: Option<f64>,
    /// Mean step time, ms.
    pub step_ms: Option<f64>,
    /// Median step time, ms.
    pub step_ms_median: Option<f64>,
    /// The config's name (preset or folder).
    pub model: String,
    /// Gradient checkpointing forced on (true) or off (false); null for `auto`.
    pub grad_ckpt: Option<bool>,
    /// `--gradient-checkpointing` as given.
    pub grad_ckpt_setting: String,
    /// Whether the checkpointed layers' inputs were kept in host memory (`offload`, or `auto`
    /// deciding so).
    pub ckpt_offload: bool,
    /// `--packing`.
    pub packing: bool,
    /// `--grouped-projections`.
    pub grouped_projections: bool,
    /// `--fused-mlp`.
    pub fused_mlp: bool,
    /// Model FLOPs per second over the peak.
    pub mfu: Option<f64>,
    /// `ok`, `oom` or `error: ...`.
    pub status: String,
    /// Model FLOPs per trained token.
    pub flops_per_token: f64,
    /// The peak MFU divides by, TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// Model TFLOP/s achieved.
    pub tflops: Option<f64>,
    /// Warm-up steps.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// The first warm-up step's time, s.
    pub first_step_s: Option<f64>,
    /// True: `fwd_ms` holds forward + loss.
    pub fwd_includes_loss: bool,
    /// True on the `--max-context` search's row.
    pub max_context: bool,
    /// Trainable (LoRA) parameters.
    pub lora_params: u64,
    /// The search's tries (max-context row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries: Option<Vec<Try>>,
    /// How the search ended (max-context row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    /// The shortest length that did not fit (max-context row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_oom: Option<usize>,
    /// The longest length that ran one step (max-context row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_single_step: Option<usize>,
    /// Seconds of search (max-context row only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_s: Option<f64>,
}

/// Whether `e` is the device (or the memory estimate) running out of memory.
fn is_oom(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}").to_ascii_lowercase();
    m.contains("out_of_memory")
        || m.contains("out of memory")
        || m.contains("alloc_failed")
        || m.contains("not enough memory")
}

fn status_of(e: &anyhow::Error) -> String {
    if is_oom(e) {
        "oom".into()
    } else {
        let m = format!("{e:#}");
        format!("error: {}", m.chars().take(300).collect::<String>())
    }
}

/// [`status_of`] of a failed case, with an out-of-memory error's own message on stderr (the row
/// says only `oom`; the message names what failed to allocate, and in which phase) and the
/// device pool's state at the failure (`pool`, from [`Meter::state`]).
fn failure(what: &str, e: &anyhow::Error, pool: Option<String>) -> String {
    let st = status_of(e);
    if st == "oom" {
        let m = format!("{e:#}");
        eprintln!(
            "{what}: out of memory: {}{}",
            m.chars().take(400).collect::<String>(),
            pool.map_or(String::new(), |p| format!(" ({p})"))
        );
    }
    st
}

/// Reads the device pool's high-water mark (CUDA); nothing elsewhere.
struct Meter {
    #[cfg(feature = "cuda")]
    pool: Option<super::pool::PoolMeter>,
}

impl Meter {
    fn new(dev: &Device) -> Result<Meter> {
        #[cfg(feature = "cuda")]
        return Ok(Meter {
            pool: match dev {
                Device::Cuda(c) => Some(super::pool::PoolMeter::new(c)?),
                _ => None,
            },
        });
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dev;
            Ok(Meter {})
        }
    }

    /// Restarts the mark from the current usage (after a synchronisation).
    fn reset(&self, dev: &Device) -> Result<()> {
        flare::runtime::synchronize(dev)?;
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            p.reset_high()?;
        }
        Ok(())
    }

    /// The pool's usage now, in words (None without a pool, or when the driver does not answer,
    /// as after some failures): what an out-of-memory report adds.
    fn state(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            let (used, reserved, high) = (p.used().ok()?, p.reserved().ok()?, p.high().ok()?);
            return Some(format!(
                "device pool: {:.2} GiB in use, {:.2} GiB reserved, peak {:.2} GiB",
                gib(used),
                gib(reserved),
                gib(high)
            ));
        }
        None
    }

    /// The mark and the memory in use now, in GiB, after one synchronisation; None without a
    /// pool.
    fn high_and_used_gib(&self, dev: &Device) -> Result<Option<(f64, f64)>> {
        flare::runtime::synchronize(dev)?;
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            return Ok(Some((gib(p.high()?), gib(p.used()?))));
        }
        Ok(None)
    }

    /// The mark in GiB (after a synchronisation); None without a pool.
    fn high_gib(&self, dev: &Device) -> Result<Option<f64>> {
        Ok(self.high_and_used_gib(dev)?.map(|(high, _)| high))
    }
}

/// Bytes in GiB.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The model, its optimizer and the trainer settings a step runs under.
struct Bench {
    /// The trainer's captured passes (the bench times the trainer's path).
    graphs: StepGraphs,
    model: Transformer,
    opt: AdamW,
    params: Vec<Var>,
    config: TrainConfig,
    dev: Device,
    meter: Meter,
}

/// One step's phase times, ms.
struct Times {
    /// Forward and loss (None when a graph ran the pass: not timed apart).
    fwd: Option<f64>,
    /// Backward (None when a graph ran the pass).
    bwd: Option<f64>,
    /// Forward, loss and backward.
    fwd_bwd: f64,
    /// Norm, clipping and AdamW.
    opt: f64,
    /// The whole step.
    step: f64,
    /// Whether a CUDA graph ran the pass.
    graphed: bool,
    /// Peak device memory of the forward and loss, GiB (op-by-op passes on CUDA).
    fwd_peak: Option<f64>,
    /// Device memory in use after the forward and loss (what the backward starts from), GiB.
    held: Option<f64>,
}

fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1e3
}

/// Mean phase times of the timed steps, the median step, the peak GiB and the first step's
/// seconds.
struct Measured {
    /// Whether the layers were checkpointed, and their inputs offloaded (the `auto`
    /// decision, or the setting).
    checkpointing: (bool, bool),
    /// The timed steps' means: a phase is `None` unless every step timed it, and `graphed`
    /// says whether every step's pass ran as a CUDA graph.
    mean: Times,
    median_step: f64,
    peak: Option<f64>,
    first_s: f64,
}

impl Bench {
    /// The batch of `batch` rows of `seq` random tokens (each row one document, every target
    /// counted), the same for the same shape.
    fn batch(&self, batch: usize, seq: usize) -> flare::train::Batch {
        let vocab = self.model.config().vocab_size as u32;
        let mut rng = rand::rngs::StdRng::seed_from_u64((batch * 131 + seq) as u64);
        let docs: Vec<Example> = (0..batch)
            .map(|_| Example {
                ids: (0..=seq).map(|_| rng.random_range(0..vocab)).collect(),
                labels: vec![true; seq + 1],
            })
            .collect();
        let docs: Vec<&Example> = docs.iter().collect();
        if self.config.packing {
            flare::train::data::make_packed_batch(&docs)
        } else {
            flare::train::data::make_batch(&docs, 0)
        }
    }

    /// One training step, timed by phase. Where the trainer would replay a CUDA graph of the
    /// pass ([`StepGraphs::applies`]), the step takes the same path ([`StepGraphs::pass`]) and
    /// its forward and backward are timed as one; otherwise they are timed apart.
    fn step(&mut self, b: &flare::train::Batch) -> Result<Times> {
        let dev = &self.dev;
        let sync = || flare::runtime::synchronize(dev);
        let scale = 1.0 / b.n_targets as f64;
        sync()?;
        let t0 = Instant::now();
        let (gs, fwd, bwd, graphed, mem) = if self.graphs.applies(&self.model, b) {
            let pass = self
                .graphs
                .pass(&self.model, &self.params, b, scale)
                .context("forward, loss and backward")?;
            drop(pass.loss);
            (pass.grads, None, None, pass.graphed, (None, None))
        } else {
            // The trainer's op-by-op pass (`eager_pass`), with a sync between its halves, where
            // the memory is read: the forward's peak (the mark restarts with each step, so a
            // case's peak is its last step's) and what stays in use for the backward.
            self.meter.reset(dev)?;
            let loss = (batch_nll_sum(&self.model, b, true).context("forward and loss")? * scale)?;
            sync()?;
            let t1 = Instant::now();
            let mem = self.meter.high_and_used_gib(dev)?.unzip();
            let gs = eager_grads(&self.model, &self.params, &loss).context("backward")?;
            drop(loss);
            sync()?;
            (
                gs,
                Some(ms(t0, t1)),
                Some(ms(t1, Instant::now())),
                false,
                mem,
            )
        };
        sync()?;
        let t2 = Instant::now();
        let norm = global_grad_norm(&gs).context("optimizer")?;
        if !norm.is_finite() {
            bail!("non-finite gradient norm {norm}");
        }
        self.opt
            .step_with(&gs, 1e-4, clip_scale(norm, self.config.max_grad_norm))?;
        drop(gs);
        sync()?;
        let t3 = Instant::now();
        Ok(Times {
            fwd,
            bwd,
            fwd_bwd: ms(t0, t2),
            opt: ms(t2, t3),
            step: ms(t0, t3),
            graphed,
            fwd_peak: mem.0,
            held: mem.1,
        })
    }

    /// The trainer settings of a `batch x seq` case, and whether its layers are checkpointed:
    /// as set, or for `auto` as the trainer decides ([`decide_checkpointing`]) from the
    /// estimate of the case's activations against the device's free memory now (the weights,
    /// adapters and optimizer state are already allocated).
    fn set_case(&mut self, batch: usize, seq: usize) -> Result<(bool, bool)> {
        self.config.batch_size = batch;
        self.config.max_seq_len = seq + 1;
        let (on, offload) = match self.config.gradient_checkpointing {
            Checkpointing::Off => (false, false),
            Checkpointing::On => (true, false),
            Checkpointing::Offload => (true, true),
            Checkpointing::Auto => {
                let cfg = self.model.config();
                let without = MemoryEstimate::for_run_with(cfg, &self.config, false)?;
                let with = MemoryEstimate::for_run_with(cfg, &self.config, true)?;
                let free = available_memory(&self.dev)?;
                let d = decide_checkpointing(
                    Checkpointing::Auto,
                    without.activations,
                    with.activations,
                    free,
                    self.dev.is_cuda(),
                );
                eprintln!("{batch}x{seq}: {d}");
                (d.on, d.offload)
            }
        };
        self.model.set_gradient_checkpointing(on);
        self.model.set_checkpoint_offload(offload);
        Ok((on, offload))
    }

    /// Warm-up then timed steps of one case.
    fn measure(
        &mut self,
        batch: usize,
        seq: usize,
        warmup: usize,
        steps: usize,
    ) -> Result<Measured> {
        let checkpointing = self.set_case(batch, seq)?;
        let b = self.batch(batch, seq);
        let mut times = Vec::with_capacity(steps);
        let mut first_s = 0.0;
        for it in 0..warmup + steps {
            if it == warmup {
                self.meter.reset(&self.dev)?;
            }
            let t = self.step(&b)?;
            if it == 0 {
                first_s = t.step / 1e3;
            }
            if it >= warmup {
                times.push(t);
            }
        }
        let peak = self.meter.high_gib(&self.dev)?;
        let n = times.len().max(1) as f64;
        let mean = |f: fn(&Times) -> f64| times.iter().map(f).sum::<f64>() / n;
        let mean_of =
            |f: fn(&Times) -> Option<f64>| times.iter().map(f).sum::<Option<f64>>().map(|s| s / n);
        Ok(Measured {
            checkpointing,
            mean: Times {
                fwd: mean_of(|t| t.fwd),
                bwd: mean_of(|t| t.bwd),
                fwd_bwd: mean(|t| t.fwd_bwd),
                opt: mean(|t| t.opt),
                step: mean(|t| t.step),
                graphed: !times.is_empty() && times.iter().all(|t| t.graphed),
                fwd_peak: times.last().and_then(|t| t.fwd_peak),
                held: times.last().and_then(|t| t.held),
            },
            median_step: median(&times.iter().map(|t| t.step).collect::<Vec<_>>()),
            peak,
            first_s,
        })
    }

    /// One batch-1 step at length `seq`: (status, step s, peak GiB). Whatever the try
    /// allocated is dropped before this returns; after a failure the pool's free memory goes
    /// back to the driver.
    fn try_once(&mut self, seq: usize) -> Result<(String, Option<f64>, Option<f64>)> {
        self.set_case(1, seq)?;
        let r = (|| -> Result<(f64, Option<f64>)> {
            let b = self.batch(1, seq);
            self.meter.reset(&self.dev)?;
            let t = self.step(&b)?;
            Ok((t.step / 1e3, self.meter.high_gib(&self.dev)?))
        })();
        match r {
            Ok((s, peak)) => Ok(("ok".into(), Some(s), peak)),
            Err(e) => {
                let st = failure(&format!("1x{seq}"), &e, self.meter.state());
                drop(e);
                flare::runtime::empty_cache(&self.dev)?;
                Ok((st, None, None))
            }
        }
    }
}

/// What every row of a run shares.
struct RowCtx {
    device: String,
    dtype: String,
    layers: usize,
    model: String,
    setting: Checkpointing,
    packing: bool,
    grouped: bool,
    fused_mlp: bool,
    peak_tflops: Option<f64>,
    warmup: usize,
    steps: usize,
    lora_params: u64,
    config: flare::models::ModelConfig,
}

impl RowCtx {
    fn row(&self, batch: usize, seq: usize, status: String) -> TrainRow {
        TrainRow {
            r#impl: "flare".into(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            layers: self.layers,
            batch,
            seq,
            tokens_per_s: None,
            peak_gib: None,
            fwd_ms: None,
            peak_fwd_gib: None,
            held_after_fwd_gib: None,
            loss_ms: None,
            bwd_ms: None,
            fwd_bwd_ms: None,
            step_graph: false,
            opt_ms: None,
            step_ms: None,
            step_ms_median: None,
            model: self.model.clone(),
            grad_ckpt: match self.setting {
                Checkpointing::Off => Some(false),
                Checkpointing::On | Checkpointing::Offload => Some(true),
                Checkpointing::Auto => None,
            },
            ckpt_offload: self.setting == Checkpointing::Offload,
            grad_ckpt_setting: format!("{:?}", self.setting).to_ascii_lowercase(),
            packing: self.packing,
            grouped_projections: self.grouped,
            fused_mlp: self.fused_mlp,
            mfu: None,
            status,
            flops_per_token: presets::flops_per_token(&self.config, seq, LORA_R),
            peak_tflops: self.peak_tflops,
            tflops: None,
            warmup: self.warmup,
            steps: self.steps,
            first_step_s: None,
            fwd_includes_loss: true,
            max_context: false,
            lora_params: self.lora_params,
            tries: None,
            search: None,
            first_oom: None,
            longest_single_step: None,
            search_s: None,
        }
    }

    fn timed(&self, batch: usize, seq: usize, m: &Measured) -> TrainRow {
        let mut r = self.row(batch, seq, "ok".into());
        r.grad_ckpt = Some(m.checkpointing.0);
        r.ckpt_offload = m.checkpointing.1;
        let t = &m.mean;
        let tps = (batch * seq) as f64 / (t.step / 1e3);
        let tf = r.flops_per_token * tps / 1e12;
        r.tokens_per_s = Some(tps);
        r.peak_gib = m.peak;
        r.fwd_ms = t.fwd;
        r.peak_fwd_gib = t.fwd_peak;
        r.held_after_fwd_gib = t.held;
        r.bwd_ms = t.bwd;
        r.fwd_bwd_ms = Some(t.fwd_bwd);
        r.step_graph = t.graphed;
        r.opt_ms = Some(t.opt);
        r.step_ms = Some(t.step);
        r.step_ms_median = Some(m.median_step);
        r.tflops = Some(tf);
        r.mfu = self.peak_tflops.map(|p| tf / p);
        r.first_step_s = Some(m.first_s);
        r
    }
}

/// Prints a row as one line on stdout (flushed, so a pipe sees it at once).
fn show(r: &TrainRow) {
    use std::io::Write;
    let tag = format!(
        "flare{}{}",
        match r.grad_ckpt {
            Some(true) if r.ckpt_offload => " +ckpt+offload",
            Some(true) => " +ckpt",
            Some(false) => "",
            None => " +ckpt:auto",
        },
        if r.packing { " +pack" } else { "" }
    );
    let tag = if r.max_context {
        format!("{tag} max-context")
    } else {
        tag
    };
    let shape = format!("{:>2}x{:<6}", r.batch, r.seq);
    let line = match (r.status.as_str(), r.tokens_per_s) {
        ("ok", Some(tps)) => {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
            let phases = if r.step_graph {
                format!("fwd+bwd {:>8} ms (graph)", f(r.fwd_bwd_ms))
            } else {
                format!("fwd+loss {:>8} ms  bwd {:>8} ms", f(r.fwd_ms), f(r.bwd_ms))
            };
            let mem = match (r.peak_fwd_gib, r.held_after_fwd_gib) {
                (Some(p), Some(h)) => format!(" (fwd {p:.2}, held {h:.2})"),
                _ => String::new(),
            };
            format!(
                "{tag:<20} {shape} {tps:>9.0} tok/s  MFU {:>6}  peak {:>10}{mem}  {phases}  \
                 opt {:>6} ms  step {:>8} ms  (first step {:.1} s)",
                r.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m)),
                r.peak_gib.map_or("-".into(), |p| format!("{p:.2} GiB")),
                f(r.opt_ms),
                f(r.step_ms),
                r.first_step_s.unwrap_or(0.0)
            )
        }
        (st, _) => format!("{tag:<20} {shape} {st}"),
    };
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// `flare bench train`.
pub fn run_train_bench(a: &TrainBenchArgs) -> Result<()> {
    let spec: DeviceSpec = a.device.parse()?;
    let dev = spec.open()?;
    let quick = a.quick || dev.is_cpu();
    let (model_name, mut json) = presets::load_config(&a.config)?;
    let full = presets::model_config(&json, &a.config)?;
    let big = presets::param_counts(&full, LORA_R).0 > 2_000_000_000;
    if quick {
        json["num_hidden_layers"] = 2.into();
    }
    if let Some(l) = a.layers {
        json["num_hidden_layers"] = l.into();
    }
    let config = presets::model_config(&json, &a.config)?;
    let layers = config.num_hidden_layers;
    let cases = match (&a.shapes, a.max_context, quick, big) {
        (Some(s), ..) => parse_shapes(s)?,
        (None, true, ..) => vec![],
        (None, false, true, _) => vec![(1, 128), (2, 256)],
        (None, false, false, true) => vec![(1, 4096), (4, 4096)],
        (None, false, false, false) => vec![(4, 512), (8, 1024)],
    };
    let warmup = a.warmup.unwrap_or(2);
    let steps = a.steps.unwrap_or(if quick || big { 3 } else { 5 }).max(1);
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let device = hardware_name(&dev);
    let peak_tflops = a.peak_tflops.or_else(|| {
        (!dev.is_cpu())
            .then(|| presets::peak_tflops_for(&device))
            .flatten()
    });
    let (n_frozen, n_lora) = presets::param_counts(&config, LORA_R);
    eprintln!(
        "{model_name}: {layers} layers, {:.3}B frozen matmul weights, {:.1}M LoRA; {device}, \
         peak {} TFLOP/s; warm-up {warmup}, timed {steps} (mean); gradient checkpointing {}, \
         packing {}, grouped projections {}, fused MLP {}",
        n_frozen as f64 / 1e9,
        n_lora as f64 / 1e6,
        peak_tflops.map_or("-".into(), |p| p.to_string()),
        format!("{:?}", a.gradient_checkpointing).to_ascii_lowercase(),
        a.packing,
        a.grouped_projections,
        a.fused_mlp
    );

    let t0 = Instant::now();
    let mut model = Transformer::random(config.clone(), dtype, &dev, 0)
        .with_context(|| format!("building the {model_name} model with random weights"))?;
    model.set_grouped_projections(a.grouped_projections);
    model
        .set_fused_mlp(a.fused_mlp)
        .context("laying out the MLP weights for --fused-mlp")?;
    let train_cfg = TrainConfig {
        dtype: format!("{dtype:?}").to_ascii_lowercase(),
        device: a.device.clone(),
        gradient_checkpointing: a.gradient_checkpointing,
        packing: a.packing,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let lora = train_cfg.lora();
    debug_assert_eq!(lora.r, LORA_R);
    let mut params = Vec::new();
    for (i, (path, layer)) in model.lora_modules_mut().into_iter().enumerate() {
        if !lora.targets(&path) {
            continue;
        }
        layer.add_adapter("default", &lora, i as u64)?;
        layer.set_active(Some("default"))?;
        layer.set_training(true);
        let v = layer.trainable_vars();
        params.push((format!("{path}.lora_A"), v[0].clone()));
        params.push((format!("{path}.lora_B"), v[1].clone()));
    }
    let lora_params: u64 = params.iter().map(|(_, v)| v.elem_count() as u64).sum();
    let opt = AdamW::new(params, train_cfg.adamw())?;
    flare::runtime::synchronize(&dev)?;
    eprintln!(
        "--- flare: built in {:.1} s, {:.1}M trainable",
        t0.elapsed().as_secs_f64(),
        lora_params as f64 / 1e6
    );
    let mut bench = Bench {
        graphs: StepGraphs::new(&dev, train_cfg.lora_dropout, 1),
        params: opt.params().to_vec(),
        model,
        opt,
        config: train_cfg,
        meter: Meter::new(&dev)?,
        dev: dev.clone(),
    };
    let ctx = RowCtx {
        device,
        dtype: format!("{dtype:?}").to_ascii_lowercase(),
        layers,
        model: model_name,
        setting: a.gradient_checkpointing,
        packing: a.packing,
        grouped: a.grouped_projections,
        fused_mlp: a.fused_mlp,
        peak_tflops,
        warmup,
        steps,
        lora_params,
        config,
    };

    let mut rows: Vec<TrainRow> = Vec::new();
    let mut emit = |r: TrainRow| -> Result<()> {
        show(&r);
        rows.push(r);
        if let Some(p) = &a.json {
            write_json(p, &rows)?;
        }
        Ok(())
    };
    for &(b, s) in &cases {
        let row = match bench.measure(b, s, warmup, steps) {
            Ok(m) => ctx.timed(b, s, &m),
            Err(e) => {
                let st = failure(&format!("{b}x{s}"), &e, bench.meter.state());
                drop(e);
                flare::runtime::empty_cache(&dev)?;
                ctx.row(b, s, st)
            }
        };
        emit(row)?;
    }
    if a.max_context {
        let start = a
            .max_context_start
            .unwrap_or(if quick { 128 } else { 4096 });
        emit(max_context(a, &mut bench, &ctx, start)?)?;
    }
    if rows.is_empty() {
        return Err(anyhow!("nothing to run: no --shapes and no --max-context"));
    }
    Ok(())
}

/// Doubling then bisection for the longest batch-1 sequence; the row of the longest, measured.
fn max_context(
    a: &TrainBenchArgs,
    bench: &mut Bench,
    ctx: &RowCtx,
    start: usize,
) -> Result<TrainRow> {
    let g = a.max_context_granularity.max(1);
    let limit = a.max_context_limit.max(1);
    let mut tries: Vec<Try> = Vec::new();
    let t_start = Instant::now();
    let mut attempt = |s: usize, bench: &mut Bench| -> Result<String> {
        let (st, secs, peak) = bench.try_once(s)?;
        eprintln!(
            "    max-context try {s:>8}: {st:<5} {:>13}  peak {}",
            secs.map_or("-".into(), |t| format!("{:.0} tok/s", s as f64 / t)),
            peak.map_or("-".into(), |p| format!("{p:.2} GiB"))
        );
        tries.push(Try {
            seq: s,
            status: st.clone(),
            step_s: secs,
            peak_gib: peak,
        });
        Ok(st)
    };
    let (mut good, mut bad) = (0usize, None::<usize>);
    let mut s = start.max(g).min(limit);
    let mut failed: Option<String> = None;
    loop {
        let st = attempt(s, bench)?;
        if st == "ok" {
            good = s;
            if s >= limit {
                break;
            }
            s = (2 * s).min(limit);
        } else if st == "oom" {
            bad = Some(s);
            break;
        } else {
            failed = Some(st);
            break;
        }
    }
    let mut search = match bad {
        Some(_) => "complete".to_string(),
        None => format!("reached --max-context-limit {limit}"),
    };
    if let Some(st) = failed {
        search = format!("stopped by an error at {s}");
        let mut r = ctx.row(1, s, st);
        r.max_context = true;
        r.tries = Some(tries);
        r.search = Some(search);
        return Ok(r);
    }
    if let Some(mut hi) = bad {
        while hi - good > g {
            if let Some(budget) = a.max_context_budget_s {
                if t_start.elapsed().as_secs_f64() > budget {
                    search = format!("stopped by --max-context-budget-s: between {good} and {hi}");
                    break;
                }
            }
            let mut mid = (good + hi) / 2 / g * g;
            if mid <= good {
                mid = good + g;
            }
            if mid >= hi {
                break;
            }
            match attempt(mid, bench)?.as_str() {
                "ok" => good = mid,
                "oom" => hi = mid,
                other => {
                    search = format!("stopped by an error at {mid}: {other}");
                    break;
                }
            }
        }
        bad = Some(hi);
    }
    let search_s = t_start.elapsed().as_secs_f64();
    eprintln!(
        "    max-context: longest that ran {good}, shortest that did not {} ({search_s:.0} s of \
         search, {search})",
        bad.map_or("-".into(), |b| b.to_string())
    );
    let finish = |mut r: TrainRow, tries: Vec<Try>| {
        r.max_context = true;
        r.tries = Some(tries);
        r.search = Some(search.clone());
        r.first_oom = bad;
        r.longest_single_step = Some(good);
        r.search_s = Some(search_s);
        r
    };
    if good == 0 {
        return Ok(finish(ctx.row(1, 0, "oom".into()), tries));
    }
    // Measure the longest that ran; if the timed steps no longer fit, the next longest.
    let mut oks: Vec<usize> = tries
        .iter()
        .filter(|t| t.status == "ok")
        .map(|t| t.seq)
        .collect();
    oks.sort_unstable_by(|x, y| y.cmp(x));
    for s in oks {
        match bench.measure(1, s, ctx.warmup, ctx.steps) {
            Ok(m) => return Ok(finish(ctx.timed(1, s, &m), tries)),
            Err(e) => {
                let st = failure(&format!("1x{s}"), &e, bench.meter.state());
                drop(e);
                flare::runtime::empty_cache(&bench.dev)?;
                if st != "oom" {
                    return Ok(finish(ctx.row(1, s, st), tries));
                }
                eprintln!("    max-context: {s} ran once but not in the timed run (oom); next");
            }
        }
    }
    Ok(finish(ctx.row(1, good, "oom".into()), tries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(
            parse_shapes("1x4096, 4X512,").unwrap(),
            vec![(1, 4096), (4, 512)]
        );
        for bad in ["", "4", "4x", "0x512", "ax2", "2x-1"] {
            assert!(parse_shapes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oom_errors_are_recognised() {
        let cuda = anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(is_oom(&cuda.context("forward")));
        assert!(is_oom(&anyhow!("CUBLAS_STATUS_ALLOC_FAILED")));
        assert!(!is_oom(&anyhow!("shape mismatch")));
        assert_eq!(
            status_of(&anyhow!("shape mismatch")),
            "error: shape mismatch"
        );
        // A failed case's status is the same; an out-of-memory one also goes to stderr.
        let oom = anyhow!("CUDA_ERROR_OUT_OF_MEMORY").context("allocating 3.2 GB");
        assert_eq!(
            failure("1x196608", &oom, Some("device pool: ...".into())),
            "oom"
        );
        assert_eq!(
            failure("4x512", &anyhow!("shape mismatch"), None),
            "error: shape mismatch"
        );
    }

    #[test]
    fn checkpointing_values() {
        assert_eq!(parse_checkpointing("AUTO").unwrap(), Checkpointing::Auto);
        assert_eq!(parse_checkpointing("on").unwrap(), Checkpointing::On);
        assert_eq!(parse_checkpointing("off").unwrap(), Checkpointing::Off);
        assert_eq!(
            parse_checkpointing("offload").unwrap(),
            Checkpointing::Offload
        );
        assert!(parse_checkpointing("sometimes").is_err());
    }
}
