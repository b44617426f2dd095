//! Putting a PEFT LoRA adapter ([`crate::lora::Adapter`], read by
//! [`crate::lora::peft::load_adapter`]) into a [`Transformer`]: every module the adapter adapts
//! gets it under a name, with PEFT's weights, and makes it active. The module paths are PEFT's
//! (`model.layers.3.self_attn.q_proj`), so an adapter saved by PEFT for the same Hugging Face
//! model fits.

use std::path::Path;

use crate::lora::peft::load_adapter;
use crate::lora::Adapter;
use crate::{Error, Result};

use super::Transformer;

/// Adds `adapter` to `model` under `name` and activates it in every module it adapts; the other
/// modules are left as they are. Returns the number of modules adapted.
///
/// Checked first, so that a failure leaves the model untouched: the adapter on its own
/// ([`Adapter::validate`]), and against the model ([`Adapter::check_against`]: every module
/// exists, `A` is `[r, in]` and `B` `[out, r]`; the error names the tensor), and `name` is not
/// taken in any of those modules.
pub fn apply_adapter(model: &mut Transformer, adapter: &Adapter, name: &str) -> Result<usize> {
    adapter.validate()?;
    let config = adapter.config.lora_config()?;
    {
        let modules = model.lora_modules();
        adapter.check_against(|path| {
            modules
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, l)| (l.out_features(), l.in_features()))
        })?;
        if let Some((path, _)) = modules
            .iter()
            .find(|(p, l)| adapter.tensors.contains_key(p) && l.adapter(name).is_some())
        {
            return Err(Error::InvalidArgument {
                op: "apply_adapter",
                msg: format!("module `{path}` already has an adapter named {name:?}"),
            });
        }
    }
    let mut n = 0;
    for (path, layer) in model.lora_modules_mut() {
        let Some((a, b)) = adapter.tensors.get(&path) else {
            continue;
        };
        layer.add_adapter_with_weights(name, &config, a, b)?;
        layer.set_active(Some(name))?;
        n += 1;
    }
    Ok(n)
}

/// Reads the PEFT adapter in `dir` onto the model's device ([`load_adapter`]) and applies it
/// under `name` ([`apply_adapter`]). Returns the number of modules adapted.
///
/// ```no_run
/// # use candle_core::{DType, Device};
/// use flare::models::{load_peft_adapter, Transformer};
/// let mut model = Transformer::from_dir("qwen2-0.5b", DType::BF16, &Device::Cpu)?;
/// let n = load_peft_adapter(&mut model, "my-adapter", "default")?;
/// println!("{n} modules adapted");
/// # Ok::<(), flare::Error>(())
/// ```
pub fn load_peft_adapter(
    model: &mut Transformer,
    dir: impl AsRef<Path>,
    name: &str,
) -> Result<usize> {
    let device = model.device().clone();
    let adapter = load_adapter(dir, &device)?;
    apply_adapter(model, &adapter, name)
}
