//! The batch-1 decode engine (`flare::generate::DecodeGraph`) against the per-op path
//! (`Transformer::decode_step`) on small random models of odd sizes (no fixture files): greedy
//! tokens, logits, the KV cache after the steps, graph replay against direct launches, and the
//! refusals. CUDA only: each test prints `skipped: no CUDA device` without one, except the
//! refusal on the CPU, which runs everywhere.

use candle_core::{DType, Device, Tensor};
use flare::generate::DecodeGraph;
use flare::generate::{greedy_on_device, ids_to_host};
use flare::lora::LoraConfig;
use flare::models::{KvCache, ModelConfig, Transformer};

use crate::common::{cuda_device, exclusive_lock, shared_lock, Result};

/// A small model of odd sizes: hidden 96, 3 heads of 32 over 1 kv head, intermediate 200,
/// vocabulary 517, 2 layers. `arch` Qwen2 (q/k/v bias, tied embeddings) or Llama (`bias`: q/k/v,
/// o and MLP biases; untied).
fn config(qwen2: bool, bias: bool, max_pos: usize) -> Result<ModelConfig> {
    let json = format!(
        r#"{{"architectures": ["{}"], "hidden_size": 96, "intermediate_size": 200,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
        "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 517,
        "max_position_embeddings": {max_pos}, "tie_word_embeddings": {},
        "attention_bias": {bias}, "mlp_bias": {bias}}}"#,
        if qwen2 {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        },
        qwen2
    );
    ModelConfig::from_json_str(&json, "config.json")
}

/// The configurations every comparison runs on: (label, qwen2, bias).
const CONFIGS: [(&str, bool, bool); 3] = [
    ("qwen2 qkv-bias tied", true, false),
    ("llama no-bias untied", false, false),
    ("llama all-bias untied", false, true),
];

const PROMPT: [u32; 7] = [3, 141, 59, 265, 358, 97, 516];
const STEPS: usize = 40;

/// A model, a prefilled cache of `max_len` positions and the greedy first token.
fn prefilled(model: &Transformer, max_len: usize) -> Result<(KvCache, u32)> {
    let mut cache = model.new_cache(1, max_len)?;
    let ids = Tensor::new(&PROMPT[..], model.device())?.unsqueeze(0)?;
    let logits = model.prefill(&ids, &mut cache)?;
    let first = ids_to_host(&greedy_on_device(&logits)?)?[0];
    Ok((cache, first))
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// The tolerance on logits and cache entries, relative to the largest magnitude.
fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-4
    } else {
        3e-2
    }
}

