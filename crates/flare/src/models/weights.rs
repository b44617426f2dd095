//! [`Weights`]: the tensors of a Hugging Face model directory, memory-mapped from
//! `model.safetensors` or from the shards listed in `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::hf_json::bad_file;
pub use crate::safetensors_header::{
    parse_safetensors_header, read_safetensors_header, safetensors_dtype_bits, HeaderEntry,
};
use crate::{Error, Result};

/// The weights file of an unsharded model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index file of a sharded model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The memory-mapped safetensors files of a model, with the file each tensor lives in.
///
/// Tensors are read on demand by [`get`](Self::get), converted to the dtype asked for.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

// ---- header validation ------------------------------------------------------------------------

/// The dtypes a model weight may be stored in.
const WEIGHT_DTYPES: [&str; 4] = ["F32", "F16", "BF16", "F64"];

/// Memory-maps one safetensors file and reads its header, after checking the header with
/// [`read_safetensors_header`] (which names the tensor at fault).
fn open_file(path: &Path) -> Result<MmapedSafetensors> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::Io {
            context: format!("opening model weights {}", path.display()),
            source: e,
        });
    }
    read_safetensors_header(path)?;
    // SAFETY: the file is mapped read-only; like every memory-mapped reader, flare assumes the
    // file is not modified while the model is being loaded.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
        // The path is in our message already.
        let e = match e {
            candle_core::Error::WithPath { inner, .. } => *inner,
            e => e,
        };
        bad_file(
            path,
            format!("malformed or truncated safetensors file: {e}"),
        )
    })
}

impl Weights {
    /// Opens the weights of a model directory: `model.safetensors` if present, otherwise the
    /// shards named by `model.safetensors.index.json`.
    ///
    /// Errors name the file: neither file present, a malformed index, a missing shard, a
    /// malformed or truncated safetensors file (its header does not describe its contents).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join(WEIGHTS_FILE);
        if single.exists() {
            return Self::from_files(&[single]);
        }
        let index = dir.join(INDEX_FILE);
        if !index.exists() {
            return Err(Error::Io {
                context: format!(
                    "model directory {}: neither {WEIGHTS_FILE} nor {INDEX_FILE}",
                    dir.display()
                ),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no weights"),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::Io {
            context: format!("reading {}", index.display()),
            source: e,
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad_file(&index, format!("malformed JSON: {e}")))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad_file(&index, "missing field `weight_map` (an object)"))?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad_file(&index, format!("`weight_map.{name}` must be a file name"))
            })?;
            shards.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let weights = Self::from_files(&paths)?;
        // Every tensor the index names must be in the shard it names.
        for (name, file) in map {
            let path = dir.join(file.as_str().unwrap_or_default());
            match weights.index.get(name) {
                Some(&i) if weights.files[i].0 == path => {}
                _ => {
                    return Err(bad_file(
                        &path,
                        format!("tensor `{name}` (listed in {INDEX_FILE}) is not in this file"),
                    ))
                }
            }
        }
        Ok(weights)
    }

    /// Opens the given safetensors files (the shards of one model). A tensor present in two
    /// files is an error.
    pub fn from_files(paths: &[impl AsRef<Path>]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let path = p.as_ref().to_path_buf();
            let st = open_file(&path)?;
            for (name, _) in st.tensors() {
                if let Some(&j) = index.get(&name) {
                    let other: &(PathBuf, MmapedSafetensors) = &files[j];
                    return Err(bad_file(
                        &path,
                        format!("tensor `{name}` is also in {}", other.0.display()),
                    ));
                }
                index.insert(name, i);
            }
            files.push((path, st));
        }
        Ok(Weights { files, index })
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads tensor `name`, checks that its shape is `shape`, and returns it on `device` in
    /// `dtype`. Errors name the file and the tensor: a missing tensor, a tensor stored in a
    /// dtype that is not a float a weight can be (`I32`, `U8`, `F8_E4M3`...: only F32, F16,
    /// BF16 and F64 are accepted), a wrong shape, data that cannot be read.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (path, view) = self.weight_view(name, Some(shape))?;
        let t = view
            .load(device)
            .map_err(|e| bad_file(path, format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(dtype)?)
    }

    /// Tensor `name` as [`stored`](Self::stored), after the checks [`get`](Self::get) makes
    /// before it reads: stored as a float a weight can be, and of `shape` when given.
    pub(crate) fn weight_view(
        &self,
        name: &str,
        shape: Option<&[usize]>,
    ) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let (path, view) = self.stored(name)?;
        let stored = format!("{:?}", view.dtype());
        if !WEIGHT_DTYPES.contains(&stored.as_str()) {
            return Err(bad_file(
                path,
                format!(
                    "tensor `{name}` is stored as {stored}; a model weight must be one of \
                     {WEIGHT_DTYPES:?}"
                ),
            ));
        }
        if let Some(shape) = shape.filter(|&s| view.shape() != s) {
            return Err(bad_file(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        Ok((path, view))
    }

    /// The shape tensor `name` is stored with, or `None` if there is no such tensor. Reads
    /// only the header.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(name)?;
        self.files[i].1.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// The files in the order they were opened, each with the names of its tensors, sorted.
    pub fn files(&self) -> Vec<(&Path, Vec<&str>)> {
        let mut per: Vec<Vec<&str>> = vec![Vec::new(); self.files.len()];
        for (name, &i) in &self.index {
            per[i].push(name);
        }
        self.files
            .iter()
            .zip(per)
            .map(|((p, _), mut names)| {
                names.sort_unstable();
                (p.as_path(), names)
            })
            .collect()
    }

    /// Tensor `name` as stored (dtype, shape and the bytes of the mapped file, nothing
    /// copied), with the file it is in. A missing tensor's error names every file.
    pub(crate) fn stored(
        &self,
        name: &str,
    ) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let Some(&i) = self.index.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            return Err(bad_file(
                Path::new(&files.join(", ")),
                format!("missing tensor `{name}`"),
            ));
        };
        let (path, st) = &self.files[i];
        let view = st
            .get(name)
            .map_err(|e| bad_file(path, format!("tensor `{name}`: {e}")))?;
        Ok((path, view))
    }
}
