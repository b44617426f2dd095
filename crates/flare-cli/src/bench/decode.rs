//! `flare bench decode`: prefill and greedy-decode speed of a model built from a config with
//! random weights (no download), against the floor set by reading the weights once per token.
//!
//! Rows: `prefill` (one prompt of `--prompt-len` tokens, tokens/s), `decode` for each
//! `--batch` size (tokens/s over `--new-tokens` greedy steps after a prefill that is not timed;
//! path `per-op`: each step is a `decode_step`, the device argmax and the copy of the token ids
//! to the host, as before the decode engine), and `generate` (batch 1, the library's
//! `generate`, prefill included; it runs on the decode engine where that applies). At batch 1,
//! where the decode engine ([`flare::generate::DecodeGraph`]) applies, two more `decode` rows: path
//! `graph` (one CUDA graph replay, one 4-byte copy and one synchronisation per step) and path
//! `kernels` (the same kernels launched one by one); before they are timed, the engine's greedy
//! tokens over `--new-tokens` steps are checked against the per-op path's (`check: ... ok` or
//! `DIFF at step s`).
//! Each is timed between device synchronisations after a warm-up run, and the median over
//! `--repeats` runs is reported. The weight-read floor is the bytes of weights read per step
//! (every projection, the norms and the output projection) over `--bandwidth-gbs`: a batch-B
//! step reads them once for B tokens.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::device::{hardware_name, DeviceSpec};
use crate::report::{median, write_json};
use flare::generate::{generate, GenerationConfig};
use flare::generate::{DecodeGraph, LaunchTime, EMPTY_KERNEL};
use flare::lora::LoraConfig;
use flare::models::{KvCache, ModelConfig, Transformer};

/// The long help of `flare bench decode`.
pub const DECODE_LONG_ABOUT: &str = "\
Time prefill and greedy decoding of a model with random weights built from a config: by default
the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, head_dim 64, intermediate
4864, vocab 151936, tied embeddings, q/k/v bias, rope_theta 1e6), or --config PATH
(a Hugging Face config.json). --quick uses a tiny config (CI, CPU: seconds).

Rows: prefill tokens/s (batch 1, --prompt-len tokens); decode tokens/s for each --batch size
(--new-tokens greedy steps after an untimed prefill; path per-op: each step is decode_step,
argmax on the device, token ids copied to the host); at batch 1 on CUDA also path graph (the
decode engine: one CUDA graph replay per step) and path kernels (the engine's kernels launched
one by one), after a check that the engine's greedy tokens equal the per-op path's (printed
'check: ... ok' or 'DIFF'); with --profile, a table of the engine's kernels (each launch of a
step timed between CUDA events: name, N and K of the gemvs, calls per step, microseconds per
call and per step, GB/s of weights); generate tokens/s (batch 1, flare::generate::generate, prefill
included; on the decode engine where it applies). Timed between device synchronisations after one warm-up run; median of
--repeats. The floor is the weight bytes read per step over --bandwidth-gbs (3350 GB/s: H100
SXM HBM3): flare's rate as a percentage of it says how far decoding is from bandwidth-bound.

Examples:
  flare bench decode --device cuda --json decode.json
  flare bench decode --device cuda --batch 1 --profile
  flare bench decode --quick";

/// Arguments of `flare bench decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights dtype: bf16, f16 or f32 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Prompt length (prefill row and the prompt before decoding).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub prompt_len: u32,
    /// Greedy decode steps per timed run.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub new_tokens: u32,
    /// Batch sizes of the decode rows, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Timed runs per row (the median is reported); default 5 (3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: Option<u32>,
    /// Memory bandwidth for the weight-read floor, GB/s.
    #[arg(long, default_value_t = 3350.0)]
    pub bandwidth_gbs: f64,
    /// A Hugging Face config.json to build the model from instead of the Qwen2-0.5B shape.
    #[arg(long, value_name = "PATH", conflicts_with = "quick")]
    pub config: Option<PathBuf>,
    /// Tiny model, short prompt and few tokens: seconds on a CPU.
    #[arg(long)]
    pub quick: bool,
    /// Write the rows as JSON to this file (atomically).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Also time each kernel of the decode engine's step (batch 1, CUDA): a table of the
    /// kernels (name, N, K, calls per step, microseconds, GB/s of weights) over --new-tokens
    /// profiled steps.
    #[arg(long)]
    pub profile: bool,
    /// Also time `generate` with a LoRA adapter of this rank on all seven projections (random,
    /// non-zero), active, then merged into the weights (`Transformer::merge_and_unload`, as
    /// `flare generate --merge-adapter`): two more `generate` rows. 0: none.
    #[arg(long, default_value_t = 0)]
    pub adapter_rank: usize,
}

