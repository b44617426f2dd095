//! `flare demo`: the whole job on the bundled assets, on a CPU, in a couple of minutes.
//!
//! `assets/demo/` (made by `bench/make_demo_assets.py`) holds a tiny pretrained Qwen2-style
//! model with its tokenizer and chat template, and a chat dataset about a made-up country
//! (Veloria) mixed with facts about real ones. The demo prints greedy answers to the held-out
//! eval questions, LoRA fine-tunes on the training set with the progress bar, saves the adapter,
//! and prints the answers again: before training the model does not know Veloria, after it
//! does.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use flare::generate::{generate, GenerationConfig, HfGenerationConfig};
use flare::models::Transformer;
use flare::text::{ChatMessage, Tokenizer};
use flare::train::{Schedule, TrainConfig, Trainer};

/// `flare demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The demo assets directory (default: ./assets/demo, else the repository's).
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Where to write the adapter, metrics and loss plot (default: a temporary directory).
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

fn assets_dir(a: &DemoArgs) -> Result<PathBuf> {
    if let Some(p) = &a.assets {
        return Ok(p.clone());
    }
    let local = PathBuf::from("assets/demo");
    if local.is_dir() {
        return Ok(local);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
    if repo.is_dir() {
        return Ok(repo);
    }
    bail!("demo assets not found: run from the repository root or pass --assets DIR")
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
    println!("\n== {title} ==");
    for q in qs {
        println!("  Q: {q}\n  A: {}", answer(model, tok, gen, q)?);
    }
    Ok(())
}

/// `flare demo`.
pub fn run_demo(a: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let assets = assets_dir(a)?;
    let model_dir = assets.join("model");
    let train = assets.join("data/train.jsonl");
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
    println!(
        "flare demo: a {}-layer, {}-wide Qwen2-style model ({}), LoRA on {}",
        base.config().num_hidden_layers,
        base.config().hidden_size,
        model_dir.display(),
        crate::device::hardware_name(&device)
    );
    print_answers("before fine-tuning", &base, &tok, &gen, &qs)?;
    drop(base);

    // The output stays after the run (its path is printed) so the adapter can be used.
    let out = match &a.output_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("flare-demo-{}", std::process::id())),
    };
    let cfg = TrainConfig {
        model: model_dir.clone(),
        data: train,
        eval_data: Some(eval),
        output_dir: out.clone(),
        lora_r: 16,
        lora_alpha: 32.0,
        lr: 3e-3,
        warmup_steps: 10,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_steps: Some(a.steps),
        batch_size: 8,
        grad_accum: 1,
        max_grad_norm: Some(1.0),
        max_seq_len: 64,
        eval_every: 50,
        seed: 0,
        dtype: "f32".into(),
        device: a.device.clone(),
        ..Default::default()
    };
    println!(
        "\n== LoRA fine-tuning (r 16, alpha 32, lr 3e-3, batch 8, {} steps) ==",
        a.steps
    );
    let mut t = Trainer::from_config(cfg, &device)?;
    let dir = crate::train::run_with_progress(&mut t, true)?;
    println!(
        "adapter saved to {} (with metrics.jsonl and loss.png)",
        dir.display()
    );
    for (_, l) in t.model_mut().lora_modules_mut() {
        l.set_training(false);
    }
    print_answers("after fine-tuning", t.model(), &tok, &gen, &qs)?;
    // The demo is also CI's end-to-end check: a fine-tune that did not learn is a failure, not
    // a printout. The held-out answers start at a loss of about 7 (see assets/demo/README.md).
    let eval_loss = t.evaluate()?.context("the demo's eval split is empty")?;
    println!(
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
