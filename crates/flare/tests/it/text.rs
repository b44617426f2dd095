//! `flare::text` and `generate::HfGenerationConfig`: the fixture tokenizers (made by
//! `bench/make_text_fixtures.py`) encode, decode and render chat templates exactly as
//! transformers' AutoTokenizer did (`tokenizer_golden.json`), streaming detokenisation gives the
//! decoded text piece by piece without half characters, `generation_config.json` parses with
//! HF's conventions, and bad files are refused with errors naming the file and field.
//!
//! Host-only (no tensors): plain `#[test]`s.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flare::generate::{GenerationConfig, HfGenerationConfig, SamplingParams};
use flare::text::{ChatMessage, ChatTemplate, TextDecoder, Tokenizer};
use serde_json::Value;

use crate::common::Result;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(arch)
}

fn golden(arch: &str) -> Value {
    let text = std::fs::read_to_string(fixture(arch).join("tokenizer_golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn opt_id(v: &Value) -> Option<u32> {
    v.as_u64().map(|x| x as u32)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "flare-text-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A copy of a fixture's tokenizer files.
    fn tokenizer_of(arch: &str) -> Self {
        let d = TempDir::new(arch);
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            let src = fixture(arch).join(f);
            if src.exists() {
                std::fs::copy(src, d.file(f)).unwrap();
            }
        }
        d
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.file(name), text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_err_mentions(err: flare::Error, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

// ---- tokenizer vs transformers --------------------------------------------------------------

fn tokenizer_matches_transformers(arch: &str) -> Result<()> {
    let tok = Tokenizer::from_dir(fixture(arch))?;
    let g = golden(arch);
    assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    assert_eq!(
        tok.bos_token_id(),
        opt_id(&g["bos_token_id"]),
        "{arch}: bos"
    );
    assert_eq!(
        tok.eos_token_id(),
        opt_id(&g["eos_token_id"]),
        "{arch}: eos"
    );
    assert_eq!(
        tok.pad_token_id(),
        opt_id(&g["pad_token_id"]),
        "{arch}: pad"
    );

    let encodes = g["encode"].as_array().unwrap();
    assert!(encodes.len() >= 10);
    for case in encodes {
        let text = case["text"].as_str().unwrap();
        let special = case["add_special_tokens"].as_bool().unwrap();
        assert_eq!(
            tok.encode(text, special)?,
            ids(&case["ids"]),
            "{arch}: encode({text:?}, add_special_tokens={special})"
        );
    }
    for case in g["decode"].as_array().unwrap() {
        let skip = case["skip_special_tokens"].as_bool().unwrap();
        assert_eq!(
            tok.decode(&ids(&case["ids"]), skip)?,
            case["text"].as_str().unwrap(),
            "{arch}: decode({}, skip_special_tokens={skip})",
            case["ids"]
        );
    }
    let chats = g["chat"].as_array().unwrap();
    assert!(chats.len() >= 6);
    for case in chats {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&messages, gen)?;
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{arch}: apply_chat_template({messages:?}, add_generation_prompt={gen})"
        );
        assert_eq!(
            tok.encode(&text, false)?,
            ids(&case["ids"]),
            "{arch}: chat ids"
        );
    }
    Ok(())
}

#[test]
fn qwen2_tokenizer_matches_transformers() -> Result<()> {
    tokenizer_matches_transformers("qwen2")
}

#[test]
fn llama_tokenizer_matches_transformers() -> Result<()> {
    tokenizer_matches_transformers("llama")
}

/// Chat templates of well-known families (Llama 3, Mistral, Gemma, a Qwen3-like one, tojson)
/// render exactly as transformers' Jinja2 environment renders them, errors included.
#[test]
fn known_templates_match_jinja2() -> Result<()> {
    let mut tok = Tokenizer::from_dir(fixture("llama"))?;
    let g = golden("llama");
    let cases = g["templates"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut errors = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        tok.set_chat_template(ChatTemplate::new(case["template"].as_str().unwrap())?);
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(&messages, gen);
        match (case.get("text"), case.get("error")) {
            (Some(want), _) => assert_eq!(
                got?,
                want.as_str().unwrap(),
                "{name}: {messages:?}, add_generation_prompt={gen}"
            ),
            (None, Some(want)) => {
                errors += 1;
                assert_err_mentions(got.unwrap_err(), &[want.as_str().unwrap()]);
            }
            _ => panic!("malformed golden case"),
        }
    }
    assert!(errors >= 2, "the error cases are exercised");
    Ok(())
}

#[test]
fn special_tokens_and_lookups() -> Result<()> {
    let mut tok = Tokenizer::from_dir(fixture("llama"))?;
    assert_eq!(tok.special_token("bos_token"), Some("<s>"));
    assert_eq!(tok.special_token("eos_token"), Some("</s>"));
    assert_eq!(tok.special_token("pad_token"), None);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(4));
    assert_eq!(tok.id_to_token(4).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_to_id("no such token"), None);
    tok.set_special_token("pad_token", "</s>")?;
    assert_eq!(tok.pad_token_id(), Some(2));
    assert!(tok.set_special_token("pad_token", "no such token").is_err());
    assert!(tok.set_special_token("sep_token", "</s>").is_err());
    // The template sees the new eos token.
    tok.set_special_token("eos_token", "<|im_end|>")?;
    let text = tok.apply_chat_template(&[ChatMessage::new("assistant", "ok")], false)?;
    assert!(text.ends_with("ok<|im_end|>\n<|im_end|>"), "{text:?}");
    // Out-of-vocabulary ids are an error, not a panic.
    assert_err_mentions(tok.decode(&[5, 1000], false).unwrap_err(), &["1000"]);
    Ok(())
}

#[test]
fn chat_template_errors() -> Result<()> {
    let tok = Tokenizer::from_dir(fixture("llama"))?;
    // The template's raise_exception reaches the caller with its message.
    let err = tok
        .apply_chat_template(&[ChatMessage::new("tool", "x")], false)
        .unwrap_err();
    assert_err_mentions(err, &["roles must be system, user or assistant, got tool"]);
    // No template at all.
    let bare = Tokenizer::from_file(fixture("llama").join("tokenizer.json"))?;
    assert!(bare.chat_template().is_none());
    assert_err_mentions(
        bare.apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err(),
        &["no chat template"],
    );
    // A template given in code.
    let mut tok = bare;
    tok.set_chat_template(ChatTemplate::new(
        "{% for m in messages %}[{{ m.role | upper }}]{{ m.content }}{% endfor %}",
    )?);
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::new("user", "hi")], false)?,
        "[USER]hi"
    );
    Ok(())
}