/// The Qwen2-0.5B shape of the issue's target.
pub const QWEN2_05B: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
  "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
  "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": true}"#;

/// The tiny shape of `--quick`.
pub const QUICK: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
  "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
  "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": true}"#;

/// One result row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecodeRow {
    /// `prefill`, `decode` or `generate`; `generate, adapter r<R>` and `generate, adapter r<R>
    /// merged` with `--adapter-rank`.
    pub name: String,
    /// How the steps ran: `graph` (the decode engine replaying one CUDA graph per step),
    /// `kernels` (the engine's kernels launched one by one), `per-op` (`decode_step`).
    pub path: String,
    /// Sequences per step.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// New tokens per sequence (0 for prefill).
    pub new_tokens: usize,
    /// Tokens per second (all rows of the batch).
    pub tokens_per_s: f64,
    /// Milliseconds per step (per decode step; the whole prefill for prefill).
    pub ms_per_step: f64,
    /// The weight-read floor in tokens/s (decode rows), `batch * bandwidth / weight bytes`.
    pub floor_tokens_per_s: Option<f64>,
    /// `tokens_per_s` as a percentage of the floor.
    pub pct_of_floor: Option<f64>,
    /// Timed runs.
    pub repeats: usize,
    /// `flare`.
    pub framework: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The hardware's name.
    pub device_name: String,
    /// `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// The model shape, e.g. `qwen2 h896 L24 heads14/2 i4864 v151936`.
    pub model: String,
    /// Weight bytes read per decode step.
    pub weight_bytes: usize,
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => bail!("unknown --dtype '{other}': expected bf16, f16 or f32"),
    }
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// A short description of the model's shape.
pub fn model_label(c: &ModelConfig) -> String {
    format!(
        "{:?} h{} L{} heads{}/{} d{} i{} v{}",
        c.architecture,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    )
    .to_lowercase()
}

/// Seconds of one run of `f` between two device synchronisations.
fn timed(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    flare::runtime::synchronize(dev)?;
    let t0 = Instant::now();
    f()?;
    flare::runtime::synchronize(dev)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// One untimed warm-up run of `f` (which returns the seconds of its timed part), then the
/// median of `repeats` runs.
fn median_secs(repeats: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    f()?;
    let mut xs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        xs.push(f()?);
    }
    Ok(median(&xs))
}

/// `new` greedy steps from `first` (`[b, 1]` ids) on a prefilled cache: decode_step, device
/// argmax, token ids to the host (as generation does for its stop check).
fn greedy_steps(
    model: &Transformer,
    cache: &mut flare::models::KvCache,
    first: &Tensor,
    new: usize,
) -> Result<Vec<u32>> {
    let b = first.dim(0)?;
    let mut ids = first.clone();
    let mut last = Vec::new();
    for _ in 0..new {
        let logits = model.decode_step(&ids, cache)?;
        let next = flare::ops::argmax_last_dim(&logits.squeeze(1)?)?;
        last = next.to_vec1::<u32>()?;
        ids = next.reshape((b, 1))?;
    }
    Ok(last)
}

/// `new` greedy steps of the decode engine from token `first` on a prefilled batch-1 cache.
fn engine_steps(
    engine: &mut DecodeGraph,
    cache: &mut KvCache,
    first: u32,
    new: usize,
) -> Result<Vec<u32>> {
    engine.start(first, cache)?;
    (0..new)
        .map(|_| Ok(engine.step(cache)?))
        .collect::<Result<Vec<u32>>>()
}

/// The per-op path fed the engine's tokens (`first`, then `got` but its last) on a fresh
/// prefill: at each step, whether the engine's token is the per-op argmax. Returns the number of
/// steps where it is not and the largest relative gap `(max - logit[engine token]) / |max|`
/// there (0 when none).
fn forced_check(
    model: &Transformer,
    cache: &mut KvCache,
    ids: &Tensor,
    first: u32,
    got: &[u32],
) -> Result<(usize, f32)> {
    cache.reset();
    model.prefill(ids, cache)?;
    let (mut ties, mut worst) = (0, 0f32);
    let mut fed = first;
    for &te in got {
        let logits = model.decode_step(&Tensor::new(&[[fed]], model.device())?, cache)?;
        let l: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let tr = first_token(&logits)? as usize;
        if tr != te as usize {
            ties += 1;
            let gap = (l[tr] - l[te as usize]) / l[tr].abs().max(1e-30);
            worst = worst.max(if gap.is_nan() { f32::INFINITY } else { gap });
        }
        fed = te;
    }
    Ok((ties, worst))
}

