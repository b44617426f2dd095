//! What a training run is: the fingerprints of its inputs ([`RunIdentity`]) and the settings
//! that change its result. Every checkpoint records both (in `trainer_state.json`, beside the
//! step), and [`super::Trainer::resume`] refuses a checkpoint whose run differs from the one
//! being started, listing every field that differs ([`differences`]).
//!
//! The fingerprints are FNV-1a 64-bit hashes (stable across platforms and Rust versions, like
//! the token cache's key): enough to tell two inputs apart by accident, not a defence against
//! someone forging a collision.
//!
//! - data, eval data: every byte of the file (a moved or renamed file with the same bytes is
//!   the same data; an edited one is not);
//! - model: `config.json`, the weights index if any, and for each `*.safetensors` file its size,
//!   its whole header (tensor names, dtypes, shapes, offsets) and 16 blocks of 64 KiB spread
//!   over its data (all of it when smaller), so that fingerprinting a 15 GB model takes
//!   milliseconds, not a full read, and any realistic other model (another fine-tune of the
//!   same architecture) still differs;
//! - tokenizer: [`super::Encoder::fingerprint`] (vocabulary, merges, chat template, EOS).
//!
//! What does not change the result is not compared: paths, the output directory, the device,
//! eval and checkpoint frequency, `save_total_limit`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::Schedule;
use crate::{Error, Result};

/// The fingerprints of a run's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The base model directory's config and weights.
    pub model: String,
    /// The tokenizer ([`super::Encoder::fingerprint`]).
    pub tokenizer: String,
    /// The training data file.
    pub data: String,
    /// The eval data file, when there is one.
    pub eval_data: Option<String>,
}

impl RunIdentity {
    /// Fingerprints the model directory and data files of `config`, and takes the tokenizer's
    /// fingerprint as given. Errors name the file that cannot be read.
    pub fn compute(config: &TrainConfig, tokenizer_fingerprint: String) -> Result<Self> {
        Ok(RunIdentity {
            model: model_fingerprint(&config.model)?,
            tokenizer: tokenizer_fingerprint,
            data: file_fingerprint(&config.data)?,
            eval_data: config
                .eval_data
                .as_deref()
                .map(file_fingerprint)
                .transpose()?,
        })
    }
}

/// One setting or input on which a run and a checkpoint disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The field (a [`TrainConfig`] key, or `model`/`tokenizer`/`data`/`eval_data`).
    pub field: &'static str,
    /// Its value in the run being started.
    pub this_run: String,
    /// Its value in the checkpoint.
    pub checkpoint: String,
    /// Why it matters, when that is not obvious.
    pub note: Option<&'static str>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}`: {} here, {} in the checkpoint",
            self.field, self.this_run, self.checkpoint
        )?;
        if let Some(n) = self.note {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

/// Why the run's length is part of its identity (item: resume with another `max_steps`).
const LENGTH_NOTE: &str = "the learning-rate schedule spans the whole run, so a decaying \
     schedule cannot be lengthened or shortened on resume without a jump in the learning \
     rate; only `schedule = constant` runs can be extended";

/// Every field on which the run (`config`, `identity`) differs from a checkpoint's
/// (`saved`, `saved_identity`), in a fixed order; empty when the checkpoint belongs to this
/// run. The run's length (`max_steps`, or `epochs` without it) may differ under the constant
/// schedule, whose learning rate does not depend on it.
pub fn differences(
    config: &TrainConfig,
    identity: &RunIdentity,
    saved: &TrainConfig,
    saved_identity: &RunIdentity,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut check = |field: &'static str, now: String, then: String, note: Option<&'static str>| {
        if now != then {
            out.push(Difference {
                field,
                this_run: now,
                checkpoint: then,
                note,
            });
        }
    };
    let (a, b) = (identity, saved_identity);
    check("model", a.model.clone(), b.model.clone(), None);
    check("tokenizer", a.tokenizer.clone(), b.tokenizer.clone(), None);
    check("data", a.data.clone(), b.data.clone(), None);
    let eval = |e: &Option<String>| e.clone().unwrap_or_else(|| "none".into());
    check("eval_data", eval(&a.eval_data), eval(&b.eval_data), None);
    let (a, b) = (config, saved);
    macro_rules! fields {
        ($($f:ident),*) => {
            $( check(stringify!($f), format!("{:?}", a.$f), format!("{:?}", b.$f), None); )*
        };
    }
    fields!(
        lora_r,
        lora_alpha,
        lora_dropout,
        lr,
        warmup_steps,
        schedule,
        weight_decay,
        beta1,
        beta2,
        eps,
        batch_size,
        grad_accum,
        max_grad_norm,
        max_seq_len,
        eval_fraction,
        seed,
        dtype,
        bad_lines,
        append_eos,
        packing
    );
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        format!("{v:?}")
    };
    check(
        "target_modules",
        sorted(&a.target_modules),
        sorted(&b.target_modules),
        None,
    );
    let constant = a.schedule == Schedule::Constant && b.schedule == Schedule::Constant;
    if !constant {
        let length = |c: &TrainConfig| match c.max_steps {
            Some(n) => format!("{n} steps"),
            None => format!("{} epochs", c.epochs),
        };
        let field = if a.max_steps.is_some() || b.max_steps.is_some() {
            "max_steps"
        } else {
            "epochs"
        };
        check(field, length(a), length(b), Some(LENGTH_NOTE));
    }
    out
}

