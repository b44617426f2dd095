//! Merging a trained adapter into its base model and writing the result as a Hugging Face
//! model directory that transformers loads like any other (`AutoModelForCausalLM`), as PEFT's
//! `merge_and_unload().save_pretrained()` does.
//!
//! For every adapted module, `W' = W + s · B A`, computed in f32 and rounded once to the output
//! dtype (the stored dtype of `W` unless another is asked for). Every other tensor is copied
//! unchanged (converted when an output dtype is asked for). The output holds `config.json` (its
//! `torch_dtype`/`dtype` set to the output dtype), the weights laid out as the base model's
//! (`model.safetensors`, or the same shards with a new `model.safetensors.index.json`;
//! metadata `{"format": "pt"}`), and the tokenizer and generation files of the base directory.
//! The weights are read as [`Weights::from_dir`] reads them (the index names the shards: other
//! `.safetensors` files in the directory, such as Mistral's `consolidated.safetensors`, are not
//! part of the model) and written one file at a time: at most one shard's merged tensors are
//! in memory, the untouched ones are copied from the mapped file, so merging a 7-8B model
//! needs about one shard's worth of memory, not the model's twice over.
//!
//! The output directory is written as one unit ([`crate::io::write_dir_atomic`]): a failure or
//! a kill leaves no partial directory, and a replaced directory is replaced whole (no file of
//! the old one stays beside the new ones). It is never the base model's or the adapter's
//! directory (or one that contains them), compared after resolving links and `..`, and an
//! existing non-empty directory is replaced only when asked to (`overwrite`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::hf_json::bad_file;
use crate::lora::load_adapter;
use crate::models::weights::{Weights, INDEX_FILE, WEIGHTS_FILE};
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

/// One weights file of the merged model, written: what [`merge_adapter_to_dir_with`] reports
/// after each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeProgress {
    /// The file's name in the output directory (the base model's name for it).
    pub file: String,
    /// Its position among the weights files, from 1.
    pub index: usize,
    /// How many weights files the model has.
    pub files: usize,
    /// The tensors written to it.
    pub tensors: usize,
    /// How many of them are adapted weights, merged.
    pub merged: usize,
    /// The bytes of tensor data written to it.
    pub bytes: u64,
}

/// A tensor of an output file: as stored in the base model (the mapped bytes, not copied), or
/// computed (merged, or converted to the output dtype).
enum Out<'a> {
    Stored(safetensors::tensor::TensorView<'a>),
    New {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
}

impl safetensors::View for Out<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Out::Stored(v) => v.dtype(),
            Out::New { dtype, .. } => *dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Out::Stored(v) => v.shape(),
            Out::New { shape, .. } => shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Out::Stored(v) => std::borrow::Cow::Borrowed(v.data()),
            Out::New { bytes, .. } => std::borrow::Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Out::Stored(v) => v.data().len(),
            Out::New { bytes, .. } => bytes.len(),
        }
    }
}

/// A float tensor of the CPU as an [`Out`]: its elements' little-endian bytes.
fn computed(t: &Tensor) -> Result<Out<'static>> {
    fn bytes<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        le: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        Ok(t.flatten_all()?
            .to_vec1::<T>()?
            .into_iter()
            .flat_map(le)
            .collect())
    }
    let (dtype, bytes) = match t.dtype() {
        DType::BF16 => (safetensors::Dtype::BF16, bytes(t, half::bf16::to_le_bytes)?),
        DType::F16 => (safetensors::Dtype::F16, bytes(t, half::f16::to_le_bytes)?),
        DType::F32 => (safetensors::Dtype::F32, bytes(t, f32::to_le_bytes)?),
        DType::F64 => (safetensors::Dtype::F64, bytes(t, f64::to_le_bytes)?),
        dt => {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("internal error: a merged tensor of dtype {dt:?}"),
            })
        }
    };
    Ok(Out::New {
        dtype,
        shape: t.dims().to_vec(),
        bytes,
    })
}

/// The candle dtype of a stored float dtype a weight may have (`None`: another dtype, kept
/// as stored).
fn float_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `model_dir` and writes the merged
/// model directory `out_dir` as one unit (see the module docs). `dtype`: the output weights'
/// dtype (`None`: each tensor keeps its stored dtype). `overwrite`: replace an existing
/// non-empty `out_dir` whole; without it such a directory is refused. `out_dir` is never the
/// base model's or the adapter's directory, nor one that contains them. Everything is checked
/// before `out_dir` is touched, and a failure part-way leaves it as it was. Errors name the
/// tensor or file concerned: an adapter module the model does not have, shapes that do not
/// fit, unreadable files. [`merge_adapter_to_dir_with`] also reports each file written.
pub fn merge_adapter_to_dir(
    model_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    dtype: Option<DType>,
    overwrite: bool,
) -> Result<()> {
    merge_adapter_to_dir_with(model_dir, adapter_dir, out_dir, dtype, overwrite, |_| {})
}

