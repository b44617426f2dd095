//! The model shapes `flare bench train` and `bench/anchor_train.py` train, and how both count
//! a step's work: the presets ([`load_config`]), the model FLOPs per trained token
//! ([`flops_per_token`]) and the GPUs' dense bf16 peaks ([`peak_tflops_for`]) that MFU divides
//! by.
//!
//! The presets are one table, `bench/model_presets.json`, read by both sides (compiled into
//! the CLI, loaded by the Python anchor): HF `config.json` contents of Qwen2-0.5B
//! (`qwen2-0.5b`), Llama-3.1-8B (`llama-3.1-8b`, llama3 RoPE scaling, 131,072 positions) and
//! Qwen2.5-7B (`qwen2.5-7b`), trained with random weights.
//!
//! Model FLOPs per trained token of LoRA training, the formula of `bench/anchor_train.py`
//! (keep the two identical):
//!
//! ```text
//! F = 4 * N_frozen + 6 * N_lora + 6 * S * L * H * d_head
//! ```
//!
//! - `N_frozen`: the frozen matmul weights, per layer `D*(H*dh) + 2*D*(KV*dh) + (H*dh)*D + 3*D*I`,
//!   plus the LM head `D*V` (counted even when tied; the embedding lookup, norms and biases are
//!   not): `2 N` for the forward and `2 N` for the input gradient (no weight gradient).
//! - `N_lora`: the LoRA factors, `r*(in+out)` per adapted projection (all seven): 2 forward,
//!   2 input gradient, 2 weight gradient.
//! - attention, causal: `QKᵀ` and `PV` are `4*S*(H*dh)` FLOPs per token and layer in full,
//!   half of it causal, so `2*S*L*H*dh` forward and three times that with the backward.
//! - Recomputation by gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
//!
//! `MFU = F * tokens/s / peak`, the peak from the device name ([`PEAKS`]) or `--peak-tflops`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use flare::models::ModelConfig;
use serde_json::Value;

/// `bench/model_presets.json`: preset name -> HF config.json object.
const PRESETS_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../bench/model_presets.json"
));

/// The LoRA rank both benches train with.
pub const LORA_R: usize = 16;

/// Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched in order as substrings of the
/// device name (the more specific names first): NVIDIA's data sheets.
pub const PEAKS: &[(&str, f64)] = &[
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
];

/// The dense bf16 peak of the device called `name`, TFLOP/s (`None`: unknown, e.g. a CPU).
pub fn peak_tflops_for(name: &str) -> Option<f64> {
    PEAKS
        .iter()
        .find(|(k, _)| name.contains(k))
        .map(|&(_, v)| v)
}

fn presets() -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str(PRESETS_JSON).context("bench/model_presets.json")? {
        Value::Object(m) => Ok(m),
        _ => bail!("bench/model_presets.json: expected an object of presets"),
    }
}

