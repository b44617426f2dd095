//! The fused linear + cross-entropy (`flare::ops::linear_cross_entropy`): loss, d(hidden) and
//! d(weight) against a float64 reference written out here (logits, log-softmax, gradients) on
//! odd shapes with ignored rows and several chunk sizes (chunks of one row, ragged last
//! chunks, one chunk), finite-difference gradients on the CPU, CUDA against the CPU, the
//! autograd rules (a frozen weight gets no gradient, the upstream gradient scales), bad input,
//! and the model/trainer wiring: `forward_hidden` + `lm_head_weight` give `forward`'s logits,
//! and the fused loss and its gradients equal the logits path on the tiny Qwen2 fixture.

use candle_core::{DType, Device, Tensor, Var};
use flare::ops::cross_entropy::IGNORE_INDEX;
use flare::ops::linear_cross_entropy::{
    chunk_rows, linear_cross_entropy_chunked, linear_cross_entropy_reference,
};
use flare::ops::{cross_entropy_per_token, linear_cross_entropy};
use flare::train::data::{make_batch, tokenize_file};
use flare::train::Trainer;

use crate::common::{
    assert_close, device_test, dt, dtypes, f64_cpu, grad_of, randn_scaled, seed, to_f64_vec, tol,
    Failures, FdCheck, Result,
};
use crate::train::{memorise_data, scratch, small_config};

/// `(loss, d(hidden), d(weight))` in f64 for an upstream gradient `g`: the logits
/// `z = h wᵀ`, `nll_i = lse(z_i) - z_i[t_i]`, `dz_i = softmax(z_i) - onehot(t_i)` (0 for an
/// ignored row), `dh = g dz w`, `dw = g dzᵀ h`.
fn reference(
    h: &[f64],
    w: &[f64],
    t: &[u32],
    (n, hd, vocab): (usize, usize, usize),
    g: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let mut loss = 0.0;
    let mut dh = vec![0.0; n * hd];
    let mut dw = vec![0.0; vocab * hd];
    for i in 0..n {
        if t[i] == IGNORE_INDEX {
            continue;
        }
        let hi = &h[i * hd..(i + 1) * hd];
        let z: Vec<f64> = (0..vocab)
            .map(|v| (0..hd).map(|k| hi[k] * w[v * hd + k]).sum())
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let ti = t[i] as usize;
        loss += lse - z[ti];
        for v in 0..vocab {
            let dz = g * ((z[v] - lse).exp() - if v == ti { 1.0 } else { 0.0 });
            for k in 0..hd {
                dh[i * hd + k] += dz * w[v * hd + k];
                dw[v * hd + k] += dz * hi[k];
            }
        }
    }
    (loss, dh, dw)
}

/// Targets spread over the vocabulary, every fifth row (and row 1) ignored.
fn targets(n: usize, vocab: usize, s: u64) -> Vec<u32> {
    (0..n)
        .map(|i| {
            if i % 5 == 4 || i == 1 {
                IGNORE_INDEX
            } else {
                ((i as u64 * 7919 + s % 1013) % vocab as u64) as u32
            }
        })
        .collect()
}

/// Random `hidden [n, hd]` and `weight [vocab, hd]` (logits of a few units) and targets.
fn inputs(
    dev: &Device,
    dtype: DType,
    (n, hd, vocab): (usize, usize, usize),
    what: &str,
) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let s = seed(what);
    let h = randn_scaled(&[n, hd], 0.0, 1.0, dtype, dev, s)?;
    let w = randn_scaled(
        &[vocab, hd],
        0.0,
        2.0 / (hd as f64).sqrt(),
        dtype,
        dev,
        s ^ 1,
    )?;
    Ok((h, w, targets(n, vocab, s)))
}

