//! Generation with the KV cache: HF's greedy continuations of the fixture models
//! (`bench/make_generation_fixtures.py`) reproduced exactly, cached logits equal to the
//! uncached forward at every decode step, and the cache's errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flare::generate::{generate, GenerationConfig, SamplingParams};
use flare::models::Transformer;

use crate::common::{device_test, rel_err, shared_lock, Result};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(arch)
}

/// `(prompt, new_tokens)` of a fixture's `generation.json`.
fn golden(arch: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixture(arch).join("generation.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    Ok((ids("prompt"), ids("new_tokens")))
}

fn check(arch: &str) -> Result<()> {
    let _g = shared_lock();
    check_on(arch, &Device::Cpu)
}

/// The greedy golden continuation and the cached-vs-uncached logits of `arch` on `dev`.
fn check_on(arch: &str, dev: &Device) -> Result<()> {
    let dev = dev.clone();
    let model = Transformer::from_dir(fixture(arch), DType::F32, &dev)?;
    let (prompt, want) = golden(arch)?;
    assert_eq!(want.len(), 32);

    // Greedy generation with the cache reproduces transformers.
    let cfg = GenerationConfig {
        max_new_tokens: want.len(),
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
        seed: 0,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let got = generate(&model, &prompt, &cfg, |t| streamed.push(t))?;
    assert_eq!(got, want, "{arch}: greedy continuation");
    assert_eq!(streamed, want);

    // Cached logits at every step equal the uncached forward of the full sequence.
    let full: Vec<u32> = prompt.iter().chain(&want).copied().collect();
    let full_ids = Tensor::new(full.as_slice(), &dev)?.unsqueeze(0)?;
    let reference = model.forward(&full_ids)?;
    let mut cache = model.new_cache(1, full.len())?;
    let p = prompt.len();
    let pre = model.prefill(&full_ids.narrow(1, 0, p)?, &mut cache)?;
    let e = rel_err(&pre, &reference.narrow(1, 0, p)?)?;
    assert!(e <= 1e-4, "{arch}: prefill rel err {e}");
    for pos in p..full.len() {
        let step = model.decode_step(&full_ids.narrow(1, pos, 1)?, &mut cache)?;
        let e = rel_err(&step, &reference.narrow(1, pos, 1)?)?;
        assert!(e <= 1e-4, "{arch}: decode step at {pos} rel err {e}");
    }
    assert_eq!(cache.len(), full.len());
    // Full: one more position is an error, and the cache is left as it was.
    let err = model
        .decode_step(&full_ids.narrow(1, 0, 1)?, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache full"), "{err}");
    assert_eq!(cache.len(), full.len());
    Ok(())
}

#[test]
fn qwen2_greedy_matches_transformers() -> Result<()> {
    check("qwen2")
}

#[test]
fn llama_greedy_matches_transformers() -> Result<()> {
    check("llama")
}

#[test]
fn mistral_greedy_matches_transformers() -> Result<()> {
    check("mistral")
}

#[test]
fn chunked_prefill_and_errors() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    let model = Transformer::from_dir(fixture("mistral"), DType::F32, &dev)?;
    let ids = Tensor::new(&[[3u32, 17, 99, 4, 250, 8, 61, 7, 0]], &dev)?;
    let reference = model.forward(&ids)?;
    // Two chunks of several tokens each (the second crosses the sliding window).
    let mut cache = model.new_cache(1, 16)?;
    let a = model.forward_with_cache(&ids.narrow(1, 0, 4)?, &mut cache, 0)?;
    let b = model.forward_with_cache(&ids.narrow(1, 4, 5)?, &mut cache, 4)?;
    let got = Tensor::cat(&[&a, &b], 1)?;
    let e = rel_err(&got, &reference)?;
    assert!(e <= 1e-4, "chunked rel err {e}");

    // Wrong offset, wrong batch, non-empty prefill, multi-token decode_step: errors.
    let one = ids.narrow(1, 0, 1)?;
    assert!(model.forward_with_cache(&one, &mut cache, 3).is_err());
    let two = Tensor::cat(&[&one, &one], 0)?;
    assert!(model.forward_with_cache(&two, &mut cache, 9).is_err());
    assert!(model.prefill(&one, &mut cache).is_err());
    assert!(model
        .decode_step(&ids.narrow(1, 0, 2)?, &mut cache)
        .is_err());
    assert_eq!(cache.len(), 9);
    cache.reset();
    assert!(cache.is_empty());
    assert!(model.new_cache(0, 4).is_err());

    // Generation errors: empty prompt, out-of-vocabulary id, bad params.
    let cfg = GenerationConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    assert!(generate(&model, &[], &cfg, |_| {}).is_err());
    assert!(generate(&model, &[1000], &cfg, |_| {}).is_err());
    let bad = GenerationConfig {
        sampling: SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        ..cfg.clone()
    };
    assert!(generate(&model, &[1], &bad, |_| {}).is_err());
    Ok(())
}

#[test]
fn eos_stops_and_sampling_is_seeded() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    let model = Transformer::from_dir(fixture("qwen2"), DType::F32, &dev)?;
    let (prompt, want) = golden("qwen2")?;
    // Stop at the 5th greedy token.
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        eos_token_ids: vec![want[4]],
        ..Default::default()
    };
    let got = generate(&model, &prompt, &cfg, |_| {})?;
    let first = want.iter().position(|t| *t == want[4]).unwrap();
    assert_eq!(got, want[..=first]);

    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingParams {
            do_sample: true,
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.2,
        },
        eos_token_ids: vec![],
        seed: 42,
        ..Default::default()
    };
    let a = generate(&model, &prompt, &cfg, |_| {})?;
    assert_eq!(a.len(), 12);
    assert_eq!(a, generate(&model, &prompt, &cfg, |_| {})?);
    Ok(())
}

