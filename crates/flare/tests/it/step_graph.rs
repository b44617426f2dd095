//! The training pass as a replayed CUDA graph (`flare::train::StepGraphs`): on CUDA, the
//! graphed pass gives the op-by-op pass's loss and gradients for fresh batches of a captured
//! shape, reads the parameters' current values at every replay, and keeps working beside other
//! shapes; the trainer gives the same losses and adapter with and without graphs, with
//! gradient accumulation. On the CPU the same calls run op by op (and are checked the same way).

use candle_core::{DType, Device, Tensor, Var};
use flare::lora::LoraConfig;
use flare::models::{ModelConfig, Transformer};
use flare::ops::cross_entropy::IGNORE_INDEX;
use flare::runtime::{settings, Settings};
use flare::train::data::Batch;
use flare::train::{eager_pass, StepGraphs, Trainer};

use crate::common::{device_test, randn_scaled, rel_err, Result};
use crate::train::{losses, memorise_data, scratch, small_config};

/// A 2-layer GQA model of width `hidden` (4 heads, 2 KV heads) in `dtype` with rank-4
/// adapters on every projection, both factors random (so every gradient is non-zero), and its
/// trainable variables.
fn model(dev: &Device, dtype: DType, hidden: usize) -> Result<(Transformer, Vec<Var>)> {
    let cfg = ModelConfig::from_json_str(
        &format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": {hidden},
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 97,
            "max_position_embeddings": 512, "tie_word_embeddings": false}}"#
        ),
        "config.json",
    )?;
    let mut model = Transformer::random(cfg, dtype, dev, 3)?;
    let lora = LoraConfig {
        r: 4,
        ..Default::default()
    };
    let vars = crate::common::add_training_adapters(&mut model, &lora)?;
    for (i, v) in vars.iter().enumerate() {
        v.set(
            &randn_scaled(v.dims(), 0.0, 0.2, DType::F32, dev, 500 + i as u64)?
                .to_dtype(v.dtype())?,
        )?;
    }
    Ok((model, vars))
}

/// A padded `rows x seq` batch of random ids, a few targets ignored (as prompt tokens are).
fn batch(rows: usize, seq: usize, salt: u64) -> Batch {
    let mut state = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let input_ids: Vec<u32> = (0..rows * seq).map(|_| (next() % 97) as u32).collect();
    let targets: Vec<u32> = (0..rows * seq)
        .map(|i| {
            if i % 5 == 1 {
                IGNORE_INDEX
            } else {
                (next() % 97) as u32
            }
        })
        .collect();
    let n_targets = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    Batch {
        batch: rows,
        seq,
        input_ids,
        targets,
        n_targets,
        n_tokens: rows * seq,
        cu_seqlens: None,
    }
}

/// The pass's loss and gradients, on the host.
fn values(loss: &Tensor, grads: &[Option<Tensor>]) -> Result<(f64, Vec<Option<Tensor>>)> {
    let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let g = grads
        .iter()
        .map(|g| g.as_ref().map(|g| g.to_device(&Device::Cpu)).transpose())
        .collect::<candle_core::Result<_>>()?;
    Ok((l, g))
}

/// Shapes 2x13, 2x13 (captured), 2x13 (replayed, after a parameter update), 3x7 (another
/// shape, op by op), 3x7 (captured), 2x13 (replayed again): each pass equals the op-by-op
/// pass of the same batch and parameters.
fn graphed_pass_matches_op_by_op(dev: &Device) -> Result<()> {
    let plan = [(2, 13), (2, 13), (2, 13), (3, 7), (3, 7), (2, 13)];
    passes_match(dev, DType::F32, 64, &plan, 1e-6, 1e-6)
}

/// The same in bf16 at head dim 64 and 128-token rows, where the attention runs on cuDNN's
/// fused kernel on CUDA (its backward accumulates with atomics, so two passes agree to bf16
/// rounding, not bit for bit).
fn graphed_pass_matches_op_by_op_bf16(dev: &Device) -> Result<()> {
    let plan = [(2, 128), (2, 128), (2, 128), (1, 256), (1, 256)];
    passes_match(dev, DType::BF16, 256, &plan, 2e-3, 3e-2)
}

