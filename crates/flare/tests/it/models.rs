//! Transformer models from Hugging Face directories: golden logits from transformers for tiny
//! random Qwen2 (q/k/v bias, tied embeddings), Llama (llama3 RoPE scaling, untied) and Mistral
//! (sliding window shorter than the sequence) models
//! (`bench/make_model_fixtures.py`), sharded loading, adapter injection by module path, and
//! the errors for bad directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use flare::lora::LoraConfig;
use flare::models::{Architecture, ModelConfig, Transformer};

use crate::common::{device_test, rel_err, shared_lock, Result};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(arch)
}

/// `(input_ids, logits)` of a fixture.
fn reference(arch: &str) -> Result<(Tensor, Tensor)> {
    let mut t =
        candle_core::safetensors::load(fixture(arch).join("reference.safetensors"), &Device::Cpu)?;
    Ok((t.remove("input_ids").unwrap(), t.remove("logits").unwrap()))
}

/// A fresh copy of a fixture directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn copy_of(arch: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "flare-models-{arch}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture(arch).join(f), p.join(f)).unwrap();
        }
        TempDir(p)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Rewrites `config.json` through `edit`.
    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let path = self.file("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    /// Rewrites `model.safetensors` through `edit`.
    fn edit_weights(&self, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<()> {
        let path = self.file("model.safetensors");
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu)?;
        edit(&mut t);
        candle_core::safetensors::save(&t, &path)?;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error of loading `dir` in f32 on the CPU, as text.
fn load_err(dir: &Path) -> String {
    match Transformer::from_dir(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

fn golden(arch: &str) -> Result<()> {
    let _guard = shared_lock();
    let model = Transformer::from_dir(fixture(arch), DType::F32, &Device::Cpu)?;
    let (ids, want) = reference(arch)?;
    let got = model.forward(&ids)?;
    assert_eq!(got.dims(), &[2, 7, 256]);
    let err = rel_err(&got, &want)?;
    assert!(err <= 1e-4, "{arch}: logits rel err {err:e}");
    Ok(())
}

#[test]
fn qwen2_golden_logits() -> Result<()> {
    golden("qwen2")
}

#[test]
fn llama_golden_logits() -> Result<()> {
    golden("llama")?;
    // The fixture exercises the llama3 scaling: plain RoPE with the same theta misses.
    let _guard = shared_lock();
    let dir = TempDir::copy_of("llama");
    dir.edit_config(|c| {
        c["rope_parameters"]["rope_type"] = "default".into();
    });
    let model = Transformer::from_dir(&dir.0, DType::F32, &Device::Cpu)?;
    let (ids, want) = reference("llama")?;
    let err = rel_err(&model.forward(&ids)?, &want)?;
    assert!(err > 1e-3, "without the llama3 scaling: rel err {err:e}");
    Ok(())
}

#[test]
fn mistral_golden_logits() -> Result<()> {
    golden("mistral")?;
    // The fixture exercises the sliding window: full causal attention misses.
    let _guard = shared_lock();
    let dir = TempDir::copy_of("mistral");
    dir.edit_config(|c| {
        c.insert("sliding_window".into(), serde_json::Value::Null);
    });
    let model = Transformer::from_dir(&dir.0, DType::F32, &Device::Cpu)?;
    assert_eq!(model.config().sliding_window, None);
    let (ids, want) = reference("mistral")?;
    let err = rel_err(&model.forward(&ids)?, &want)?;
    assert!(err > 1e-3, "without the sliding window: rel err {err:e}");
    Ok(())
}

#[test]
fn fixture_configs() -> Result<()> {
    let q = ModelConfig::from_dir(fixture("qwen2"))?;
    assert_eq!(q.architecture, Architecture::Qwen2);
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings && q.rope_scaling.is_none());
    assert_eq!(
        (q.num_key_value_heads, q.head_dim, q.rope_theta),
        (2, 16, 10000.0)
    );
    let l = ModelConfig::from_dir(fixture("llama"))?;
    assert_eq!(l.architecture, Architecture::Llama);
    assert!(!l.qkv_bias && !l.tie_word_embeddings);
    let s = l.rope_scaling.expect("llama3 scaling");
    assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 16));
    assert_eq!(l.rope_theta, 500000.0);

    // The transformers 4.x layout (top-level rope_theta and rope_scaling) reads the same.
    let dir = TempDir::copy_of("llama");
    dir.edit_config(|c| {
        let mut p = c.remove("rope_parameters").unwrap();
        let p = p.as_object_mut().unwrap();
        c.insert("rope_theta".into(), p.remove("rope_theta").unwrap());
        c.insert("rope_scaling".into(), serde_json::Value::Object(p.clone()));
    });
    assert_eq!(ModelConfig::from_dir(&dir.0)?, l);
    Ok(())
}

#[test]
fn lower_precision_loads() -> Result<()> {
    let _guard = shared_lock();
    let (ids, want) = reference("llama")?;
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 1e-2)] {
        let model = Transformer::from_dir(fixture("llama"), dtype, &Device::Cpu)?;
        let got = model.forward(&ids)?;
        assert_eq!(got.dtype(), dtype);
        let err = rel_err(&got, &want)?;
        assert!(err <= tol, "{dtype:?}: logits rel err {err:e}");
    }
    Ok(())
}

