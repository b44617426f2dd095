//! PEFT's LoRA adapter format: `adapter_config.json` plus `adapter_model.safetensors`, read and
//! written so that an adapter trained with flare loads in PEFT and the other way round.
//!
//! Layout of an adapter directory, as `PeftModel.save_pretrained` writes it:
//!
//! - `adapter_model.safetensors`: for every adapted linear module at path `<module>` (e.g.
//!   `model.layers.0.self_attn.q_proj`), the tensors `base_model.model.<module>.lora_A.weight`
//!   of shape `[r, in]` and `base_model.model.<module>.lora_B.weight` of shape `[out, r]`, with
//!   header metadata `{"format": "pt"}`.
//! - `adapter_config.json`: the hyper-parameters ([`AdapterConfig`]).
//!
//! The adapted layer computes `y = x Wᵀ (+ bias) + s · (x Aᵀ) Bᵀ` with `s` from
//! [`LoraConfig::scaling`].
//!
//! [`load_adapter`] also accepts the key variants found in state dicts saved by other tools:
//! with the adapter-name segment (`...lora_A.default.weight`) and without the
//! `base_model.model.` prefix. It refuses what flare does not implement (DoRA, per-module
//! ranks, `fan_in_fan_out`, trained biases, regex `target_modules`, ...) with an error that says
//! so, rather than loading an adapter that would compute something else.
//!
//! [`save_adapter`] writes both files atomically ([`crate::io::write_atomic`]), the weights
//! first and the config last, so that a directory with a config always has the complete weights
//! it describes.
//!
//! ```
//! use std::collections::BTreeMap;
//! use candle_core::{DType, Device, Tensor};
//! use flare::lora::{load_adapter, save_adapter, Adapter, AdapterConfig, LoraConfig};
//!
//! let lora = LoraConfig { r: 2, alpha: 4.0, target_modules: vec!["q_proj".into()], ..Default::default() };
//! let a = Tensor::ones((2, 8), DType::F32, &Device::Cpu)?; // [r, in]
//! let b = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?; // [out, r]
//! let adapter = Adapter {
//!     config: AdapterConfig::from(&lora),
//!     tensors: BTreeMap::from([("model.layers.0.self_attn.q_proj".to_string(), (a, b))]),
//! };
//! # let dir = std::env::temp_dir().join(format!("flare-peft-doc-{}", std::process::id()));
//! save_adapter(&dir, &adapter)?;
//! let back = load_adapter(&dir, &Device::Cpu)?;
//! assert_eq!(back.config.lora_config()?, lora);
//! back.check_against(|path| (path == "model.layers.0.self_attn.q_proj").then_some((4, 8)))?;
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), flare::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::LoraConfig;
use crate::hf_json::bad_file;
use crate::{Error, Result};

/// The name of the config file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The name of the weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module path in the weights file.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The weights-file key of the `A` matrix (`[r, in]`) of the module at `module_path`:
/// `base_model.model.<module_path>.lora_A.weight`.
pub fn lora_a_key(module_path: &str) -> String {
    format!("{KEY_PREFIX}{module_path}.lora_A.weight")
}

/// The weights-file key of the `B` matrix (`[out, r]`) of the module at `module_path`:
/// `base_model.model.<module_path>.lora_B.weight`.
pub fn lora_b_key(module_path: &str) -> String {
    format!("{KEY_PREFIX}{module_path}.lora_B.weight")
}

// ---- config -----------------------------------------------------------------------------------