/// The fused loss and its gradients (`None` for an input that is not a `Var`) for the upstream
/// gradient `g`.
fn fused(
    h: &Tensor,
    w: &Tensor,
    t: &Tensor,
    chunk: usize,
    (h_var, w_var): (bool, bool),
    g: f64,
) -> Result<(f64, Option<Tensor>, Option<Tensor>)> {
    let hv = Var::from_tensor(h)?;
    let wv = Var::from_tensor(w)?;
    let hh = if h_var {
        hv.as_tensor().clone()
    } else {
        h.clone()
    };
    let ww = if w_var {
        wv.as_tensor().clone()
    } else {
        w.clone()
    };
    let loss = linear_cross_entropy_chunked(&hh, &ww, t, IGNORE_INDEX, chunk)?;
    assert_eq!(loss.dims(), &[] as &[usize]);
    let want = if h.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    assert_eq!(loss.dtype(), want);
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !h_var && !w_var {
        return Ok((value, None, None));
    }
    let grads = (loss * g)?.backward()?;
    let dh = grads.get(&hh).cloned();
    let dw = grads.get(&ww).cloned();
    assert_eq!(dh.is_some(), h_var, "d(hidden) present iff hidden is a Var");
    assert_eq!(dw.is_some(), w_var, "d(weight) present iff weight is a Var");
    Ok((value, dh, dw))
}

const SHAPES: &[(usize, usize, usize, usize)] = &[
    // (n, hidden, vocab, chunk)
    (1, 3, 5, 1),
    (7, 5, 33, 3),
    (13, 17, 1029, 4),
    (9, 16, 4096, 4),
    (37, 24, 4099, 16),
    (20, 8, 300, 64),
];

/// Loss, d(hidden) and d(weight) against the f64 reference on odd shapes, chunk sizes that
/// leave a ragged last chunk, for every dtype; on CUDA also against the CPU on the same inputs.
fn matches_f64_reference(dev: &Device) -> Result<()> {
    let mut f = Failures::default();
    let g = 0.37;
    for &(n, hd, vocab, chunk) in SHAPES {
        for dtype in dtypes(dev) {
            let what = format!("lce n{n} h{hd} v{vocab} c{chunk} {}", dt(dtype));
            let (h, w, tv) = inputs(dev, dtype, (n, hd, vocab), &what)?;
            let t = Tensor::new(tv.as_slice(), dev)?;
            let (hf, wf) = (to_f64_vec(&h)?, to_f64_vec(&w)?);
            let (rl, rdh, rdw) = reference(&hf, &wf, &tv, (n, hd, vocab), g);
            let (loss, dh, dw) = fused(&h, &w, &t, chunk, (true, true), g)?;
            let tl = tol(dtype);
            f.check(
                &Tensor::new(&[loss], &Device::Cpu)?,
                &Tensor::new(&[rl], &Device::Cpu)?,
                tl,
                &format!("{what} loss"),
            )?;
            let dh = dh.expect("checked");
            let dw = dw.expect("checked");
            f.check(
                &dh,
                &Tensor::from_vec(rdh, (n, hd), &Device::Cpu)?,
                tl,
                &format!("{what} d(hidden)"),
            )?;
            f.check(
                &dw,
                &Tensor::from_vec(rdw, (vocab, hd), &Device::Cpu)?,
                tl,
                &format!("{what} d(weight)"),
            )?;
            if dev.is_cuda() {
                let cpu = Device::Cpu;
                let tc = Tensor::new(tv.as_slice(), &cpu)?;
                let (hc, wc) = (h.to_device(&cpu)?, w.to_device(&cpu)?);
                let (cl, cdh, cdw) = fused(&hc, &wc, &tc, chunk, (true, true), g)?;
                f.check(
                    &Tensor::new(&[loss], &cpu)?,
                    &Tensor::new(&[cl], &cpu)?,
                    tl,
                    &format!("{what} loss cuda vs cpu"),
                )?;
                f.check(
                    &dh,
                    &cdh.expect("checked"),
                    tl,
                    &format!("{what} dh cuda vs cpu"),
                )?;
                f.check(
                    &dw,
                    &cdw.expect("checked"),
                    tl,
                    &format!("{what} dw cuda vs cpu"),
                )?;
            }
        }
    }
    f.finish();
    Ok(())
}