#[test]
fn chat_messages_deserialize_from_dataset_json() {
    let m: Vec<ChatMessage> = serde_json::from_str(
        r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 1}]"#,
    )
    .unwrap();
    assert_eq!(
        m,
        vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello")
        ]
    );
    assert!(serde_json::from_str::<ChatMessage>(r#"{"role": "user"}"#).is_err());
}

#[test]
fn tokenizer_file_errors() {
    // Missing directory / file.
    let nowhere = std::env::temp_dir().join("flare-text-no-such-dir");
    assert_err_mentions(
        Tokenizer::from_dir(&nowhere).unwrap_err(),
        &["flare-text-no-such-dir", "tokenizer.json"],
    );
    // A tokenizer.json that is not one.
    let d = TempDir::tokenizer_of("qwen2");
    d.write("tokenizer.json", "{\"version\": \"1.0\", \"model\": 3}");
    assert_err_mentions(Tokenizer::from_dir(&d.0).unwrap_err(), &["tokenizer.json"]);
    // tokenizer_config.json: malformed, wrong types, unknown token, broken template.
    let cases: [(&str, &[&str]); 5] = [
        ("{not json", &["tokenizer_config.json", "malformed JSON"]),
        (
            "{\"eos_token\": 5}",
            &["tokenizer_config.json", "eos_token"],
        ),
        (
            "{\"bos_token\": \"<nope>\"}",
            &["tokenizer_config.json", "bos_token", "<nope>"],
        ),
        (
            "{\"chat_template\": 7}",
            &["tokenizer_config.json", "chat_template"],
        ),
        (
            "{\"chat_template\": \"{% for m in messages %}\"}",
            &["tokenizer_config.json", "chat template"],
        ),
    ];
    for (text, parts) in cases {
        let d = TempDir::tokenizer_of("qwen2");
        d.write("tokenizer_config.json", text);
        assert_err_mentions(Tokenizer::from_dir(&d.0).unwrap_err(), parts);
    }
    // A special token as an added-token object, and chat templates as a named list.
    let d = TempDir::tokenizer_of("qwen2");
    d.write(
        "tokenizer_config.json",
        r#"{"eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
    );
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "D<|im_end|>");
    // chat_template.jinja wins over the config's template.
    d.write("chat_template.jinja", "J");
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "J");
    d.write("chat_template.jinja", "{% if %}");
    assert_err_mentions(
        Tokenizer::from_dir(&d.0).unwrap_err(),
        &["chat_template.jinja"],
    );
}

