//! Flash attention in the model and sequence packing: the flash-attention forward against the
//! masked-softmax path it replaced (logits and LoRA gradients, f64), a packed batch against
//! its documents run alone (per-document losses and summed LoRA gradients, f64), the flash
//! prefill against the reference (and the decode step after it), and the errors for bad
//! document offsets.

use candle_core::{DType, Device, Tensor, Var};
use flare::lora::LoraConfig;
use flare::models::{ModelConfig, Transformer};
use flare::ops::cross_entropy::IGNORE_INDEX;
use flare::ops::cross_entropy_per_token;

use crate::common::{randn, rel_err, seed, shared_lock, Result};

/// A tiny random model, f64 on the CPU, with an f64 LoRA adapter (random A and B, so every
/// factor has a gradient) on all seven projections; returns it and the adapters' variables.
/// Mistral: GQA (4 query heads over 2 kv heads) and a sliding window of 3 keys, shorter than
/// the sequences; Qwen2: q/k/v biases and no window.
fn model(arch: &str) -> Result<(Transformer, Vec<Var>)> {
    let json = match arch {
        "mistral" => {
            r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 61,
            "max_position_embeddings": 64, "sliding_window": 3, "tie_word_embeddings": false}"#
        }
        _ => {
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 24,
            "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 6,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 53,
            "max_position_embeddings": 64, "tie_word_embeddings": true}"#
        }
    };
    let cfg = ModelConfig::from_json_str(json, "config.json")?;
    let mut m = Transformer::random(cfg, DType::F64, &Device::Cpu, seed(arch))?;
    let lora = LoraConfig {
        r: 3,
        alpha: 6.0,
        target_modules: vec!["q_proj".into()],
        ..Default::default()
    };
    let mut vars = Vec::new();
    for (i, (path, lin)) in m.lora_modules_mut().into_iter().enumerate() {
        let (out, inp) = lin.weight().dims2()?;
        let a = (randn(&[3, inp], DType::F64, &Device::Cpu, seed(&path))? * 0.3)?;
        let b = (randn(&[out, 3], DType::F64, &Device::Cpu, 1000 + i as u64)? * 0.3)?;
        lin.add_adapter_with_weights("t", &lora, &a, &b)?;
        lin.set_active(Some("t"))?;
        vars.extend(lin.trainable_vars());
    }
    Ok((m, vars))
}

/// `n` token ids below `vocab`, varied by `salt`.
fn ids(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 11 + 5) % vocab) as u32)
        .collect()
}

/// The gradients of `vars` as f64 vectors (zeros where a variable got none).
fn grads(loss: &Tensor, vars: &[Var]) -> Result<Vec<Vec<f64>>> {
    let g = loss.backward()?;
    vars.iter()
        .map(|v| {
            let t = match g.get(v.as_tensor()) {
                Some(t) => t.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok(t.flatten_all()?.to_vec1::<f64>()?)
        })
        .collect()
}

fn max_rel(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            num = num.max((p - q).abs());
            den = den.max(q.abs());
        }
    }
    num / den.max(1e-300)
}

/// The flash-attention forward equals the masked-softmax reference: logits and the gradients
/// of every LoRA factor of a weighted sum of the logits.
fn flash_matches_reference(arch: &str) -> Result<()> {
    let _guard = shared_lock();
    let (m, vars) = model(arch)?;
    let vocab = m.config().vocab_size;
    let (b, s) = (2, 9);
    let x = Tensor::from_vec(ids(b * s, vocab, 1), (b, s), &Device::Cpu)?;
    let w = randn(&[b, s, vocab], DType::F64, &Device::Cpu, seed("weights"))?;
    let flash = m.forward(&x)?;
    let reference = m.forward_reference(&x)?;
    let err = rel_err(&flash, &reference)?;
    assert!(err < 1e-10, "{arch}: logits rel err {err:e}");
    let gf = grads(&(&flash * &w)?.sum_all()?, &vars)?;
    let gr = grads(&(&reference * &w)?.sum_all()?, &vars)?;
    assert!(gr.iter().flatten().any(|&v| v != 0.0));
    let err = max_rel(&gf, &gr);
    assert!(err < 1e-10, "{arch}: LoRA grads rel err {err:e}");
    // One token (the fused decode op on the reference side).
    let one = Tensor::new(&[[7u32]], &Device::Cpu)?;
    let err = rel_err(&m.forward(&one)?, &m.forward_reference(&one)?)?;
    assert!(err < 1e-12, "{arch}: one token: rel err {err:e}");
    Ok(())
}

#[test]
fn flash_forward_matches_the_masked_softmax_path_mistral() -> Result<()> {
    flash_matches_reference("mistral")
}

#[test]
fn flash_forward_matches_the_masked_softmax_path_qwen2() -> Result<()> {
    flash_matches_reference("qwen2")
}