/// The chunk size changes nothing beyond rounding: chunks of one row, ragged chunks, exactly
/// `n`, more than `n` and the default rule all give the same loss and gradients.
fn chunk_size_changes_nothing(dev: &Device) -> Result<()> {
    let (n, hd, vocab) = (23, 12, 517);
    for dtype in [DType::F32, DType::F64] {
        if !flare::ops::supported_dtypes(dev).contains(&dtype) {
            continue;
        }
        let what = format!("lce chunks {}", dt(dtype));
        let (h, w, tv) = inputs(dev, dtype, (n, hd, vocab), &what)?;
        let t = Tensor::new(tv.as_slice(), dev)?;
        let (l0, dh0, dw0) = fused(&h, &w, &t, n, (true, true), 1.0)?;
        let (dh0, dw0) = (dh0.expect("var"), dw0.expect("var"));
        let bound = if dtype == DType::F64 { 1e-13 } else { 1e-6 };
        let default = chunk_rows(n, vocab, dtype);
        assert_eq!(default, n, "a small problem is one chunk");
        for chunk in [1, 2, 5, n - 1, n + 1, 10 * n] {
            let (l, dh, dw) = fused(&h, &w, &t, chunk, (true, true), 1.0)?;
            let c = format!("{what} chunk {chunk}");
            assert!((l - l0).abs() <= bound * l0.abs(), "{c}: loss {l} vs {l0}");
            assert_close(&dh.expect("var"), &dh0, bound, &format!("{c} dh"))?;
            assert_close(&dw.expect("var"), &dw0, bound, &format!("{c} dw"))?;
        }
        let l = linear_cross_entropy(&h, &w, &t, IGNORE_INDEX)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!(
            (l - l0).abs() <= bound * l0.abs(),
            "default chunk: {l} vs {l0}"
        );
    }
    Ok(())
}

/// Only the inputs that take part in autograd get a gradient (a frozen head, as in LoRA, gets
/// none), ignored rows get exactly zero, an all-ignored batch has loss 0, and the composed
/// reference agrees.
fn autograd_rules_and_ignored_rows(dev: &Device) -> Result<()> {
    let (n, hd, vocab) = (11, 6, 97);
    let dtype = DType::F32;
    let (h, w, tv) = inputs(dev, dtype, (n, hd, vocab), "lce autograd")?;
    let t = Tensor::new(tv.as_slice(), dev)?;
    let (l_both, dh_both, dw_both) = fused(&h, &w, &t, 4, (true, true), 1.0)?;
    let (l_h, dh_only, none) = fused(&h, &w, &t, 4, (true, false), 1.0)?;
    assert!(none.is_none());
    let (l_w, none, dw_only) = fused(&h, &w, &t, 4, (false, true), 1.0)?;
    assert!(none.is_none());
    let (l_none, _, _) = fused(&h, &w, &t, 4, (false, false), 1.0)?;
    for l in [l_h, l_w, l_none] {
        assert_eq!(
            l, l_both,
            "the loss does not depend on which gradients are computed"
        );
    }
    let (dh, dw) = (dh_both.expect("var"), dw_both.expect("var"));
    assert_close(&dh_only.expect("var"), &dh, 0.0, "dh alone")?;
    assert_close(&dw_only.expect("var"), &dw, 0.0, "dw alone")?;
    let dhv = to_f64_vec(&dh)?;
    for (i, &ti) in tv.iter().enumerate() {
        if ti == IGNORE_INDEX {
            assert!(
                dhv[i * hd..(i + 1) * hd].iter().all(|&v| v == 0.0),
                "ignored row {i} has a gradient"
            );
        }
    }
    // The composed reference (whole logits, Candle's backward).
    let hv = Var::from_tensor(&h)?;
    let r = linear_cross_entropy_reference(hv.as_tensor(), &w, &t, IGNORE_INDEX)?;
    let rl = r.to_scalar::<f32>()? as f64;
    assert!(
        (rl - l_both).abs() < 1e-5 * rl.abs(),
        "reference {rl} vs {l_both}"
    );
    let rg = r.backward()?;
    assert_close(
        &dh,
        &grad_of(&rg, hv.as_tensor(), "reference dh"),
        1e-5,
        "vs reference",
    )?;
    // Everything ignored: loss 0, zero gradient.
    let all = Tensor::new(vec![IGNORE_INDEX; n].as_slice(), dev)?;
    let (l0, dh0, dw0) = fused(&h, &w, &all, 4, (true, true), 1.0)?;
    assert_eq!(l0, 0.0);
    assert!(to_f64_vec(&dh0.expect("var"))?.iter().all(|&v| v == 0.0));
    assert!(to_f64_vec(&dw0.expect("var"))?.iter().all(|&v| v == 0.0));
    Ok(())
}

