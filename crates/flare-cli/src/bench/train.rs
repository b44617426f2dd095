//! `flare bench train`: LoRA training throughput on the Qwen2-0.5B shape (random weights),
//! with a per-phase time breakdown and the peak device memory, in the rows that
//! `bench/anchor_train.py` prints for PyTorch + PEFT on the same shapes.
//!
//! Model: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied
//! embeddings, q/k/v biases; bf16 on CUDA (f32 on the CPU). LoRA r = 16, alpha = 32 on all seven
//! projections (f32 adapters); AdamW. Cases batch x seq = 4x512 and 8x1024 with random token
//! ids (`--quick`: 2 layers, 1x128 and 2x256). Each step is timed by phase with a device
//! synchronisation between phases: forward (logits), loss (fused cross-entropy), backward,
//! optimizer (global norm, clipping, the multi-tensor AdamW). Steps: 2 warmup, then 5 timed
//! (3 with `--quick`); medians reported. Peak memory: the device pool's high-water mark over one
//! step, everything allocated included (weights too), as `torch.cuda.max_memory_allocated`.
//! As in `flare::train::Trainer`, the forward and backward run under
//! `flare::runtime::cache_launch_params` (`FLARE_LAUNCH_PARAM_CACHE=0` turns it off, to compare).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use flare::lora::LoraConfig;
use flare::models::{ModelConfig, Transformer};
use flare::ops::cross_entropy::IGNORE_INDEX;
use flare::train::{clip_scale, global_grad_norm, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::device::{hardware_name, DeviceSpec};
use crate::report::{median, write_json};

/// `flare bench train`.
#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// 2 layers and small batches (a smoke run, and the only sensible one on a CPU).
    #[arg(long)]
    pub quick: bool,
    /// Write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One result row (the same fields as bench/anchor_train.py's).
#[derive(Debug, Clone, Serialize)]
pub struct TrainRow {
    /// `flare`.
    pub r#impl: String,
    /// Device name.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// Decoder layers.
    pub layers: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Trained tokens per second (batch * seq / median step time).
    pub tokens_per_s: f64,
    /// Peak device memory over a step, GiB (None on CPU).
    pub peak_gib: Option<f64>,
    /// Median forward time, ms.
    pub fwd_ms: f64,
    /// Median loss time, ms.
    pub loss_ms: f64,
    /// Median backward time, ms.
    pub bwd_ms: f64,
    /// Median optimizer time, ms.
    pub opt_ms: f64,
    /// Median step time, ms.
    pub step_ms: f64,
}

fn qwen2_config(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": layers,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "sliding_window": null,
        "use_sliding_window": false,
        "torch_dtype": "bfloat16"
    })
}

#[cfg(feature = "cuda")]
fn meter(dev: &Device) -> Result<Option<super::pool::PoolMeter>> {
    Ok(match dev {
        Device::Cuda(c) => Some(super::pool::PoolMeter::new(c)?),
        _ => None,
    })
}

fn sync(dev: &Device) -> Result<()> {
    flare::runtime::synchronize(dev)?;
    Ok(())
}