/// [`merge_adapter_to_dir`], calling `progress` after each weights file is written (one per
/// shard of a sharded model): a merge of a 7-8B model writes gigabytes.
pub fn merge_adapter_to_dir_with(
    model_dir: impl AsRef<Path>,
    adapter_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    dtype: Option<DType>,
    overwrite: bool,
    mut progress: impl FnMut(&MergeProgress),
) -> Result<()> {
    let (model_dir, out_dir) = (model_dir.as_ref(), out_dir.as_ref());
    check_out_dir(model_dir, adapter_dir.as_ref(), out_dir, overwrite)?;
    let cpu = Device::Cpu;
    let adapter = load_adapter(adapter_dir.as_ref(), &cpu)?;
    let s = adapter.scaling();
    let weights = Weights::from_dir(model_dir)?;
    let files = weights.files();
    let sharded = !model_dir.join(WEIGHTS_FILE).is_file();
    let mut names = Vec::with_capacity(files.len());
    for (path, _) in &files {
        // The index names each shard by its file name in the model directory; one that names
        // another place is refused (the output files bear the same names).
        match path.file_name() {
            Some(name) if path.parent() == Some(model_dir) => {
                names.push(name.to_string_lossy().into_owned())
            }
            _ => {
                return Err(bad_file(
                    &model_dir.join(INDEX_FILE),
                    format!(
                        "shard {} is not a file directly in the model directory",
                        path.display()
                    ),
                ))
            }
        }
    }

    adapter.check_against(|path| match weights.shape(&format!("{path}.weight")) {
        Some(d) if d.len() == 2 => Some((d[0], d[1])),
        _ => None,
    })?;
    // Each adapted weight must be stored as a float a weight can be: checked here, before
    // anything is written.
    for path in adapter.tensors.keys() {
        weights.weight_view(&format!("{path}.weight"), None)?;
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
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

    // Everything is checked: now the output, as one unit, one weights file at a time (at most
    // one file's computed tensors in memory; the rest are the base model's mapped bytes).
    if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    crate::io::remove_stale_of(out_dir)?;
    crate::io::write_dir_atomic(out_dir, |tmp| {
        let cfg_out = tmp.join("config.json");
        crate::io::write_atomic(&cfg_out, &pretty)?;
        // The safetensors writer creates its files private to their owner (0600 on Unix);
        // the weights get the mode every other file of the directory gets instead.
        let mode = std::fs::metadata(&cfg_out)
            .map_err(io(format!("reading {}", cfg_out.display())))?
            .permissions();
        let mut weight_map = serde_json::Map::new();
        let mut total: u64 = 0;
        for (i, ((_, tensors), file)) in files.iter().zip(&names).enumerate() {
            let mut out: Vec<(&str, Out<'_>)> = Vec::with_capacity(tensors.len());
            let mut merged = 0;
            for &name in tensors {
                let (_, view) = weights.stored(name)?;
                let lora = name
                    .strip_suffix(".weight")
                    .and_then(|p| adapter.tensors.get(p));
                let stored_dt = float_dtype(view.dtype());
                let t = match (lora, stored_dt) {
                    (Some((a, b)), Some(sdt)) => {
                        let w = weights.get(name, view.shape(), DType::F32, &cpu)?;
                        let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
                        merged += 1;
                        computed(&(w + (delta * s)?)?.to_dtype(dtype.unwrap_or(sdt))?)?
                    }
                    (None, Some(sdt)) if dtype.is_some_and(|d| d != sdt) => {
                        computed(&weights.get(name, view.shape(), dtype.unwrap_or(sdt), &cpu)?)?
                    }
                    _ => Out::Stored(view),
                };
                out.push((name, t));
            }
            let bytes: u64 = out
                .iter()
                .map(|(_, t)| safetensors::View::data_len(t) as u64)
                .sum();
            let count = out.len();
            for (name, _) in &out {
                weight_map.insert((*name).to_string(), file.clone().into());
            }
            let dest = tmp.join(file);
            safetensors::tensor::serialize_to_file(out, metadata.clone(), &dest).map_err(|e| {
                Error::Io {
                    context: format!("writing {}", dest.display()),
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            std::fs::set_permissions(&dest, mode.clone())
                .map_err(io(format!("setting the permissions of {}", dest.display())))?;
            total += bytes;
            progress(&MergeProgress {
                file: file.clone(),
                index: i + 1,
                files: files.len(),
                tensors: count,
                merged,
                bytes,
            });
        }
        if sharded {
            let index = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            let text = serde_json::to_vec_pretty(&index).map_err(|e| Error::InvalidArgument {
                op: OP,
                msg: format!("serialising {INDEX_FILE}: {e}"),
            })?;
            crate::io::write_atomic(tmp.join(INDEX_FILE), &text)?;
        }
        for (name, bytes) in &copied {
            crate::io::write_atomic(tmp.join(name), bytes)?;
        }
        Ok(())
    })
}
