//! [`ModelConfig`]: the hyper-parameters of a decoder-only model, read from a Hugging Face
//! `config.json` (Llama, Qwen2, Mistral).
//!
//! Both layouts of the RoPE settings are read: the top-level `rope_theta` and `rope_scaling` of
//! transformers 4.x and the `rope_parameters` object of transformers 5.x.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hf_json::{bad_file, Fields};
use crate::{Error, Result};

/// The name of the config file in a model directory.
pub const CONFIG_FILE: &str = "config.json";

/// The model families flare builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM` (`model_type` `llama`).
    Llama,
    /// `Qwen2ForCausalLM` (`model_type` `qwen2`): Llama with a bias on q/k/v.
    Qwen2,
    /// `MistralForCausalLM` (`model_type` `mistral`): Llama with an optional sliding window.
    Mistral,
}

impl Architecture {
    /// The architecture named by an `architectures` entry (`LlamaForCausalLM`, ...).
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "MistralForCausalLM" => Some(Self::Mistral),
            _ => None,
        }
    }

    /// The architecture named by a `model_type` (`llama`, `qwen2`, `mistral`).
    pub fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "mistral" => Some(Self::Mistral),
            _ => None,
        }
    }
}

/// The `llama3` RoPE frequency scaling (Llama 3.1 and later).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// `factor`: how much the low frequencies are slowed down.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`: the context length of pre-training.
    pub original_max_position_embeddings: usize,
}