/// The subset of PEFT's `LoraConfig` (as stored in `adapter_config.json`) that flare implements.
///
/// Deserializing checks the file against what flare supports: it refuses `peft_type` other
/// than `"LORA"`, `use_dora: true`, `bias` other than `"none"`, `lora_bias: true`,
/// `fan_in_fan_out: true`, non-empty `rank_pattern` / `alpha_pattern`, non-empty
/// `modules_to_save`, `layers_to_transform`, `layer_replication`, `target_parameters`, the LoRA
/// variants of newer PEFT releases when switched on (`use_qalora`, `alora_invocation_tokens`,
/// `use_bdlora`, `velora_config`, `kasa_config`, `monteclora_config`, `arrow_config`,
/// `trainable_token_indices`) and a `target_modules` regex (or `"all-linear"`), each with an
/// error that names the field; it also
/// checks the values themselves as [`LoraConfig::validate`] does. Other keys
/// (`init_lora_weights`, `revision`, `exclude_modules`, ...) are ignored. Serializing writes the
/// fields PEFT needs to rebuild the config, keys sorted as PEFT sorts them, and leaves out the
/// fields whose PEFT default is what flare implements (`use_dora`, `rank_pattern`, ...), so that
/// PEFT releases older than those fields (which refuse unknown keys) load the file too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawAdapterConfig", into = "RawAdapterConfig")]
pub struct AdapterConfig {
    /// The PEFT method; always `"LORA"`.
    pub peft_type: String,
    /// Rank of the update, >= 1.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout probability on the low-rank path's input (training only).
    pub lora_dropout: f64,
    /// Module names (suffixes of module paths) that carry an adapter. A plain-name string in
    /// the file (`"q_proj"`) is read as a one-element list.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Which biases are trained; flare supports only `"none"`.
    pub bias: String,
    /// PEFT's task type (`"CAUSAL_LM"`, ...), if any. Informational.
    pub task_type: Option<String>,
    /// The base model the adapter was trained on (a hub id or a path), if recorded.
    pub base_model_name_or_path: Option<String>,
    /// Whether the base weights are stored `[in, out]` (GPT-2 `Conv1D`); must be false.
    pub fan_in_fan_out: bool,
    /// Whether PEFT should load the adapter frozen. Informational for flare.
    pub inference_mode: bool,
}

impl AdapterConfig {
    /// Checks that the config describes something flare implements and that its values are
    /// valid; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|msg| Error::InvalidArgument {
            op: "AdapterConfig",
            msg,
        })
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.peft_type != "LORA" {
            return Err(format!(
                "peft_type {:?} is not supported (flare reads LoRA adapters, peft_type \"LORA\")",
                self.peft_type
            ));
        }
        if self.bias != "none" {
            return Err(format!(
                "bias {:?} is not supported: flare trains no biases, only bias \"none\"",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return Err(
                "fan_in_fan_out: true (weights stored [in, out], GPT-2 Conv1D) is not \
                        supported"
                    .into(),
            );
        }
        for t in &self.target_modules {
            check_target_name(t)?;
        }
        self.lora_config_unchecked()
            .validate()
            .map_err(|e| match e {
                Error::InvalidArgument { msg, .. } => msg,
                other => other.to_string(),
            })
    }

    /// The flare [`LoraConfig`] this adapter config describes, after [`AdapterConfig::validate`].
    pub fn lora_config(&self) -> Result<LoraConfig> {
        self.validate()?;
        Ok(self.lora_config_unchecked())
    }

    fn lora_config_unchecked(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout as f32,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
        }
    }

    /// The scaling `s` of the low-rank product (see [`LoraConfig::scaling`]).
    pub fn scaling(&self) -> f64 {
        self.lora_config_unchecked().scaling()
    }
}

impl From<&LoraConfig> for AdapterConfig {
    /// A PEFT config for `c` with `task_type` and `base_model_name_or_path` unset and
    /// `inference_mode` false.
    fn from(c: &LoraConfig) -> Self {
        // f32 -> f64 through the shortest decimal form, so 0.05f32 is written as 0.05.
        let dropout = c.dropout.to_string().parse().unwrap_or(c.dropout as f64);
        AdapterConfig {
            peft_type: "LORA".into(),
            r: c.r,
            lora_alpha: c.alpha,
            lora_dropout: dropout,
            target_modules: c.target_modules.clone(),
            use_rslora: c.use_rslora,
            bias: "none".into(),
            task_type: None,
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            inference_mode: false,
        }
    }
}

impl TryFrom<&AdapterConfig> for LoraConfig {
    type Error = Error;
    fn try_from(c: &AdapterConfig) -> Result<LoraConfig> {
        c.lora_config()
    }
}