/// Passes of `plan`'s shapes, each with a fresh batch, graphed where allowed (the second
/// sighting of a shape on), against the op-by-op pass of the same batch: the loss within
/// `loss_tol` and every gradient within `grad_tol` (relative), none of them zero.
fn passes_match(
    dev: &Device,
    dtype: DType,
    hidden: usize,
    plan: &[(usize, usize)],
    loss_tol: f64,
    grad_tol: f64,
) -> Result<()> {
    let (model, vars) = model(dev, dtype, hidden)?;
    let mut graphs = StepGraphs::new(dev, 0.0, 1);
    assert_eq!(graphs.allowed(), dev.is_cuda() && settings().step_graph);
    let mut seen = std::collections::HashSet::new();
    for (k, &(rows, seq)) in plan.iter().enumerate() {
        if k == 2 {
            // An optimizer-like in-place update: the next replay must read the new values.
            for v in &vars {
                v.set(&(v.as_tensor() * 0.9)?)?;
            }
        }
        let b = batch(rows, seq, 40 + k as u64);
        let scale = 1.0 / b.n_targets as f64;
        let reference = eager_pass(&model, &vars, &b, scale)?;
        let (want_loss, want_grads) = values(&reference.loss, &reference.grads)?;
        drop(reference);
        let pass = graphs.pass(&model, &vars, &b, scale)?;
        let (loss, grads) = values(&pass.loss, &pass.grads)?;
        let expect_graph = graphs.allowed() && !seen.insert((rows, seq));
        assert_eq!(
            pass.graphed, expect_graph,
            "pass {k} ({rows}x{seq}): graphed {} (expected {expect_graph})",
            pass.graphed
        );
        assert!(
            (loss - want_loss).abs() <= loss_tol * want_loss.abs().max(1.0),
            "pass {k}: loss {loss} vs op by op {want_loss}"
        );
        assert_eq!(grads.len(), vars.len());
        for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
            let (g, w) = (g.as_ref().expect("gradient"), w.as_ref().expect("gradient"));
            let e = rel_err(g, w)?;
            assert!(e < grad_tol, "pass {k}, parameter {i}: rel err {e}");
            let norm = w
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert!(norm > 0.0, "pass {k}, parameter {i}: zero gradient");
        }
    }
    Ok(())
}

/// The trainer, padded batches of the memorisation data (several shapes, each seen more than
/// once, two micro-batches a step), with graphs on and off: the same losses and adapter.
fn trainer_with_graphs_matches_without(dev: &Device) -> Result<()> {
    let dir = scratch(&format!("graphs-{}", dev.is_cuda()));
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data, 8);
    cfg.packing = false;
    let run = |on: bool, out: &str| -> Result<(Vec<f64>, Vec<Vec<f32>>)> {
        let _guard = Settings {
            step_graph: on,
            ..settings()
        }
        .apply();
        let mut c = cfg.clone();
        c.output_dir = dir.join(out);
        let mut t = Trainer::from_config(c, dev)?;
        let l = losses(&mut t, 8)?;
        let adapter = t.adapter()?;
        let mut vals = Vec::new();
        // A BTreeMap: the same module order in both runs.
        for (a, b) in adapter.tensors.values() {
            for x in [a, b] {
                vals.push(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok((l, vals))
    };
    let (on_l, on_a) = run(true, "on")?;
    let (off_l, off_a) = run(false, "off")?;
    assert_eq!(on_l.len(), 8);
    for (i, (a, b)) in on_l.iter().zip(&off_l).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "step {i}: loss {a} with graphs, {b} without"
        );
    }
    assert!(on_l[7] < on_l[0], "the loss did not fall: {on_l:?}");
    for (a, b) in on_a.iter().zip(&off_a) {
        let e = crate::common::rel_err_vec(
            &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        assert!(e < 1e-4, "adapters differ: rel err {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `FLARE_STEP_GRAPH=0` (here through `Settings::apply`) and LoRA dropout keep every pass op
/// by op.
#[test]
fn graphs_are_not_allowed_off_or_with_dropout() {
    let _lock = crate::common::shared_lock();
    let dev = Device::Cpu;
    assert!(
        !StepGraphs::new(&dev, 0.0, 1).allowed(),
        "no graphs on the CPU"
    );
    if let Some(cuda) = crate::common::cuda_device() {
        assert!(!StepGraphs::new(&cuda, 0.1, 1).allowed(), "dropout");
        assert!(!StepGraphs::new(&cuda, 0.0, 2).allowed(), "data parallel");
        let _guard = Settings {
            step_graph: false,
            ..settings()
        }
        .apply();
        assert!(!StepGraphs::new(&cuda, 0.0, 1).allowed(), "switched off");
    }
}

device_test!(
    exclusive: graphed_pass_matches_op_by_op,
    graphed_pass_matches_op_by_op_bf16,
    trainer_with_graphs_matches_without
);
