//! Activation checkpointing (`flare::models::checkpoint`, `Transformer::set_gradient_checkpointing`)
//! and the trainer with it: the loss and every LoRA gradient of a checkpointed model equal the
//! plain model's (f64 CPU reference, GQA, biases, several stacked layers, LoRA dropout under one
//! seed); the checkpointed graph keeps only the layers' inputs; the trainer's loss falls,
//! resumes exactly, and matches the run without checkpointing.

use candle_core::{DType, Device, Tensor, Var};
use flare::lora::LoraConfig;
use flare::models::{ModelConfig, Transformer};
use flare::train::{Checkpointing, Trainer};

use crate::common::{device_test, randn_scaled, rel_err, seed, Result};
use crate::train::{losses, memorise_data, scratch, small_config};

/// A small Qwen2 shape with odd sizes: GQA (6 query heads over 2 KV heads, head_dim 4),
/// q/k/v biases, three layers, an untied head.
fn config() -> Result<ModelConfig> {
    ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 24, "intermediate_size": 37,
            "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "vocab_size": 41, "max_position_embeddings": 64,
            "tie_word_embeddings": false}"#,
        "config.json",
    )
}

/// The model with an adapter on all seven projections of every layer (random `A` and `B`,
/// so that every gradient is non-zero), in training mode; and its variables.
fn lora_model(dev: &Device, dtype: DType, dropout: f32) -> Result<(Transformer, Vec<Var>)> {
    lora_model_of(config()?, dev, dtype, dropout)
}

fn lora_model_of(
    config: ModelConfig,
    dev: &Device,
    dtype: DType,
    dropout: f32,
) -> Result<(Transformer, Vec<Var>)> {
    let mut model = Transformer::random(config, dtype, dev, 17)?;
    let lora = LoraConfig {
        r: 3,
        alpha: 6.0,
        dropout,
        ..Default::default()
    };
    let vars = crate::common::add_training_adapters(&mut model, &lora)?;
    // Module i's A and B, seeded "i/0" and "i/1".
    for (k, v) in vars.iter().enumerate() {
        let (i, j) = (k / 2, k % 2);
        let t = randn_scaled(
            v.dims(),
            0.0,
            0.3,
            v.dtype(),
            dev,
            seed(&format!("{i}/{j}")),
        )?;
        v.set(&t)?;
    }
    Ok((model, vars))
}

/// The two rows of token ids the model tests here run on.
fn token_ids(dev: &Device) -> Result<Tensor> {
    Ok(Tensor::new(
        &[[3u32, 17, 40, 0, 9, 22, 5], [1, 2, 3, 4, 5, 6, 7]],
        dev,
    )?)
}

/// The loss (a weighted sum of the logits, weights fixed) and every variable's gradient, after
/// merging the checkpointed layers' gradients.
fn loss_and_grads(model: &Transformer, vars: &[Var]) -> Result<(f64, Vec<Tensor>)> {
    let dev = model.device();
    let ids = token_ids(dev)?;
    let logits = model.forward(&ids)?;
    let w = randn_scaled(
        logits.dims(),
        0.0,
        1.0,
        logits.dtype(),
        dev,
        seed("ckpt loss"),
    )?;
    let loss = (logits * w)?.sum_all()?;
    let mut grads = loss.backward()?;
    let merged = model.merge_checkpoint_grads(&mut grads)?;
    assert_eq!(
        merged,
        if model.gradient_checkpointing() {
            vars.len()
        } else {
            0
        },
        "merged gradients"
    );
    let g = vars
        .iter()
        .map(|v| Ok(grads.get(v.as_tensor()).expect("a LoRA gradient").clone()))
        .collect::<Result<_>>()?;
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, g))
}