fn bench_case(
    model: &Transformer,
    opt: &mut AdamW,
    dev: &Device,
    batch: usize,
    seq: usize,
    timed: usize,
) -> Result<([f64; 5], Option<f64>)> {
    let vocab = model.config().vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64((batch * 131 + seq) as u64);
    let ids: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mut input = Vec::with_capacity(batch * seq);
    let mut target = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        let row = &ids[b * (seq + 1)..(b + 1) * (seq + 1)];
        input.extend_from_slice(&row[..seq]);
        target.extend_from_slice(&row[1..]);
    }
    let input = Tensor::from_vec(input, (batch, seq), dev)?;
    let target = Tensor::from_vec(target, batch * seq, dev)?;
    let params: Vec<Var> = opt.params().to_vec();
    let inv = 1.0 / (batch * seq) as f64;
    let mut times: Vec<[f64; 5]> = Vec::new();
    #[cfg(feature = "cuda")]
    let pool = meter(dev)?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut peak = None;
    for it in 0..2 + timed {
        #[cfg(feature = "cuda")]
        if it == 2 {
            if let Some(p) = &pool {
                sync(dev)?;
                p.reset_high()?;
            }
        }
        sync(dev)?;
        let t0 = Instant::now();
        // As the trainer does: Candle's launch-parameter cache on for the forward and backward.
        let params_cache = flare::runtime::cache_launch_params(dev);
        let logits = model.forward(&input)?;
        sync(dev)?;
        let t1 = Instant::now();
        let logits = logits.reshape((batch * seq, vocab))?;
        let loss = (flare::ops::cross_entropy_per_token(&logits, &target, IGNORE_INDEX)?
            .sum_all()?
            * inv)?;
        sync(dev)?;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        sync(dev)?;
        let t3 = Instant::now();
        drop(params_cache);
        let gs: Vec<Option<Tensor>> = params
            .iter()
            .map(|p| grads.get(p.as_tensor()).cloned())
            .collect();
        let norm = global_grad_norm(&gs)?;
        opt.step_with(&gs, 1e-4, clip_scale(norm, Some(1.0)))?;
        sync(dev)?;
        let t4 = Instant::now();
        drop((logits, loss, grads, gs));
        #[cfg(feature = "cuda")]
        if it == 2 {
            if let Some(p) = &pool {
                sync(dev)?;
                peak = Some(p.high()? as f64 / (1u64 << 30) as f64);
            }
        }
        if it >= 2 {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            times.push([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4), ms(t0, t4)]);
        }
        let _ = it;
    }
    let med = |k: usize| median(&times.iter().map(|t| t[k]).collect::<Vec<_>>());
    Ok(([med(0), med(1), med(2), med(3), med(4)], peak))
}

/// `flare bench train`.
pub fn run_train_bench(a: &TrainBenchArgs) -> Result<()> {
    let spec: DeviceSpec = a.device.parse()?;
    let dev = spec.open()?;
    let quick = a.quick || dev.is_cpu();
    let layers = if quick { 2 } else { 24 };
    let cases: &[(usize, usize)] = if quick {
        &[(1, 128), (2, 256)]
    } else {
        &[(4, 512), (8, 1024)]
    };
    let timed = if quick { 3 } else { 5 };
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    eprintln!("building a Qwen2-0.5B-shaped model ({layers} layers) with random weights");
    let config =
        ModelConfig::from_json_str(&qwen2_config(layers).to_string(), "<qwen2-0.5b config>")?;
    let result = (|| -> Result<Vec<TrainRow>> {
        let mut model =
            Transformer::random(config, dtype, &dev, 0).context("building the model")?;
        let lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        let mut params = Vec::new();
        for (i, (path, layer)) in model.lora_modules_mut().into_iter().enumerate() {
            layer.add_adapter("default", &lora, i as u64)?;
            layer.set_active(Some("default"))?;
            layer.set_training(true);
            let v = layer.trainable_vars();
            params.push((format!("{path}.lora_A"), v[0].clone()));
            params.push((format!("{path}.lora_B"), v[1].clone()));
        }
        let mut opt = AdamW::new(
            params,
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut rows = Vec::new();
        for &(b, s) in cases {
            let (t, peak) = bench_case(&model, &mut opt, &dev, b, s, timed)?;
            let row = TrainRow {
                r#impl: "flare".into(),
                device: hardware_name(&dev),
                dtype: format!("{dtype:?}").to_lowercase(),
                layers,
                batch: b,
                seq: s,
                tokens_per_s: (b * s) as f64 / (t[4] / 1e3),
                peak_gib: peak,
                fwd_ms: t[0],
                loss_ms: t[1],
                bwd_ms: t[2],
                opt_ms: t[3],
                step_ms: t[4],
            };
            println!(
                "{:>2}x{:<5} {:>10.0} tok/s  peak {:>7}  fwd {:>8.2} ms  loss {:>7.2} ms  bwd {:>8.2} ms  opt {:>6.2} ms  step {:>8.2} ms",
                b,
                s,
                row.tokens_per_s,
                peak.map_or("-".into(), |p| format!("{p:.2} GiB")),
                t[0],
                t[1],
                t[2],
                t[3],
                t[4]
            );
            rows.push(row);
        }
        Ok(rows)
    })();
    let rows = result?;
    if let Some(p) = &a.json {
        write_json(p, &rows)?;
    }
    Ok(())
}
