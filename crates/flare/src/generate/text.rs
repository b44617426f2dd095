//! Text-level generation: [`TextStream`] turns the token ids of a [`TokenStream`] into text
//! pieces with a [`TextDecoder`] (special tokens skipped, never half a character) and stops at
//! the first of the config's stop strings, which it leaves out of the text. Text that could be
//! the beginning of a stop string is held back until the next tokens show it is not.
//! [`generate_text`] runs it to the end from a [`Prompt`]: a plain string, or a conversation
//! rendered with the tokenizer's chat template.

use super::{GenerationConfig, StopReason, TokenStream};
use crate::models::Transformer;
use crate::text::{ChatMessage, TextDecoder, Tokenizer};
use crate::{Error, Result};

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, encoded with the tokenizer's special tokens (BOS for Llama).
    Text(String),
    /// A conversation, rendered with the tokenizer's chat template and the generation prompt
    /// (`add_generation_prompt = true`), then encoded without adding special tokens (the
    /// template writes them).
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// The token ids of the prompt, as described on each variant.
    pub fn to_ids(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
        match self {
            Prompt::Text(text) => tokenizer.encode(text, true),
            Prompt::Chat(messages) => {
                let text = tokenizer.apply_chat_template(messages, true)?;
                tokenizer.encode(&text, false)
            }
        }
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_string())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl From<Vec<ChatMessage>> for Prompt {
    fn from(messages: Vec<ChatMessage>) -> Self {
        Prompt::Chat(messages)
    }
}

impl From<&[ChatMessage]> for Prompt {
    fn from(messages: &[ChatMessage]) -> Self {
        Prompt::Chat(messages.to_vec())
    }
}

/// The result of [`generate_text`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The generated text: special tokens skipped, cut before the stop string.
    pub text: String,
    /// The generated token ids, including the EOS token or the tokens of the stop string
    /// when generation stopped on one.
    pub token_ids: Vec<u32>,
    /// The number of prompt tokens.
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub stop_reason: StopReason,
}

/// Generated text, one piece per [`Iterator::next`]: the pieces add up to the decoded new
/// tokens (special tokens skipped), cut before the first stop string of the config. Stopping
/// early (dropping the stream) costs nothing more. After an error the stream ends.
///
/// ```no_run
/// # use candle_core::{DType, Device};
/// use std::io::Write;
/// use flare::generate::{GenerationConfig, Prompt, TextStream};
/// use flare::text::{ChatMessage, Tokenizer};
/// let model = flare::models::Transformer::from_dir("qwen2-0.5b-instruct", DType::F32, &Device::Cpu)?;
/// let tok = Tokenizer::from_dir("qwen2-0.5b-instruct")?;
/// let cfg = GenerationConfig { max_new_tokens: 64, stop_strings: vec!["\n\n".into()], ..Default::default() };
/// let prompt = Prompt::Chat(vec![ChatMessage::new("user", "Hi!")]).to_ids(&tok)?;
/// for piece in TextStream::new(&model, &tok, &prompt, &cfg)? {
///     print!("{}", piece?);
///     std::io::stdout().flush().ok();
/// }
/// # Ok::<(), flare::Error>(())
/// ```
#[derive(Debug)]
pub struct TextStream<'a> {
    tokens: TokenStream<'a>,
    decoder: TextDecoder<'a>,
    stop_strings: &'a [String],
    /// All decoded new text (may run past a stop string by the tail of its last token).
    text: String,
    /// Bytes of `text` handed out.
    emitted: usize,
    stop: Option<StopReason>,
    done: bool,
}