/// max |a - b| / max |b|.
fn rel_max(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Positions `0..len` of every layer's keys and values, on the host.
fn cache_rows(cache: &KvCache) -> Result<Vec<Vec<f32>>> {
    let len = cache.len();
    let mut out = Vec::new();
    for l in cache.layers() {
        for t in [&l.k, &l.v] {
            out.push(host(&t.narrow(2, 0, len)?)?);
        }
    }
    Ok(out)
}

/// For each config and dtype: the engine's tokens equal the per-op path's, its logits at every
/// step match the per-op path's (fed the same tokens) within the dtype's tolerance, and the
/// caches agree afterwards.
#[test]
fn graph_matches_per_op_path() -> Result<()> {
    let _g = shared_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    for (label, qwen2, bias) in CONFIGS {
        for dtype in [DType::F32, DType::BF16] {
            let model = Transformer::random(config(qwen2, bias, 512)?, dtype, &dev, 7)?;
            let max_len = PROMPT.len() + STEPS;
            let tol = tolerance(dtype);

            // The engine: tokens and logits of every step.
            let (mut cache_e, first) = prefilled(&model, max_len)?;
            let mut engine = DecodeGraph::new(&model, &cache_e)?;
            assert!(engine.uses_graph(), "graph replay is the default");
            engine.start(first, &cache_e)?;
            let mut toks_e = Vec::with_capacity(STEPS);
            let mut logits_e = Vec::with_capacity(STEPS);
            for _ in 0..STEPS {
                toks_e.push(engine.step(&mut cache_e)?);
                logits_e.push(host(&engine.step_logits()?)?);
            }
            assert_eq!(cache_e.len(), max_len);
            assert_eq!(engine.position(), max_len);

            // The per-op path fed the engine's tokens: each engine token must be its argmax
            // (or, in bf16, a tie within rounding), its logits within tolerance.
            let (mut cache_r, first_r) = prefilled(&model, max_len)?;
            assert_eq!(first, first_r);
            let mut fed = first;
            let mut near_ties = 0;
            for (s, (&te, le)) in toks_e.iter().zip(&logits_e).enumerate() {
                let ids = Tensor::new(&[[fed]], &dev)?;
                let lr = host(&model.decode_step(&ids, &mut cache_r)?)?;
                let err = rel_max(le, &lr);
                assert!(
                    err <= tol,
                    "{label} {dtype:?} step {s}: logits differ by {err} (> {tol})"
                );
                let tr = argmax(&lr);
                if tr != te {
                    let max = lr[tr as usize];
                    let gap = (max - lr[te as usize]) / max.abs().max(1e-30);
                    assert!(
                        dtype != DType::F32 && gap <= tol,
                        "{label} {dtype:?} step {s}: engine token {te}, per-op argmax {tr} (gap {gap})"
                    );
                    near_ties += 1;
                }
                fed = te;
            }
            for (i, (a, b)) in cache_rows(&cache_e)?
                .iter()
                .zip(&cache_rows(&cache_r)?)
                .enumerate()
            {
                let err = rel_max(a, b);
                assert!(
                    err <= tol,
                    "{label} {dtype:?}: cache tensor {i} differs by {err}"
                );
            }

            // Free-running greedy decoding of the per-op path gives the engine's tokens (unless a
            // bf16 near-tie above let them part legitimately).
            if near_ties == 0 {
                let (mut cache_f, _) = prefilled(&model, max_len)?;
                let mut t = first;
                let mut toks_r = Vec::with_capacity(STEPS);
                for _ in 0..STEPS {
                    let ids = Tensor::new(&[[t]], &dev)?;
                    let logits = model.decode_step(&ids, &mut cache_f)?;
                    t = ids_to_host(&greedy_on_device(&logits)?)?[0];
                    toks_r.push(t);
                }
                assert_eq!(toks_e, toks_r, "{label} {dtype:?}: greedy tokens");
            }
            println!("{label} {dtype:?}: ok ({near_ties} near-ties)");
        }
    }
    Ok(())
}

/// A model with adapters on all seven projections, merged for good (`merge_and_unload`), runs
/// on the engine (it refuses the model while the adapters are active), and its logits at every
/// step match the per-op path with the adapters active, fed the same tokens: within f32's
/// tolerance in f32, and within the merged weights' rounding in bf16.
#[test]
fn graph_runs_a_merged_adapter() -> Result<()> {
    let _g = shared_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let mut adapted = Transformer::random(config(false, true, 512)?, dtype, &dev, 13)?;
        let lora = LoraConfig {
            r: 8,
            alpha: 16.0,
            ..Default::default()
        };
        for (i, (_, l)) in adapted.lora_modules_mut().into_iter().enumerate() {
            l.add_adapter("default", &lora, i as u64)?;
            let a = l.adapter("default").unwrap().a().clone();
            let b = l.adapter("default").unwrap().b().randn_like(0.0, 0.05)?;
            l.set_adapter_weights("default", &a, &b)?;
            l.set_active(Some("default"))?;
        }
        let max_len = PROMPT.len() + STEPS;
        let (cache_a, _) = prefilled(&adapted, max_len)?;
        assert!(
            DecodeGraph::unsupported(&adapted, &cache_a).is_some(),
            "the engine took active adapters"
        );
        let mut merged = adapted.clone();
        merged.merge_and_unload()?;
        let (mut cache_e, first) = prefilled(&merged, max_len)?;
        let mut engine = DecodeGraph::new(&merged, &cache_e)?;
        engine.start(first, &cache_e)?;
        let (mut cache_r, _) = prefilled(&adapted, max_len)?;
        let tol = tolerance(dtype);
        let mut fed = first;
        for s in 0..STEPS {
            let te = engine.step(&mut cache_e)?;
            let le = host(&engine.step_logits()?)?;
            let lr = host(&adapted.decode_step(&Tensor::new(&[[fed]], &dev)?, &mut cache_r)?)?;
            let err = rel_max(&le, &lr);
            assert!(
                err <= tol,
                "{dtype:?} step {s}: logits differ by {err} (> {tol})"
            );
            fed = te;
        }
        println!("{dtype:?}: ok");
    }
    Ok(())
}