/// Checkpointed and plain: the same loss and gradients, without and with LoRA dropout (one
/// dropout seed for both). f64 on the CPU (1e-10), f32 on CUDA.
fn checkpointed_model_matches_the_plain_one(dev: &Device) -> Result<()> {
    let (dtype, tol) = if dev.is_cpu() {
        (DType::F64, 1e-10)
    } else {
        (DType::F32, 1e-4)
    };
    for dropout in [0.0, 0.3] {
        let (mut model, vars) = lora_model(dev, dtype, dropout)?;
        model.set_dropout_seed(Some(99));
        let (plain_loss, plain) = loss_and_grads(&model, &vars)?;
        model.set_gradient_checkpointing(true);
        let (loss, grads) = loss_and_grads(&model, &vars)?;
        let what = format!("dropout {dropout}");
        assert!(
            (loss - plain_loss).abs() <= tol * plain_loss.abs(),
            "{what}: loss {loss} vs {plain_loss}"
        );
        for (i, (g, p)) in grads.iter().zip(&plain).enumerate() {
            let e = rel_err(g, p)?;
            assert!(e <= tol, "{what}: gradient {i}: rel err {e}");
            assert!(
                p.abs()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    > 0.0
            );
        }
        // Twice in a row: the accumulator was drained, nothing is counted twice.
        let (again, grads2) = loss_and_grads(&model, &vars)?;
        assert_eq!(again, loss, "{what}: a second checkpointed run");
        for (g, g2) in grads.iter().zip(&grads2) {
            assert_eq!(rel_err(g2, g)?, 0.0, "{what}: second run's gradient");
        }
        // The layers' inputs offloaded to host memory: the same values (bit for bit on the
        // CPU; on CUDA within the tolerance, as the attention backward's sums may be ordered
        // differently from run to run).
        model.set_checkpoint_offload(true);
        assert!(model.checkpoint_offload());
        let (off_loss, off_grads) = loss_and_grads(&model, &vars)?;
        model.set_checkpoint_offload(false);
        let exact = if dev.is_cpu() { 0.0 } else { tol };
        assert!(
            (off_loss - loss).abs() <= exact * loss.abs(),
            "{what}: offloaded loss {off_loss} vs {loss}"
        );
        for (i, (g, go)) in grads.iter().zip(&off_grads).enumerate() {
            let e = rel_err(go, g)?;
            assert!(e <= exact, "{what}: offloaded gradient {i}: rel err {e}");
        }
        // The MLP in tiles of 3 tokens (14 rows: tiles of 3, 3, 3, 3, 2), each checkpointed
        // inside the checkpointed layer: without dropout the values of the untiled run (the
        // rows' products are the same; on CUDA within the tolerance), with dropout (each tile
        // its own mask seed) the same values on every run.
        model.set_mlp_tile(Some(3));
        assert_eq!(model.mlp_tile(), Some(3));
        let (tile_loss, tile_grads) = loss_and_grads(&model, &vars)?;
        let (tile_again, tile_grads2) = loss_and_grads(&model, &vars)?;
        model.set_mlp_tile(None);
        assert_eq!(tile_again, tile_loss, "{what}: a second tiled run");
        for (g, g2) in tile_grads.iter().zip(&tile_grads2) {
            assert_eq!(rel_err(g2, g)?, 0.0, "{what}: second tiled run's gradient");
        }
        if dropout == 0.0 {
            assert!(
                (tile_loss - loss).abs() <= tol * loss.abs(),
                "{what}: tiled loss {tile_loss} vs {loss}"
            );
            for (i, (g, gt)) in grads.iter().zip(&tile_grads).enumerate() {
                let e = rel_err(gt, g)?;
                assert!(e <= tol, "{what}: tiled gradient {i}: rel err {e}");
            }
        }
        if dropout > 0.0 {
            // The masks did drop something: without dropout (eval mode) the loss differs.
            for (_, l) in model.lora_modules_mut() {
                l.set_training(false);
            }
            let (no_drop, _) = loss_and_grads(&model, &vars)?;
            assert!(
                (no_drop - loss).abs() > 1e-6 * loss.abs(),
                "{what}: no mask drawn"
            );
        }
    }
    Ok(())
}

// Exclusive: its dropout masks come from the device's generator (process-wide state), which a
// test running beside it (a model's random init on CUDA, say) would move between the reseed
// and the draw.
device_test!(exclusive: checkpointed_model_matches_the_plain_one);