// ---- streaming detokenisation ---------------------------------------------------------------

#[test]
fn text_decoder_streams_whole_characters() -> Result<()> {
    let tok = Tokenizer::from_dir(fixture("qwen2"))?;
    let text = "Café naïve 日本語 🙂 and <|im_end|> done";
    let ids = tok.encode(text, false)?;
    // Some characters span several tokens, so some pushes must hold back.
    for skip in [false, true] {
        let mut dec = TextDecoder::new(&tok, skip);
        let mut pieces = Vec::new();
        let mut held = 0;
        for &id in &ids {
            match dec.push(id)? {
                Some(p) => pieces.push(p),
                None => held += 1,
            }
        }
        if let Some(p) = dec.finish()? {
            pieces.push(p);
        }
        assert!(held > 0, "no token was held back");
        for p in &pieces {
            assert!(
                !p.contains('\u{FFFD}'),
                "piece {p:?} holds a half character"
            );
        }
        assert_eq!(pieces.concat(), tok.decode(&ids, skip)?);
        assert_eq!(dec.text(), tok.decode(&ids, skip)?);
        assert_eq!(dec.ids(), &ids[..]);
    }
    // Random ids (invalid UTF-8, special tokens, long runs): the windowed decoding still adds up
    // to the decoded text of all ids, for both tokenizers and both settings.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for arch in ["qwen2", "llama"] {
        let tok = Tokenizer::from_dir(fixture(arch))?;
        let ids: Vec<u32> = (0..600).map(|_| rng.random_range(0..256)).collect();
        for skip in [false, true] {
            let mut dec = TextDecoder::new(&tok, skip);
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(p) = dec.push(id)? {
                    streamed.push_str(&p);
                }
            }
            if let Some(p) = dec.finish()? {
                streamed.push_str(&p);
            }
            assert_eq!(streamed, tok.decode(&ids, skip)?, "{arch}, skip={skip}");
        }
    }

    // An incomplete character at the end comes out at finish, as decode gives it.
    let one = tok.encode("🙂", false)?;
    assert!(one.len() > 1);
    let mut dec = TextDecoder::new(&tok, false);
    assert_eq!(dec.push(one[0])?, None);
    assert_eq!(dec.finish()?, Some(tok.decode(&one[..1], false)?));
    Ok(())
}

// ---- generation_config.json -----------------------------------------------------------------