/// Graph replay and direct launches of the same kernels agree bitwise: tokens, logits, cache.
#[test]
fn graph_and_direct_launches_agree_bitwise() -> Result<()> {
    let _g = shared_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::BF16] {
        let model = Transformer::random(config(true, false, 512)?, dtype, &dev, 11)?;
        let max_len = PROMPT.len() + 24;
        let mut runs = Vec::new();
        for graph in [true, false] {
            let (mut cache, first) = prefilled(&model, max_len)?;
            let mut engine = DecodeGraph::with_graph(&model, &cache, graph)?;
            assert_eq!(engine.uses_graph(), graph);
            engine.start(first, &cache)?;
            let mut toks = Vec::new();
            let mut logits = Vec::new();
            for _ in 0..24 {
                toks.push(engine.step(&mut cache)?);
                logits.push(host(&engine.step_logits()?)?);
            }
            runs.push((toks, logits, cache_rows(&cache)?));
        }
        let (a, b) = (&runs[0], &runs[1]);
        assert_eq!(a.0, b.0, "{dtype:?}: tokens");
        assert!(a.1 == b.1, "{dtype:?}: logits differ");
        assert!(a.2 == b.2, "{dtype:?}: caches differ");
    }
    Ok(())
}

/// The engine can be restarted after per-op steps on the same cache, and keeps in step with it.
#[test]
fn graph_restart_after_per_op_steps() -> Result<()> {
    let _g = shared_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let model = Transformer::random(config(true, false, 512)?, DType::F32, &dev, 5)?;
    let (mut cache, first) = prefilled(&model, PROMPT.len() + 12)?;
    let mut engine = DecodeGraph::new(&model, &cache)?;
    engine.start(first, &cache)?;
    let a = engine.step(&mut cache)?;
    // Two per-op steps advance the cache behind the engine's back: it must refuse, then resume.
    let mut t = a;
    for _ in 0..2 {
        let logits = model.decode_step(&Tensor::new(&[[t]], &dev)?, &mut cache)?;
        t = ids_to_host(&greedy_on_device(&logits)?)?[0];
    }
    let err = engine.step(&mut cache).unwrap_err().to_string();
    assert!(err.contains("call start again"), "{err}");
    engine.start(t, &cache)?;
    let b = engine.step(&mut cache)?;
    let logits = model.decode_step(&Tensor::new(&[[t]], &dev)?, &mut {
        let (mut c2, f2) = prefilled(&model, PROMPT.len() + 12)?;
        let mut u = f2;
        for _ in 0..3 {
            let l = model.decode_step(&Tensor::new(&[[u]], &dev)?, &mut c2)?;
            u = ids_to_host(&greedy_on_device(&l)?)?[0];
        }
        assert_eq!(u, t);
        c2
    })?;
    assert_eq!(b, ids_to_host(&greedy_on_device(&logits)?)?[0]);
    Ok(())
}

