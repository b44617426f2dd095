//! PEFT LoRA adapters in the fixture models (`bench/make_adapter_fixtures.py`: r=4, alpha=8 on
//! all seven projections, random A and B): flare loads the adapter with
//! `lora::peft::load_adapter`, puts it into the model with `models::apply_adapter`, and matches
//! PEFT's logits (f32, relative error <= 1e-4) and its 32-token greedy continuation; a second
//! adapter of the same name or one that does not fit the model is refused and changes nothing.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flare::generate::{generate, GenerationConfig};
use flare::lora::peft::load_adapter;
use flare::models::{apply_adapter, load_peft_adapter, Transformer};

use crate::common::{device_test, rel_err, Result};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(arch)
}

/// `(input_ids, logits)` of a reference file.
fn reference(path: &Path) -> Result<(Tensor, Tensor)> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
    Ok((t.remove("input_ids").unwrap(), t.remove("logits").unwrap()))
}

/// `(prompt, new_tokens)` of a `generation.json`.
fn golden_generation(path: &Path) -> (Vec<u32>, Vec<u32>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (ids("prompt"), ids("new_tokens"))
}

fn adapter_matches_peft(arch: &str, dev: &Device) -> Result<()> {
    let dir = fixture(arch);
    let adapter_dir = dir.join("adapter");
    let mut model = Transformer::from_dir(&dir, DType::F32, dev)?;
    let (ids, want) = reference(&adapter_dir.join("reference.safetensors"))?;
    let ids = ids.to_device(dev)?;
    let base = model.forward(&ids)?.to_device(&Device::Cpu)?;
    assert!(
        rel_err(&base, &want)? > 0.05,
        "{arch}: the adapter must change the logits"
    );

    let n = load_peft_adapter(&mut model, &adapter_dir, "default")?;
    assert_eq!(
        n,
        7 * model.config().num_hidden_layers,
        "{arch}: modules adapted"
    );
    for (path, layer) in model.lora_modules() {
        assert_eq!(layer.active(), Some("default"), "{arch}: {path}");
    }
    let got = model.forward(&ids)?.to_device(&Device::Cpu)?;
    let err = rel_err(&got, &want)?;
    assert!(
        err <= 1e-4,
        "{arch}: logits with the adapter: rel err {err:e}"
    );

    let (prompt, new_tokens) = golden_generation(&adapter_dir.join("generation.json"));
    assert_eq!(new_tokens.len(), 32);
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        ..Default::default()
    };
    let out = generate(&model, &prompt, &cfg, |_| {})?;
    assert_eq!(
        out, new_tokens,
        "{arch}: greedy continuation with the adapter"
    );

    // The same name again: refused, and the model is unchanged.
    let adapter = load_adapter(&adapter_dir, dev)?;
    let err = apply_adapter(&mut model, &adapter, "default").unwrap_err();
    assert!(err.to_string().contains("already has an adapter"), "{err}");
    // An adapter for a module the model lacks: refused before anything changes.
    let mut wrong = adapter.clone();
    let (a, b) = wrong.tensors.values().next().unwrap().clone();
    wrong
        .tensors
        .insert("model.layers.9.self_attn.q_proj".into(), (a, b));
    let err = apply_adapter(&mut model, &wrong, "other").unwrap_err();
    assert!(
        err.to_string().contains("model.layers.9.self_attn.q_proj"),
        "{err}"
    );
    for (path, layer) in model.lora_modules() {
        assert_eq!(layer.adapter_names(), ["default"], "{arch}: {path}");
    }
    let again = model.forward(&ids)?.to_device(&Device::Cpu)?;
    assert!(rel_err(&again, &want)? <= 1e-4);
    Ok(())
}

fn qwen2_adapter_matches_peft(dev: &Device) -> Result<()> {
    adapter_matches_peft("qwen2", dev)
}

fn llama_adapter_matches_peft(dev: &Device) -> Result<()> {
    adapter_matches_peft("llama", dev)
}

device_test!(qwen2_adapter_matches_peft, llama_adapter_matches_peft);
