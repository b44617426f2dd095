//! Helpers for reading the JSON files of Hugging Face directories (`config.json`,
//! `generation_config.json`, `adapter_config.json`, the tokenizer's files) and the files beside
//! them: [`bad_file`], the error about a file's contents, and [`Fields`], typed access to the
//! fields of a JSON object with errors that name the file and the field.
//!
//! It sits below every folder that reads such files (`text`, `models`, `lora`, `generate`), so
//! none of them imports another for it.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// An error about the contents of `file`: [`Error::Io`] of kind `InvalidData` whose context is
/// the file's path.
pub(crate) fn bad_file(file: &Path, msg: impl Into<String>) -> Error {
    Error::Io {
        context: file.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into()),
    }
}

/// Field access on a JSON object read from `file`, with errors naming the file and the field.
/// A field that is `null` counts as absent.
pub(crate) struct Fields<'a> {
    /// The object.
    pub obj: &'a Map<String, Value>,
    /// The file it was read from (for errors).
    pub file: &'a Path,
}

impl Fields<'_> {
    /// An error about the file whose message is `msg`.
    pub fn err(&self, msg: String) -> Error {
        bad_file(self.file, msg)
    }

    /// An error about `field`: "field `field`: msg".
    pub fn field_err(&self, field: &str, msg: String) -> Error {
        bad_file(self.file, format!("field `{field}`: {msg}"))
    }

    /// A field that is present and not `null`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer, if present.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(format!(
                    "field `{key}` must be a non-negative integer, got {v}"
                ))
            }),
        }
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    /// A number, if present.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a number, got {v}"))),
        }
    }

    /// A required number.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    /// A finite number as f32, if present.
    pub fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.f64_opt(key)? {
            None => Ok(None),
            Some(x) if x.is_finite() => Ok(Some(x as f32)),
            Some(x) => Err(self.err(format!("field `{key}` must be a finite number, got {x}"))),
        }
    }

    /// A boolean, if present.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a boolean, got {v}"))),
        }
    }

    /// A boolean, `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.bool_opt(key)?.unwrap_or(default))
    }

    /// A string, if present.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a string, got {v}"))),
        }
    }

    /// A nested object, if present.
    pub fn object(&self, key: &str) -> Result<Option<Fields<'_>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields {
                obj,
                file: self.file,
            })),
            Some(v) => Err(self.err(format!("field `{key}` must be an object, got {v}"))),
        }
    }

    /// A token id (a u32), if present.
    pub fn id_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => self.one_id(key, v).map(Some),
        }
    }

    fn one_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(format!("field `{key}` must be a token id, got {v}")))
    }

    /// One token id or a list of them; empty when absent.
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(list)) => list.iter().map(|v| self.one_id(key, v)).collect(),
            Some(v) => Ok(vec![self.one_id(key, v)?]),
        }
    }

    /// One non-empty string or a list of them; empty when absent.
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let one = |v: &Value| match v {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(self.err(format!("field `{key}` must be a non-empty string, got {v}"))),
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(list)) => list.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_fields_and_errors_name_file_and_field() {
        let v: Value = serde_json::json!({
            "n": 3, "x": 0.5, "b": true, "s": "hi", "null": null, "ids": [1, 2], "id": 7,
            "neg": -1, "words": "stop", "o": {"k": 1}
        });
        let f = Fields {
            obj: v.as_object().unwrap(),
            file: Path::new("dir/config.json"),
        };
        assert_eq!(f.usize("n").unwrap(), 3);
        assert_eq!(f.usize_opt("null").unwrap(), None);
        assert_eq!(f.f32_opt("x").unwrap(), Some(0.5));
        assert!(f.bool_or("missing", true).unwrap());
        assert_eq!(f.bool_opt("b").unwrap(), Some(true));
        assert_eq!(f.str_opt("s").unwrap(), Some("hi"));
        assert_eq!(f.ids("ids").unwrap(), vec![1, 2]);
        assert_eq!(f.ids("id").unwrap(), vec![7]);
        assert_eq!(f.id_opt("id").unwrap(), Some(7));
        assert_eq!(f.strings("words").unwrap(), vec!["stop".to_string()]);
        assert_eq!(f.object("o").unwrap().unwrap().usize("k").unwrap(), 1);
        let e = f.usize("missing").unwrap_err().to_string();
        assert!(
            e.contains("dir/config.json") && e.contains("missing field `missing`"),
            "{e}"
        );
        let e = f.usize("neg").unwrap_err().to_string();
        assert!(
            e.contains("field `neg` must be a non-negative integer"),
            "{e}"
        );
        let e = f.id_opt("s").unwrap_err().to_string();
        assert!(e.contains("field `s` must be a token id"), "{e}");
        let e = f.field_err("x", "must be > 1".into()).to_string();
        assert!(e.contains("field `x`: must be > 1"), "{e}");
    }
}