impl<'a> TextStream<'a> {
    /// Prefills `prompt_ids` (see [`TokenStream::new`] for the errors; an empty stop string is
    /// one too).
    pub fn new(
        model: &'a Transformer,
        tokenizer: &'a Tokenizer,
        prompt_ids: &[u32],
        config: &'a GenerationConfig,
    ) -> Result<Self> {
        if config.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(Error::InvalidArgument {
                op: "generate",
                msg: "a stop string is empty".into(),
            });
        }
        Ok(TextStream {
            tokens: TokenStream::new(model, prompt_ids, config)?,
            decoder: TextDecoder::new(tokenizer, true),
            stop_strings: &config.stop_strings,
            text: String::new(),
            emitted: 0,
            stop: None,
            done: false,
        })
    }

    /// The text handed out so far.
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// The token ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        self.tokens.tokens()
    }

    /// Why generation ended, once it has.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref().or(self.tokens.stop_reason())
    }

    /// The next piece of text, or `None` at the end.
    pub fn next_piece(&mut self) -> Result<Option<String>> {
        while !self.done {
            let res = self.advance();
            if res.is_err() {
                self.done = true;
            }
            if let Some(piece) = res? {
                return Ok(Some(piece));
            }
        }
        Ok(None)
    }

    /// Runs the stream to the end and returns everything as one [`Generated`].
    pub fn finish(mut self) -> Result<Generated> {
        while self.next_piece()?.is_some() {}
        Ok(Generated {
            text: self.text().to_string(),
            token_ids: self.token_ids().to_vec(),
            prompt_tokens: self.tokens.prompt().len(),
            stop_reason: self
                .stop_reason()
                .cloned()
                .unwrap_or(StopReason::MaxNewTokens),
        })
    }

    /// One token (or the end): returns a non-empty piece when there is one.
    fn advance(&mut self) -> Result<Option<String>> {
        let at_end = match self.tokens.next_token()? {
            Some(id) => {
                if let Some(piece) = self.decoder.push(id)? {
                    self.text.push_str(&piece);
                }
                false
            }
            None => {
                if let Some(piece) = self.decoder.finish()? {
                    self.text.push_str(&piece);
                }
                self.done = true;
                true
            }
        };
        // A stop string can only begin in the part not handed out yet (see `safe_end`).
        let open = &self.text[self.emitted..];
        let found = self
            .stop_strings
            .iter()
            .filter_map(|s| open.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i);
        let end = match found {
            Some((i, s)) => {
                self.stop = Some(StopReason::StopString(s.clone()));
                self.done = true;
                self.emitted + i
            }
            None if at_end => self.text.len(),
            None => self.emitted + safe_end(open, self.stop_strings),
        };
        let piece = self.text[self.emitted..end].to_string();
        self.emitted = end;
        Ok((!piece.is_empty()).then_some(piece))
    }
}

/// The length of the longest prefix of `open` that can be handed out: `open` minus its
/// longest suffix that is the beginning of a stop string.
fn safe_end(open: &str, stop_strings: &[String]) -> usize {
    let held = stop_strings
        .iter()
        .map(|s| {
            (1..s.len().min(open.len() + 1))
                .rev()
                .find(|&n| {
                    s.is_char_boundary(n)
                        && open.is_char_boundary(open.len() - n)
                        && open.ends_with(&s[..n])
                })
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    open.len() - held
}

impl Iterator for TextStream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        self.next_piece().transpose()
    }
}

/// Generates text after `prompt` (a string or a conversation, see [`Prompt`]) and returns it
/// with its token ids and why it stopped. Stops at an EOS id of `config`, at its first stop
/// string (left out of the text) or after `config.max_new_tokens` tokens.
///
/// ```no_run
/// # use candle_core::{DType, Device};
/// use flare::generate::{generate_text, GenerationConfig, HfGenerationConfig};
/// use flare::text::Tokenizer;
/// let dir = "qwen2-0.5b";
/// let model = flare::models::Transformer::from_dir(dir, DType::F32, &Device::Cpu)?;
/// let tok = Tokenizer::from_dir(dir)?;
/// let mut cfg = GenerationConfig { max_new_tokens: 32, ..Default::default() };
/// if let Some(file) = HfGenerationConfig::from_dir(dir)? {
///     file.apply(&mut cfg, 0);
/// }
/// let out = generate_text(&model, &tok, "The capital of France is", &cfg)?;
/// println!("{}", out.text);
/// # Ok::<(), flare::Error>(())
/// ```
pub fn generate_text(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompt: impl Into<Prompt>,
    config: &GenerationConfig,
) -> Result<Generated> {
    let ids = prompt.into().to_ids(tokenizer)?;
    TextStream::new(model, tokenizer, &ids, config)?.finish()
}

#[cfg(test)]
mod tests {
    use super::safe_end;

    #[test]
    fn safe_end_holds_back_stop_string_prefixes() {
        let stops = vec!["</s>".to_string(), "ab".to_string(), "é!".to_string()];
        assert_eq!(safe_end("hello", &stops), 5);
        assert_eq!(safe_end("hello</", &stops), 5);
        assert_eq!(safe_end("hello<", &stops), 5);
        assert_eq!(safe_end("xa", &stops), 1);
        assert_eq!(safe_end("café", &stops), "caf".len());
        assert_eq!(safe_end("", &stops), 0);
        assert_eq!(safe_end("abc", &[]), 3);
    }
}
