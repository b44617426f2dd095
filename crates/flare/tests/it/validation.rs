//! Inputs that must be refused with a message naming the file (and the tensor, field or line):
//! a weight stored as an integer dtype, nonsense `config.json` values, malformed safetensors
//! headers (unknown dtype, bad offsets, sizes that do not match), JSONL that is not UTF-8, and
//! a training run too large for the machine's memory. Also the warning for generating past
//! `max_position_embeddings`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flare::lora::peft::load_adapter;
use flare::models::{ModelConfig, Transformer, Weights};
use flare::text::Tokenizer;
use flare::train::data::tokenize_file;
use flare::train::{BadLines, DataConfig, TrainConfig, Trainer};
use flare::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2")
}

/// A fresh directory under the temp dir, removed first if it exists.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flare-validation-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the qwen2 fixture's files (not its subdirectories) in a fresh directory.
fn fixture_copy(name: &str) -> PathBuf {
    let d = scratch(name);
    for e in std::fs::read_dir(fixture()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    d
}

/// A safetensors file written by hand: the header JSON as given, then `data_len` zero bytes.
fn raw_safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    b
}

fn message(e: &Error) -> String {
    e.to_string()
}

// ---- item 6: integer weights ---------------------------------------------------------------

#[test]
fn a_weight_stored_as_an_integer_dtype_is_refused() {
    let dir = fixture_copy("i32-weight");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let victim = "model.norm.weight";
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == victim {
            let n: usize = view.shape().iter().product();
            tensors.push((name, Dtype::I32, view.shape().to_vec(), vec![0u8; n * 4]));
        } else {
            tensors.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let err = Transformer::from_dir(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = message(&err);
    assert!(
        msg.contains(victim) && msg.contains("I32") && msg.contains("model.safetensors"),
        "{msg}"
    );
    // Weights::get refuses it for any requested dtype.
    let w = Weights::from_dir(&dir).unwrap();
    let err = w.get(victim, &[64], DType::F32, &Device::Cpu).unwrap_err();
    assert!(message(&err).contains("stored as I32"), "{err}");
}

// ---- item 10: malformed safetensors headers ------------------------------------------------

#[test]
fn malformed_safetensors_headers_name_the_file_and_the_tensor() {
    let dir = scratch("headers");
    let t = |dtype: &str, shape: &str, offsets: &str| {
        format!(
            r#""w.{dtype}": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}"#
        )
    };
    // (header entries, data bytes, what the message must contain)
    let cases: Vec<(String, usize, Vec<&str>)> = vec![
        (
            format!("{{{}}}", t("F33", "[2]", "[0, 8]")),
            8,
            vec!["w.F33", "unknown dtype \"F33\""],
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}"#
                .to_string(),
            16,
            vec!["`b`", "overlaps", "`a`"],
        ),
        (
            format!("{{{}}}", t("F32", "[3]", "[0, 16]")),
            16,
            vec!["w.F32", "12 bytes", "span 16"],
        ),
        (
            format!("{{{}}}", t("F16", "[8]", "[0, 16]")),
            4,
            vec!["w.F16", "past the end of the file", "truncated"],
        ),
        (
            format!("{{{}}}", t("BF16", "[2, 2]", "[8, 4]")),
            8,
            vec!["w.BF16", "end before begin"],
        ),
        (
            format!("{{{}}}", t("F32", "[4294967296, 4294967296, 16]", "[0, 8]")),
            8,
            vec!["w.F32", "not a whole, representable number of bytes"],
        ),
        (
            format!("{{{}}}", t("F32", "[2]", "[4, 12]")),
            12,
            vec!["w.F32", "must start at 0"],
        ),
        (
            format!("{{{}}}", t("F32", "\"x\"", "[0, 8]")),
            8,
            vec!["w.F32", "`shape`"],
        ),
        ("[1, 2]".to_string(), 0, vec!["not a JSON object"]),
    ];
    for (i, (header, data, wants)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.safetensors"));
        std::fs::write(&path, raw_safetensors(header, *data)).unwrap();
        let err = Weights::from_files(&[&path]).unwrap_err();
        let msg = message(&err);
        assert!(msg.contains(&path.display().to_string()), "case {i}: {msg}");
        for w in wants {
            assert!(msg.contains(w), "case {i}: {w:?} not in {msg}");
        }
    }
    // A header length past the end of the file.
    let path = dir.join("short.safetensors");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&path, b).unwrap();
    let msg = message(&Weights::from_files(&[&path]).unwrap_err());
    assert!(
        msg.contains("header length 1000") && msg.contains("short.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_malformed_adapter_names_its_file_and_tensor() {
    let dir = scratch("bad-adapter");
    std::fs::copy(
        fixture().join("adapter/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let header =
        format!(r#"{{"{key}": {{"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}}}"#);
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        raw_safetensors(&header, 8),
    )
    .unwrap();
    let msg = message(&load_adapter(&dir, &Device::Cpu).unwrap_err());
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains(key) && msg.contains("F33"),
        "{msg}"
    );
}

// ---- item 7: nonsense config values --------------------------------------------------------

#[test]
fn nonsense_config_values_are_refused_with_the_field_and_file() {
    let dir = scratch("config");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    let path = dir.join("config.json");
    // (field, value, what the message must name)
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("num_hidden_layers", 0.into(), "num_hidden_layers"),
        (
            "max_position_embeddings",
            0.into(),
            "max_position_embeddings",
        ),
        ("vocab_size", 0.into(), "vocab_size"),
        ("hidden_size", 0.into(), "hidden_size"),
        ("intermediate_size", 0.into(), "intermediate_size"),
        ("num_attention_heads", 0.into(), "num_attention_heads"),
        ("num_key_value_heads", 3.into(), "num_key_value_heads"),
        ("hidden_size", 66.into(), "hidden_size"),
        ("rms_norm_eps", (-1.0).into(), "rms_norm_eps"),
        ("rms_norm_eps", 0.0.into(), "rms_norm_eps"),
        ("head_dim", (1u64 << 40).into(), "head_dim"),
        ("vocab_size", (1u64 << 40).into(), "vocab_size"),
        ("num_hidden_layers", (-2).into(), "num_hidden_layers"),
    ];
    for (field, value, name) in cases {
        let mut v = base.clone();
        v[field] = value.clone();
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let err = ModelConfig::from_file(&path).unwrap_err();
        let msg = message(&err);
        assert!(
            msg.contains(name) && msg.contains(&path.display().to_string()),
            "{field} = {value}: {msg}"
        );
    }
    // The fixture itself is fine.
    std::fs::write(&path, serde_json::to_string(&base).unwrap()).unwrap();
    ModelConfig::from_file(&path).unwrap();
}

#[test]
fn generating_past_max_position_embeddings_warns() {
    let c = ModelConfig::from_dir(fixture()).unwrap();
    assert_eq!(c.max_position_embeddings, 128);
    assert!(c.context_warning(128).is_none());
    let w = c.context_warning(200).unwrap();
    assert!(
        w.contains("200") && w.contains("max_position_embeddings (128)"),
        "{w}"
    );
}

// ---- item 8: JSONL that is not UTF-8 -------------------------------------------------------

#[test]
fn jsonl_with_invalid_utf8_names_the_line_and_can_be_skipped() {
    let dir = scratch("utf8");
    let path = dir.join("data.jsonl");
    let mut bytes = b"{\"text\": \"hello there\"}\n{\"text\": \"bad \xff\xfe byte\"}\r\n".to_vec();
    bytes.extend_from_slice(b"{\"text\": \"fine again\"}\n");
    std::fs::write(&path, &bytes).unwrap();
    let tok = Tokenizer::from_dir(fixture()).unwrap();
    let mut cfg = DataConfig::default();
    let err = tokenize_file(&path, &tok, &cfg).unwrap_err();
    match &err {
        Error::Data { file, line, msg } => {
            assert_eq!(
                (file.as_str(), *line),
                (path.display().to_string().as_str(), 2)
            );
            assert!(msg.contains("UTF-8"), "{msg}");
        }
        other => panic!("expected Error::Data, got {other}"),
    }
    assert!(err
        .to_string()
        .starts_with(&format!("{}:2:", path.display())));
    cfg.bad_lines = BadLines::Skip;
    let t = tokenize_file(&path, &tok, &cfg).unwrap();
    assert_eq!(t.examples.len(), 2);
    assert_eq!(t.bad_lines.len(), 1);
    assert_eq!(t.bad_lines[0].line, 2);
}

// ---- item 9: the memory estimate -----------------------------------------------------------

#[test]
fn a_run_too_large_for_memory_is_refused_before_anything_is_written() {
    let dir = scratch("oom");
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n").unwrap();
    let out = dir.join("out");
    let cfg = TrainConfig {
        model: fixture(),
        data,
        output_dir: out.clone(),
        // ~10^14 adapter parameters: no machine has the memory.
        lora_r: 100_000_000_000,
        max_steps: Some(1),
        ..Default::default()
    };
    let err = Trainer::from_config(cfg, &Device::Cpu).unwrap_err();
    match &err {
        Error::OutOfMemory {
            device,
            needed,
            available,
            detail,
        } => {
            assert_eq!(device, "cpu");
            assert!(needed.ends_with("GiB") && available.contains('B'), "{err}");
            assert!(detail.contains("adapters"), "{detail}");
        }
        other => panic!("expected Error::OutOfMemory, got {other}"),
    }
    assert!(err.to_string().contains("lower lora_r"), "{err}");
    assert!(!out.exists(), "the output directory was created");
}