/// A 2-layer Qwen2 shape with head dim 64, where bf16 attention on CUDA runs its fused path.
fn head_dim_64_config() -> Result<ModelConfig> {
    ModelConfig::from_json_str(
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "vocab_size": 41,
            "max_position_embeddings": 64, "tie_word_embeddings": false}"#,
        "config.json",
    )
}

/// Gate and up as one grouped LoRA product (the default) against the separate projections:
/// the same loss and gradients (f64 on the CPU: 1e-10; f32 on CUDA: 1e-4), plain and
/// checkpointed; with training-mode dropout the grouping does not apply and the two runs are
/// the same bit for bit. The fused MLP (`set_fused_mlp`) likewise; on CUDA in bf16 its fused op
/// runs, plain and checkpointed.
fn grouped_projections_match_separate(dev: &Device) -> Result<()> {
    let (dtype, tol) = if dev.is_cpu() {
        (DType::F64, 1e-10)
    } else {
        (DType::F32, 1e-4)
    };
    for dropout in [0.0, 0.3] {
        for ckpt in [false, true] {
            let what = format!("dropout {dropout}, checkpointing {ckpt}");
            let (mut model, vars) = lora_model(dev, dtype, dropout)?;
            model.set_dropout_seed(Some(5));
            model.set_gradient_checkpointing(ckpt);
            assert!(model.grouped_projections(), "grouping is on by default");
            let (loss, grads) = loss_and_grads(&model, &vars)?;
            assert!(!model.fused_mlp(), "the fused MLP is off by default");
            model.set_fused_mlp(true)?;
            let (fused_loss, fused) = loss_and_grads(&model, &vars)?;
            model.set_fused_mlp(false)?;
            model.set_grouped_projections(false);
            assert!(!model.grouped_projections());
            let (sep_loss, sep) = loss_and_grads(&model, &vars)?;
            let bound = if dropout > 0.0 { 0.0 } else { tol };
            for (how, l, gs) in [("grouped", loss, &grads), ("fused MLP", fused_loss, &fused)] {
                assert!(
                    (l - sep_loss).abs() <= bound * sep_loss.abs(),
                    "{what}, {how}: loss {l} vs {sep_loss}"
                );
                for (i, (g, p)) in gs.iter().zip(&sep).enumerate() {
                    let e = rel_err(g, p)?;
                    assert!(e <= bound, "{what}, {how}: gradient {i}: rel err {e}");
                }
            }
        }
    }
    if dev.is_cuda() {
        // bf16 on CUDA at head dim 64: the packed attention runs its fused path (flare's
        // kernel; f32 and head dim 4 take the composed one), so the grouped q/k/v path is
        // compared end to end there too; it differs from the separate path in the order of
        // bf16 sums only. With the fused MLP on, `lora_swiglu_mlp` runs its CUDA op (bf16,
        // ranks and sizes in its reach), plain and checkpointed; it rounds at other points (the
        // low-rank terms join the base outputs in the GEMMs' f32 accumulators, where the
        // separate path rounds them to bf16 first; `s x Aᵀ` is rounded with its scale), and the
        // logits differ by about 1.3e-2 (measured on an H100 with the op's first, kernel-based
        // form). The logits are compared, not the loss: a sum of the logits with random signs,
        // it cancels, and its relative difference is several times the logits' (0.11 for that
        // 1.3e-2).
        let (mut model, vars) = lora_model_of(head_dim_64_config()?, dev, DType::BF16, 0.0)?;
        let ids = token_ids(dev)?;
        for (fused, ckpt) in [(false, false), (true, false), (true, true)] {
            let what = format!("bf16, fused MLP {fused}, checkpointing {ckpt}");
            model.set_gradient_checkpointing(ckpt);
            model.set_grouped_projections(false);
            model.set_fused_mlp(false)?;
            let sep_logits = model.forward(&ids)?;
            let (sep_loss, sep) = loss_and_grads(&model, &vars)?;
            model.set_grouped_projections(true);
            model.set_fused_mlp(fused)?;
            let logits = model.forward(&ids)?;
            let (_, grads) = loss_and_grads(&model, &vars)?;
            let e = rel_err(&logits, &sep_logits)?;
            assert!(e <= 2e-2, "{what}: logits rel err {e}");
            for (i, (g, p)) in grads.iter().zip(&sep).enumerate() {
                let e = rel_err(g, p)?;
                assert!(e <= 5e-2, "{what}: gradient {i}: rel err {e}");
            }
            // The grouped (fused) run leaves the model as it found it: the separate path gives
            // the same loss after it.
            model.set_fused_mlp(false)?;
            model.set_grouped_projections(false);
            let (after, _) = loss_and_grads(&model, &vars)?;
            assert!(
                (after - sep_loss).abs() <= 1e-6 * sep_loss.abs(),
                "{what}: the separate path's loss moved from {sep_loss} to {after} across the run"
            );
        }
    }
    Ok(())
}

