//! Merging a trained adapter into its base model and writing the result as a Hugging Face
//! model directory that transformers loads like any other (`AutoModelForCausalLM`), as PEFT's
//! `merge_and_unload().save_pretrained()` does.
//!
//! For every adapted module, `W' = W + s · B A`, computed in f32 and rounded once to the output
//! dtype (the stored dtype of `W` unless another is asked for). Every other tensor is copied
//! unchanged. The output holds `config.json` (its `torch_dtype`/`dtype` set to the output
//! dtype), `model.safetensors` (one file, metadata `{"format": "pt"}`) and the tokenizer and
//! generation files of the base directory, each written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::lora::load_adapter;
use crate::{Error, Result};

const OP: &str = "merge";

/// Files copied unchanged from the base directory when present.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The safetensors files of a model directory: `model.safetensors`, or every
/// `*.safetensors` file (the shards).
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("{} holds no safetensors weights", dir.display()),
        });
    }
    Ok(files)
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `model_dir` and writes the merged
/// model directory `out_dir` (created if needed). `dtype`: the output weights' dtype (`None`:
/// each tensor keeps its stored dtype). Errors name the tensor or file concerned: an adapter
/// module the model does not have, shapes that do not fit, unreadable files.
pub fn merge_adapter_to_dir(
    model_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    dtype: Option<DType>,
) -> Result<()> {
    let (model_dir, out_dir) = (model_dir.as_ref(), out_dir.as_ref());
    let cpu = Device::Cpu;
    let adapter = load_adapter(adapter_dir.as_ref(), &cpu)?;
    let s = adapter.scaling();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in weight_files(model_dir)? {
        tensors.extend(candle_core::safetensors::load(&f, &cpu)?);
    }
    adapter.check_against(|path| {
        tensors
            .get(&format!("{path}.weight"))
            .and_then(|w| w.dims2().ok())
    })?;
    for (path, (a, b)) in &adapter.tensors {
        let key = format!("{path}.weight");
        let w = &tensors[&key];
        let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
        let merged = (w.to_dtype(DType::F32)? + (delta * s)?)?;
        let out_dt = dtype.unwrap_or(w.dtype());
        tensors.insert(key, merged.to_dtype(out_dt)?);
    }
    if let Some(dt) = dtype {
        for t in tensors.values_mut() {
            if t.dtype().is_float() && t.dtype() != dt {
                *t = t.to_dtype(dt)?;
            }
        }
    }
    std::fs::create_dir_all(out_dir).map_err(io(format!("creating {}", out_dir.display())))?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes =
        safetensors::tensor::serialize(sorted, metadata).map_err(|e| Error::InvalidArgument {
            op: OP,
            msg: format!("serialising the merged weights: {e}"),
        })?;
    crate::io::write_atomic(out_dir.join("model.safetensors"), &bytes)?;

    let cfg_path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(io(format!("reading {}", cfg_path.display())))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Io {
        context: cfg_path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    if let (Some(dt), Some(obj)) = (dtype, cfg.as_object_mut()) {
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), dtype_name(dt).into());
            }
        }
    }
    let pretty = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::InvalidArgument {
        op: OP,
        msg: format!("serialising config.json: {e}"),
    })?;
    crate::io::write_atomic(out_dir.join("config.json"), &pretty)?;
    for name in COPIED {
        let src = model_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io(format!("reading {}", src.display())))?;
            crate::io::write_atomic(out_dir.join(name), &bytes)?;
        }
    }
    Ok(())
}
