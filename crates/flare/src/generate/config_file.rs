//! [`HfGenerationConfig`]: the `generation_config.json` of a Hugging Face model directory,
//! the defaults transformers' `model.generate` takes from it (EOS ids, sampling settings,
//! length), applied to a [`GenerationConfig`] with [`HfGenerationConfig::apply`].

use std::path::Path;

use serde_json::Value;

use super::GenerationConfig;
use crate::hf_json::{bad_file, Fields};
use crate::{Error, Result};

const FILE: &str = "generation_config.json";

/// transformers' global defaults for the sampling settings a file leaves out.
const HF_TOP_K: usize = 50;

/// The fields of a `generation_config.json` that flare uses; `None` where the file does not
/// set them (or sets them to `null`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HfGenerationConfig {
    /// `eos_token_id`: one id or a list; empty when absent.
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `do_sample`.
    pub do_sample: Option<bool>,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
    /// `max_length`: prompt plus new tokens.
    pub max_length: Option<usize>,
    /// `stop_strings`: one string or a list; empty when absent.
    pub stop_strings: Vec<String>,
}

impl HfGenerationConfig {
    /// Reads `generation_config.json` from a model directory; `Ok(None)` when there is none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        Self::from_file(path).map(Some)
    }

    /// Reads a `generation_config.json` file. Errors name the file (and the field): unreadable,
    /// malformed JSON, not an object, a field of the wrong type or out of range (a negative
    /// id, a non-positive temperature, `top_p` outside `(0, 1]`...).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            context: format!("reading generation config {}", path.display()),
            source: e,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `generation_config.json`; `file` is the name errors give it.
    pub fn from_json_str(text: &str, file: impl AsRef<Path>) -> Result<Self> {
        let file = file.as_ref();
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad_file(file, format!("malformed JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(bad_file(file, "expected a JSON object"));
        };
        let f = Fields { obj, file };
        let cfg = HfGenerationConfig {
            eos_token_ids: f.ids("eos_token_id")?,
            bos_token_id: f.id_opt("bos_token_id")?,
            pad_token_id: f.id_opt("pad_token_id")?,
            do_sample: f.bool_opt("do_sample")?,
            temperature: f.f32_opt("temperature")?,
            top_k: f.usize_opt("top_k")?,
            top_p: f.f32_opt("top_p")?,
            min_p: f.f32_opt("min_p")?,
            repetition_penalty: f.f32_opt("repetition_penalty")?,
            max_new_tokens: f.usize_opt("max_new_tokens")?,
            max_length: f.usize_opt("max_length")?,
            stop_strings: f.strings("stop_strings")?,
        };
        if let Some(t) = cfg.temperature {
            if t <= 0.0 {
                return Err(f.field_err("temperature", format!("must be > 0, got {t}")));
            }
        }
        if let Some(p) = cfg.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(f.field_err("top_p", format!("must be in (0, 1], got {p}")));
            }
        }
        if let Some(p) = cfg.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(f.field_err("min_p", format!("must be in [0, 1], got {p}")));
            }
        }
        if let Some(p) = cfg.repetition_penalty {
            if p <= 0.0 {
                return Err(f.field_err("repetition_penalty", format!("must be > 0, got {p}")));
            }
        }
        Ok(cfg)
    }

    /// The number of new tokens the file allows after a prompt of `prompt_len` tokens:
    /// `max_new_tokens`, else `max_length - prompt_len` (0 when the prompt is that long
    /// already), else `None`.
    pub fn max_new_tokens_for(&self, prompt_len: usize) -> Option<usize> {
        self.max_new_tokens
            .or_else(|| self.max_length.map(|m| m.saturating_sub(prompt_len)))
    }

    /// Sets `config` to what transformers' `model.generate` would use with this file and no
    /// other arguments: the EOS ids (when the file has some), the stop strings (when it has
    /// some), the length (when the file sets one, see
    /// [`max_new_tokens_for`](Self::max_new_tokens_for)), and every sampling setting, taking
    /// transformers' global default for those the file leaves out (greedy, temperature 1,
    /// top-k 50, top-p 1, no min-p, no repetition penalty). The seed is left alone.
    pub fn apply(&self, config: &mut GenerationConfig, prompt_len: usize) {
        if !self.eos_token_ids.is_empty() {
            config.eos_token_ids = self.eos_token_ids.clone();
        }
        if !self.stop_strings.is_empty() {
            config.stop_strings = self.stop_strings.clone();
        }
        if let Some(n) = self.max_new_tokens_for(prompt_len) {
            config.max_new_tokens = n;
        }
        let s = &mut config.sampling;
        s.do_sample = self.do_sample.unwrap_or(false);
        s.temperature = self.temperature.unwrap_or(1.0);
        s.top_k = self.top_k.unwrap_or(HF_TOP_K);
        s.top_p = self.top_p.unwrap_or(1.0);
        s.min_p = self.min_p.unwrap_or(0.0);
        s.repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
    }
}