// Exclusive: dropout masks from the device's generator, as above.
device_test!(exclusive: grouped_projections_match_separate);

/// The grouped paths run the grouped products instead of the separate ones, not beside them:
/// a forward with grouping on issues exactly 6 cuBLASLt GEMMs per layer fewer than with it off
/// (q/k/v: one `x Aᵀ`, three low-rank products and one base GEMM against three projections of
/// three each; gate/up: 1 + 2 + 1 against 2 x 3), and with the fused MLP on as well
/// (`set_fused_mlp`) exactly 9 fewer (the MLP as `lora_swiglu_mlp`: gate/up's `x Aᵀ` and base
/// GEMM, down's likewise, the low-rank products folded into the base GEMMs, against three
/// projections of three each). A
/// grouped path that also ran the separate projections (a bug an earlier build had: same
/// values, a wasted forward per layer) issues more, not fewer. CUDA only: the CPU issues no
/// cuBLASLt GEMMs.
fn grouped_projections_skip_separate_gemms(dev: &Device) -> Result<()> {
    if dev.is_cpu() {
        return Ok(());
    }
    let layers = 2;
    let (mut model, _vars) = lora_model_of(head_dim_64_config()?, dev, DType::BF16, 0.0)?;
    let ids = token_ids(dev)?;
    let mut count = |grouped: bool, fused: bool| -> Result<usize> {
        model.set_grouped_projections(grouped);
        model.set_fused_mlp(fused)?;
        model.forward(&ids)?; // warm-up: plans, kernels
        dev.synchronize()?;
        let before = flare::runtime::stats().gemms_launched;
        let logits = model.forward(&ids)?;
        dev.synchronize()?;
        crate::common::assert_no_nan(&logits, "grouped gemm count")?;
        Ok(flare::runtime::stats().gemms_launched - before)
    };
    let on = count(true, false)?;
    let fused = count(true, true)?;
    let off = count(false, false)?;
    assert!(on > 0, "the forward issued no cuBLASLt GEMM");
    for (what, n, fewer) in [
        ("grouping on", on, 6),
        ("grouping and the fused MLP on", fused, 9),
    ] {
        assert_eq!(
            off - n.min(off),
            fewer * layers,
            "{what} issued {n} GEMMs, off {off}: expected {} fewer",
            fewer * layers
        );
    }
    Ok(())
}

// Exclusive: it counts a process-wide counter.
device_test!(exclusive: grouped_projections_skip_separate_gemms);

/// With checkpointing the backward graph holds each layer's input and one op per layer, not
/// the layers' intermediates: its node count does not grow with the layer's contents, and is
/// far below the plain graph's.
#[test]
fn checkpointed_graph_keeps_only_the_layer_inputs() -> Result<()> {
    let dev = Device::Cpu;
    let (mut model, vars) = lora_model(&dev, DType::F32, 0.0)?;
    let ids = Tensor::new(&[[3u32, 17, 40, 0, 9]], &dev)?;
    let plain = model.forward(&ids)?.sum_all()?;
    model.set_gradient_checkpointing(true);
    let ckpt = model.forward(&ids)?.sum_all()?;
    let (n_plain, n_ckpt) = (plain.sorted_nodes().len(), ckpt.sorted_nodes().len());
    // Checkpointed: one op for the chain of layers, the first input (made a variable), the
    // final norm, the head product and the sum with their few views.
    let layers = model.config().num_hidden_layers;
    assert!(n_ckpt <= 8, "{n_ckpt} nodes for {layers} layers");
    assert!(n_plain > 10 * layers, "plain graph: {n_plain} nodes");
    // The LoRA variables are not in the outer graph: their gradients come from the merge.
    let ids_in_graph: Vec<_> = ckpt.sorted_nodes().iter().map(|t| t.id()).collect();
    assert!(vars
        .iter()
        .all(|v| !ids_in_graph.contains(&v.as_tensor().id())));
    Ok(())
}