/// Documents packed in one row give each document's loss as if run alone, and the LoRA
/// gradients of their summed loss.
fn packed_matches_alone(arch: &str) -> Result<()> {
    let _guard = shared_lock();
    let (m, vars) = model(arch)?;
    let vocab = m.config().vocab_size;
    // Odd lengths, a one-token document, documents longer than the window.
    let lens = [5usize, 1, 7, 3, 6];
    let docs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, vocab, i + 2))
        .collect();
    // Targets: the next token of the same document; a document's last token predicts nothing.
    let targets = |d: &[u32]| -> Vec<u32> {
        (0..d.len())
            .map(|i| d.get(i + 1).copied().unwrap_or(IGNORE_INDEX))
            .collect()
    };
    let mut cu = vec![0u32];
    let (mut all_ids, mut all_t): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    for d in &docs {
        all_ids.extend(d);
        all_t.extend(targets(d));
        cu.push(all_ids.len() as u32);
    }
    let total = all_ids.len();
    let dev = Device::Cpu;
    let packed_ids = Tensor::new(all_ids.as_slice(), &dev)?;
    let logits = m.forward_packed(&packed_ids, &cu)?;
    assert_eq!(logits.dims(), &[total, vocab]);
    // `[1, total]` ids are the same call.
    let again = m.forward_packed(&packed_ids.unsqueeze(0)?, &cu)?;
    assert_eq!(rel_err(&again, &logits)?, 0.0);
    let per_tok =
        cross_entropy_per_token(&logits, &Tensor::new(all_t.as_slice(), &dev)?, IGNORE_INDEX)?;
    let packed_loss = per_tok.sum_all()?;
    let mut alone_total: Option<Tensor> = None;
    for (i, d) in docs.iter().enumerate() {
        let (lo, n) = (cu[i] as usize, d.len());
        let x = Tensor::new(d.as_slice(), &dev)?.unsqueeze(0)?;
        let l = m.forward(&x)?.squeeze(0)?;
        // The logits themselves agree, row for row.
        let err = rel_err(&logits.narrow(0, lo, n)?, &l)?;
        assert!(err < 1e-10, "{arch}: document {i} logits rel err {err:e}");
        let t = Tensor::new(targets(d).as_slice(), &dev)?;
        let alone = cross_entropy_per_token(&l, &t, IGNORE_INDEX)?.sum_all()?;
        let packed = per_tok.narrow(0, lo, n)?.sum_all()?;
        let (a, p) = (alone.to_scalar::<f64>()?, packed.to_scalar::<f64>()?);
        assert!(
            (a - p).abs() <= 1e-10 * a.abs().max(1e-300),
            "{arch}: document {i}: alone {a}, packed {p}"
        );
        alone_total = Some(match alone_total {
            Some(s) => (s + alone)?,
            None => alone,
        });
    }
    let alone_total = alone_total.unwrap();
    let gp = grads(&packed_loss, &vars)?;
    let ga = grads(&alone_total, &vars)?;
    assert!(ga.iter().flatten().any(|&v| v != 0.0));
    let err = max_rel(&gp, &ga);
    assert!(err < 1e-10, "{arch}: LoRA grads rel err {err:e}");
    // The final hidden states times the head are the logits.
    let h = m.forward_hidden_packed(&packed_ids, &cu)?;
    assert_eq!(h.dims(), &[total, m.config().hidden_size]);
    let via = h.matmul(&m.lm_head_weight().t()?)?;
    assert!(rel_err(&via, &logits)? < 1e-12);
    Ok(())
}

#[test]
fn packed_documents_match_each_run_alone_mistral() -> Result<()> {
    packed_matches_alone("mistral")
}

#[test]
fn packed_documents_match_each_run_alone_qwen2() -> Result<()> {
    packed_matches_alone("qwen2")
}

/// The flash prefill into an empty cache gives the reference logits and fills the cache that
/// the decode step after it reads.
#[test]
fn flash_prefill_then_decode_matches_the_reference() -> Result<()> {
    let _guard = shared_lock();
    let (m, _) = model("mistral")?;
    let vocab = m.config().vocab_size;
    let (b, s) = (2, 6);
    let all = ids(b * (s + 1), vocab, 9);
    let full = Tensor::from_vec(all.clone(), (b, s + 1), &Device::Cpu)?;
    let prompt = full.narrow(1, 0, s)?.contiguous()?;
    let mut cache = m.new_cache(b, 16)?;
    let pre = m.prefill(&prompt, &mut cache)?;
    let want = m.forward_reference(&full)?;
    assert!(rel_err(&pre, &want.narrow(1, 0, s)?)? < 1e-10);
    let next = full.narrow(1, s, 1)?.contiguous()?;
    let step = m.decode_step(&next, &mut cache)?;
    let err = rel_err(&step, &want.narrow(1, s, 1)?)?;
    assert!(
        err < 1e-10,
        "decode after the flash prefill: rel err {err:e}"
    );
    // The hidden states of the padded forward, times the head, are its logits.
    let h = m.forward_hidden(&full)?;
    let via = h.broadcast_matmul(&m.lm_head_weight().t()?)?;
    assert!(rel_err(&via, &m.forward(&full)?)? < 1e-12);
    Ok(())
}

#[test]
fn bad_document_offsets_are_refused_by_name() -> Result<()> {
    let _guard = shared_lock();
    let (m, _) = model("qwen2")?;
    let x = Tensor::new(&[1u32, 2, 3, 4, 5], &Device::Cpu)?;
    for (cu, needle) in [
        (vec![1u32, 3, 5], "must start at 0"),
        (vec![0, 4, 3, 5], "decreases at entry 2"),
        (
            vec![0, 3, 4],
            "must end at the number of tokens, 5, ends at 4",
        ),
        (
            vec![0, 3, 6],
            "must end at the number of tokens, 5, ends at 6",
        ),
        (vec![0], "needs documents + 1 >= 2 entries"),
        (vec![], "needs documents + 1 >= 2 entries"),
    ] {
        let e = m.forward_packed(&x, &cu).unwrap_err().to_string();
        assert!(
            e.contains("cu_seqlens") && e.contains(needle),
            "{cu:?}: {e}"
        );
    }
    let e = m
        .forward_packed(&x.reshape((1, 5))?.repeat((2, 1))?, &[0, 5])
        .unwrap_err()
        .to_string();
    assert!(e.contains("[total] or [1, total]"), "{e}");
    // An empty document is allowed (nothing to compute for it).
    assert_eq!(m.forward_packed(&x, &[0, 2, 2, 5])?.dims(), &[5, 53]);
    Ok(())
}