/// The hyper-parameters of a decoder-only transformer of the Llama family.
///
/// ```
/// use flare::models::{Architecture, ModelConfig};
/// let json = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
///     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
///     "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
///     "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": true}"#;
/// let c = ModelConfig::from_json_str(json, "config.json")?;
/// assert_eq!((c.architecture, c.head_dim, c.qkv_bias), (Architecture::Qwen2, 16, true));
/// assert!(ModelConfig::from_json_str(r#"{"architectures": ["GPT2LMHeadModel"]}"#, "config.json").is_err());
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model family.
    pub architecture: Architecture,
    /// `hidden_size`: the width of the residual stream.
    pub hidden_size: usize,
    /// `intermediate_size`: the width of the MLP.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`: query heads.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`): key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (or `rope_parameters.rope_theta`; defaults to 10000).
    pub rope_theta: f64,
    /// `rope_scaling` (or `rope_parameters`) of type `llama3`; `None` for plain RoPE.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// `tie_word_embeddings`: the output projection is the embedding matrix (default false).
    pub tie_word_embeddings: bool,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `max_position_embeddings`: the context length the model was trained for. Generating
    /// past it runs but warns; see [`context_warning`](Self::context_warning).
    pub max_position_embeddings: usize,
    /// Whether q/k/v projections have a bias (always for Qwen2; `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Whether the output projection has a bias (`attention_bias` for Llama).
    pub o_bias: bool,
    /// Whether the MLP projections have a bias (`mlp_bias` for Llama).
    pub mlp_bias: bool,
    /// The attention window of Mistral's `sliding_window` (a query sees the last `w` keys,
    /// itself included); `None` for full causal attention.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    ///
    /// Errors name the file: a missing or unreadable file ([`Error::Io`] with its own kind),
    /// malformed JSON, a missing or mistyped field, an architecture flare does not build, or
    /// settings it does not implement (an activation other than SiLU, RoPE scaling other than
    /// `llama3`, Qwen2's per-layer sliding window), values no model can have (zero layers,
    /// heads, sizes or positions, a hidden size not divisible by the heads, query heads not a
    /// multiple of the KV heads, a non-positive `rms_norm_eps`), all [`Error::Io`] of kind
    /// `InvalidData`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join(CONFIG_FILE))
    }

    /// Reads a `config.json` file; see [`from_dir`](Self::from_dir).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            context: format!("reading model config {}", path.display()),
            source: e,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `file` is the name errors give it.
    pub fn from_json_str(text: &str, file: impl AsRef<Path>) -> Result<Self> {
        let file = file.as_ref();
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad_file(file, format!("malformed JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(bad_file(file, "expected a JSON object"));
        };
        let f = Fields { obj, file };

        let architecture = architecture(&f)?;
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f
            .usize_opt("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(f.err(
                "`num_attention_heads` and `num_key_value_heads` must be positive".to_string(),
            ));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(format!(
                "`num_attention_heads` ({num_attention_heads}) must be a multiple of \
                 `num_key_value_heads` ({num_key_value_heads})"
            )));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(format!(
                        "no `head_dim`, and `hidden_size` ({hidden_size}) is not a multiple of \
                         `num_attention_heads` ({num_attention_heads})"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.err(format!(
                "the head dimension (`head_dim`, else `hidden_size` / `num_attention_heads`) \
                 must be even and positive (RoPE), got {head_dim}"
            )));
        }
        if let Some(act) = f.str_opt("hidden_act")?.or(f.str_opt("hidden_activation")?) {
            if act != "silu" && act != "swish" {
                return Err(f.err(format!(
                    "field `hidden_act`: activation {act:?} is not supported (only \"silu\")"
                )));
            }
        }

        let (rope_theta, rope_scaling) = rope(&f)?;

        let attention_bias = f.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false, false),
            Architecture::Llama => (
                attention_bias,
                attention_bias,
                f.bool_or("mlp_bias", false)?,
            ),
            Architecture::Mistral => (false, false, false),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => f.usize_opt("sliding_window")?,
            Architecture::Qwen2 => {
                if f.bool_or("use_sliding_window", false)? {
                    return Err(f.err(
                        "field `use_sliding_window`: Qwen2's per-layer sliding window is not \
                         supported"
                            .to_string(),
                    ));
                }
                None
            }
            Architecture::Llama => None,
        };
        if sliding_window == Some(0) {
            return Err(f.err("field `sliding_window` must be positive".to_string()));
        }

        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: f.usize("max_position_embeddings")?,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
        };
        config.check_values(file)?;
        Ok(config)
    }

    /// The positions a model of this config was trained for (`max_position_embeddings`), and
    /// what flare does past them: RoPE is computed for any position and the KV cache is sized
    /// for the whole request, so generation goes on, but the model has never seen such
    /// positions and its output usually degrades. Returns a warning for a request of
    /// `positions` positions (prompt plus new tokens) that goes past them, `None` otherwise.
    /// The CLI prints it; library callers decide.
    ///
    /// ```
    /// # let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    /// #     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    /// #     "rms_norm_eps": 1e-6, "vocab_size": 256, "max_position_embeddings": 128}"#;
    /// let c = flare::models::ModelConfig::from_json_str(json, "config.json")?;
    /// assert!(c.context_warning(128).is_none());
    /// assert!(c.context_warning(129).unwrap().contains("max_position_embeddings"));
    /// # Ok::<(), flare::Error>(())
    /// ```
    pub fn context_warning(&self, positions: usize) -> Option<String> {
        (positions > self.max_position_embeddings).then(|| {
            format!(
                "up to {positions} positions (prompt + max new tokens) exceed the model's \
                 max_position_embeddings ({}): positions past it were never trained and the \
                 output will likely degrade",
                self.max_position_embeddings
            )
        })
    }

    /// Refuses values no model can have, naming the field and `file`: zero sizes (layers,
    /// hidden, intermediate, vocabulary, positions), sizes beyond what flare can address, a
    /// non-positive or non-finite `rms_norm_eps` or `rope_theta`. (Head counts, GQA grouping
    /// and the head dimension are checked while parsing.)
    fn check_values(&self, file: &Path) -> Result<()> {
        /// The largest width, vocabulary or head count accepted: far above any real model, small
        /// enough that products of two sizes cannot overflow.
        const MAX_DIM: usize = 1 << 26;
        /// The largest `max_position_embeddings` accepted.
        const MAX_POSITIONS: usize = 1 << 32;
        let dims = [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 16),
            ("num_attention_heads", self.num_attention_heads, MAX_DIM),
            ("num_key_value_heads", self.num_key_value_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (field, v, max) in dims {
            if v == 0 {
                return Err(bad_file(
                    file,
                    format!("field `{field}` must be positive, got 0"),
                ));
            }
            if v > max {
                return Err(bad_file(
                    file,
                    format!("field `{field}` = {v} is larger than flare accepts ({max})"),
                ));
            }
        }
        if self.num_attention_heads * self.head_dim > MAX_DIM {
            return Err(bad_file(
                file,
                format!(
                    "fields `num_attention_heads` × `head_dim` = {} × {} is larger than flare \
                     accepts ({MAX_DIM})",
                    self.num_attention_heads, self.head_dim
                ),
            ));
        }
        for (field, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad_file(
                    file,
                    format!("field `{field}` must be a positive finite number, got {v}"),
                ));
            }
        }
        if let Some(s) = &self.rope_scaling {
            let ok = [s.factor, s.low_freq_factor, s.high_freq_factor]
                .iter()
                .all(|x| x.is_finite() && *x > 0.0)
                && s.original_max_position_embeddings > 0;
            if !ok {
                return Err(bad_file(
                    file,
                    format!(
                        "field `rope_scaling`: llama3 scaling needs positive finite factors and \
                         a positive original_max_position_embeddings, got {s:?}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The architecture from `architectures` (first entry), else from `model_type`.
fn architecture(f: &Fields<'_>) -> Result<Architecture> {
    const SUPPORTED: &str = "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM";
    if let Some(v) = f.get("architectures") {
        let name = v
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| {
                f.err(format!(
                    "field `architectures` must be a non-empty list of strings, got {v}"
                ))
            })?;
        return Architecture::from_class_name(name).ok_or_else(|| {
            f.err(format!(
                "field `architectures`: unknown architecture {name:?} (flare builds {SUPPORTED})"
            ))
        });
    }
    match f.str_opt("model_type")? {
        Some(t) => Architecture::from_model_type(t).ok_or_else(|| {
            f.err(format!(
                "field `model_type`: unknown model type {t:?} (flare builds llama, qwen2, mistral)"
            ))
        }),
        None => Err(f.err(
            "missing field `architectures` (and no `model_type`): cannot tell the architecture"
                .to_string(),
        )),
    }
}

/// `(rope_theta, rope_scaling)` from the 4.x fields or 5.x `rope_parameters`.
fn rope(f: &Fields<'_>) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let params = f.object("rope_parameters")?;
    let theta = match f.f64_opt("rope_theta")? {
        Some(t) => t,
        None => match &params {
            Some(p) => p.f64_opt("rope_theta")?.unwrap_or(10000.0),
            None => 10000.0,
        },
    };
    if theta <= 0.0 {
        return Err(f.err(format!("field `rope_theta` must be positive, got {theta}")));
    }
    let (scaling, field) = match f.object("rope_scaling")? {
        Some(s) => (Some(s), "rope_scaling"),
        None => (params, "rope_parameters"),
    };
    let Some(s) = scaling else {
        return Ok((theta, None));
    };
    let kind = s.str_opt("rope_type")?.or(s.str_opt("type")?);
    match kind {
        None | Some("default") => Ok((theta, None)),
        Some("llama3") => {
            let field_err = |e: Error| match e {
                Error::Io { context, source } => Error::Io {
                    context,
                    source: std::io::Error::new(
                        source.kind(),
                        format!("`{field}`: {source}"),
                    ),
                },
                other => other,
            };
            let scaling = Llama3RopeScaling {
                factor: s.f64("factor").map_err(field_err)?,
                low_freq_factor: s.f64("low_freq_factor").map_err(field_err)?,
                high_freq_factor: s.f64("high_freq_factor").map_err(field_err)?,
                original_max_position_embeddings: s
                    .usize("original_max_position_embeddings")
                    .map_err(field_err)?,
            };
            if scaling.factor <= 0.0 || scaling.high_freq_factor <= scaling.low_freq_factor {
                return Err(f.err(format!(
                    "field `{field}`: llama3 scaling needs factor > 0 and high_freq_factor > \
                     low_freq_factor, got {scaling:?}"
                )));
            }
            Ok((theta, Some(scaling)))
        }
        Some(other) => Err(f.err(format!(
            "field `{field}`: RoPE type {other:?} is not supported (only \"default\" and \"llama3\")"
        ))),
    }
}
