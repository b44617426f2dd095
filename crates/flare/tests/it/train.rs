//! Training: the fused cross-entropy (values and gradients vs an f64 reference and finite
//! differences, CPU and CUDA), AdamW against a hand-computed f64 step, clipping, the JSONL
//! pipeline (formats, prompt masking, bad lines, cache), and the trainer end to end on the tiny
//! Qwen2 fixture: the loss falls, resuming is exact, the adapter loads and changes generation,
//! and checkpoints are atomic.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use flare::ops::cross_entropy::{cross_entropy_reference, IGNORE_INDEX};
use flare::ops::{cross_entropy, cross_entropy_per_token};
use flare::text::Tokenizer;
use flare::train::data::{make_batch, make_packed_batch, tokenize_cached, tokenize_file};
use flare::train::{
    clip_scale, global_grad_norm, AdamW, AdamWConfig, BadLines, DataConfig, Encoder, Schedule,
    TrainConfig, Trainer,
};

use crate::common::{device_test, dtypes, randn_scaled, rel_err, seed, to_f64_vec, tol, Result};

pub(crate) fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2")
}

/// A fresh directory under the target's temp dir, removed first if it exists.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flare-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

// ---- cross-entropy ----------------------------------------------------------------------------

/// f64 reference: nll_i = lse(x_i) - x_i[t_i]; d/dx_ij = softmax_ij - [j = t_i] (times dnll_i).
fn ce_ref(x: &[f64], t: &[u32], vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let mut nll = vec![0.0; t.len()];
    let mut grad = vec![0.0; x.len()];
    for (i, &ti) in t.iter().enumerate() {
        if ti == IGNORE_INDEX {
            continue;
        }
        let row = &x[i * vocab..(i + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        nll[i] = lse - row[ti as usize];
        for j in 0..vocab {
            grad[i * vocab + j] = (row[j] - lse).exp() - if j == ti as usize { 1.0 } else { 0.0 };
        }
    }
    (nll, grad)
}

fn cross_entropy_matches_reference(dev: &Device) -> Result<()> {
    for &(n, vocab) in &[(1usize, 5usize), (7, 33), (13, 1029), (3, 4099)] {
        for dt in dtypes(dev) {
            let s = seed(&format!("ce {n} {vocab} {dt:?}"));
            let x = randn_scaled(&[n, vocab], 0.0, 3.0, dt, dev, s)?;
            let t: Vec<u32> = (0..n)
                .map(|i| {
                    if i % 4 == 3 {
                        IGNORE_INDEX
                    } else {
                        ((i * 7919 + 13) % vocab) as u32
                    }
                })
                .collect();
            let tt = Tensor::new(t.as_slice(), dev)?;
            let xv = Var::from_tensor(&x)?;
            let nll = cross_entropy_per_token(xv.as_tensor(), &tt, IGNORE_INDEX)?;
            // Weight rows differently so the backward's per-row scaling is checked.
            let w: Vec<f64> = (0..n).map(|i| 0.5 + i as f64).collect();
            let wt = Tensor::new(w.as_slice(), dev)?.to_dtype(nll.dtype())?;
            let grads = (&nll * &wt)?.sum_all()?.backward()?;
            let g = grads.get(xv.as_tensor()).expect("logits gradient");
            assert_eq!(g.dtype(), dt);
            let (rn, mut rg) = ce_ref(&to_f64_vec(&x)?, &t, vocab);
            for i in 0..n {
                for j in 0..vocab {
                    rg[i * vocab + j] *= w[i];
                }
            }
            let rn_t = Tensor::new(rn, &Device::Cpu)?;
            let rg_t = Tensor::from_vec(rg, (n, vocab), &Device::Cpu)?;
            // The NLL is accumulated in f32 from the rounded inputs: f32-level accuracy for
            // every input dtype (f64 for f64).
            let ftol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let e = rel_err(&nll, &rn_t)?;
            assert!(e < ftol, "nll {n}x{vocab} {dt:?}: rel err {e}");
            let e = rel_err(g, &rg_t)?;
            assert!(
                e < tol(dt).max(1e-5),
                "grad {n}x{vocab} {dt:?}: rel err {e}"
            );
            // Ignored rows: exactly zero loss and gradient.
            let gv = to_f64_vec(g)?;
            let nv = to_f64_vec(&nll)?;
            for i in (0..n).filter(|i| i % 4 == 3) {
                assert_eq!(nv[i], 0.0);
                assert!(gv[i * vocab..(i + 1) * vocab].iter().all(|&v| v == 0.0));
            }
            // The composite reference agrees too.
            let r = cross_entropy_reference(&x, &tt, IGNORE_INDEX)?;
            assert!(rel_err(&nll, &r)? < tol(dt).max(1e-5));
        }
    }
    Ok(())
}

fn cross_entropy_mean_counts_only_targets(dev: &Device) -> Result<()> {
    let x = randn_scaled(&[5, 17], 0.0, 1.0, DType::F32, dev, 3)?;
    let t = Tensor::new(&[1u32, IGNORE_INDEX, 4, IGNORE_INDEX, 16], dev)?;
    let mean = cross_entropy(&x, &t, IGNORE_INDEX)?.to_scalar::<f32>()?;
    let per = to_f64_vec(&cross_entropy_per_token(&x, &t, IGNORE_INDEX)?)?;
    let want = (per[0] + per[2] + per[4]) / 3.0;
    assert!((f64::from(mean) - want).abs() < 1e-6);
    Ok(())
}

device_test!(
    cross_entropy_matches_reference,
    cross_entropy_mean_counts_only_targets
);

#[test]
fn cross_entropy_gradient_by_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let (n, vocab) = (3, 11);
    let x0 = randn_scaled(&[n, vocab], 0.0, 2.0, DType::F64, &dev, 77)?;
    let t = Tensor::new(&[3u32, IGNORE_INDEX, 10], &dev)?;
    let xv = Var::from_tensor(&x0)?;
    let loss = cross_entropy(xv.as_tensor(), &t, IGNORE_INDEX)?;
    let g = to_f64_vec(loss.backward()?.get(xv.as_tensor()).unwrap())?;
    let base = to_f64_vec(&x0)?;
    let h = 1e-6;
    for k in 0..base.len() {
        let f = |d: f64| -> Result<f64> {
            let mut v = base.clone();
            v[k] += d;
            let x = Tensor::from_vec(v, (n, vocab), &dev)?;
            Ok(cross_entropy(&x, &t, IGNORE_INDEX)?.to_scalar::<f64>()?)
        };
        let fd = (f(h)? - f(-h)?) / (2.0 * h);
        assert!((fd - g[k]).abs() < 1e-7, "element {k}: fd {fd} vs {}", g[k]);
    }
    Ok(())
}

#[test]
fn cross_entropy_rejects_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let bad_dtype = Tensor::new(&[1i64, 2], &dev).unwrap();
    assert!(cross_entropy(&x, &bad_dtype, IGNORE_INDEX).is_err());
    let bad_len = Tensor::new(&[1u32], &dev).unwrap();
    assert!(cross_entropy(&x, &bad_len, IGNORE_INDEX).is_err());
    let out_of_vocab = Tensor::new(&[1u32, 9], &dev).unwrap();
    let e = cross_entropy(&x, &out_of_vocab, IGNORE_INDEX).unwrap_err();
    assert!(e.to_string().contains("target 9 of row 1"), "{e}");
}

