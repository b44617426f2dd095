//! Seeded fuzzing of every loader that reads a user's file: the safetensors header and offsets
//! of a model and of an adapter, `config.json`, `generation_config.json`, `adapter_config.json`,
//! `tokenizer.json` and `tokenizer_config.json`, JSONL training data, the TOML train config,
//! and a checkpoint's `trainer_state.json` and `optimizer.safetensors` (through
//! [`Trainer::resume`]).
//!
//! Each loader gets a fixed number of inputs mutated from a valid file by a seeded mutator
//! (bit flips, byte replacements with JSON-significant characters, deletions, insertions,
//! duplications, truncation; and for JSON, structural edits: a field dropped or given a wrong
//! type, a huge, negative or fractional number, an empty or nested value). For every input
//! the test asserts: no panic (each case runs under `catch_unwind`, and a panicking input is
//! written out with its seed), an error (if any) whose message names the file, and no file
//! touched in the directory the loader was given. Each test prints how many inputs it ran;
//! `FLARE_FUZZ_SCALE=10` runs ten times as many (a longer local run).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flare::generate::HfGenerationConfig;
use flare::lora::peft::load_adapter;
use flare::models::{ModelConfig, Transformer};
use flare::text::Tokenizer;
use flare::train::data::tokenize_file;
use flare::train::{BadLines, DataConfig, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2")
}

/// A fresh directory under the temp dir, removed first if it exists.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flare-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The number of inputs a loader gets: `base`, times `FLARE_FUZZ_SCALE` when set.
fn cases(base: usize) -> usize {
    let scale = std::env::var("FLARE_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    base * scale.max(1)
}

// ---- the mutator ------------------------------------------------------------------------------

/// Bytes that mean something to JSON, TOML and the safetensors header.
const SPECIAL_BYTES: &[u8] = b"{}[]\",:-.0123456789eE \n\r\t\\=#'\x00\xff\xc3";

/// Tokens worth inserting into a text format.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "1e400",
    "-1e400",
    "18446744073709551616",
    "4294967296",
    "9999999999999999999999",
    "0.5",
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"F33\"",
    "\"I32\"",
    "NaN",
    "inf",
    "\u{feff}",
    "\u{0}",
    "[[[[[[[[",
    "\\u0000",
    "\\ud800",
];

/// A seeded mutator of files.
struct Mutator {
    rng: StdRng,
}