/// Refusals: a full cache, a position past the RoPE table, batch 2, a padded cache, an active
/// adapter, another cache, a step before start.
#[test]
fn graph_refusals() -> Result<()> {
    let _g = shared_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let model = Transformer::random(config(true, false, 512)?, DType::BF16, &dev, 3)?;

    // Overflow: room for 3 steps after the prompt.
    let (mut cache, first) = prefilled(&model, PROMPT.len() + 3)?;
    let mut engine = DecodeGraph::new(&model, &cache)?;
    let err = engine.step(&mut cache).unwrap_err().to_string();
    assert!(err.contains("before start"), "{err}");
    engine.start(first, &cache)?;
    for _ in 0..3 {
        engine.step(&mut cache)?;
    }
    let err = engine.step(&mut cache).unwrap_err().to_string();
    assert!(err.contains("cache full"), "{err}");
    assert_eq!(cache.len(), PROMPT.len() + 3);

    // Another cache.
    let (other, _) = prefilled(&model, PROMPT.len() + 3)?;
    let err = engine.start(first, &other).unwrap_err().to_string();
    assert!(err.contains("not the one"), "{err}");

    // A cache longer than the RoPE table.
    let short = Transformer::random(config(true, false, 16)?, DType::BF16, &dev, 3)?;
    let (c, _) = prefilled(&short, 20)?;
    let err = DecodeGraph::new(&short, &c).unwrap_err().to_string();
    assert!(err.contains("RoPE table"), "{err}");

    // Batch 2, and a padded batch.
    let c = model.new_cache(2, 16)?;
    let err = DecodeGraph::new(&model, &c).unwrap_err().to_string();
    assert!(err.contains("batch 2"), "{err}");

    // An active adapter.
    let mut adapted = model.clone();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: vec!["q_proj".into()],
        ..Default::default()
    };
    if let Some(l) = adapted.lora_module_mut("model.layers.0.self_attn.q_proj") {
        l.add_adapter("default", &cfg, 0)?;
        l.set_active(Some("default"))?;
    }
    let (c, _) = prefilled(&adapted, 16)?;
    let err = DecodeGraph::new(&adapted, &c).unwrap_err().to_string();
    assert!(err.contains("adapter"), "{err}");
    Ok(())
}

/// Generation (`TokenStream`, hence `generate`) takes the engine for plain greedy decoding on
/// CUDA and gives the per-op path's tokens (`FLARE_DECODE_ENGINE=0`, here through
/// `Settings::apply`).
#[test]
fn graph_in_generate() -> Result<()> {
    let _g = exclusive_lock();
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let model = Transformer::random(config(true, false, 512)?, DType::F32, &dev, 9)?;
    let gen = flare::generate::GenerationConfig {
        max_new_tokens: 30,
        ..Default::default()
    };
    let stream = flare::generate::TokenStream::new(&model, &PROMPT, &gen)?;
    assert!(stream.uses_decode_engine());
    let with: Vec<u32> = stream.collect::<Result<_>>()?;
    let off = flare::runtime::Settings {
        decode_engine: false,
        ..flare::runtime::settings()
    };
    let guard = off.apply();
    let stream = flare::generate::TokenStream::new(&model, &PROMPT, &gen)?;
    drop(guard);
    assert!(!stream.uses_decode_engine());
    let without: Vec<u32> = stream.collect::<Result<_>>()?;
    assert_eq!(with, without);
    Ok(())
}

/// On the CPU the engine does not apply, with a reason; building it is an error.
#[test]
fn graph_refused_on_cpu() -> Result<()> {
    let _g = shared_lock();
    let model = Transformer::random(config(true, false, 64)?, DType::F32, &Device::Cpu, 1)?;
    let cache = model.new_cache(1, 16)?;
    let why = DecodeGraph::unsupported(&model, &cache).expect("no engine on the CPU");
    assert!(why.contains("cuda") || why.contains("CUDA"), "{why}");
    assert!(DecodeGraph::new(&model, &cache).is_err());
    Ok(())
}
