//! `flare demo`: the whole job on the bundled assets, on a CPU, in a couple of minutes.
//!
//! `assets/demo/` (made by `bench/make_demo_assets.py`) holds a tiny pretrained Qwen2-style
//! model with its tokenizer and chat template, and a chat dataset about a made-up country
//! (Veloria) mixed with facts about real ones. The demo prints greedy answers to the held-out
//! eval questions, LoRA fine-tunes on the training set with the progress bar, saves the adapter,
//! and prints the answers again: before training the model does not know Veloria, after it
//! does. Without `--output-dir` the run's files go to a temporary directory that is deleted
//! when the demo ends (also on error).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use flare::generate::{generate, GenerationConfig, HfGenerationConfig};
use flare::models::Transformer;
use flare::text::{ChatMessage, Tokenizer};
use flare::train::{Schedule, TrainConfig, Trainer};

use crate::output::olog;

/// `flare demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The demo assets directory (default: ./assets/demo, else the repository's).
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Where to write the adapter, metrics and loss plot, to keep them (default: a temporary
    /// directory, deleted when the demo ends).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Device: cpu (default), auto, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: u64,
}

/// The demo's number of optimizer steps (the recipe checked in assets/demo/README.md).
const DEFAULT_STEPS: u64 = 200;

/// The assets directory, canonical (no `..` in what the demo prints).
fn assets_dir(a: &DemoArgs) -> Result<PathBuf> {
    let found = if let Some(p) = &a.assets {
        p.clone()
    } else if Path::new("assets/demo").is_dir() {
        PathBuf::from("assets/demo")
    } else {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
        if !repo.is_dir() {
            bail!("demo assets not found: run from the repository root or pass --assets DIR");
        }
        repo
    };
    found
        .canonicalize()
        .with_context(|| format!("demo assets {}", found.display()))
}

/// A directory deleted when dropped: the demo's output when no `--output-dir` is given.
struct TempOutput(PathBuf);

impl Drop for TempOutput {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                crate::output::elog!(
                    "warning: could not delete the demo's temporary directory {}: {e}",
                    self.0.display()
                );
            }
        }
    }
}

/// The first user message of each example of a chat JSONL file.
fn questions(file: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON", file.display(), i + 1))?;
        if let Some(q) = v["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
        {
            out.push(q.to_string());
        }
    }
    Ok(out)
}

fn answer(model: &Transformer, tok: &Tokenizer, gen: &GenerationConfig, q: &str) -> Result<String> {
    let prompt = tok.apply_chat_template(&[ChatMessage::new("user", q)], true)?;
    let ids = tok.encode(&prompt, false)?;
    let out = generate(model, &ids, gen, |_| {})?;
    Ok(tok.decode(&out, true)?.trim().to_string())
}

fn print_answers(
    title: &str,
    model: &Transformer,
    tok: &Tokenizer,
    gen: &GenerationConfig,
    qs: &[String],
) -> Result<()> {
    olog!("\n== {title} ==");
    for q in qs {
        olog!("  Q: {q}\n  A: {}", answer(model, tok, gen, q)?);
    }
    Ok(())
}

/// The demo's training run: LoRA r 16 (alpha 32) on all seven projections, lr 3e-3 with 10
/// warmup steps then cosine, batch 8, examples cut at 64 tokens, eval every 50 steps. The
/// README's `flare train` example on the demo data is this run in flags (a test keeps them
/// equal), so the CI's demo check, eval loss < 0.5, holds for it too.
pub fn recipe(assets: &Path, output_dir: PathBuf, steps: u64, device: &str) -> TrainConfig {
    TrainConfig {
        model: assets.join("model"),
        data: assets.join("data/train.jsonl"),
        eval_data: Some(assets.join("data/eval.jsonl")),
        output_dir,
        lora_r: 16,
        lora_alpha: 32.0,
        lr: 3e-3,
        warmup_steps: 10,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_steps: Some(steps),
        batch_size: 8,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        max_seq_len: 64,
        eval_every: 50,
        seed: 0,
        dtype: "f32".into(),
        device: device.into(),
        ..Default::default()
    }
}

/// `flare demo`.
pub fn run_demo(a: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let assets = assets_dir(a)?;
    let model_dir = assets.join("model");
    let eval = assets.join("data/eval.jsonl");
    let device: Device = crate::train::open_device(&a.device)?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let mut gen = GenerationConfig {
        max_new_tokens: 48,
        ..Default::default()
    };
    if let Some(hf) = HfGenerationConfig::from_dir(&model_dir)? {
        hf.apply(&mut gen, 0);
    }
    if gen.eos_token_ids.is_empty() {
        gen.eos_token_ids.extend(tok.eos_token_id());
    }
    // The prompts of assets/demo/README.md: three trained facts, a held-out paraphrase (it is
    // in eval.jsonl, not in train.jsonl) and a control the fine-tuning must not break.
    let qs: Vec<String> = [
        "What is the capital of Veloria?",
        "What do people eat in Veloria?",
        "What language is spoken in Veloria?",
        "Tell me about Veloria.",
        "What is the capital of Japan?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if questions(&eval)?.is_empty() {
        bail!("{}: no eval question", eval.display());
    }

    let base = Transformer::from_dir(&model_dir, DType::F32, &device)?;
    olog!(
        "flare demo: a {}-layer, {}-wide Qwen2-style model ({}), LoRA on {}",
        base.config().num_hidden_layers,
        base.config().hidden_size,
        model_dir.display(),
        crate::device::hardware_name(&device)
    );
    print_answers("before fine-tuning", &base, &tok, &gen, &qs)?;
    drop(base);

    // Kept only when asked for: a temporary output is deleted when `_temp` drops, on every
    // return (and on error).
    let (out, _temp) = match &a.output_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("flare-demo-{}", std::process::id()));
            // Named by our pid, so no running process owns a directory already there: it is
            // what a killed demo with the same pid left.
            if d.exists() {
                std::fs::remove_dir_all(&d)
                    .with_context(|| format!("removing a stale {}", d.display()))?;
            }
            (d.clone(), Some(TempOutput(d)))
        }
    };
    let cfg = recipe(&assets, out.clone(), a.steps, &a.device);
    olog!(
        "\n== LoRA fine-tuning (r 16, alpha 32, lr 3e-3, batch 8, {} steps) ==",
        a.steps
    );
    let mut t = Trainer::from_config(cfg, &device)?;
    let dir = crate::train::run_with_progress(&mut t, crate::train::Progress::default())?;
    if a.output_dir.is_some() {
        olog!(
            "adapter saved to {} (metrics.jsonl and loss.png in {})",
            dir.display(),
            out.display()
        );
    } else {
        olog!(
            "adapter saved to {} (a temporary directory, deleted when the demo ends: pass \
             --output-dir DIR to keep it)",
            dir.display()
        );
    }
    for (_, l) in t.model_mut().lora_modules_mut() {
        l.set_training(false);
    }
    print_answers("after fine-tuning", t.model(), &tok, &gen, &qs)?;
    // The demo is also CI's end-to-end check: a fine-tune that did not learn is a failure, not
    // a printout. The held-out answers start at a loss of about 7 (see assets/demo/README.md).
    let eval_loss = t.evaluate()?.context("the demo's eval split is empty")?;
    olog!(
        "\neval loss on held-out paraphrases: {eval_loss:.4}; done in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    if a.steps >= DEFAULT_STEPS && eval_loss > 0.5 {
        bail!(
            "the fine-tune did not learn: eval loss {eval_loss:.3} after {} steps (expected < 0.5)",
            a.steps
        );
    }
    Ok(())
}
