//! Merging a trained adapter into its base model and writing the result as a Hugging Face
//! model directory that transformers loads like any other (`AutoModelForCausalLM`), as PEFT's
//! `merge_and_unload().save_pretrained()` does.
//!
//! For every adapted module, `W' = W + s · B A`, computed in f32 and rounded once to the output
//! dtype (the stored dtype of `W` unless another is asked for). Every other tensor is copied
//! unchanged. The output holds `config.json` (its `torch_dtype`/`dtype` set to the output
//! dtype), `model.safetensors` (one file, metadata `{"format": "pt"}`) and the tokenizer and
//! generation files of the base directory.
//!
//! The output directory is written as one unit ([`crate::io::write_dir_atomic`]): a failure or
//! a kill leaves no partial directory, and a replaced directory is replaced whole (no file of
//! the old one stays beside the new ones). It is never the base model's or the adapter's
//! directory (or one that contains them), compared after resolving links and `..`, and an
//! existing non-empty directory is replaced only when asked to (`overwrite`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// `path` made absolute with links and `..` resolved, also when it does not exist yet: its
/// nearest existing ancestor is canonicalised and the rest appended.
fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io("reading the current directory".into()))?
            .join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return Ok(rest.iter().rev().fold(c, |p, part| p.join(part)));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            // `..` past a missing directory, or the root: nothing to resolve against.
            _ => return Ok(abs),
        }
    }
}

/// Refuses an output directory that would destroy an input, or mix with other files.
fn check_out_dir(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    overwrite: bool,
) -> Result<()> {
    let refuse = |msg: String| Err(Error::InvalidArgument { op: OP, msg });
    let out = resolved(out_dir)?;
    for (what, dir) in [("base model", model_dir), ("adapter", adapter_dir)] {
        let input = resolved(dir)?;
        if input.starts_with(&out) {
            let how = if input == out { "is" } else { "contains" };
            return refuse(format!(
                "the output directory {} {how} the {what}'s directory {}: writing there would \
                 destroy what the merge reads; choose a new directory",
                out_dir.display(),
                dir.display()
            ));
        }
    }
    match std::fs::read_dir(out_dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !names.is_empty() && !overwrite {
                names.sort();
                let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
                let more = if names.len() > 5 { ", ..." } else { "" };
                return refuse(format!(
                    "the output directory {} is not empty ({shown}{more}): choose a new \
                     directory, or replace it whole with --force",
                    out_dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if out_dir.exists() => refuse(format!(
            "the output path {} exists and is not a directory",
            out_dir.display()
        )),
        Err(e) => Err(Error::Io {
            context: format!("listing {}", out_dir.display()),
            source: e,
        }),
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `model_dir` and writes the merged
/// model directory `out_dir` as one unit (see the module docs). `dtype`: the output weights'
/// dtype (`None`: each tensor keeps its stored dtype). `overwrite`: replace an existing
/// non-empty `out_dir` whole; without it such a directory is refused. `out_dir` is never the
/// base model's or the adapter's directory, nor one that contains them. Everything is checked
/// and computed before `out_dir` is touched. Errors name the tensor or file concerned: an
/// adapter module the model does not have, shapes that do not fit, unreadable files.
pub fn merge_adapter_to_dir(
    model_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    dtype: Option<DType>,
    overwrite: bool,
) -> Result<()> {
    let (model_dir, out_dir) = (model_dir.as_ref(), out_dir.as_ref());
    check_out_dir(model_dir, adapter_dir.as_ref(), out_dir, overwrite)?;
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
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes =
        safetensors::tensor::serialize(sorted, metadata).map_err(|e| Error::InvalidArgument {
            op: OP,
            msg: format!("serialising the merged weights: {e}"),
        })?;
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
    let mut copied = Vec::new();
    for name in COPIED {
        let src = model_dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io(format!("reading {}", src.display())))?;
            copied.push((name, bytes));
        }
    }

    // Everything is read and computed: now the output, as one unit.
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    crate::io::remove_stale_of(out_dir)?;
    crate::io::write_dir_atomic(out_dir, |tmp| {
        crate::io::write_atomic(tmp.join("model.safetensors"), &bytes)?;
        crate::io::write_atomic(tmp.join("config.json"), &pretty)?;
        for (name, bytes) in &copied {
            crate::io::write_atomic(tmp.join(name), bytes)?;
        }
        Ok(())
    })
}