/// A `target_modules` entry flare can honour: a plain (possibly dotted) module name.
fn check_target_name(t: &str) -> std::result::Result<(), String> {
    if t == "all-linear" {
        return Err(
            "target_modules \"all-linear\" is not supported: list the module names \
                    (PEFT's saved configs list them)"
                .into(),
        );
    }
    let plain = !t.is_empty()
        && !t.starts_with('.')
        && !t.ends_with('.')
        && !t.contains("..")
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "regex target_modules not supported: {t:?} (give a list of module names)"
        ))
    }
}

/// `target_modules` as PEFT writes it: a list of names, or one string (a regex to PEFT).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// `adapter_config.json` as stored, including the fields flare refuses. Fields in PEFT's order
/// (sorted).
#[derive(Serialize, Deserialize)]
struct RawAdapterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    inference_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_lora_weights: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer_replication: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers_to_transform: Option<serde_json::Value>,
    lora_alpha: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora_bias: Option<bool>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modules_to_save: Option<Vec<String>>,
    peft_type: String,
    r: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_parameters: Option<serde_json::Value>,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    use_dora: Option<bool>,
    #[serde(default)]
    use_rslora: Option<bool>,

    // LoRA variants of newer PEFT releases, read only to be refused when set.
    #[serde(default, skip_serializing)]
    alora_invocation_tokens: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    arrow_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    kasa_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    monteclora_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    trainable_token_indices: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    use_bdlora: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    use_qalora: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    velora_config: Option<serde_json::Value>,
}

impl RawAdapterConfig {
    /// The first newer-PEFT variant that is switched on, as (field, what it is).
    fn variant_in_use(&self) -> Option<(&'static str, &'static str, &serde_json::Value)> {
        [
            (
                "alora_invocation_tokens",
                "activated LoRA",
                &self.alora_invocation_tokens,
            ),
            ("arrow_config", "Arrow routing", &self.arrow_config),
            ("kasa_config", "KaSA", &self.kasa_config),
            ("monteclora_config", "MonteCLoRA", &self.monteclora_config),
            (
                "trainable_token_indices",
                "trainable token embeddings",
                &self.trainable_token_indices,
            ),
            ("use_bdlora", "block-diagonal LoRA", &self.use_bdlora),
            ("use_qalora", "QA-LoRA", &self.use_qalora),
            ("velora_config", "VeLoRA", &self.velora_config),
        ]
        .into_iter()
        .find_map(|(k, what, v)| match v {
            Some(v) if is_set(v) => Some((k, what, v)),
            _ => None,
        })
    }
}

/// True unless `v` is null, false, 0, `""`, `[]` or `{}`: a PEFT option that is switched on.
fn is_set(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
        other => !is_empty_value(other),
    }
}

/// True for JSON null, `[]`, `{}` and `""`: a PEFT field that is set to "nothing".
fn is_empty_value(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        serde_json::Value::String(s) => s.is_empty(),
        _ => false,
    }
}

impl TryFrom<RawAdapterConfig> for AdapterConfig {
    type Error = String;