// ---- AdamW, clipping, schedule ----------------------------------------------------------------

#[test]
fn adamw_matches_hand_computed_f64_steps() -> Result<()> {
    let dev = Device::Cpu;
    let p0 = [0.5f32, -1.25, 2.0, 0.0, 3.5];
    let grads = [[0.1f32, -0.3, 2.0, 0.0, -5.0], [-0.2, 0.1, 1.0, 0.5, 4.0]];
    let cfg = AdamWConfig {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let (lr, scale) = (0.01, 0.5);
    let var = Var::new(&p0, &dev)?;
    let mut opt = AdamW::new(vec![("p".into(), var.clone())], cfg)?;
    // The reference, in f64 from the formulas of torch.optim.AdamW.
    let mut p: Vec<f64> = p0.iter().map(|&v| f64::from(v)).collect();
    let mut m = [0.0; 5];
    let mut v = [0.0; 5];
    for (k, g) in grads.iter().enumerate() {
        opt.step_with(&[Some(Tensor::new(g, &dev)?)], lr, scale)?;
        let t = (k + 1) as i32;
        for i in 0..5 {
            let gi = f64::from(g[i]) * scale;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
            p[i] *= 1.0 - lr * cfg.weight_decay;
            let mhat = m[i] / (1.0 - cfg.beta1.powi(t));
            let denom = (v[i] / (1.0 - cfg.beta2.powi(t))).sqrt() + cfg.eps;
            p[i] -= lr * mhat / denom;
        }
        let got = to_f64_vec(var.as_tensor())?;
        for i in 0..5 {
            assert!(
                (got[i] - p[i]).abs() < 1e-6 * (1.0 + p[i].abs()),
                "step {t} element {i}: {} vs {}",
                got[i],
                p[i]
            );
        }
    }
    assert_eq!(opt.step_count(), 2);
    // A parameter without a gradient is left alone.
    let before = to_f64_vec(var.as_tensor())?;
    opt.step_with(&[None], lr, 1.0)?;
    assert_eq!(to_f64_vec(var.as_tensor())?, before);
    Ok(())
}

#[test]
fn clipping_bounds_the_global_norm() -> Result<()> {
    let dev = Device::Cpu;
    let g1 = Tensor::new(&[3f32, 4.0], &dev)?;
    let g2 = Tensor::new(&[[12f32]], &dev)?;
    let grads = vec![Some(g1), None, Some(g2)];
    let norm = global_grad_norm(&grads)?;
    assert!((norm - 13.0).abs() < 1e-5);
    for max in [0.5, 1.0, 5.0, 13.0, 100.0] {
        let s = clip_scale(norm, Some(max));
        let clipped: Vec<Option<Tensor>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| (g * s).unwrap()))
            .collect();
        let n2 = global_grad_norm(&clipped)?;
        assert!(n2 <= max + 1e-5, "max {max}: norm {n2}");
        if max > 13.0 {
            assert_eq!(s, 1.0);
        } else {
            assert!((n2 - max).abs() < 1e-4, "max {max}: norm {n2}");
        }
    }
    Ok(())
}