/// FNV-1a, 64 bits, fed in pieces.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: format!("fingerprinting {}", path.display()),
        source,
    }
}

/// `fnv1a64:<hash> (<size> bytes)` over every byte of the file.
pub fn file_fingerprint(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(read_err(path))?;
    let mut h = Fnv64::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(read_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(format!("fnv1a64:{:016x} ({size} bytes)", h.0))
}

/// Blocks sampled from a weights file's data, and their size.
const SAMPLES: u64 = 16;
const SAMPLE_BYTES: u64 = 64 * 1024;

/// The model directory's fingerprint (see the module docs).
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let listing = |source| Error::Io {
        context: format!("listing model directory {}", dir.display()),
        source,
    };
    let mut weights: Vec<std::path::PathBuf> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(listing)? {
        let p = e.map_err(listing)?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
            weights.push(p);
        }
    }
    weights.sort();
    let mut h = Fnv64::new();
    for name in ["config.json", "model.safetensors.index.json"] {
        let p = dir.join(name);
        if p.is_file() {
            h.update(name.as_bytes());
            h.update(&std::fs::read(&p).map_err(read_err(&p))?);
        }
    }
    for p in &weights {
        h.update(p.file_name().unwrap_or_default().as_encoded_bytes());
        sample_weights(p, &mut h)?;
    }
    Ok(format!(
        "fnv1a64:{:016x} ({} weights file{})",
        h.0,
        weights.len(),
        if weights.len() == 1 { "" } else { "s" }
    ))
}

/// Feeds a safetensors file's size, header and sampled data to `h`.
fn sample_weights(path: &Path, h: &mut Fnv64) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(read_err(path))?;
    let size = f.metadata().map_err(read_err(path))?.len();
    h.update(&size.to_le_bytes());
    let mut read_at = |start: u64, len: u64| -> Result<Vec<u8>> {
        let len = len.min(size.saturating_sub(start));
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(start)).map_err(read_err(path))?;
        f.read_exact(&mut buf).map_err(read_err(path))?;
        Ok(buf)
    };
    // The 8-byte header length, then the header. A malformed length only bounds the read: the
    // loader, not the fingerprint, reports a malformed file.
    let head = read_at(0, 8)?;
    h.update(&head);
    let header_len = <[u8; 8]>::try_from(head.as_slice())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
        .min(size.saturating_sub(8));
    h.update(&read_at(8, header_len)?);
    let start = 8 + header_len;
    let data = size.saturating_sub(start);
    if data <= SAMPLES * SAMPLE_BYTES {
        h.update(&read_at(start, data)?);
    } else {
        let stride = (data - SAMPLE_BYTES) / (SAMPLES - 1);
        for i in 0..SAMPLES {
            h.update(&read_at(start + i * stride, SAMPLE_BYTES)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_values() {
        // Test vectors of the FNV-1a 64 specification.
        let mut h = Fnv64::new();
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        h.update(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv64::new();
        h.update(b"foobar");
        assert_eq!(h.0, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn differences_name_every_field_and_allow_extending_a_constant_schedule() {
        let id = RunIdentity {
            model: "m".into(),
            tokenizer: "t".into(),
            data: "d".into(),
            eval_data: None,
        };
        let a = TrainConfig {
            max_steps: Some(40),
            ..Default::default()
        };
        assert!(differences(&a, &id, &a, &id).is_empty());
        let mut b = a.clone();
        b.lr = 1e-3;
        b.max_steps = Some(60);
        b.target_modules.reverse(); // the same set
        b.output_dir = "elsewhere".into(); // not part of the run
        let other = RunIdentity {
            data: "d2".into(),
            ..id.clone()
        };
        let d = differences(&b, &other, &a, &id);
        let fields: Vec<_> = d.iter().map(|d| d.field).collect();
        assert_eq!(fields, ["data", "lr", "max_steps"]);
        assert_eq!(
            d[1].to_string(),
            "`lr`: 0.001 here, 0.0002 in the checkpoint"
        );
        assert!(d[2].to_string().contains("schedule spans the whole run"));
        let (mut c, mut e) = (a.clone(), a.clone());
        c.schedule = Schedule::Constant;
        e.schedule = Schedule::Constant;
        e.max_steps = Some(60);
        assert!(differences(&e, &id, &c, &id).is_empty());
        // A packed run's checkpoint does not resume unpacked: other batches, other steps.
        let unpacked = TrainConfig {
            packing: false,
            ..a.clone()
        };
        let d = differences(&unpacked, &id, &a, &id);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].to_string(),
            "`packing`: false here, true in the checkpoint"
        );
    }
}
