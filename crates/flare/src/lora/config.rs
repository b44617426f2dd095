//! LoRA hyper-parameters, validated, with PEFT's meaning for every field.

use crate::{Error, Result};

/// The projections LoRA can target, by the module names PEFT uses for Llama/Qwen2/Mistral.
pub const KNOWN_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA hyper-parameters: `W' = W + s · B A` with `A: [r, in]`, `B: [out, r]` and scaling
/// `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update (`r` in PEFT), >= 1.
    pub r: usize,
    /// Scaling numerator (`lora_alpha` in PEFT), > 0.
    pub alpha: f64,
    /// Dropout probability on the input of the low-rank path (`lora_dropout`), in [0, 1).
    pub dropout: f32,
    /// Use rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r` (`use_rslora`).
    pub use_rslora: bool,
    /// Module names (suffixes of module paths, as in PEFT) that receive an adapter.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: KNOWN_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidArgument {
                op: "LoraConfig",
                msg,
            })
        };
        if self.r == 0 {
            return bad("r must be >= 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha must be finite and > 0, got {}", self.alpha));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.target_modules.is_empty() {
            return bad("target_modules is empty".into());
        }
        if let Some(t) = self.target_modules.iter().find(|t| t.trim().is_empty()) {
            return bad(format!("target_modules holds an empty name: {t:?}"));
        }
        Ok(())
    }

    /// The scaling `s` applied to the low-rank product: `alpha / r`, or `alpha / sqrt(r)` with
    /// rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is a target: its
    /// last component equals a target name, or the whole path ends with a dotted target.
    pub fn targets(&self, path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_and_validation() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
        assert!(c.validate().is_ok());
        assert!(LoraConfig {
            r: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(LoraConfig {
            alpha: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(LoraConfig {
            dropout: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(LoraConfig {
            target_modules: vec![],
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(c.targets("model.layers.3.self_attn.q_proj"));
        assert!(!c.targets("model.layers.3.self_attn.q_proj_extra"));
    }
}