/// Gradients of odd sizes for the norm tests: many tensors (more than one launch row each),
/// one large enough to span several blocks of the CUDA kernel, an empty one, and `None`s.
fn odd_grads(dev: &Device) -> Result<Vec<Option<Tensor>>> {
    let shapes: Vec<Vec<usize>> = (0..61)
        .map(|i| match i % 5 {
            0 => vec![16, 7 + 2 * i],
            1 => vec![3 * i + 1, 16],
            2 => vec![1 + i],
            3 => vec![0],
            _ => vec![5, 3, 1 + i % 7],
        })
        .chain([vec![297_013], vec![13, 17]])
        .collect();
    let mut out = Vec::new();
    for (i, sh) in shapes.iter().enumerate() {
        let t = randn_scaled(sh, 0.25, 3.0, DType::F32, dev, seed(&format!("gnorm{i}")))?;
        out.push(Some(t));
        if i % 9 == 0 {
            out.push(None);
        }
    }
    Ok(out)
}

/// The reference: one f64 sum of squares per tensor, added in f64.
fn norm_reference(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += to_f64_vec(g)?.iter().map(|x| x * x).sum::<f64>();
    }
    Ok(total.sqrt())
}

#[test]
fn global_norm_equals_the_per_tensor_reference() -> Result<()> {
    let dev = Device::Cpu;
    let mut grads = odd_grads(&dev)?;
    // A non-contiguous gradient and an f64 one are read as they are.
    grads.push(Some(
        randn_scaled(&[9, 31], 0.0, 1.0, DType::F32, &dev, 5)?.t()?,
    ));
    grads.push(Some(randn_scaled(&[11], 0.0, 1.0, DType::F64, &dev, 6)?));
    let got = global_grad_norm(&grads)?;
    let want = norm_reference(&grads)?;
    assert!(want > 100.0, "the grads are not trivial: {want}");
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "global norm {got} vs reference {want}"
    );
    assert_eq!(global_grad_norm(&[None, None])?, 0.0);
    assert_eq!(global_grad_norm(&[])?, 0.0);
    // clip_scale is unchanged: PyTorch's max / (norm + 1e-6), at most 1.
    assert_eq!(clip_scale(got, Some(1.0)), 1.0 / (got + 1e-6));
    assert_eq!(clip_scale(0.5, Some(1.0)), 1.0);
    Ok(())
}