#[test]
fn generation_config_files() -> Result<()> {
    let q = HfGenerationConfig::from_dir(fixture("qwen2"))?.expect("qwen2 has one");
    assert_eq!(q.eos_token_ids, vec![2, 0]);
    assert_eq!(q.bos_token_id, Some(0));
    assert_eq!(q.pad_token_id, Some(0));
    assert_eq!(q.do_sample, Some(false));
    assert_eq!(q.repetition_penalty, Some(1.05));
    assert_eq!(q.max_new_tokens_for(10), Some(40));
    let l = HfGenerationConfig::from_dir(fixture("llama"))?.expect("llama has one");
    assert_eq!(l.eos_token_ids, vec![2]);
    assert_eq!(l.temperature, Some(0.7));
    assert_eq!(l.top_p, Some(0.9));
    assert_eq!(l.max_new_tokens, None);
    assert_eq!(l.max_new_tokens_for(10), Some(54));
    assert_eq!(l.max_new_tokens_for(100), Some(0));
    assert!(HfGenerationConfig::from_dir(fixture("mistral"))?.is_none());

    // apply: the file's settings, HF's global defaults for the rest, the seed untouched.
    let mut cfg = GenerationConfig {
        max_new_tokens: 7,
        seed: 42,
        sampling: SamplingParams {
            top_k: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    l.apply(&mut cfg, 10);
    assert_eq!(cfg.max_new_tokens, 54);
    assert_eq!(cfg.eos_token_ids, vec![2]);
    assert_eq!(cfg.seed, 42);
    assert_eq!(
        cfg.sampling,
        SamplingParams {
            do_sample: true,
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    );
    cfg.sampling.validate()?;

    let s = HfGenerationConfig::from_json_str(
        r#"{"eos_token_id": null, "stop_strings": "\n\n", "top_k": 0, "min_p": 0.1, "transformers_version": "5.23"}"#,
        "g.json",
    )?;
    assert!(s.eos_token_ids.is_empty());
    assert_eq!(s.stop_strings, vec!["\n\n".to_string()]);
    assert_eq!((s.top_k, s.min_p), (Some(0), Some(0.1)));
    let mut cfg = GenerationConfig {
        eos_token_ids: vec![9],
        max_new_tokens: 5,
        ..Default::default()
    };
    s.apply(&mut cfg, 3);
    assert_eq!(cfg.eos_token_ids, vec![9], "no ids in the file: kept");
    assert_eq!(cfg.max_new_tokens, 5, "no length in the file: kept");
    assert_eq!(cfg.stop_strings, vec!["\n\n".to_string()]);
    Ok(())
}

#[test]
fn generation_config_bad_files() {
    let cases: [(&str, &[&str]); 10] = [
        ("{oops", &["malformed JSON"]),
        ("[1, 2]", &["JSON object"]),
        (r#"{"eos_token_id": "2"}"#, &["eos_token_id"]),
        (r#"{"eos_token_id": [2, -1]}"#, &["eos_token_id"]),
        (r#"{"do_sample": "yes"}"#, &["do_sample"]),
        (r#"{"temperature": 0}"#, &["temperature", "> 0"]),
        (r#"{"top_p": 1.5}"#, &["top_p"]),
        (r#"{"top_k": -1}"#, &["top_k"]),
        (r#"{"max_new_tokens": 1.5}"#, &["max_new_tokens"]),
        (r#"{"stop_strings": ["ok", 3]}"#, &["stop_strings"]),
    ];
    let d = TempDir::new("gencfg");
    for (text, parts) in cases {
        d.write("generation_config.json", text);
        let err = HfGenerationConfig::from_dir(&d.0).unwrap_err();
        assert_err_mentions(err, &[&["generation_config.json"], parts].concat());
    }
    let nowhere = d.file("missing/generation_config.json");
    assert_err_mentions(
        HfGenerationConfig::from_file(&nowhere).unwrap_err(),
        &["missing/generation_config.json"],
    );
}