impl Mutator {
    fn new(seed: u64) -> Self {
        Mutator {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A position in `0..=len`, biased towards `0..hot` (the header of a binary file) when
    /// `hot` is given.
    fn pos(&mut self, len: usize, hot: Option<usize>) -> usize {
        match hot {
            Some(h) if h > 0 && self.rng.random_bool(0.8) => {
                self.rng.random_range(0..h.min(len + 1))
            }
            _ => self.rng.random_range(0..=len),
        }
    }

    /// One to three byte-level edits of `input`; `hot` biases where they land.
    fn bytes(&mut self, input: &[u8], hot: Option<usize>) -> Vec<u8> {
        let mut b = input.to_vec();
        let edits = self.rng.random_range(1..=3);
        for _ in 0..edits {
            let len = b.len();
            match self.rng.random_range(0..7) {
                0 if len > 0 => {
                    let i = self.pos(len - 1, hot);
                    b[i] ^= 1 << self.rng.random_range(0..8);
                }
                1 if len > 0 => {
                    let i = self.pos(len - 1, hot);
                    b[i] = SPECIAL_BYTES[self.rng.random_range(0..SPECIAL_BYTES.len())];
                }
                2 if len > 0 => {
                    let i = self.pos(len - 1, hot);
                    let n = self.rng.random_range(1..=16).min(len - i);
                    b.drain(i..i + n);
                }
                3 => {
                    let i = self.pos(len, hot);
                    let t = TOKENS[self.rng.random_range(0..TOKENS.len())];
                    b.splice(i..i, t.bytes());
                }
                4 if len > 0 => {
                    let i = self.pos(len - 1, hot);
                    let n = self.rng.random_range(1..=32).min(len - i);
                    let chunk = b[i..i + n].to_vec();
                    let j = self.pos(len, hot);
                    b.splice(j..j, chunk);
                }
                5 => {
                    let i = self.pos(len, hot);
                    b.truncate(i);
                }
                _ => {
                    let i = self.pos(len, hot);
                    let n = self.rng.random_range(1..=8);
                    let junk: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                    b.splice(i..i, junk);
                }
            }
        }
        b
    }

    /// A value of a wrong or extreme kind.
    fn odd_value(&mut self) -> Value {
        match self.rng.random_range(0..14) {
            0 => Value::Null,
            1 => Value::Bool(self.rng.random()),
            2 => (-1).into(),
            3 => 0.into(),
            4 => u64::MAX.into(),
            5 => 1e300.into(),
            6 => (-1e300).into(),
            7 => 0.5.into(),
            8 => "x".into(),
            9 => Value::Array(vec![]),
            10 => Value::Object(Default::default()),
            11 => serde_json::json!([[1, 2], {"a": null}]),
            12 => "y".repeat(self.rng.random_range(0..5000)).into(),
            _ => (1u64 << self.rng.random_range(20..63)).into(),
        }
    }

    /// One to three structural edits of a JSON value: a field dropped, or a value replaced by
    /// [`odd_value`](Self::odd_value), anywhere in the tree.
    fn json(&mut self, v: &Value) -> Value {
        let mut v = v.clone();
        let edits = self.rng.random_range(1..=3);
        for _ in 0..edits {
            let mut paths = Vec::new();
            collect_paths(&v, String::new(), &mut paths);
            let p = paths[self.rng.random_range(0..paths.len())].clone();
            if p.is_empty() {
                if self.rng.random_bool(0.1) {
                    v = self.odd_value();
                }
                continue;
            }
            let (parent, key) = p.rsplit_once('/').unwrap();
            let drop = self.rng.random_bool(0.3);
            match v.pointer_mut(parent) {
                Some(Value::Object(m)) if drop => {
                    m.remove(&key.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(a)) if drop => {
                    let i: usize = key.parse().unwrap();
                    a.remove(i);
                }
                _ => {
                    let odd = self.odd_value();
                    if let Some(slot) = v.pointer_mut(&p) {
                        *slot = odd;
                    }
                }
            }
        }
        v
    }

    /// A mutated JSON text: structural edits or byte edits of the text, half each.
    fn json_text(&mut self, v: &Value, text: &[u8]) -> Vec<u8> {
        if self.rng.random_bool(0.5) {
            serde_json::to_vec_pretty(&self.json(v)).unwrap()
        } else {
            self.bytes(text, None)
        }
    }
}

/// Every JSON pointer of `v` (the root as `""`).
fn collect_paths(v: &Value, here: String, out: &mut Vec<String>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                collect_paths(x, format!("{here}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_paths(x, format!("{here}/{i}"), out);
            }
        }
        _ => {}
    }
}

// ---- the harness ------------------------------------------------------------------------------

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// Where a loader must not write: `Always` for a pure reader, `OnError` for one whose success
/// legitimately writes (a resumed run cuts `metrics.jsonl` back to its checkpoint).
#[derive(Clone, Copy, PartialEq)]
enum Untouched {
    Always,
    OnError,
}

/// Runs `n` cases: each writes `mutate(rng, i)` to `target`, runs `load`, and checks that it did
/// not panic, that an error names `must_name` (a path, usually `target`), and that `watch` (the
/// directory the loader reads and could write) is byte-for-byte as before (`untouched` says
/// when). Restores `target` from `original` at the end. Returns (cases, errors).
#[allow(clippy::too_many_arguments)]
fn run_cases(
    name: &str,
    n: usize,
    target: &Path,
    original: &[u8],
    watch: &Path,
    must_name: &Path,
    untouched: Untouched,
    mut mutate: impl FnMut(&mut Mutator) -> Vec<u8>,
    mut load: impl FnMut() -> flare::Result<()>,
) -> (usize, usize) {
    let mut errors = 0;
    for i in 0..n {
        let seed = flare_seed(name, i);
        let mut m = Mutator::new(seed);
        let input = mutate(&mut m);
        std::fs::write(target, &input).unwrap();
        let before = snapshot(watch);
        let result = catch_unwind(AssertUnwindSafe(&mut load));
        let after = snapshot(watch);
        let failed = matches!(result, Ok(Err(_)));
        let keep = || {
            let p = std::env::temp_dir().join(format!("flare-fuzz-crash-{name}-{seed:016x}"));
            std::fs::write(&p, &input).unwrap();
            p
        };
        match result {
            Err(_) => panic!(
                "fuzz {name}: case {i} (seed {seed:#x}) panicked; input kept in {}",
                keep().display()
            ),
            Ok(Err(e)) => {
                errors += 1;
                let msg = e.to_string();
                let named = msg.contains(&must_name.display().to_string());
                assert!(
                    named,
                    "fuzz {name}: case {i} (seed {seed:#x}): the error does not name {}: {msg}; \
                     input kept in {}",
                    must_name.display(),
                    keep().display()
                );
            }
            Ok(Ok(())) => {}
        }
        assert!(
            before == after || (untouched == Untouched::OnError && !failed),
            "fuzz {name}: case {i} (seed {seed:#x}) changed files under {}; input kept in {}",
            watch.display(),
            keep().display()
        );
    }
    std::fs::write(target, original).unwrap();
    println!(
        "fuzz {name}: {n} inputs, {errors} refused, {} accepted",
        n - errors
    );
    (n, errors)
}

/// A per-case seed from the loader's name and the case number.
fn flare_seed(name: &str, i: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A copy of the qwen2 fixture's files (not its subdirectories).
fn model_copy(name: &str) -> PathBuf {
    let d = scratch(name);
    for e in std::fs::read_dir(fixture()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    d
}

/// The safetensors header length + 8 of `bytes` (where byte edits matter most).
fn header_end(bytes: &[u8]) -> usize {
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[..8]);
    8 + u64::from_le_bytes(len) as usize
}

/// The header of a safetensors file, parsed, and its data bytes.
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let end = header_end(bytes);
    (
        serde_json::from_slice(&bytes[8..end]).unwrap(),
        bytes[end..].to_vec(),
    )
}

/// A safetensors file from a (possibly mutated) header and data.
fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

/// Mutates a safetensors file: its header as JSON (re-encoded), or its bytes with edits mostly
/// in the length and the header.
fn mutate_safetensors(m: &mut Mutator, original: &[u8]) -> Vec<u8> {
    let (header, data) = split_safetensors(original);
    if m.rng.random_bool(0.5) {
        join_safetensors(&m.json(&header), &data)
    } else {
        m.bytes(original, Some(header_end(original)))
    }
}

// ---- the loaders --------------------------------------------------------------------------------

#[test]
fn fuzz_model_safetensors() {
    let _g = crate::common::shared_lock();
    let dir = model_copy("model-st");
    let target = dir.join("model.safetensors");
    let original = std::fs::read(&target).unwrap();
    run_cases(
        "model.safetensors",
        cases(250),
        &target,
        &original,
        &dir,
        &target,
        Untouched::Always,
        |m| mutate_safetensors(m, &original),
        || Transformer::from_dir(&dir, DType::F32, &Device::Cpu).map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_config_json() {
    let _g = crate::common::shared_lock();
    let dir = model_copy("config");
    let target = dir.join("config.json");
    let original = std::fs::read(&target).unwrap();
    let value: Value = serde_json::from_slice(&original).unwrap();
    run_cases(
        "config.json",
        cases(500),
        &target,
        &original,
        &dir,
        &target,
        Untouched::Always,
        |m| m.json_text(&value, &original),
        || ModelConfig::from_file(&target).map(|_| ()),
    );
    // Through the whole model: a config that parses but disagrees with the weights is an error
    // naming one of the directory's files.
    run_cases(
        "config.json+model",
        cases(100),
        &target,
        &original,
        &dir,
        &dir,
        Untouched::Always,
        |m| serde_json::to_vec(&m.json(&value)).unwrap(),
        || Transformer::from_dir(&dir, DType::F32, &Device::Cpu).map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_generation_config_json() {
    let _g = crate::common::shared_lock();
    let dir = scratch("genconfig");
    let target = dir.join("generation_config.json");
    let original = std::fs::read(fixture().join("generation_config.json")).unwrap();
    let value: Value = serde_json::from_slice(&original).unwrap();
    run_cases(
        "generation_config.json",
        cases(400),
        &target,
        &original,
        &dir,
        &target,
        Untouched::Always,
        |m| m.json_text(&value, &original),
        || HfGenerationConfig::from_dir(&dir).map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_adapter_config_and_weights() {
    let _g = crate::common::shared_lock();
    let dir = scratch("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join("adapter").join(f), dir.join(f)).unwrap();
    }
    let config = dir.join("adapter_config.json");
    let original = std::fs::read(&config).unwrap();
    let value: Value = serde_json::from_slice(&original).unwrap();
    run_cases(
        "adapter_config.json",
        cases(300),
        &config,
        &original,
        &dir,
        // A config that disagrees with the weights (other targets, another r) is reported
        // against the weights file.
        &dir,
        Untouched::Always,
        |m| m.json_text(&value, &original),
        || load_adapter(&dir, &Device::Cpu).map(|_| ()),
    );
    let weights = dir.join("adapter_model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    run_cases(
        "adapter_model.safetensors",
        cases(250),
        &weights,
        &original,
        &dir,
        &weights,
        Untouched::Always,
        |m| mutate_safetensors(m, &original),
        || load_adapter(&dir, &Device::Cpu).map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_tokenizer_files() {
    let _g = crate::common::shared_lock();
    let dir = model_copy("tokenizer");
    for (file, n) in [("tokenizer.json", 250), ("tokenizer_config.json", 250)] {
        let target = dir.join(file);
        let original = std::fs::read(&target).unwrap();
        let value: Value = serde_json::from_slice(&original).unwrap();
        run_cases(
            file,
            cases(n),
            &target,
            &original,
            &dir,
            &target,
            Untouched::Always,
            |m| m.json_text(&value, &original),
            || Tokenizer::from_dir(&dir).map(|_| ()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_jsonl_data() {
    let _g = crate::common::shared_lock();
    let dir = scratch("jsonl");
    let target = dir.join("data.jsonl");
    let original = concat!(
        "{\"text\": \"The quick brown fox jumps over the lazy dog.\"}\n",
        "{\"prompt\": \"Two plus two is\", \"completion\": \" four.\"}\n",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, ",
        "{\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
        "\n",
        "{\"text\": \"caf\u{e9} \u{2603} \u{1F600}\"}\r\n",
    )
    .as_bytes()
    .to_vec();
    let tok = Tokenizer::from_dir(fixture()).unwrap();
    let lines: Vec<Value> = std::str::from_utf8(&original)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (mode, bad_lines) in [("error", BadLines::Error), ("skip", BadLines::Skip)] {
        let cfg = DataConfig {
            max_seq_len: 32,
            bad_lines,
            ..Default::default()
        };
        run_cases(
            &format!("data.jsonl ({mode})"),
            cases(200),
            &target,
            &original,
            &dir,
            &target,
            Untouched::Always,
            |m| {
                if m.rng.random_bool(0.5) {
                    let mut out = Vec::new();
                    for l in &lines {
                        let l = if m.rng.random_bool(0.4) {
                            m.json(l)
                        } else {
                            l.clone()
                        };
                        out.extend(serde_json::to_vec(&l).unwrap());
                        out.push(b'\n');
                    }
                    out
                } else {
                    m.bytes(&original, None)
                }
            },
            || tokenize_file(&target, &tok, &cfg).map(|_| ()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_train_toml() {
    let _g = crate::common::shared_lock();
    let dir = scratch("toml");
    let target = dir.join("train.toml");
    let original = br#"# a train config
model = "models/tiny"
data = "data/train.jsonl"
eval_data = "data/eval.jsonl"
output_dir = "out"
lora_r = 8
lora_alpha = 16.0
lora_dropout = 0.05
target_modules = ["q_proj", "v_proj"]
lr = 2e-4
warmup_steps = 10
schedule = "cosine"
weight_decay = 0.01
epochs = 3
max_steps = 100
batch_size = 4
grad_accum = 2
max_grad_norm = 1.0
max_seq_len = 512
eval_every = 20
save_every = 50
seed = 42
dtype = "bf16"
device = "auto"
bad_lines = "skip"
append_eos = true
"#
    .to_vec();
    let text = std::str::from_utf8(&original).unwrap().to_string();
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .collect();
    const ODD: &[&str] = &[
        "-1",
        "0",
        "1e400",
        "18446744073709551616",
        "\"\"",
        "[]",
        "{}",
        "true",
        "-0.0",
        "nan",
        "inf",
        "\"x\"",
        "[1, \"a\"]",
        "9223372036854775807",
    ];
    run_cases(
        "train.toml",
        cases(400),
        &target,
        &original,
        &dir,
        &target,
        Untouched::Always,
        |m| {
            if m.rng.random_bool(0.5) {
                // Drop a key or give it an odd value.
                let key = keys[m.rng.random_range(0..keys.len())];
                let odd = ODD[m.rng.random_range(0..ODD.len())];
                let drop = m.rng.random_bool(0.3);
                text.lines()
                    .filter_map(|l| match l.split_once(" = ") {
                        Some((k, _)) if k == key && drop => None,
                        Some((k, _)) if k == key => Some(format!("{k} = {odd}")),
                        _ => Some(l.to_string()),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes()
            } else {
                m.bytes(&original, None)
            }
        },
        || TrainConfig::from_toml_file(&target).map(|_| ()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short run that leaves `out/checkpoint-2` and a final adapter, for the checkpoint fuzz.
fn trained_run(dir: &Path) -> TrainConfig {
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Cats say\", \"completion\": \" meow.\"}\n\
         {\"prompt\": \"Dogs say\", \"completion\": \" woof.\"}\n",
    )
    .unwrap();
    let cfg = TrainConfig {
        model: fixture(),
        data,
        output_dir: dir.join("out"),
        lora_r: 2,
        lora_alpha: 4.0,
        max_steps: Some(2),
        batch_size: 2,
        save_every: 2,
        max_seq_len: 16,
        seed: 3,
        ..Default::default()
    };
    let mut t = Trainer::from_config(cfg.clone(), &Device::Cpu).unwrap();
    t.run(|_| {}).unwrap();
    cfg
}

#[test]
fn fuzz_checkpoint_state() {
    let _g = crate::common::shared_lock();
    let dir = scratch("checkpoint");
    let cfg = trained_run(&dir);
    let ckpt = cfg.output_dir.join("checkpoint-2");
    assert!(ckpt.join("trainer_state.json").is_file(), "no checkpoint");
    let tok = Tokenizer::from_dir(fixture()).unwrap();
    let resume = |c: &TrainConfig| -> flare::Result<()> {
        // A valid input resumes: that rewrites metrics.jsonl (cut back to the checkpoint's step),
        // which is the resume's job, not a touched output; compare its bytes before and after.
        Trainer::resume(c.clone(), &Device::Cpu, Box::new(tok.clone()), &ckpt).map(|_| ())
    };
    let state = ckpt.join("trainer_state.json");
    let original = std::fs::read(&state).unwrap();
    let value: Value = serde_json::from_slice(&original).unwrap();
    // Mutations that leave the run's identity intact resume (and rewrite metrics.jsonl the same
    // way every time), so the whole output directory is watched.
    run_cases(
        "trainer_state.json",
        cases(40),
        &state,
        &original,
        &cfg.output_dir,
        &cfg.output_dir,
        Untouched::OnError,
        |m| m.json_text(&value, &original),
        || resume(&cfg),
    );
    let optim = ckpt.join("optimizer.safetensors");
    let original = std::fs::read(&optim).unwrap();
    run_cases(
        "optimizer.safetensors",
        cases(40),
        &optim,
        &original,
        &cfg.output_dir,
        &optim,
        Untouched::OnError,
        |m| mutate_safetensors(m, &original),
        || resume(&cfg),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