#[test]
fn global_norm_cuda_matches_cpu() -> Result<()> {
    let Some(dev) = crate::common::cuda_device() else {
        return Ok(());
    };
    let cpu = odd_grads(&Device::Cpu)?;
    let mut gpu: Vec<Option<Tensor>> = cpu
        .iter()
        .map(|g| g.as_ref().map(|g| g.to_device(&dev)).transpose())
        .collect::<candle_core::Result<_>>()?;
    let want = global_grad_norm(&cpu)?;
    let got = global_grad_norm(&gpu)?;
    // f64 squares and sums on both sides: only the order of the additions differs.
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "cuda {got} vs cpu {want}"
    );
    // A bf16 and a non-contiguous gradient are converted (bf16 values are exact in f32).
    let b = randn_scaled(&[37, 5], 0.0, 1.0, DType::BF16, &Device::Cpu, 8)?;
    gpu.push(Some(b.to_device(&dev)?.t()?));
    let mut cpu2 = cpu.clone();
    cpu2.push(Some(b.t()?));
    let (got, want) = (global_grad_norm(&gpu)?, norm_reference(&cpu2)?);
    assert!((got - want).abs() <= 1e-12 * want, "cuda {got} vs {want}");
    Ok(())
}

#[test]
fn schedules_warm_up_and_decay_to_zero() {
    for s in [Schedule::Linear, Schedule::Cosine] {
        assert_eq!(s.lr(1.0, 0, 100, 10), 0.0);
        assert!((s.lr(1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(s.lr(1.0, 100, 100, 10).abs() < 1e-12);
    }
    assert_eq!(Schedule::Constant.lr(0.3, 50, 100, 10), 0.3);
}

// ---- data ---------------------------------------------------------------------------------------

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixture()).expect("fixture tokenizer")
}

#[test]
fn prompt_masking_puts_zero_weight_on_prompt_tokens() -> Result<()> {
    let dir = scratch("mask");
    let f = dir.join("d.jsonl");
    write(
        &f,
        concat!(
            r#"{"prompt": "Question: what is up? ", "completion": "the sky"}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}"#,
            "\n"
        ),
    );
    let tok = tokenizer();
    let cfg = DataConfig::default();
    let t = tokenize_file(&f, &tok, &cfg)?;
    assert_eq!(t.examples.len(), 2);

    // prompt/completion: labels exactly on the completion (+ EOS).
    let ex = &t.examples[0];
    let p = Encoder::encode(&tok, "Question: what is up? ")?.len();
    let c = Encoder::encode(&tok, "the sky")?.len();
    assert_eq!(ex.ids.len(), p + c + 1);
    assert!(ex.labels[..p].iter().all(|&b| !b));
    assert!(ex.labels[p..].iter().all(|&b| b));
    assert_eq!(*ex.ids.last().unwrap(), tok.eos_token_id().unwrap());

    // messages: labelled tokens decode to exactly the assistant turns (with their end tokens).
    let ex = &t.examples[1];
    let labelled: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l)
        .map(|(&i, _)| i)
        .collect();
    let text = tok.decode(&labelled, false)?;
    assert_eq!(text, "hello there<|im_end|>\nciao<|im_end|>\n");

    // In a batch, prompt positions have no target, and the loss gradient there is zero.
    let b = make_batch(&[&t.examples[0]], 0);
    let dev = Device::Cpu;
    for i in 0..p - 1 {
        assert_eq!(b.targets[i], IGNORE_INDEX, "prompt position {i}");
    }
    let logits = Var::from_tensor(&randn_scaled(&[b.seq, 256], 0.0, 1.0, DType::F32, &dev, 5)?)?;
    let tt = Tensor::new(b.targets.as_slice(), &dev)?;
    let loss = cross_entropy(logits.as_tensor(), &tt, IGNORE_INDEX)?;
    let g = loss.backward()?;
    let g = to_f64_vec(g.get(logits.as_tensor()).unwrap())?;
    for i in 0..b.seq {
        let row_zero = g[i * 256..(i + 1) * 256].iter().all(|&v| v == 0.0);
        assert_eq!(row_zero, i < p - 1, "position {i}");
    }
    // Packed with another example: the same targets, at the same places of its document.
    let packed = make_packed_batch(&[&t.examples[1], &t.examples[0]]);
    let cu = packed.cu_seqlens.clone().unwrap();
    let start = cu[1] as usize;
    assert_eq!(&packed.targets[start..], b.targets.as_slice());
    assert_eq!(
        packed.n_targets,
        t.examples[0].targets() + t.examples[1].targets()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn bad_jsonl_lines_are_named_and_handled_as_configured() -> Result<()> {
    let dir = scratch("bad");
    let f = dir.join("d.jsonl");
    write(
        &f,
        "{\"text\": \"good one\"}\n\n{\"text\": 3}\n{not json\n{\"prompt\": \"only a prompt\"}\n{\"text\": \"fine\"}\n",
    );
    let tok = tokenizer();
    let strict = DataConfig::default();
    let e = tokenize_file(&f, &tok, &strict).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("d.jsonl:3:"), "{msg}");
    let skip = DataConfig {
        bad_lines: BadLines::Skip,
        ..Default::default()
    };
    let t = tokenize_file(&f, &tok, &skip)?;
    assert_eq!(t.examples.len(), 2);
    let lines: Vec<usize> = t.bad_lines.iter().map(|b| b.line).collect();
    assert_eq!(lines, vec![3, 4, 5]);
    assert!(t.bad_lines[2].msg.contains("exactly one of"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn tokenisation_is_cached_and_the_key_follows_the_settings() -> Result<()> {
    let dir = scratch("cache");
    let f = dir.join("d.jsonl");
    write(&f, "{\"text\": \"some words here\"}\n");
    let tok = tokenizer();
    let cfg = DataConfig::default();
    let cache = dir.join("cache");
    let (a, hit) = tokenize_cached(&f, &tok, &cfg, &cache)?;
    assert!(!hit);
    let (b, hit) = tokenize_cached(&f, &tok, &cfg, &cache)?;
    assert!(hit);
    assert_eq!(a, b);
    let short = DataConfig {
        max_seq_len: 3,
        ..Default::default()
    };
    let (c, hit) = tokenize_cached(&f, &tok, &short, &cache)?;
    assert!(!hit);
    assert_eq!(c.examples[0].ids.len(), 3);
    assert_eq!(c.truncated, 1);
    // Changing the data invalidates too.
    write(&f, "{\"text\": \"other words\"}\n");
    let (_, hit) = tokenize_cached(&f, &tok, &cfg, &cache)?;
    assert!(!hit);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- trainer ------------------------------------------------------------------------------------

const MEMORISE: &[(&str, &str)] = &[
    ("The capital of France is", " Paris."),
    ("Two plus two equals", " four."),
    ("The colour of the sky is", " blue."),
    ("Cats say", " meow."),
];

pub(crate) fn memorise_data(dir: &Path) -> PathBuf {
    let f = dir.join("mem.jsonl");
    let body: String = MEMORISE
        .iter()
        .map(|(p, c)| format!("{{\"prompt\": {p:?}, \"completion\": {c:?}}}\n"))
        .collect();
    write(&f, &body);
    f
}

pub(crate) fn small_config(dir: &Path, data: PathBuf, steps: u64) -> TrainConfig {
    TrainConfig {
        model: fixture(),
        data,
        output_dir: dir.join("out"),
        lora_r: 4,
        lora_alpha: 8.0,
        lr: 2e-2,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        max_steps: Some(steps),
        batch_size: 2,
        grad_accum: 2,
        max_grad_norm: Some(1.0),
        max_seq_len: 64,
        seed: 7,
        ..Default::default()
    }
}

pub(crate) fn losses(t: &mut Trainer, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..n {
        match t.step()? {
            Some(m) => out.push(m.loss),
            None => break,
        }
    }
    Ok(out)
}

#[test]
fn loss_falls_on_a_memorisation_task() -> Result<()> {
    loss_falls(true)
}

#[test]
fn loss_falls_on_a_memorisation_task_unpacked() -> Result<()> {
    loss_falls(false)
}

fn loss_falls(packing: bool) -> Result<()> {
    let dir = scratch(if packing {
        "memorise"
    } else {
        "memorise-padded"
    });
    let mut cfg = small_config(&dir, memorise_data(&dir), 30);
    cfg.packing = packing;
    let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
    let l = losses(&mut t, 30)?;
    assert_eq!(l.len(), 30);
    let first = l[..2].iter().sum::<f64>() / 2.0;
    let last = l[l.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(last < 0.5 * first, "loss {first} -> {last}: {l:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses_exactly() -> Result<()> {
    resumed_run(true)
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses_exactly_unpacked() -> Result<()> {
    resumed_run(false)
}

fn resumed_run(packing: bool) -> Result<()> {
    let dir = scratch(if packing { "resume" } else { "resume-padded" });
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data, 8);
    cfg.save_every = 3;
    // Padded: 4 batches per epoch, 2 per step. Packed: 2 packs of 2 examples per epoch (of at
    // most 1 × 40 tokens). Either way steps cross epochs.
    cfg.batch_size = 1;
    cfg.packing = packing;
    if packing {
        cfg.max_seq_len = 40;
    }
    let full = {
        let mut c = cfg.clone();
        c.output_dir = dir.join("full");
        let mut t = Trainer::from_config(c, &Device::Cpu)?;
        losses(&mut t, 8)?
    };
    // Interrupted after step 5: the last checkpoint is step 3.
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    let mut first = Vec::new();
    for _ in 0..5 {
        let m = t.step()?.unwrap();
        first.push(m.loss);
        if m.step % 3 == 0 {
            t.save_checkpoint()?;
        }
    }
    drop(t);
    let ckpt = Trainer::latest_checkpoint(&cfg.output_dir).expect("a checkpoint");
    assert!(ckpt.ends_with("checkpoint-3"));
    let mut t = Trainer::resume_from_config(cfg.clone(), &Device::Cpu, &ckpt)?;
    assert_eq!(t.state().step, 3);
    let rest = losses(&mut t, 8)?;
    assert_eq!(rest.len(), 5);
    assert_eq!(&first[..3], &full[..3]);
    assert_eq!(rest, full[3..].to_vec(), "resumed losses differ");
    // metrics.jsonl is appended to: the interrupted run's steps 1-5, the resume line at step
    // 3, then steps 4-8 of the resumed run, whose losses are the uninterrupted run's.
    let metrics = std::fs::read_to_string(cfg.output_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]);
    assert!(lines[5]["resumed_from"]
        .as_str()
        .unwrap()
        .ends_with("checkpoint-3"));
    let logged: Vec<f64> = lines[6..]
        .iter()
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(logged, full[3..].to_vec());
    // A checkpoint of another configuration is refused by name.
    let mut other = cfg.clone();
    other.seed = 8;
    let e = Trainer::resume_from_config(other, &Device::Cpu, &ckpt).unwrap_err();
    assert!(e.to_string().contains("`seed`"), "{e}");
    // Nor does a packed run resume unpacked, or the other way round.
    let mut other = cfg.clone();
    other.packing = !packing;
    let e = Trainer::resume_from_config(other, &Device::Cpu, &ckpt).unwrap_err();
    assert!(e.to_string().contains("`packing`"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn eval_loss_and_first_step_are_the_same_packed_or_padded() -> Result<()> {
    let dir = scratch("pack-eval");
    let data = memorise_data(&dir);
    let run = |packing: bool| -> Result<(f64, f64, usize)> {
        let mut cfg = small_config(&dir, data.clone(), 4);
        cfg.output_dir = dir.join(format!("out-{packing}"));
        cfg.eval_fraction = 0.5;
        cfg.grad_accum = 1;
        cfg.packing = packing;
        let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
        let eval = t.evaluate()?.expect("eval data");
        // One step over both training examples (padded: one batch of 2; packed: one pack).
        let m = t.step()?.unwrap();
        Ok((eval, m.loss, m.tokens))
    };
    let (e1, l1, n1) = run(true)?;
    let (e0, l0, n0) = run(false)?;
    assert!(
        (e1 - e0).abs() <= 1e-5 * e0,
        "eval loss packed {e1}, padded {e0}"
    );
    assert!(
        (l1 - l0).abs() <= 1e-5 * l0,
        "first loss packed {l1}, padded {l0}"
    );
    // Real tokens only, both ways.
    assert_eq!(n1, n0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn trained_adapter_loads_and_changes_generation() -> Result<()> {
    let dir = scratch("adapter");
    let mut cfg = small_config(&dir, memorise_data(&dir), 12);
    cfg.eval_fraction = 0.25;
    cfg.eval_every = 4;
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    let mut evals = 0;
    let out = t.run(|e| {
        if matches!(e, flare::train::Event::Eval { .. }) {
            evals += 1;
        }
    })?;
    assert!(evals >= 3, "{evals} evals");
    assert_eq!(out, cfg.output_dir.join("adapter"));
    let png = std::fs::read(cfg.output_dir.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let adapter = flare::lora::load_adapter(&out, &Device::Cpu)?;
    assert_eq!(adapter.config.r, 4);
    assert_eq!(adapter.tensors.len(), 2 * 7);
    let mut base = flare::models::Transformer::from_dir(fixture(), DType::F32, &Device::Cpu)?;
    let prompt = Tensor::new(&[[20u32, 21, 22, 23, 24]], &Device::Cpu)?;
    let before = base.forward(&prompt)?;
    let lora = adapter.config.lora_config()?;
    for (path, (a, b)) in &adapter.tensors {
        let layer = base.lora_module_mut(path).unwrap();
        layer.add_adapter("trained", &lora, 0)?;
        layer.set_adapter_weights("trained", a, b)?;
        layer.set_active(Some("trained"))?;
    }
    let after = base.forward(&prompt)?;
    let diff = (&after - &before)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        diff > 1e-3,
        "the adapter does not change the logits ({diff})"
    );
    // And the logits equal the trainer's own model (training mode has no dropout here).
    let own = t.model().forward(&prompt)?;
    assert!(rel_err(&after, &own)? < 1e-6);
    // Greedy generation after training completes a memorised prompt.
    let tok = tokenizer();
    let ids = Encoder::encode(&tok, MEMORISE[0].0)?;
    let gen = flare::generate::GenerationConfig {
        max_new_tokens: 4,
        ..Default::default()
    };
    let out_ids = flare::generate::generate(&base, &ids, &gen, |_| {})?;
    let text = tok.decode(&out_ids, true)?;
    assert!(text.starts_with(" Par"), "generated {text:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn checkpoints_are_atomic_and_complete() -> Result<()> {
    let dir = scratch("atomic");
    let mut cfg = small_config(&dir, memorise_data(&dir), 2);
    cfg.save_every = 1;
    let out = cfg.output_dir.clone();
    let mut t = Trainer::from_config(cfg, &Device::Cpu)?;
    t.step()?;
    let c1 = t.save_checkpoint()?;
    // What a write killed half-way leaves: a temp dir, and a checkpoint dir with no state.
    std::fs::create_dir_all(out.join(".tmp-checkpoint-9-1")).unwrap();
    std::fs::create_dir_all(out.join("checkpoint-7")).unwrap();
    assert_eq!(Trainer::latest_checkpoint(&out), Some(c1.clone()));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "loss.png",
    ] {
        assert!(c1.join(f).is_file(), "{f} missing");
    }
    t.step()?;
    let c2 = t.save_checkpoint()?;
    assert_eq!(Trainer::latest_checkpoint(&out), Some(c2));
    // No temporary directory of ours is left behind.
    let ours = format!(".tmp.{}.", std::process::id());
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(&ours), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn merged_model_gives_the_base_plus_adapter_logits() -> Result<()> {
    let dir = scratch("merge");
    let cfg = small_config(&dir, memorise_data(&dir), 6);
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu)?;
    let adapter_dir = t.run(|_| {})?;
    let merged_dir = dir.join("merged");
    flare::train::merge_adapter_to_dir(
        fixture(),
        &adapter_dir,
        &merged_dir,
        Some(DType::F32),
        false,
    )?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged_dir.join(f).is_file(), "{f} missing");
    }
    let merged = flare::models::Transformer::from_dir(&merged_dir, DType::F32, &Device::Cpu)?;
    let base = flare::models::Transformer::from_dir(fixture(), DType::F32, &Device::Cpu)?;
    let ids = Tensor::new(
        &[[3u32, 50, 77, 120, 9, 200, 31], [1, 2, 3, 4, 5, 6, 7]],
        &Device::Cpu,
    )?;
    let want = t.model().forward(&ids)?;
    let got = merged.forward(&ids)?;
    let plain = base.forward(&ids)?;
    let e = rel_err(&got, &want)?;
    assert!(e < 1e-5, "merged vs base+adapter: rel err {e}");
    assert!(
        rel_err(&plain, &want)? > 100.0 * e.max(1e-7),
        "the adapter changes nothing"
    );
    // An adapter for a model of other shapes (the demo model: hidden 128, not 64) is refused,
    // naming the tensor.
    let e = flare::train::merge_adapter_to_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/model"),
        &adapter_dir,
        dir.join("bad"),
        None,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lora_A"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- device agreement (the CUDA variants run on the GPU machine) ------------------------------

/// AdamW on `dev` (the multi-tensor kernel on CUDA) against the CPU update: three steps over
/// three parameters of odd sizes, one of them without a gradient at step 2.
fn adamw_matches_cpu(dev: &Device) -> Result<()> {
    let shapes: [&[usize]; 3] = [&[7, 33], &[1029], &[3, 5, 2]];
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        ..Default::default()
    };
    let mk = |d: &Device| -> Result<(Vec<Var>, AdamW)> {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| -> Result<Var> {
                Ok(Var::from_tensor(&randn_scaled(
                    s,
                    0.0,
                    1.0,
                    DType::F32,
                    d,
                    10 + i as u64,
                )?)?)
            })
            .collect::<Result<_>>()?;
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()))
            .collect();
        Ok((vars.clone(), AdamW::new(named, cfg)?))
    };
    let (dv, mut dopt) = mk(dev)?;
    let (cv, mut copt) = mk(&Device::Cpu)?;
    for step in 0..3u64 {
        let grads = |d: &Device| -> Result<Vec<Option<Tensor>>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if step == 1 && i == 2 {
                        return Ok(None);
                    }
                    Ok(Some(randn_scaled(
                        s,
                        0.0,
                        2.0,
                        DType::F32,
                        d,
                        100 * step + i as u64,
                    )?))
                })
                .collect()
        };
        dopt.step_with(&grads(dev)?, 1e-2, 0.7)?;
        copt.step_with(&grads(&Device::Cpu)?, 1e-2, 0.7)?;
    }
    for (d, c) in dv.iter().zip(&cv) {
        let e = rel_err(d.as_tensor(), c.as_tensor())?;
        assert!(e < 1e-6, "params differ: rel err {e}");
    }
    for ((k, d), (_, c)) in dopt.state_tensors().iter().zip(copt.state_tensors().iter()) {
        let e = rel_err(d, c)?;
        assert!(e < 1e-6, "{k} differs: rel err {e}");
    }
    Ok(())
}

/// A few trainer steps on `dev` in f32 give the CPU's losses (to float rounding), and bf16
/// training on `dev` still lowers the loss.
fn trainer_losses_match_cpu(dev: &Device) -> Result<()> {
    let dir = scratch(&format!("devtrain-{}", dev.is_cuda()));
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data, 6);
    cfg.output_dir = dir.join("cpu");
    let cpu = losses(&mut Trainer::from_config(cfg.clone(), &Device::Cpu)?, 6)?;
    cfg.output_dir = dir.join("dev");
    let on_dev = losses(&mut Trainer::from_config(cfg.clone(), dev)?, 6)?;
    for (i, (a, b)) in on_dev.iter().zip(&cpu).enumerate() {
        assert!(
            (a - b).abs() < 1e-3 * (1.0 + b.abs()),
            "step {i}: {a} vs {b}"
        );
    }
    if !dev.is_cpu() {
        cfg.dtype = "bf16".into();
        cfg.max_steps = Some(30);
        cfg.output_dir = dir.join("bf16");
        let l = losses(&mut Trainer::from_config(cfg, dev)?, 30)?;
        assert!(l[28] + l[29] < 0.5 * (l[0] + l[1]), "bf16 loss {l:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

device_test!(adamw_matches_cpu, trainer_losses_match_cpu);