    fn try_from(raw: RawAdapterConfig) -> std::result::Result<Self, String> {
        if raw.peft_type != "LORA" {
            return Err(format!(
                "peft_type {:?} is not supported (flare reads LoRA adapters, peft_type \"LORA\")",
                raw.peft_type
            ));
        }
        if raw.use_dora == Some(true) {
            return Err("use_dora: true (DoRA) is not supported".into());
        }
        if let Some((key, what, v)) = raw.variant_in_use() {
            return Err(format!("{key}: {v} ({what}) is not supported"));
        }
        if raw.lora_bias == Some(true) {
            return Err("lora_bias: true (a trained bias on lora_B) is not supported".into());
        }
        if let Some(p) = raw.rank_pattern.as_ref().filter(|p| !p.is_empty()) {
            let keys: Vec<&String> = p.keys().collect();
            return Err(format!(
                "rank_pattern (per-module ranks) is not supported, got entries for {keys:?}"
            ));
        }
        if let Some(p) = raw.alpha_pattern.as_ref().filter(|p| !p.is_empty()) {
            let keys: Vec<&String> = p.keys().collect();
            return Err(format!(
                "alpha_pattern (per-module alphas) is not supported, got entries for {keys:?}"
            ));
        }
        if let Some(m) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(format!(
                "modules_to_save {m:?} is not supported (fully trained extra modules)"
            ));
        }
        if let Some(l) = raw
            .layers_to_transform
            .as_ref()
            .filter(|l| !is_empty_value(l))
        {
            return Err(format!("layers_to_transform ({l}) is not supported"));
        }
        if let Some(l) = raw
            .layer_replication
            .as_ref()
            .filter(|l| !is_empty_value(l))
        {
            return Err(format!("layer_replication ({l}) is not supported"));
        }
        if let Some(t) = raw
            .target_parameters
            .as_ref()
            .filter(|t| !is_empty_value(t))
        {
            return Err(format!("target_parameters ({t}) is not supported"));
        }
        let target_modules = match raw.target_modules {
            None => return Err("target_modules is missing".into()),
            Some(TargetModules::List(v)) => v,
            Some(TargetModules::One(s)) => vec![s],
        };
        let c = AdapterConfig {
            peft_type: raw.peft_type,
            r: raw.r,
            lora_alpha: raw.lora_alpha,
            lora_dropout: raw.lora_dropout.unwrap_or(0.0),
            target_modules,
            use_rslora: raw.use_rslora.unwrap_or(false),
            bias: raw.bias.unwrap_or_else(|| "none".into()),
            task_type: raw.task_type,
            base_model_name_or_path: raw.base_model_name_or_path,
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            inference_mode: raw.inference_mode.unwrap_or(false),
        };
        c.check()?;
        Ok(c)
    }
}

/// Writes only the fields every PEFT release since rsLoRA (0.7) knows: PEFT builds its config
/// class from the file's keys and older releases refuse keys they do not know (PEFT 0.13 fails
/// on `lora_bias`), while every field left out has the default that flare implements.
impl From<AdapterConfig> for RawAdapterConfig {
    fn from(c: AdapterConfig) -> Self {
        RawAdapterConfig {
            alpha_pattern: None,
            base_model_name_or_path: c.base_model_name_or_path,
            bias: Some(c.bias),
            fan_in_fan_out: Some(c.fan_in_fan_out),
            inference_mode: Some(c.inference_mode),
            init_lora_weights: Some(serde_json::Value::Bool(true)),
            layer_replication: None,
            layers_to_transform: None,
            lora_alpha: c.lora_alpha,
            lora_bias: None,
            lora_dropout: Some(c.lora_dropout),
            modules_to_save: None,
            peft_type: c.peft_type,
            r: c.r,
            rank_pattern: None,
            target_parameters: None,
            target_modules: Some(TargetModules::List(c.target_modules)),
            task_type: c.task_type,
            use_dora: None,
            use_rslora: Some(c.use_rslora),
            alora_invocation_tokens: None,
            arrow_config: None,
            kasa_config: None,
            monteclora_config: None,
            trainable_token_indices: None,
            use_bdlora: None,
            use_qalora: None,
            velora_config: None,
        }
    }
}

// ---- adapter ----------------------------------------------------------------------------------