/// The op keeps its gradients for one backward: a second backward through the same loss is a
/// clear error, not a silently wrong gradient.
fn second_backward_is_an_error(dev: &Device) -> Result<()> {
    let (h, w, tv) = inputs(dev, DType::F32, (4, 3, 9), "lce twice")?;
    let t = Tensor::new(tv.as_slice(), dev)?;
    let hv = Var::from_tensor(&h)?;
    let loss = linear_cross_entropy(hv.as_tensor(), &w, &t, IGNORE_INDEX)?;
    loss.backward()?;
    let e = loss.backward().unwrap_err().to_string();
    assert!(
        e.contains("linear_cross_entropy") && e.contains("one backward"),
        "{e}"
    );
    Ok(())
}

device_test!(
    matches_f64_reference,
    chunk_size_changes_nothing,
    autograd_rules_and_ignored_rows,
    second_backward_is_an_error,
);

/// d(hidden) and d(weight) of the f64 CPU op against central finite differences, with chunks
/// of two rows (so the gradient crosses chunk boundaries) and an ignored row.
#[test]
fn gradient_by_finite_differences() -> Result<()> {
    let dev = Device::Cpu;
    let (n, hd, vocab) = (5, 3, 7);
    let fd = FdCheck::new(&dev, "lce fd");
    let h = fd.input(&[n, hd], "h")?;
    let w = fd.input(&[vocab, hd], "w")?;
    let t = Tensor::new(&[3u32, IGNORE_INDEX, 0, 6, 2], &dev)?;
    fd.check(&[("hidden", &h), ("weight", &w)], |x| {
        linear_cross_entropy_chunked(&x[0], &x[1], &t, IGNORE_INDEX, 2)
    })?;
    Ok(())
}

/// Bad input gets a clear error naming the op and what is wrong, before anything runs.
#[test]
fn rejects_bad_input() -> Result<()> {
    let dev = Device::Cpu;
    let h = Tensor::zeros((3, 4), DType::F32, &dev)?;
    let w = Tensor::zeros((5, 4), DType::F32, &dev)?;
    let t = Tensor::new(&[0u32, 4, IGNORE_INDEX], &dev)?;
    let err = |r: flare::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(linear_cross_entropy(
        &h,
        &w,
        &Tensor::new(&[0u32, 5, 1], &dev)?,
        IGNORE_INDEX,
    ));
    assert!(e.contains("target 5 of row 1") && e.contains("0..5"), "{e}");
    let e = err(linear_cross_entropy(
        &h,
        &Tensor::zeros((5, 3), DType::F32, &dev)?,
        &t,
        IGNORE_INDEX,
    ));
    assert!(
        e.contains("linear_cross_entropy") && e.contains("[5, 3]"),
        "{e}"
    );
    let e = err(linear_cross_entropy(
        &h,
        &w.to_dtype(DType::F16)?,
        &t,
        IGNORE_INDEX,
    ));
    assert!(
        e.contains("linear_cross_entropy") && e.contains("F16"),
        "{e}"
    );
    let e = err(linear_cross_entropy(
        &h,
        &w,
        &t.to_dtype(DType::I64)?,
        IGNORE_INDEX,
    ));
    assert!(e.contains("targets must be u32"), "{e}");
    let e = err(linear_cross_entropy(
        &h,
        &w,
        &Tensor::new(&[0u32, 1], &dev)?,
        IGNORE_INDEX,
    ));
    assert!(e.contains("targets must be [n]"), "{e}");
    let e = err(linear_cross_entropy(&h.unsqueeze(0)?, &w, &t, IGNORE_INDEX));
    assert!(e.contains("hidden must be [tokens, hidden]"), "{e}");
    let e = err(linear_cross_entropy(&h, &w.unsqueeze(0)?, &t, IGNORE_INDEX));
    assert!(e.contains("weight must be [vocab, hidden]"), "{e}");
    let e = err(linear_cross_entropy_chunked(&h, &w, &t, IGNORE_INDEX, 0));
    assert!(e.contains("chunk"), "{e}");
    let e = err(linear_cross_entropy(
        &h.to_dtype(DType::U32)?,
        &w.to_dtype(DType::U32)?,
        &t,
        IGNORE_INDEX,
    ));
    assert!(e.contains("linear_cross_entropy"), "{e}");
    Ok(())
}

// ---- the model and the trainer --------------------------------------------------------------