// ---- the trainer ------------------------------------------------------------------------------

/// With checkpointing on, the memorisation task's loss falls as without, step for step (f32:
/// the two graphs round differently, so within 1e-4), on prompt/completion data (prompt
/// tokens masked out of the loss); with the layers' inputs offloaded, exactly as on.
#[test]
fn trainer_with_checkpointing_matches_the_plain_run() -> Result<()> {
    let dir = scratch("ckpt-train");
    let data = memorise_data(&dir);
    let run = |mode: Checkpointing, name: &str| -> Result<Vec<f64>> {
        let mut cfg = small_config(&dir, data.clone(), 12);
        cfg.gradient_checkpointing = mode;
        cfg.output_dir = dir.join(name);
        let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
        let (on, offload) = match mode {
            Checkpointing::On => (true, false),
            Checkpointing::Offload => (true, true),
            _ => (false, false),
        };
        assert_eq!(t.model().gradient_checkpointing(), on);
        assert_eq!(t.model().checkpoint_offload(), offload);
        assert_eq!(
            (t.checkpointing().on, t.checkpointing().offload),
            (on, offload)
        );
        losses(&mut t, 12)
    };
    let on = run(Checkpointing::On, "on")?;
    // Offloaded: the same losses, bit for bit (only where the layers' inputs wait differs).
    assert_eq!(run(Checkpointing::Offload, "offload")?, on);
    // auto on the CPU is off.
    let off = run(Checkpointing::Auto, "auto")?;
    assert_eq!(on.len(), 12);
    for (i, (a, b)) in on.iter().zip(&off).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {}: {a} vs {b}",
            i + 1
        );
    }
    let first = on[..2].iter().sum::<f64>() / 2.0;
    let last = on[on.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}: {on:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// With checkpointing on (and LoRA dropout, now seeded per step), a resumed run reproduces
/// the uninterrupted one exactly; a resume may switch checkpointing off (it is not part of the
/// run's identity) and then continues with the same losses up to rounding.
#[test]
fn checkpointed_resume_is_exact_and_may_switch_it() -> Result<()> {
    let dir = scratch("ckpt-resume");
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data, 6);
    cfg.save_every = 3;
    cfg.lora_dropout = 0.1;
    cfg.gradient_checkpointing = Checkpointing::On;
    let full = {
        let mut c = cfg.clone();
        c.output_dir = dir.join("full");
        let mut t = Trainer::from_config(c, &Device::Cpu)?;
        losses(&mut t, 6)?
    };
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    for _ in 0..3 {
        t.step()?;
    }
    t.save_checkpoint()?;
    drop(t);
    let ckpt = Trainer::latest_checkpoint(&cfg.output_dir).expect("a checkpoint");
    let mut t = Trainer::resume_from_config(cfg.clone(), &Device::Cpu, &ckpt)?;
    assert_eq!(
        losses(&mut t, 6)?,
        full[3..].to_vec(),
        "resumed losses differ"
    );
    drop(t);
    let mut off = cfg.clone();
    off.gradient_checkpointing = Checkpointing::Off;
    let mut t = Trainer::resume_from_config(off, &Device::Cpu, &ckpt)?;
    assert!(!t.model().gradient_checkpointing());
    let switched = losses(&mut t, 6)?;
    for (a, b) in switched.iter().zip(&full[3..]) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{switched:?} vs {full:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- the host store ---------------------------------------------------------------------------

/// A chain whose inputs are kept in host memory (`CheckpointStore::Host`: on CUDA, page-locked
/// buffers with asynchronous copies) computes exactly what the device store computes, values
/// and gradients, bit for bit, on odd shapes, in f32 and bf16 (f64 on the CPU too), with a
/// block that hands the next one a non-contiguous view. On CUDA the pinned buffers are pooled:
/// a second run pins nothing new.
fn host_store_matches_the_device_store(dev: &Device) -> Result<()> {
    use flare::models::checkpoint::{
        checkpoint_chain, ChainBlock, CheckpointGrads, CheckpointStore,
    };
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F64, DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    for &dtype in dtypes {
        let x = randn_scaled(&[3, 5, 7], 0.0, 1.0, dtype, dev, seed("host store x"))?;
        let w1 = Var::from_tensor(&randn_scaled(&[7], 1.0, 0.5, dtype, dev, seed("w1"))?)?;
        let w2 = Var::from_tensor(&randn_scaled(&[5], 1.0, 0.5, dtype, dev, seed("w2"))?)?;
        let w3 = Var::from_tensor(&randn_scaled(&[7], 1.0, 0.5, dtype, dev, seed("w3"))?)?;
        let x = Var::from_tensor(&x)?;
        let run = |store: CheckpointStore| -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
            let acc = CheckpointGrads::default();
            let (a, b, c) = (w1.clone(), w2.clone(), w3.clone());
            let blocks = vec![
                // [3, 5, 7] -> [3, 7, 5], a transposed (non-contiguous) view.
                ChainBlock::new(vec![a.clone()], move |x: &Tensor| {
                    Ok((
                        x.broadcast_mul(a.as_tensor())?.tanh()?.transpose(1, 2)?,
                        None,
                    ))
                }),
                // [3, 7, 5] -> [3, 5, 7], with a residual.
                ChainBlock::new(vec![b.clone()], move |x: &Tensor| {
                    let t = x.transpose(1, 2)?;
                    Ok((
                        t.broadcast_mul(&b.as_tensor().reshape((5, 1))?)?.sin()?,
                        Some(t),
                    ))
                }),
                ChainBlock::new(vec![c.clone()], move |x: &Tensor| {
                    Ok((x.broadcast_mul(c.as_tensor())?.exp()?, Some(x.clone())))
                }),
            ];
            let y = checkpoint_chain(x.as_tensor(), blocks, &acc, store)?;
            let mut grads = (y.sqr()?.sum_all()?).backward()?;
            acc.merge_into(&mut grads)?;
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
            };
            let mut g = Vec::new();
            for v in [&x, &w1, &w2, &w3] {
                g.push(flat(grads.get(v.as_tensor()).expect("a gradient"))?);
            }
            Ok((flat(&y)?, g))
        };
        let (y_dev, g_dev) = run(CheckpointStore::Device)?;
        let (y_host, g_host) = run(CheckpointStore::Host)?;
        assert_eq!(y_host, y_dev, "{dtype:?}: values");
        assert_eq!(g_host, g_dev, "{dtype:?}: gradients");
        assert!(g_dev.iter().all(|g| g.iter().any(|v| *v != 0.0)));
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = dev {
            let rt = flare::runtime::cuda::CudaRuntime::get(d)?;
            let pooled = rt.pinned_pool_bytes();
            // Two block inputs of 105 elements went out and came back.
            assert!(
                pooled >= 2 * 105 * dtype.size_in_bytes(),
                "{dtype:?}: pooled {pooled}"
            );
            let (y_again, g_again) = run(CheckpointStore::Host)?;
            assert_eq!((y_again, g_again), (y_dev, g_dev), "{dtype:?}: second run");
            assert_eq!(
                rt.pinned_pool_bytes(),
                pooled,
                "{dtype:?}: a second run pinned more"
            );
        }
    }
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        flare::runtime::empty_cache(dev)?;
        if let Device::Cuda(d) = dev {
            let rt = flare::runtime::cuda::CudaRuntime::get(d)?;
            assert_eq!(
                rt.pinned_pool_bytes(),
                0,
                "empty_cache frees the pinned buffers"
            );
        }
    }
    Ok(())
}

device_test!(exclusive: host_store_matches_the_device_store);