/// A LoRA adapter: its config and, per adapted module, the pair `(A, B)`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The hyper-parameters.
    pub config: AdapterConfig,
    /// Module path (e.g. `model.layers.0.self_attn.q_proj`) to `(A [r, in], B [out, r])`.
    pub tensors: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Checks the adapter on its own: a valid config, at least one module, module paths that
    /// are dotted names, and for every module an `A` of shape `[r, in]` and a `B` of shape
    /// `[out, r]` in f32, f16 or bf16, with `r` the config's rank. The error names the tensor.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        self.check_tensors()
            .map_err(|msg| Error::InvalidArgument { op: "Adapter", msg })
    }

    fn check_tensors(&self) -> std::result::Result<(), String> {
        if self.tensors.is_empty() {
            return Err("the adapter holds no LoRA tensors".into());
        }
        for (path, (a, b)) in &self.tensors {
            check_module_path(path)?;
            for (t, key) in [(a, lora_a_key(path)), (b, lora_b_key(path))] {
                if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                    return Err(format!(
                        "tensor `{key}` has dtype {:?}; LoRA tensors must be f32, f16 or bf16",
                        t.dtype()
                    ));
                }
            }
            check_pair(path, a.dims(), b.dims(), self.config.r)?;
        }
        Ok(())
    }

    /// The scaling `s` of the low-rank product (see [`LoraConfig::scaling`]).
    pub fn scaling(&self) -> f64 {
        self.config.scaling()
    }

    /// Checks the adapter against a model: `shapes(path)` gives the `(out, in)` of the linear
    /// module at `path`, or `None` if the model has no such module. Every adapted module must
    /// exist, and its `A` must be `[r, in]` and its `B` `[out, r]`; the error names the
    /// offending tensor key, its shape and the shape the model needs.
    pub fn check_against(&self, shapes: impl Fn(&str) -> Option<(usize, usize)>) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidArgument {
                op: "Adapter::check_against",
                msg,
            })
        };
        for (path, (a, b)) in &self.tensors {
            let Some((out, inp)) = shapes(path) else {
                return bad(format!(
                    "tensor `{}`: the model has no linear module `{path}`",
                    lora_a_key(path)
                ));
            };
            let r = a.dims().first().copied().unwrap_or(0);
            let want_a = [r, inp];
            if a.dims() != want_a {
                return bad(format!(
                    "tensor `{}` has shape {:?} but module `{path}` (out {out}, in {inp}) needs \
                     {want_a:?}",
                    lora_a_key(path),
                    a.dims()
                ));
            }
            let want_b = [out, r];
            if b.dims() != want_b {
                return bad(format!(
                    "tensor `{}` has shape {:?} but module `{path}` (out {out}, in {inp}) needs \
                     {want_b:?}",
                    lora_b_key(path),
                    b.dims()
                ));
            }
        }
        Ok(())
    }
}

/// A module path that round-trips through a weights-file key: non-empty dotted name.
fn check_module_path(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() || path.split('.').any(|s| s.is_empty()) {
        return Err(format!(
            "module path {path:?} is not a dotted module name (e.g. `model.layers.0.self_attn.q_proj`)"
        ));
    }
    Ok(())
}

/// Shapes of one module's pair: `A [r, in]`, `B [out, r]`, with `r` the config's.
fn check_pair(path: &str, a: &[usize], b: &[usize], r: usize) -> std::result::Result<(), String> {
    let (ka, kb) = (lora_a_key(path), lora_b_key(path));
    if a.len() != 2 {
        return Err(format!(
            "tensor `{ka}` has shape {a:?}; lora_A must be [r, in]"
        ));
    }
    if b.len() != 2 {
        return Err(format!(
            "tensor `{kb}` has shape {b:?}; lora_B must be [out, r]"
        ));
    }
    if a[0] != b[1] {
        return Err(format!(
            "inconsistent rank: `{ka}` has shape {a:?} (r = {}) but `{kb}` has shape {b:?} (r = {})",
            a[0], b[1]
        ));
    }
    if a[0] != r {
        return Err(format!(
            "tensor `{ka}` has shape {a:?} and `{kb}` {b:?}, rank {} where the config says r = {r}",
            a[0]
        ));
    }
    Ok(())
}

// ---- saving -----------------------------------------------------------------------------------

/// Writes `adapter` to the directory `dir` (created if needed) in PEFT's format:
/// `adapter_model.safetensors` (keys [`lora_a_key`] / [`lora_b_key`], the tensors' own dtypes,
/// metadata `{"format": "pt"}`) then `adapter_config.json` (pretty JSON), each atomically.
/// The adapter is checked first ([`Adapter::validate`]); tensors may live on any device.
pub fn save_adapter(dir: impl AsRef<Path>, adapter: &Adapter) -> Result<()> {
    let dir = dir.as_ref();
    adapter.validate()?;

    let mut blobs: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (path, (a, b)) in &adapter.tensors {
        for (t, key) in [(a, lora_a_key(path)), (b, lora_b_key(path))] {
            let (dtype, bytes) = tensor_bytes(t)?;
            blobs.push((key, dtype, t.dims().to_vec(), bytes));
        }
    }
    let views = blobs
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (k.as_str(), v))
                .map_err(|e| Error::InvalidArgument {
                    op: "save_adapter",
                    msg: format!("tensor `{k}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights =
        safetensors::serialize(views, Some(metadata)).map_err(|e| Error::InvalidArgument {
            op: "save_adapter",
            msg: format!("serializing {}: {e}", weights_path.display()),
        })?;

    let mut config = serde_json::to_string_pretty(&adapter.config).map_err(|e| Error::Io {
        context: format!("serializing {}", dir.join(CONFIG_FILE).display()),
        source: e.into(),
    })?;
    config.push('\n');

    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        context: format!("creating adapter directory {}", dir.display()),
        source: e,
    })?;
    // Weights first: a config on disk always points to complete weights.
    crate::io::write_atomic(&weights_path, &weights)?;
    crate::io::write_atomic(dir.join(CONFIG_FILE), config.as_bytes())?;
    Ok(())
}