#[test]
fn sharded_checkpoint_matches() -> Result<()> {
    let _guard = shared_lock();
    let dir = TempDir::copy_of("llama");
    let all = candle_core::safetensors::load(dir.file("model.safetensors"), &Device::Cpu)?;
    std::fs::remove_file(dir.file("model.safetensors")).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (name, t) in all {
        let shard = if name.contains("layers.1") || name.starts_with("lm_head") {
            b.insert(name.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(name.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        map.insert(name, shard.into());
    }
    candle_core::safetensors::save(&a, dir.file("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&b, dir.file("model-00002-of-00002.safetensors"))?;
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.file("model.safetensors.index.json"), index.to_string()).unwrap();

    let model = Transformer::from_dir(&dir.0, DType::F32, &Device::Cpu)?;
    let (ids, want) = reference("llama")?;
    let err = rel_err(&model.forward(&ids)?, &want)?;
    assert!(err <= 1e-4, "sharded: logits rel err {err:e}");

    // A shard that is gone: the error names it.
    std::fs::remove_file(dir.file("model-00002-of-00002.safetensors")).unwrap();
    assert_mentions(&load_err(&dir.0), &["model-00002-of-00002.safetensors"]);
    Ok(())
}

#[test]
fn adapters_injected_by_module_path() -> Result<()> {
    let _guard = shared_lock();
    let mut model = Transformer::from_dir(fixture("qwen2"), DType::F32, &Device::Cpu)?;
    let paths: Vec<String> = model.lora_modules().into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths.len(), 14);
    assert_eq!(paths[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(paths[13], "model.layers.1.mlp.down_proj");
    let (ids, base) = reference("qwen2")?;

    // A fresh adapter (B = 0) changes nothing; a non-zero B does.
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    for (i, (path, layer)) in model.lora_modules_mut().into_iter().enumerate() {
        if path.ends_with(".q_proj") || path.ends_with(".down_proj") {
            layer.add_adapter("default", &cfg, i as u64)?;
            layer.set_active(Some("default"))?;
        }
    }
    let err = rel_err(&model.forward(&ids)?, &base)?;
    assert!(err <= 1e-4, "zero adapter: rel err {err:e}");

    let layer = model
        .lora_module_mut("model.layers.1.mlp.down_proj")
        .expect("module path");
    let a = layer.adapter("default").unwrap().a().clone();
    let b = Tensor::ones((64, 2), DType::F32, &Device::Cpu)?;
    layer.set_adapter_weights("default", &a, &b)?;
    let err = rel_err(&model.forward(&ids)?, &base)?;
    assert!(
        err > 1e-2,
        "a non-zero adapter should change the logits (rel err {err:e})"
    );
    assert!(model
        .lora_module_mut("model.layers.2.mlp.down_proj")
        .is_none());
    Ok(())
}

#[test]
fn missing_config_field() {
    let dir = TempDir::copy_of("qwen2");
    dir.edit_config(|c| {
        c.remove("hidden_size");
    });
    assert_mentions(
        &load_err(&dir.0),
        &["config.json", "missing field `hidden_size`"],
    );
}

#[test]
fn unknown_architecture() {
    let dir = TempDir::copy_of("llama");
    dir.edit_config(|c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    assert_mentions(
        &load_err(&dir.0),
        &["config.json", "architectures", "GPT2LMHeadModel"],
    );
    // No `architectures`: the model_type decides, and an unknown one is named.
    dir.edit_config(|c| {
        c.remove("architectures");
        c.insert("model_type".into(), "gpt2".into());
    });
    assert_mentions(&load_err(&dir.0), &["config.json", "model_type", "gpt2"]);
}

#[test]
fn unsupported_rope_type() {
    let dir = TempDir::copy_of("llama");
    dir.edit_config(|c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    assert_mentions(
        &load_err(&dir.0),
        &["config.json", "rope_parameters", "yarn"],
    );
}

#[test]
fn tensor_with_wrong_shape() -> Result<()> {
    let dir = TempDir::copy_of("qwen2");
    let name = "model.layers.1.self_attn.k_proj.weight";
    dir.edit_weights(|t| {
        let w = t[name].narrow(0, 0, 31).unwrap();
        t.insert(name.to_string(), w);
    })?;
    assert_mentions(
        &load_err(&dir.0),
        &["model.safetensors", name, "[31, 64]", "[32, 64]"],
    );
    Ok(())
}

#[test]
fn missing_tensor() -> Result<()> {
    let dir = TempDir::copy_of("qwen2");
    let name = "model.layers.0.self_attn.v_proj.bias";
    dir.edit_weights(|t| {
        t.remove(name);
    })?;
    assert_mentions(
        &load_err(&dir.0),
        &["model.safetensors", "missing tensor", name],
    );
    // An untied model without its lm_head.
    let dir = TempDir::copy_of("qwen2");
    dir.edit_config(|c| {
        c.insert("tie_word_embeddings".into(), false.into());
    });
    assert_mentions(&load_err(&dir.0), &["model.safetensors", "lm_head.weight"]);
    Ok(())
}

#[test]
fn truncated_weights_file() {
    let dir = TempDir::copy_of("llama");
    let path = dir.file("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors", "truncated"]);
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..20]).unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors", "truncated"]);
}

#[test]
fn missing_files() {
    let dir = TempDir::copy_of("llama");
    std::fs::remove_file(dir.file("model.safetensors")).unwrap();
    assert_mentions(&load_err(&dir.0), &["model.safetensors"]);
    std::fs::remove_file(dir.file("config.json")).unwrap();
    assert_mentions(&load_err(&dir.0), &["config.json"]);
}

#[test]
fn bad_input_ids() -> Result<()> {
    let model = Transformer::from_dir(fixture("llama"), DType::F32, &Device::Cpu)?;
    let f = Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?;
    assert!(model.forward(&f).is_err());
    let flat = Tensor::zeros(3, DType::U32, &Device::Cpu)?;
    assert!(model.forward(&flat).is_err());
    Ok(())
}

/// The golden logits of all three fixtures on every device: on CUDA this runs the model through
/// flare's kernels, its small-GEMM kernel and cuBLASLt (f32, TF32 off).
fn golden_all_archs(dev: &Device) -> Result<()> {
    for arch in ["qwen2", "llama", "mistral"] {
        let model = Transformer::from_dir(fixture(arch), DType::F32, dev)?;
        let (ids, want) = reference(arch)?;
        let got = model
            .forward(&ids.to_device(dev)?)?
            .to_device(&Device::Cpu)?;
        let err = rel_err(&got, &want)?;
        assert!(err <= 1e-4, "{arch} on {dev:?}: logits rel err {err:e}");
    }
    Ok(())
}

device_test!(golden_all_archs);

/// `Transformer::random` on each device: weights uniform in ±0.02·√3 (standard deviation 0.02),
/// the same for the same seed and different for another (on CUDA they are drawn on the device).
fn random_weights(dev: &Device) -> Result<()> {
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 200,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "vocab_size": 301, "max_position_embeddings": 64}"#,
        "config.json",
    )?;
    let weights = |seed: u64| -> Result<Vec<f32>> {
        let m = Transformer::random(cfg.clone(), DType::BF16, dev, seed)?;
        let mut v = Vec::new();
        for (_, lin) in m.lora_modules() {
            v.extend(
                lin.weight()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(v)
    };
    let a = weights(3)?;
    assert_eq!(a, weights(3)?, "the same seed gives the same weights");
    assert_ne!(a, weights(4)?, "another seed gives other weights");
    let bound = 0.02 * 3f64.sqrt() * 1.01; // bf16 rounding
    assert!(a.iter().all(|&x| f64::from(x).abs() <= bound));
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let std = (a
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(mean.abs() < 1e-3, "mean {mean}");
    assert!((std - 0.02).abs() < 0.001, "std {std}");
    Ok(())
}
device_test!(random_weights);
