//! The generation API above `generate`: [`TokenStream`] (the token iterator `generate` loops
//! over: same tokens, stops when dropped or taken from, reports why it ended), and the
//! text level, [`TextStream`] / [`generate_text`], on the qwen2 and llama fixture models with
//! their fixture tokenizers: streamed pieces add up to the decoded tokens, stop strings cut the
//! text before them, chat prompts go through the chat template.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flare::generate::{
    generate, generate_text, GenerationConfig, Prompt, SamplingParams, StopReason, TextStream,
    TokenStream,
};
use flare::models::Transformer;
use flare::text::{ChatMessage, Tokenizer};

use crate::common::{device_test, Result};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(arch)
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    }
}

/// The token stream gives `generate`'s tokens, can be stopped at any point, and says why it
/// ended; sampled streams are reproducible by seed.
fn token_stream(dev: &Device) -> Result<()> {
    let model = Transformer::from_dir(fixture("qwen2"), DType::F32, dev)?;
    let prompt = [129u32, 35, 185, 168, 201];
    let cfg = greedy(20);
    let all = generate(&model, &prompt, &cfg, |_| {})?;
    assert_eq!(all.len(), 20);

    let mut s = TokenStream::new(&model, &prompt, &cfg)?;
    assert_eq!(s.prompt(), &prompt);
    let first: Vec<u32> = s.by_ref().take(6).collect::<Result<_>>()?;
    assert_eq!(first, all[..6]);
    assert_eq!(s.tokens(), &all[..6]);
    assert_eq!(s.stop_reason(), None, "not ended");
    let rest: Vec<u32> = s.by_ref().collect::<Result<_>>()?;
    assert_eq!(rest, all[6..]);
    assert_eq!(s.stop_reason(), Some(&StopReason::MaxNewTokens));
    assert_eq!(s.next_token()?, None, "ended streams stay ended");

    // EOS: the stream ends on the first EOS id, included.
    let eos = all[9];
    let cfg_eos = GenerationConfig {
        eos_token_ids: vec![eos],
        ..cfg.clone()
    };
    let mut s = TokenStream::new(&model, &prompt, &cfg_eos)?;
    let got: Vec<u32> = s.by_ref().collect::<Result<_>>()?;
    let first_eos = all.iter().position(|&t| t == eos).unwrap();
    assert_eq!(got, all[..=first_eos]);
    assert_eq!(s.stop_reason(), Some(&StopReason::Eos(eos)));

    // No tokens asked: an empty stream that has ended.
    let zero = greedy(0);
    let mut s = TokenStream::new(&model, &prompt, &zero)?;
    assert_eq!(s.next_token()?, None);
    assert_eq!(s.stop_reason(), Some(&StopReason::MaxNewTokens));

    // Sampling: the same seed gives the same tokens through both APIs.
    let sampled = GenerationConfig {
        max_new_tokens: 12,
        seed: 7,
        sampling: SamplingParams {
            do_sample: true,
            temperature: 0.9,
            top_k: 40,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = generate(&model, &prompt, &sampled, |_| {})?;
    let b: Vec<u32> = TokenStream::new(&model, &prompt, &sampled)?.collect::<Result<_>>()?;
    assert_eq!(a, b);

    // Errors at creation: empty prompt, id out of the vocabulary, bad sampling settings.
    assert!(TokenStream::new(&model, &[], &cfg).is_err());
    assert!(TokenStream::new(&model, &[1, 256], &cfg).is_err());
    let bad = GenerationConfig {
        sampling: SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        ..cfg.clone()
    };
    assert!(TokenStream::new(&model, &prompt, &bad).is_err());
    Ok(())
}

/// Streamed pieces add up to the decoded tokens; stop strings cut the text before them and end
/// generation on the token that completes them.
fn text_stream_and_stop_strings(dev: &Device) -> Result<()> {
    for arch in ["qwen2", "llama"] {
        let model = Transformer::from_dir(fixture(arch), DType::F32, dev)?;
        let tok = Tokenizer::from_dir(fixture(arch))?;
        let prompt = tok.encode("The quick brown fox", true)?;
        let cfg = greedy(32);

        // Without stop strings: pieces == final text == decode of the ids. (A random model
        // writes invalid UTF-8 too, so pieces may hold U+FFFD for bytes that never make a
        // character; whole-character streaming of valid text is tested in `text`.)
        let mut s = TextStream::new(&model, &tok, &prompt, &cfg)?;
        let mut pieces = Vec::new();
        while let Some(p) = s.next_piece()? {
            assert!(!p.is_empty());
            pieces.push(p);
        }
        let full = generate_text(&model, &tok, "The quick brown fox", &cfg)?;
        assert_eq!(full.token_ids.len(), 32);
        assert_eq!(full.prompt_tokens, prompt.len());
        assert_eq!(full.stop_reason, StopReason::MaxNewTokens);
        assert_eq!(pieces.concat(), full.text, "{arch}");
        assert_eq!(full.text, tok.decode(&full.token_ids, true)?, "{arch}");
        assert_eq!(s.text(), full.text);
        assert_eq!(
            full.token_ids,
            generate(&model, &prompt, &cfg, |_| {})?,
            "{arch}: same tokens as generate"
        );

        // A stop string taken from the middle of that text (3 characters from the 6th).
        let chars: Vec<(usize, char)> = full.text.char_indices().collect();
        assert!(chars.len() > 12, "{arch}: text too short: {:?}", full.text);
        let (start, end) = (chars[5].0, chars[8].0);
        let stop = full.text[start..end].to_string();
        let cut = full.text.find(&stop).unwrap();
        let cfg_stop = GenerationConfig {
            stop_strings: vec!["never appears \u{1F600}".into(), stop.clone()],
            ..cfg.clone()
        };
        let mut s = TextStream::new(&model, &tok, &prompt, &cfg_stop)?;
        let pieces: Vec<String> = s.by_ref().collect::<Result<_>>()?;
        assert_eq!(pieces.concat(), full.text[..cut], "{arch}: stop {stop:?}");
        assert_eq!(s.stop_reason(), Some(&StopReason::StopString(stop.clone())));
        let ids = s.token_ids().to_vec();
        assert!(ids.len() < 32 && full.token_ids.starts_with(&ids));
        // It stopped on the token that completed the stop string.
        assert!(tok.decode(&ids, true)?.contains(&stop));
        assert!(!tok.decode(&ids[..ids.len() - 1], true)?.contains(&stop));
        let out = generate_text(
            &model,
            &tok,
            Prompt::Text("The quick brown fox".into()),
            &cfg_stop,
        )?;
        assert_eq!(out.text, full.text[..cut]);
        assert_eq!(out.token_ids, ids);
        assert_eq!(out.stop_reason, StopReason::StopString(stop));

        // Stopping a text stream early: the text so far is a prefix.
        let mut s = TextStream::new(&model, &tok, &prompt, &cfg)?;
        let first = s.next().unwrap()?;
        assert!(full.text.starts_with(&first));
        assert!(s.token_ids().len() < 32);

        // An empty stop string is refused.
        let bad = GenerationConfig {
            stop_strings: vec![String::new()],
            ..cfg.clone()
        };
        assert!(TextStream::new(&model, &tok, &prompt, &bad).is_err());
    }
    Ok(())
}

/// A chat prompt is rendered with the template and the generation prompt, encoded without
/// extra special tokens; EOS from the tokenizer ends it.
fn chat_prompt(dev: &Device) -> Result<()> {
    let model = Transformer::from_dir(fixture("qwen2"), DType::F32, dev)?;
    let tok = Tokenizer::from_dir(fixture("qwen2"))?;
    let messages = vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "Hello, how are you?"),
    ];
    let ids = Prompt::from(messages.clone()).to_ids(&tok)?;
    let text = tok.apply_chat_template(&messages, true)?;
    assert!(text.ends_with("<|im_start|>assistant\n"));
    assert_eq!(ids, tok.encode(&text, false)?);
    assert_eq!(Prompt::from(&messages[..]), Prompt::Chat(messages.clone()));
    assert_eq!(
        Prompt::from("Hi").to_ids(&tok)?,
        tok.encode("Hi", true)?,
        "plain text keeps the tokenizer's special tokens"
    );

    let cfg = greedy(16);
    let plain = generate(&model, &ids, &cfg, |_| {})?;
    let out = generate_text(&model, &tok, messages.clone(), &cfg)?;
    assert_eq!(out.token_ids, plain);
    assert_eq!(out.prompt_tokens, ids.len());
    // With an EOS id that occurs, generation ends there (the EOS is in the ids, not the text).
    let eos = plain[3];
    let cfg_eos = GenerationConfig {
        eos_token_ids: vec![eos],
        ..cfg
    };
    let out = generate_text(&model, &tok, messages, &cfg_eos)?;
    let first = plain.iter().position(|&t| t == eos).unwrap();
    assert_eq!(out.token_ids, plain[..=first]);
    assert_eq!(out.stop_reason, StopReason::Eos(eos));
    assert_eq!(out.text, tok.decode(&plain[..=first], true)?);
    Ok(())
}

device_test!(token_stream, text_stream_and_stop_strings, chat_prompt);