/// The safetensors dtype and little-endian bytes of `t` (row-major, on the CPU).
fn tensor_bytes(t: &Tensor) -> Result<(StDtype, Vec<u8>)> {
    let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            StDtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StDtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            StDtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(Error::UnsupportedDType {
                op: "save_adapter",
                dtype: other,
                device: crate::error::device_name(t.device()),
            })
        }
    })
}

// ---- loading ----------------------------------------------------------------------------------

/// Which matrix of the pair a key holds.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Which {
    A,
    B,
}

/// Splits a weights-file key into (module path, A or B). Accepts, for `X` in `A`/`B`:
/// `[base_model.model.]<path>.lora_X[.default].weight`.
fn parse_key(key: &str) -> Option<(&str, Which)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A") {
        (p, Which::A)
    } else if let Some(p) = rest.strip_suffix(".lora_B") {
        (p, Which::B)
    } else {
        return None;
    };
    check_module_path(path).ok()?;
    Some((path, which))
}

/// Reads the adapter in `dir` (written by PEFT's `save_pretrained` or by [`save_adapter`]) onto
/// `device`, keeping the tensors' dtypes.
///
/// Every error names the file concerned: a missing file, malformed JSON (with serde's line and
/// column), a config flare does not support, a malformed or truncated safetensors file, a key
/// that is not a LoRA weight, a `lora_A` without its `lora_B` (or the reverse), a module the
/// config's `target_modules` does not cover, a dtype other than f32/f16/bf16, and ranks that
/// differ between `A` and `B` or from the config's `r`. File-content errors are
/// [`Error::Io`] of kind `InvalidData`; a missing file keeps its `NotFound` kind.
///
/// A training output directory (`flare train --output-dir`) may be given for its final
/// adapter: when `dir` has no `adapter_config.json` but `dir/adapter/` has one, that is read.
pub fn load_adapter(dir: impl AsRef<Path>, device: &Device) -> Result<Adapter> {
    let dir = dir.as_ref();
    let nested = dir.join("adapter");
    let dir = if !dir.join(CONFIG_FILE).exists() && nested.join(CONFIG_FILE).is_file() {
        nested.as_path()
    } else {
        dir
    };
    let config = read_config(&dir.join(CONFIG_FILE))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights_path).map_err(|e| {
        let hint =
            if e.kind() == std::io::ErrorKind::NotFound && dir.join("adapter_model.bin").exists() {
                " (only adapter_model.bin, a PyTorch pickle, is there: flare reads safetensors; \
             re-save with save_pretrained(..., safe_serialization=True))"
            } else {
                ""
            };
        Error::Io {
            context: format!("reading adapter weights {}{hint}", weights_path.display()),
            source: e,
        }
    })?;
    // Our own check first: its errors name the tensor at fault, the crate's do not.
    crate::safetensors_header::parse_safetensors_header(&bytes, bytes.len() as u64, &weights_path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        bad_file(
            &weights_path,
            format!("malformed or truncated safetensors file: {e}"),
        )
    })?;

    // (module path) -> (A, B), each with the key it came from.
    type Slot = Option<(String, Tensor)>;
    let mut pairs: BTreeMap<String, (Slot, Slot)> = BTreeMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    for key in names {
        let view = st
            .tensor(key)
            .map_err(|e| bad_file(&weights_path, format!("tensor `{key}`: {e}")))?;
        let Some((path, which)) = parse_key(key) else {
            return Err(bad_file(
                &weights_path,
                format!(
                    "unexpected tensor `{key}`: flare reads only LoRA weights \
                     `base_model.model.<module>.lora_A.weight` and `...lora_B.weight` \
                     (optionally with `.default` before `.weight`)"
                ),
            ));
        };
        if !matches!(view.dtype(), StDtype::F32 | StDtype::F16 | StDtype::BF16) {
            return Err(bad_file(
                &weights_path,
                format!(
                    "tensor `{key}` has dtype {:?}; LoRA tensors must be F32, F16 or BF16",
                    view.dtype()
                ),
            ));
        }
        let slots = pairs.entry(path.to_string()).or_default();
        let slot = match which {
            Which::A => &mut slots.0,
            Which::B => &mut slots.1,
        };
        if let Some((other, _)) = slot {
            return Err(bad_file(
                &weights_path,
                format!(
                    "tensors `{other}` and `{key}` are both the same weight of module `{path}`"
                ),
            ));
        }
        let t = view
            .load(device)
            .map_err(|e| bad_file(&weights_path, format!("tensor `{key}`: {e}")))?;
        *slot = Some((key.to_string(), t));
    }

    if pairs.is_empty() {
        return Err(bad_file(&weights_path, "holds no LoRA tensors"));
    }
    let lora = config.lora_config()?;
    let mut tensors = BTreeMap::new();
    for (path, (a, b)) in pairs {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((ka, _)), None) => {
                return Err(bad_file(
                    &weights_path,
                    format!(
                        "tensor `{ka}` has no matching lora_B (expected `{}`)",
                        swap_last(&ka, ".lora_A", ".lora_B")
                    ),
                ))
            }
            (None, Some((kb, _))) => {
                return Err(bad_file(
                    &weights_path,
                    format!(
                        "tensor `{kb}` has no matching lora_A (expected `{}`)",
                        swap_last(&kb, ".lora_B", ".lora_A")
                    ),
                ))
            }
            (None, None) => {
                return Err(bad_file(
                    &weights_path,
                    format!("internal error: module `{path}` has no tensors"),
                ))
            }
        };
        check_pair(&path, a.1.dims(), b.1.dims(), config.r)
            .map_err(|msg| bad_file(&weights_path, msg))?;
        if !lora.targets(&path) {
            return Err(bad_file(
                &weights_path,
                format!(
                    "tensor `{}`: module `{path}` matches none of the config's target_modules \
                     {:?}",
                    a.0, config.target_modules
                ),
            ));
        }
        tensors.insert(path, (a.1, b.1));
    }
    Ok(Adapter { config, tensors })
}