#[test]
fn batched_greedy_matches_single() -> Result<()> {
    let _g = shared_lock();
    let dev = Device::Cpu;
    for arch in ["qwen2", "mistral"] {
        let model = Transformer::from_dir(fixture(arch), DType::F32, &dev)?;
        let (prompt, want) = golden(arch)?;
        let other: Vec<u32> = prompt.iter().map(|t| (t * 7 + 3) % 256).collect();
        let cfg = GenerationConfig {
            max_new_tokens: 16,
            ..Default::default()
        };
        let single_other = generate(&model, &other, &cfg, |_| {})?;
        let mut seen = 0;
        let got = flare::generate::generate_batch(
            &model,
            &[prompt.as_slice(), other.as_slice()],
            &cfg,
            |_, _| seen += 1,
        )?;
        assert_eq!(got[0], want[..16], "{arch} row 0");
        assert_eq!(got[1], single_other, "{arch} row 1");
        assert_eq!(seen, 32);

        // A row that hits EOS stops; the other goes on.
        let eos = GenerationConfig {
            eos_token_ids: vec![want[2]],
            ..cfg.clone()
        };
        let got = flare::generate::generate_batch(
            &model,
            &[prompt.as_slice(), other.as_slice()],
            &eos,
            |_, _| {},
        )?;
        let stop = want.iter().position(|t| *t == want[2]).unwrap();
        assert_eq!(got[0], want[..=stop]);
        let single = generate(&model, &other, &eos, |_| {})?;
        assert_eq!(got[1], single);

        assert!(flare::generate::generate_batch(&model, &[], &cfg, |_, _| {}).is_err());
        assert!(
            flare::generate::generate_batch(&model, &[&[1, 2], &[1]], &cfg, |_, _| {}).is_err()
        );
    }
    Ok(())
}

/// The greedy golden continuations on every device (on CUDA: flare's kernels, cuBLASLt and the
/// KV cache on the GPU, f32).
fn greedy_all_archs(dev: &Device) -> Result<()> {
    for arch in ["qwen2", "llama", "mistral"] {
        check_on(arch, dev)?;
    }
    Ok(())
}

device_test!(greedy_all_archs);
