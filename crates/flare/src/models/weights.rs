//! [`Weights`]: the tensors of a Hugging Face model directory, memory-mapped from
//! `model.safetensors` or from the shards listed in `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::hf_json::bad_file;
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

/// The largest safetensors header accepted (the `safetensors` crate's own limit).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a safetensors header, as [`read_safetensors_header`] checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    /// The tensor's name.
    pub name: String,
    /// Its dtype as the file names it (`F32`, `BF16`, `I32`, ...).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `[begin, end)` of its bytes, relative to the end of the header.
    pub data_offsets: (u64, u64),
}

impl HeaderEntry {
    /// The number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The size in bits of one element of a safetensors dtype, `None` for a name the format does
/// not define.
pub fn safetensors_dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Reads and checks the header of the safetensors file at `path` without reading the tensors.
/// See [`parse_safetensors_header`] for what is checked; errors name the file and the tensor.
pub fn read_safetensors_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    use std::io::Read;
    let io = |e: std::io::Error| Error::Io {
        context: format!("reading safetensors file {}", path.display()),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    if file_len < 8 {
        return Err(bad_file(
            path,
            format!(
                "malformed or truncated safetensors file: {file_len} bytes, too short for a header"
            ),
        ));
    }
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    let mut prefix = len.to_vec();
    if n <= MAX_HEADER_LEN && n <= file_len - 8 {
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        prefix.extend_from_slice(&header);
    }
    parse_safetensors_header(&prefix, file_len, path)
}

/// Checks a safetensors header: `prefix` holds at least the 8-byte length and the JSON header
/// it announces, `file_len` is the length of the whole file. Checked, each with an error that
/// names `file` and (where there is one) the tensor: the header length against the file, the
/// header as a UTF-8 JSON object of `{name: {dtype, shape, data_offsets}}` (plus an optional
/// `__metadata__` of strings), every dtype name, every shape (element count without overflow,
/// a whole number of bytes), `shape × dtype size = end − begin` for every tensor, and the
/// offsets: begin <= end, no overlap and no gap between tensors, the last one ending exactly at
/// the end of the file. A header that passes is one the `safetensors` crate accepts.
pub fn parse_safetensors_header(
    prefix: &[u8],
    file_len: u64,
    file: &Path,
) -> Result<Vec<HeaderEntry>> {
    let bad = |msg: String| {
        bad_file(
            file,
            format!("malformed or truncated safetensors file: {msg}"),
        )
    };
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(bad(format!("{file_len} bytes, too short for a header")));
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {n} is larger than the limit ({MAX_HEADER_LEN} bytes)"
        )));
    }
    if n > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {n} runs past the end of the file ({file_len} bytes): truncated?"
        )));
    }
    let header = prefix
        .get(8..8 + n as usize)
        .ok_or_else(|| bad(format!("header of {n} bytes not given")))?;
    let text =
        std::str::from_utf8(header).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(bad("the header is not a JSON object".into()));
    };
    let data_len = file_len - 8 - n;
    let mut entries = Vec::with_capacity(obj.len());
    for (name, v) in &obj {
        if name == "__metadata__" {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                return Err(bad(
                    "`__metadata__` must be an object of strings".to_string()
                ));
            }
            continue;
        }
        entries.push(header_entry(name, v, &bad)?);
    }
    entries.sort_by_key(|e| e.data_offsets);
    let mut end = 0u64;
    let mut prev: Option<&str> = None;
    for e in &entries {
        let (b, _) = e.data_offsets;
        if b != end {
            let what = if b < end {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            return Err(bad(match prev {
                Some(p) => format!(
                    "tensor `{}`: data_offsets {:?} {what} tensor `{p}` (which ends at {end})",
                    e.name, e.data_offsets
                ),
                None => format!(
                    "tensor `{}`: data_offsets {:?}: the first tensor must start at 0",
                    e.name, e.data_offsets
                ),
            }));
        }
        end = e.data_offsets.1;
        prev = Some(&e.name);
    }
    if end != data_len {
        return Err(bad(match prev {
            Some(p) if end > data_len => format!(
                "tensor `{p}` ends at byte {end} of the data, past the end of the file \
                 ({data_len} data bytes): truncated?"
            ),
            Some(p) => format!(
                "the tensors end at byte {end} (tensor `{p}`) but the file has {data_len} data \
                 bytes"
            ),
            None => format!("no tensors, but {data_len} data bytes"),
        }));
    }
    Ok(entries)
}

/// One `{dtype, shape, data_offsets}` entry of a header, checked on its own.
fn header_entry(
    name: &str,
    v: &serde_json::Value,
    bad: &dyn Fn(String) -> Error,
) -> Result<HeaderEntry> {
    let t = |msg: String| bad(format!("tensor `{name}`: {msg}"));
    let Some(obj) = v.as_object() else {
        return Err(t(format!(
            "expected {{dtype, shape, data_offsets}}, got {v}"
        )));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(t(format!("unknown field `{k}`")));
    }
    let dtype = match obj.get("dtype") {
        Some(serde_json::Value::String(d)) => d.clone(),
        Some(other) => return Err(t(format!("`dtype` must be a string, got {other}"))),
        None => return Err(t("missing `dtype`".into())),
    };
    let Some(bits) = safetensors_dtype_bits(&dtype) else {
        return Err(t(format!("unknown dtype {dtype:?}")));
    };
    let shape: Vec<usize> = match obj.get("shape") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| t(format!("`shape` must be a list of sizes, got {:?}", a)))?,
        Some(other) => return Err(t(format!("`shape` must be a list, got {other}"))),
        None => return Err(t("missing `shape`".into())),
    };
    let offsets = match obj.get("data_offsets") {
        Some(serde_json::Value::Array(a)) if a.len() == 2 => (a[0].as_u64(), a[1].as_u64()),
        Some(other) => {
            return Err(t(format!(
                "`data_offsets` must be [begin, end], got {other}"
            )))
        }
        None => return Err(t("missing `data_offsets`".into())),
    };
    let (Some(b), Some(e)) = offsets else {
        return Err(t("`data_offsets` must be two non-negative integers".into()));
    };
    if e < b {
        return Err(t(format!("data_offsets [{b}, {e}]: end before begin")));
    }
    let bytes = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|n| n.checked_mul(bits))
        .filter(|nbits| nbits % 8 == 0 && usize::try_from(*nbits).is_ok())
        .map(|nbits| nbits / 8)
        .ok_or_else(|| {
            t(format!(
                "shape {shape:?} of {dtype} is not a whole, representable number of bytes"
            ))
        })?;
    if e - b != bytes {
        return Err(t(format!(
            "shape {shape:?} of {dtype} is {bytes} bytes, but data_offsets [{b}, {e}] span {}",
            e - b
        )));
    }
    Ok(HeaderEntry {
        name: name.to_string(),
        dtype,
        shape,
        data_offsets: (b, e),
    })
}

// ---- loading ----------------------------------------------------------------------------------

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
        if view.shape() != shape {
            return Err(bad_file(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        let t = view
            .load(device)
            .map_err(|e| bad_file(path, format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(dtype)?)
    }
}
