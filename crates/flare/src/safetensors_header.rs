//! The safetensors header check every loader of a user's `.safetensors` file runs first (model
//! weights, PEFT adapters, optimizer state, `flare info`): the 8-byte length, the JSON, the dtype
//! names, shapes against offsets, overlaps, gaps and the end of the file, with errors that name
//! the file and the tensor. Below `models`, `lora` and `train`, which all use it.

use std::path::Path;

use crate::hf_json::bad_file;
use crate::{Error, Result};

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