/// The relative logit gap within which two tokens tie at `dtype`'s rounding (about one unit in
/// the last place of the logits).
fn tie_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

/// The greedy first token after a batch-1 prefill.
fn first_token(logits: &Tensor) -> Result<u32> {
    Ok(flare::generate::ids_to_host(&flare::generate::greedy_on_device(logits)?)?[0])
}

/// Runs `flare bench decode`.
pub fn run_decode(args: &DecodeArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let dev = spec.open()?;
    let dtype = match &args.dtype {
        Some(s) => parse_dtype(s)?,
        None if dev.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    let config = match (&args.config, args.quick) {
        (Some(p), _) => ModelConfig::from_file(p)
            .with_context(|| format!("reading --config {}", p.display()))?,
        (None, true) => ModelConfig::from_json_str(QUICK, "<quick config>")?,
        (None, false) => ModelConfig::from_json_str(QWEN2_05B, "<qwen2-0.5b config>")?,
    };
    let (prompt_len, new_tokens) = if args.quick {
        (
            (args.prompt_len as usize).min(32),
            (args.new_tokens as usize).min(16),
        )
    } else {
        (args.prompt_len as usize, args.new_tokens as usize)
    };
    let repeats = args
        .repeats
        .map_or(if args.quick { 3 } else { 5 }, |r| r as usize);
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs positive sizes, got {:?}", args.batch);
    }
    if args.bandwidth_gbs.is_nan() || args.bandwidth_gbs <= 0.0 {
        bail!("--bandwidth-gbs must be positive");
    }
    let label = model_label(&config);
    eprintln!(
        "building {label} with random weights ({}) on {}",
        dtype_name(dtype),
        spec.name()
    );
    let t_build = Instant::now();
    let model = Transformer::random(config.clone(), dtype, &dev, 0)?;
    flare::runtime::synchronize(&dev)?;
    eprintln!("built in {:.1} s", t_build.elapsed().as_secs_f64());
    let weight_bytes = model.decode_weight_bytes();
    let bw = args.bandwidth_gbs * 1e9;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let vocab = config.vocab_size as u32;
    let mut prompt = |b: usize| -> Result<Tensor> {
        let ids: Vec<u32> = (0..b * prompt_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        Ok(Tensor::from_vec(ids, (b, prompt_len), &dev)?)
    };
    let row =
        |name: &str, path: &str, batch: usize, new: usize, secs: f64, steps: usize, floor: bool| {
            let tokens = if new == 0 { prompt_len } else { batch * new };
            let tps = tokens as f64 / secs;
            let floor_tps = floor.then(|| batch as f64 * bw / weight_bytes as f64);
            DecodeRow {
                name: name.into(),
                path: path.into(),
                batch,
                prompt_len,
                new_tokens: new,
                tokens_per_s: tps,
                ms_per_step: secs * 1e3 / steps.max(1) as f64,
                floor_tokens_per_s: floor_tps,
                pct_of_floor: floor_tps.map(|f| 100.0 * tps / f),
                repeats,
                framework: "flare".into(),
                device: spec.name(),
                device_name: hardware_name(&dev),
                dtype: dtype_name(dtype).into(),
                model: label.clone(),
                weight_bytes,
            }
        };
    let mut rows = Vec::new();

    // Prefill, batch 1.
    let ids = prompt(1)?;
    let mut cache = model.new_cache(1, prompt_len + new_tokens)?;
    let secs = median_secs(repeats, || {
        cache.reset();
        timed(&dev, || {
            model.prefill(&ids, &mut cache)?;
            Ok(())
        })
    })?;
    rows.push(row("prefill", "per-op", 1, 0, secs, 1, false));

    // Greedy decode per batch size; batch 1 also on the decode engine where it applies, after
    // checking that its greedy tokens are the per-op path's.
    for &b in &args.batch {
        if b == 1 {
            let ids = prompt(1)?;
            let mut cache = model.new_cache(1, prompt_len + new_tokens)?;
            if let Some(why) = DecodeGraph::unsupported(&model, &cache) {
                eprintln!("decode engine: not used ({why})");
            } else {
                let first = first_token(&model.prefill(&ids, &mut cache)?)?;
                let mut per_op = vec![first];
                let mut t = first;
                for _ in 0..new_tokens {
                    let logits = model.decode_step(&Tensor::new(&[[t]], &dev)?, &mut cache)?;
                    t = first_token(&logits)?;
                    per_op.push(t);
                }
                for graph in [true, false] {
                    cache.reset();
                    let first = first_token(&model.prefill(&ids, &mut cache)?)?;
                    let mut engine = DecodeGraph::with_graph(&model, &cache, graph)?;
                    let path = if graph { "graph" } else { "kernels" };
                    let got = engine_steps(&mut engine, &mut cache, first, new_tokens)?;
                    let verdict = if first == per_op[0] && got[..] == per_op[1..] {
                        "ok (equal tokens)".to_string()
                    } else {
                        // Free-running tokens part at a tie: check every engine token against
                        // the per-op path fed the engine's own tokens (teacher forcing).
                        let s0 = got
                            .iter()
                            .zip(&per_op[1..])
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        let (ties, worst) = forced_check(&model, &mut cache, &ids, first, &got)?;
                        let tol = tie_tolerance(dtype);
                        if worst <= tol {
                            format!(
                                "ok (equal tokens for {s0} steps, then a tie: every engine token \
                                 is the per-op argmax fed the same tokens, or ties it within \
                                 rounding: {ties} ties, largest relative gap {worst:.1e} <= {tol:.0e})"
                            )
                        } else {
                            format!(
                                "DIFF at step {s0} (teacher-forced: {ties} mismatches, largest \
                                 relative logit gap {worst:.1e} > {tol:.0e})"
                            )
                        }
                    };
                    println!(
                        "check: decode engine ({path}) greedy tokens over {new_tokens} steps vs per-op path: {verdict}"
                    );
                    let secs = median_secs(repeats, || {
                        cache.reset();
                        let first = first_token(&model.prefill(&ids, &mut cache)?)?;
                        timed(&dev, || {
                            engine_steps(&mut engine, &mut cache, first, new_tokens)?;
                            Ok(())
                        })
                    })?;
                    rows.push(row("decode", path, 1, new_tokens, secs, new_tokens, true));
                }
                if args.profile {
                    cache.reset();
                    let first = first_token(&model.prefill(&ids, &mut cache)?)?;
                    let mut engine = DecodeGraph::with_graph(&model, &cache, false)?;
                    engine.start(first, &cache)?;
                    let mut steps = Vec::with_capacity(new_tokens);
                    for _ in 0..new_tokens {
                        steps.push(engine.profile_step(&mut cache)?.1);
                    }
                    print!("{}", format_profile(&steps));
                }
            }
        }
        let ids = prompt(b)?;
        let mut cache = model.new_cache(b, prompt_len + new_tokens)?;
        let secs = median_secs(repeats, || {
            cache.reset();
            let logits = model.prefill(&ids, &mut cache)?;
            let s = logits.dim(1)?;
            let first = flare::ops::argmax_last_dim(&logits.narrow(1, s - 1, 1)?.squeeze(1)?)?
                .reshape((b, 1))?;
            timed(&dev, || {
                greedy_steps(&model, &mut cache, &first, new_tokens)?;
                Ok(())
            })
        })?;
        rows.push(row(
            "decode", "per-op", b, new_tokens, secs, new_tokens, true,
        ));
    }

    // The library's generate, batch 1, prefill included.
    let prompt_ids: Vec<u32> = prompt(1)?.flatten_all()?.to_vec1()?;
    let gen = GenerationConfig {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let time_generate = |model: &Transformer| -> Result<(&'static str, f64)> {
        let path =
            if flare::generate::TokenStream::new(model, &prompt_ids, &gen)?.uses_decode_engine() {
                "graph"
            } else {
                "per-op"
            };
        let secs = median_secs(repeats, || {
            timed(&dev, || {
                let out = generate(model, &prompt_ids, &gen, |_| {})?;
                if out.len() != new_tokens {
                    bail!(
                        "generate returned {} tokens, expected {new_tokens}",
                        out.len()
                    );
                }
                Ok(())
            })
        })?;
        Ok((path, secs))
    };
    let (path, secs) = time_generate(&model)?;
    rows.push(row("generate", path, 1, new_tokens, secs, new_tokens, true));
    if args.adapter_rank > 0 {
        let r = args.adapter_rank;
        let mut adapted = model.clone();
        drop(model);
        let lora = LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            ..Default::default()
        };
        for (i, (path, l)) in adapted.lora_modules_mut().into_iter().enumerate() {
            l.add_adapter("bench", &lora, i as u64)?;
            let ad = l
                .adapter("bench")
                .with_context(|| format!("{path}: the adapter just added is missing"))?;
            let (a, b) = (ad.a().clone(), ad.b().randn_like(0.0, 0.01)?);
            l.set_adapter_weights("bench", &a, &b)?;
            l.set_active(Some("bench"))?;
        }
        let (path, secs) = time_generate(&adapted)?;
        let name = format!("generate, adapter r{r}");
        rows.push(row(&name, path, 1, new_tokens, secs, new_tokens, true));
        adapted.merge_and_unload()?;
        let (path, secs) = time_generate(&adapted)?;
        let name = format!("generate, adapter r{r} merged");
        rows.push(row(&name, path, 1, new_tokens, secs, new_tokens, true));
    }

    print!("{}", format_rows(&rows, args.bandwidth_gbs));
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The `--profile` table: the launches of the profiled steps grouped by kernel and shape, in
/// order of first launch, with calls per step, microseconds per call (mean over the steps) and
/// per step, and the gemvs' weight GB/s; then the sum per step and the empty kernel's time.
pub fn format_profile(steps: &[Vec<LaunchTime>]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // (name, n, k, bytes per call, launches, total microseconds)
    let mut groups: Vec<(&'static str, usize, usize, usize, usize, f64)> = Vec::new();
    for l in steps.iter().flatten() {
        match groups
            .iter_mut()
            .find(|g| (g.0, g.1, g.2) == (l.name, l.n, l.k))
        {
            Some(g) => {
                g.4 += 1;
                g.5 += l.us;
            }
            None => groups.push((l.name, l.n, l.k, l.bytes, 1, l.us)),
        }
    }
    let nsteps = steps.len().max(1) as f64;
    let _ = writeln!(
        out,
        "profile: decode engine kernels, each launch timed between CUDA events, mean of {} steps",
        steps.len()
    );
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>5} {:>6} {:>9} {:>10} {:>8}",
        "kernel", "N", "K", "calls", "us/call", "us/step", "GB/s"
    );
    let mut total = 0.0;
    let mut empty = None;
    for (name, n, k, bytes, count, us) in &groups {
        if *name == EMPTY_KERNEL {
            empty = Some(us / *count as f64);
            continue;
        }
        let per_call = us / *count as f64;
        let per_step = us / nsteps;
        total += per_step;
        let dim = |v: usize| {
            if v == 0 {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        let gbs = if *bytes > 0 && per_call > 0.0 {
            format!("{:.0}", *bytes as f64 / per_call / 1e3)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{name:<14} {:>7} {:>5} {:>6} {per_call:>9.2} {per_step:>10.1} {gbs:>8}",
            dim(*n),
            dim(*k),
            (*count as f64 / nsteps).round() as usize
        );
    }
    let _ = writeln!(out, "{:<14} {:>40.1}", "sum", total);
    if let Some(e) = empty {
        let _ = writeln!(
            out,
            "(each time includes the cost of a launch between two events: {e:.2} us for an empty kernel)"
        );
    }
    out
}

/// The printed table.
pub fn format_rows(rows: &[DecodeRow], bandwidth_gbs: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(r) = rows.first() {
        let _ = writeln!(
            out,
            "flare bench decode: {} ({}), {} on {}; weights read per step {:.1} MB, floor at {bandwidth_gbs} GB/s",
            r.model,
            r.dtype,
            r.device,
            r.device_name,
            r.weight_bytes as f64 / 1e6
        );
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(9);
    let _ = writeln!(
        out,
        "{:<w$} {:<8} {:>5} {:>7} {:>6} {:>12} {:>10} {:>12} {:>8}",
        "row", "path", "batch", "prompt", "new", "tokens/s", "ms/step", "floor tok/s", "% floor"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<w$} {:<8} {:>5} {:>7} {:>6} {:>12.1} {:>10.3} {:>12} {:>8}",
            r.name,
            r.path,
            r.batch,
            r.prompt_len,
            r.new_tokens,
            r.tokens_per_s,
            r.ms_per_step,
            r.floor_tokens_per_s
                .map_or("-".into(), |f| format!("{f:.0}")),
            r.pct_of_floor.map_or("-".into(), |p| format!("{p:.1}")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        let c = ModelConfig::from_json_str(QWEN2_05B, "x").unwrap();
        assert_eq!(
            (c.head_dim, c.qkv_bias, c.tie_word_embeddings),
            (64, true, true)
        );
        assert_eq!(
            model_label(&c),
            "qwen2 h896 l24 heads14/2 d64 i4864 v151936"
        );
        assert!(ModelConfig::from_json_str(QUICK, "x").is_ok());
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").is_err());
    }
}