/// Token ids and shifted targets (a few ignored) for the tiny model's vocabulary of 256.
fn tiny_batch(dev: &Device, b: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..b * s).map(|i| ((i * 37 + 11) % 256) as u32).collect();
    let t: Vec<u32> = (0..b * s)
        .map(|i| {
            if i % s == s - 1 || i % 7 == 3 {
                IGNORE_INDEX
            } else {
                ids[i + 1]
            }
        })
        .collect();
    Ok((
        Tensor::from_vec(ids, (b, s), dev)?,
        Tensor::from_vec(t, b * s, dev)?,
    ))
}

/// On the tiny Qwen2 (tied head) after two LoRA steps: `forward` is `forward_hidden` times
/// `lm_head_weight`ᵀ, and the fused loss and its gradients (d(hidden), d(head) when the head
/// is a Var) equal the logits path's (`forward` + `cross_entropy_per_token`, summed) to f32
/// rounding.
fn fused_loss_matches_the_logits_path_on_the_tiny_model(dev: &Device) -> Result<()> {
    let dir = scratch(&format!("lce-model-{}", dev.is_cuda()));
    let cfg = small_config(&dir, memorise_data(&dir), 2);
    let mut tr = Trainer::from_config(cfg, dev)?;
    while tr.step()?.is_some() {}
    let model = tr.model();
    let (ids, t) = tiny_batch(dev, 2, 9)?;
    let hidden = model.forward_hidden(&ids)?;
    let head = model.lm_head_weight();
    assert_eq!(head.dims(), &[256, 64]);
    let logits = model.forward(&ids)?;
    let again = flare::ops::matmul(&hidden, &head.t()?)?;
    assert_close(&again, &logits, 0.0, "forward = forward_hidden @ headᵀ")?;

    let h2 = hidden.reshape((18, 64))?.detach();
    let hv = Var::from_tensor(&h2)?;
    let wv = Var::from_tensor(head)?;
    let old = cross_entropy_per_token(
        &flare::ops::matmul(hv.as_tensor(), &wv.as_tensor().t()?)?,
        &t,
        IGNORE_INDEX,
    )?
    .sum_all()?;
    let new = linear_cross_entropy(hv.as_tensor(), wv.as_tensor(), &t, IGNORE_INDEX)?;
    let (lo, ln) = (old.to_scalar::<f32>()?, new.to_scalar::<f32>()?);
    assert!(
        (lo - ln).abs() <= 1e-5 * lo.abs(),
        "loss {ln} vs the logits path's {lo}"
    );
    let (go, gn) = (old.backward()?, new.backward()?);
    for (x, name) in [(&hv, "d(hidden)"), (&wv, "d(head)")] {
        assert_close(
            &grad_of(&gn, x.as_tensor(), name),
            &grad_of(&go, x.as_tensor(), name),
            1e-5,
            name,
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The trainer's eval loss (the fused path, after two steps) equals the mean NLL of the same
/// eval batches through `forward`'s logits and the unfused cross-entropy.
fn trainer_eval_loss_matches_the_logits_path(dev: &Device) -> Result<()> {
    let dir = scratch(&format!("lce-eval-{}", dev.is_cuda()));
    let data = memorise_data(&dir);
    let mut cfg = small_config(&dir, data.clone(), 2);
    cfg.eval_data = Some(data.clone());
    let mut tr = Trainer::from_config(cfg.clone(), dev)?;
    while tr.step()?.is_some() {}
    let fused = tr.evaluate()?.expect("eval data");
    let exs = tokenize_file(&data, tr.encoder(), &cfg.data_config())?.examples;
    let pad = tr.encoder().eos_token_id().unwrap_or(0);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in exs.chunks(cfg.batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let b = make_batch(&refs, pad);
        let ids = Tensor::from_vec(b.input_ids.clone(), (b.batch, b.seq), dev)?;
        let t = Tensor::from_vec(b.targets.clone(), b.batch * b.seq, dev)?;
        let logits = tr.model().forward(&ids)?.reshape((b.batch * b.seq, 256))?;
        let nll = cross_entropy_per_token(&logits, &t, IGNORE_INDEX)?.sum_all()?;
        sum += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += b.n_targets;
    }
    let unfused = sum / count as f64;
    assert!(
        (fused - unfused).abs() <= 1e-5 * unfused.abs(),
        "eval loss {fused} vs the logits path's {unfused}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

device_test!(
    fused_loss_matches_the_logits_path_on_the_tiny_model,
    trainer_eval_loss_matches_the_logits_path,
);

/// The f64 CPU op against the f64 reference of the composed path, on an input where the
/// logits are large (a stable log-sum-exp matters): no overflow, the exact loss.
#[test]
fn stable_for_large_logits() -> Result<()> {
    let dev = Device::Cpu;
    let h = Tensor::new(&[[300f64, -200.], [1e3, 1e3]], &dev)?;
    let w = Tensor::new(&[[1f64, 0.], [0., 1.], [1., 1.]], &dev)?;
    let t = Tensor::new(&[1u32, 0], &dev)?;
    let l = linear_cross_entropy_chunked(&h, &w, &t, IGNORE_INDEX, 1)?.to_scalar::<f64>()?;
    let (r, _, _) = reference(
        &to_f64_vec(&f64_cpu(&h)?)?,
        &to_f64_vec(&w)?,
        &[1, 0],
        (2, 2, 3),
        1.0,
    );
    assert!(l.is_finite() && (l - r).abs() < 1e-9 * r, "{l} vs {r}");
    let l32 = linear_cross_entropy(
        &h.to_dtype(DType::F32)?,
        &w.to_dtype(DType::F32)?,
        &t,
        IGNORE_INDEX,
    )?
    .to_scalar::<f32>()? as f64;
    assert!((l32 - r).abs() < 1e-5 * r, "f32 {l32} vs {r}");
    Ok(())
}

/// GPU measurement, not run by default: the fused loss against the logits path at the
/// Llama-3.1-8B head (4096 tokens x 4096 hidden x 128,256 vocab, bf16, frozen head), forward +
/// backward, median of 5 after a warm-up (the logits' memory of each is printed from the chunk
/// rule). Asserts that both give the same loss and d(hidden) (bf16 tolerance). Run with
/// `cargo test --release -p flare --features cuda --test it lce_gpu_timing -- --ignored
/// --nocapture`.
#[test]
#[ignore = "GPU timing; run explicitly"]
fn lce_gpu_timing() -> Result<()> {
    let Some(dev) = crate::common::cuda_device() else {
        return Ok(());
    };
    let (n, hd, vocab) = (4096, 4096, 128_256);
    let h = randn_scaled(&[n, hd], 0.0, 1.0, DType::BF16, &dev, 1)?;
    let w = randn_scaled(&[vocab, hd], 0.0, 0.02, DType::BF16, &dev, 2)?;
    let tv = targets(n, vocab, 3);
    let t = Tensor::new(tv.as_slice(), &dev)?;
    let hv = Var::from_tensor(&h)?;
    let run = |fused: bool| -> Result<(f64, Tensor, f64)> {
        let mut times = Vec::new();
        let mut out = None;
        for _ in 0..6 {
            dev.synchronize()?;
            let t0 = std::time::Instant::now();
            let loss = if fused {
                linear_cross_entropy(hv.as_tensor(), &w, &t, IGNORE_INDEX)?
            } else {
                let logits = flare::ops::matmul(hv.as_tensor(), &w.t()?)?;
                cross_entropy_per_token(&logits, &t, IGNORE_INDEX)?.sum_all()?
            };
            let g = loss.backward()?;
            dev.synchronize()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            out = Some((
                loss.to_scalar::<f32>()? as f64,
                grad_of(&g, hv.as_tensor(), "dh"),
            ));
        }
        let mut t = times[1..].to_vec();
        t.sort_by(f64::total_cmp);
        let (l, dh) = out.expect("ran");
        Ok((l, dh, t[t.len() / 2]))
    };
    let (lf, dhf, tf) = run(true)?;
    let (lu, dhu, tu) = run(false)?;
    println!(
        "linear_cross_entropy {n}x{hd}x{vocab} bf16 fwd+bwd: fused {tf:.2} ms, logits path \
         {tu:.2} ms ({:.2}x); chunk {} rows = {} MiB of logits, against {} MiB of logits + \
         their gradient unfused",
        tu / tf,
        chunk_rows(n, vocab, DType::BF16),
        (chunk_rows(n, vocab, DType::BF16) * vocab * 2) >> 20,
        (2 * n * vocab * 2) >> 20
    );
    assert!((lf - lu).abs() <= 1e-2 * lu.abs(), "loss {lf} vs {lu}");
    assert_close(&dhf, &dhu, 2e-2, "d(hidden) fused vs logits path")?;
    Ok(())
}