/// `key` with the last occurrence of `from` replaced by `to` (the partner of a LoRA key, in the
/// same naming variant).
fn swap_last(key: &str, from: &str, to: &str) -> String {
    match key.rfind(from) {
        Some(i) => format!("{}{to}{}", &key[..i], &key[i + from.len()..]),
        None => key.to_string(),
    }
}

/// Reads and checks `adapter_config.json`.
fn read_config(path: &Path) -> Result<AdapterConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        context: format!("reading adapter config {}", path.display()),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| bad_file(path, format!("invalid adapter config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_variants() {
        let p = "model.layers.0.self_attn.q_proj";
        for (key, which) in [
            (format!("base_model.model.{p}.lora_A.weight"), Which::A),
            (format!("base_model.model.{p}.lora_B.weight"), Which::B),
            (
                format!("base_model.model.{p}.lora_A.default.weight"),
                Which::A,
            ),
            (format!("{p}.lora_B.default.weight"), Which::B),
            (format!("{p}.lora_A.weight"), Which::A),
        ] {
            assert_eq!(parse_key(&key), Some((p, which)), "{key}");
        }
        for key in [
            "base_model.model.x.lora_A.bias",
            "base_model.model.x.lora_magnitude_vector",
            "base_model.model.x.lora_embedding_A",
            "base_model.model.x.lora_A.other.weight",
            "base_model.model.lora_A.weight",
            "base_model.model..lora_A.weight",
            "base_model.model.x.weight",
        ] {
            assert_eq!(parse_key(key), None, "{key}");
        }
        assert_eq!(
            swap_last("m.lora_A.x.lora_A.default.weight", ".lora_A", ".lora_B"),
            "m.lora_A.x.lora_B.default.weight"
        );
        assert_eq!(lora_a_key(p), format!("base_model.model.{p}.lora_A.weight"));
        assert_eq!(lora_b_key(p), format!("base_model.model.{p}.lora_B.weight"));
    }

    fn parse(json: &str) -> std::result::Result<AdapterConfig, String> {
        serde_json::from_str::<AdapterConfig>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn config_parses_peft_output_and_refuses_unsupported() {
        // As written by PEFT 0.13 (keys sorted, many ignored ones).
        let peft = r#"{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "Qwen/Qwen2-0.5B",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": ["v_proj", "q_proj"],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}"#;
        let c = parse(peft).unwrap();
        assert_eq!(c.r, 8);
        assert_eq!(c.lora_alpha, 16.0);
        assert_eq!(c.lora_dropout, 0.05);
        assert_eq!(c.target_modules, ["v_proj", "q_proj"]);
        assert_eq!(c.task_type.as_deref(), Some("CAUSAL_LM"));
        assert!(c.inference_mode);
        let l = c.lora_config().unwrap();
        assert_eq!(l.scaling(), 2.0);
        assert_eq!(l.dropout, 0.05f32);

        // Round trip through our own serialization.
        let back = parse(&serde_json::to_string_pretty(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        let with = |k: &str, v: &str| {
            let mut m: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(peft).unwrap();
            m.insert(k.into(), serde_json::from_str(v).unwrap());
            parse(&serde_json::to_string(&m).unwrap())
        };
        for (k, v, needle) in [
            ("use_dora", "true", "DoRA"),
            ("peft_type", "\"IA3\"", "peft_type"),
            ("bias", "\"all\"", "bias"),
            ("fan_in_fan_out", "true", "fan_in_fan_out"),
            ("rank_pattern", "{\"q_proj\": 4}", "rank_pattern"),
            ("alpha_pattern", "{\"q_proj\": 4}", "alpha_pattern"),
            ("modules_to_save", "[\"lm_head\"]", "modules_to_save"),
            ("layers_to_transform", "[0, 1]", "layers_to_transform"),
            ("layers_to_transform", "3", "layers_to_transform"),
            ("lora_bias", "true", "lora_bias"),
            ("use_qalora", "true", "QA-LoRA"),
            ("alora_invocation_tokens", "[1, 2]", "activated LoRA"),
            ("trainable_token_indices", "[5]", "trainable token"),
            ("velora_config", "{\"x\": 1}", "velora_config"),
            (
                "target_modules",
                "\".*(q|v)_proj\"",
                "regex target_modules not supported",
            ),
            ("target_modules", "\"all-linear\"", "all-linear"),
            ("r", "0", "r must be"),
            ("lora_dropout", "1.5", "dropout"),
        ] {
            let e = with(k, v).expect_err(k);
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
        // Fine: empty lists / nulls, a plain-name string, unknown keys.
        assert!(with("modules_to_save", "[]").is_ok());
        assert!(with("layers_to_transform", "null").is_ok());
        assert!(with("rank_pattern", "null").is_ok());
        assert!(with("init_lora_weights", "\"gaussian\"").is_ok());
        assert!(with("use_qalora", "false").is_ok());
        assert!(with("alora_invocation_tokens", "null").is_ok());
        assert!(with("velora_config", "null").is_ok());
        assert!(with("something_new", "{\"a\": 1}").is_ok());
        assert_eq!(
            with("target_modules", "\"q_proj\"").unwrap().target_modules,
            ["q_proj"]
        );
    }

    #[test]
    fn config_from_lora_config() {
        let l = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            use_rslora: true,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        };
        let c = AdapterConfig::from(&l);
        assert_eq!(
            c.lora_dropout, 0.05,
            "f32 dropout written by its shortest decimal"
        );
        assert_eq!(c.lora_config().unwrap(), l);
        assert_eq!(LoraConfig::try_from(&c).unwrap(), l);
        let json = serde_json::to_string_pretty(&c).unwrap();
        assert!(json.contains("\"peft_type\": \"LORA\""), "{json}");
        assert!(!json.contains("use_dora"), "{json}");
        assert!(json.contains("\"lora_dropout\": 0.05,"), "{json}");
    }
}