/// The preset names.
pub fn preset_names() -> Vec<String> {
    presets()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// The config named by `spec`, a preset or a path to an HF `config.json` (or to its folder),
/// as (a name for the rows, the JSON object).
pub fn load_config(spec: &str) -> Result<(String, Value)> {
    let table = presets()?;
    if let Some(v) = table.get(spec) {
        return Ok((spec.to_string(), v.clone()));
    }
    let p = Path::new(spec);
    let file = if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    };
    if !file.is_file() {
        bail!(
            "--config {spec:?}: neither a preset ({}) nor a config.json file",
            preset_names().join(", ")
        );
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", file.display()))?;
    if !v.is_object() {
        bail!("{}: expected a JSON object", file.display());
    }
    let name = file
        .canonicalize()
        .ok()
        .and_then(|f| f.parent()?.file_name()?.to_str().map(str::to_string))
        .unwrap_or_else(|| file.display().to_string());
    Ok((name, v))
}

/// Parses `v` (after any override of its fields) into a [`ModelConfig`]; errors name `what`.
pub fn model_config(v: &Value, what: &str) -> Result<ModelConfig> {
    Ok(ModelConfig::from_json_str(&v.to_string(), what)?)
}

/// `(N_frozen, N_lora)` of the module docs: the frozen matmul weights (LM head included) and
/// the LoRA parameters at rank `r` on all seven projections.
pub fn param_counts(c: &ModelConfig, r: usize) -> (u64, u64) {
    let (d, l, h, kv, dh, i, v) = (
        c.hidden_size as u64,
        c.num_hidden_layers as u64,
        c.num_attention_heads as u64,
        c.num_key_value_heads as u64,
        c.head_dim as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let r = r as u64;
    let per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * i;
    let lora_layer = r * ((d + h * dh) + 2 * (d + kv * dh) + (h * dh + d) + 3 * (d + i));
    (l * per_layer + d * v, l * lora_layer)
}

/// Model FLOPs per trained token at sequence length `seq` (the module docs' `F`).
pub fn flops_per_token(c: &ModelConfig, seq: usize, r: usize) -> f64 {
    let (n_frozen, n_lora) = param_counts(c, r);
    let attn = 6
        * seq as u64
        * c.num_hidden_layers as u64
        * c.num_attention_heads as u64
        * c.head_dim as u64;
    (4 * n_frozen + 6 * n_lora + attn) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str, layers: Option<usize>) -> ModelConfig {
        let (_, mut v) = load_config(name).unwrap();
        if let Some(l) = layers {
            v["num_hidden_layers"] = l.into();
        }
        model_config(&v, name).unwrap()
    }

    /// The numbers `bench/anchor_train.py`'s `param_counts` and `flops_per_token` print for the
    /// same presets (python3 -c 'import anchor_train as a; ...'), so the two sides' MFU agree.
    #[test]
    fn flops_match_the_anchor() {
        type Case<'a> = (&'a str, Option<usize>, (u64, u64), &'a [(usize, f64)]);
        let cases: [Case; 4] = [
            (
                "qwen2-0.5b",
                None,
                (493_961_216, 8_798_208),
                &[(512, 2_094_694_400.0), (1024, 2_160_754_688.0)],
            ),
            (
                "llama-3.1-8b",
                None,
                (7_504_658_432, 41_943_040),
                &[(1024, 31_075_598_336.0), (4096, 33_491_517_440.0)],
            ),
            (
                "qwen2.5-7b",
                None,
                (7_070_285_824, 40_370_176),
                &[(4096, 30_989_615_104.0)],
            ),
            (
                "llama-3.1-8b",
                Some(2),
                (961_544_192, 2_621_440),
                &[(128, 3_868_196_864.0)],
            ),
        ];
        for (name, layers, counts, flops) in cases {
            let c = preset(name, layers);
            assert_eq!(param_counts(&c, LORA_R), counts, "{name}");
            for &(s, f) in flops {
                assert_eq!(flops_per_token(&c, s, LORA_R), f, "{name} at {s}");
            }
        }
    }

    #[test]
    fn presets_parse_with_their_shapes() {
        let mut names = preset_names();
        names.sort();
        assert_eq!(names, ["llama-3.1-8b", "qwen2-0.5b", "qwen2.5-7b"]);
        let l = preset("llama-3.1-8b", None);
        assert_eq!(
            (
                l.hidden_size,
                l.num_hidden_layers,
                l.num_key_value_heads,
                l.head_dim
            ),
            (4096, 32, 8, 128)
        );
        assert!(l.rope_scaling.is_some() && !l.tie_word_embeddings);
        let q = preset("qwen2.5-7b", None);
        assert!(q.qkv_bias && !q.tie_word_embeddings && q.vocab_size == 152_064);
        assert!(preset("qwen2-0.5b", None).tie_word_embeddings);
        let e = load_config("no-such-preset").unwrap_err().to_string();
        assert!(
            e.contains("qwen2-0.5b") && e.contains("no-such-preset"),
            "{e}"
        );
    }

    #[test]
    fn peaks_by_device_name() {
        assert_eq!(peak_tflops_for("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(peak_tflops_for("NVIDIA H200"), Some(989.4));
        assert_eq!(peak_tflops_for("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_tflops_for("CPU (2 threads)"), None);
    }
}
