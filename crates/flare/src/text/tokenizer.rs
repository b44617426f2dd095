//! [`Tokenizer`]: a Hugging Face fast tokenizer (`tokenizer.json`, run by the `tokenizers`
//! crate) with what transformers reads beside it: the special tokens (`bos_token`,
//! `eos_token`, `pad_token`, `unk_token`) from `tokenizer_config.json` or
//! `special_tokens_map.json`, and the chat template from `chat_template.jinja` or the
//! `chat_template` field of `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat::{ChatMessage, ChatTemplate};
use crate::hf_json::bad_file;
use crate::{Error, Result};

const OP: &str = "tokenizer";
const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
const TEMPLATE_FILE: &str = "chat_template.jinja";
const SPECIAL_NAMES: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

/// A tokenizer with its special tokens and (optional) chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: PathBuf,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    unk: Option<(String, u32)>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("file", &self.file)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Reads a model directory: `tokenizer.json` (required), and when present
    /// `tokenizer_config.json` (special tokens, `chat_template`), `special_tokens_map.json`
    /// (special tokens the config lacks) and `chat_template.jinja` (preferred over the config's
    /// `chat_template`, as transformers does).
    ///
    /// Errors name the file: a missing or malformed `tokenizer.json`, malformed JSON in the
    /// other files, a special token or `chat_template` of the wrong type, a special token that
    /// is not in the vocabulary, a chat template that does not compile.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join(TOKENIZER_FILE))?;

        let mut template: Option<String> = None;
        let config_path = dir.join(CONFIG_FILE);
        if config_path.is_file() {
            let config = read_json(&config_path)?;
            for name in SPECIAL_NAMES {
                if let Some(v) = config.get(name) {
                    tok.set_special_from_json(name, v, &config_path)?;
                }
            }
            template = match config.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(v) => Some(template_from_json(v, &config_path)?),
            };
        }
        let map_path = dir.join(SPECIAL_TOKENS_FILE);
        if map_path.is_file() {
            let map = read_json(&map_path)?;
            for name in SPECIAL_NAMES {
                if tok.special(name).is_none() {
                    if let Some(v) = map.get(name) {
                        tok.set_special_from_json(name, v, &map_path)?;
                    }
                }
            }
        }
        let template_path = dir.join(TEMPLATE_FILE);
        let mut template_file = config_path.clone();
        if template_path.is_file() {
            template = Some(
                std::fs::read_to_string(&template_path).map_err(|e| Error::Io {
                    context: format!("reading chat template {}", template_path.display()),
                    source: e,
                })?,
            );
            template_file = template_path;
        }
        if let Some(source) = template {
            let t =
                ChatTemplate::new(source).map_err(|e| bad_file(&template_file, e.to_string()))?;
            tok.chat_template = Some(t);
        }
        Ok(tok)
    }

    /// Reads a `tokenizer.json` alone: no special tokens known (see
    /// [`set_special_token`](Self::set_special_token)) and no chat template.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            context: format!("reading tokenizer {}", path.display()),
            source: e,
        })?;
        let inner = parse_tokenizer(&bytes, path)?;
        Ok(Tokenizer {
            inner,
            file: path.to_path_buf(),
            bos: None,
            eos: None,
            pad: None,
            unk: None,
            chat_template: None,
        })
    }

    /// The `tokenizer.json` this tokenizer was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (adding
    /// BOS for Llama, nothing for Qwen2), as transformers' `encode` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` leaves out special tokens (BOS, EOS, chat
    /// markers). No `clean_up_tokenization_spaces` step: transformers 5 skips it for BPE
    /// tokenizers, which every family flare builds uses. Errors: a token id outside the
    /// vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(t) = ids.iter().find(|&&t| t as usize >= n) {
            return Err(self.err(format!("token id {t} out of the vocabulary ({n})")));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("decoding failed: {e}")))
    }

    /// The id of a token (added tokens included), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of tokens, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token's id, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.1)
    }

    /// The EOS token's id, if the tokenizer has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.1)
    }

    /// The padding token's id, if the tokenizer has one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|t| t.1)
    }

    /// The text of a special token by its transformers name (`bos_token`, `eos_token`,
    /// `pad_token`, `unk_token`), if set.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special(name).as_ref().map(|t| t.0.as_str())
    }

    /// Sets a special token (`bos_token`, `eos_token`, `pad_token` or `unk_token`) to `token`,
    /// which must be in the vocabulary. The chat template sees the new value.
    pub fn set_special_token(&mut self, name: &str, token: &str) -> Result<()> {
        let id = self
            .token_to_id(token)
            .ok_or_else(|| self.err(format!("{name} {token:?} is not in the vocabulary")))?;
        let slot = match name {
            "bos_token" => &mut self.bos,
            "eos_token" => &mut self.eos,
            "pad_token" => &mut self.pad,
            "unk_token" => &mut self.unk,
            _ => {
                return Err(self.err(format!(
                "unknown special token name {name:?} (bos_token, eos_token, pad_token, unk_token)"
            )))
            }
        };
        *slot = Some((token.to_string(), id));
        Ok(())
    }

    /// The chat template, if the model directory has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Sets (or replaces) the chat template.
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        self.chat_template = Some(template);
    }

    /// Renders a conversation with the chat template, as transformers'
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`:
    /// the template sees `messages`, `add_generation_prompt` and the special tokens. The text
    /// usually begins with the special tokens already, so encode it with
    /// `add_special_tokens = false`. Errors: no chat template, or the template fails.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(self.err(
                "no chat template (neither chat_template.jinja nor a `chat_template` field in \
                 tokenizer_config.json)"
                    .into(),
            ));
        };
        let mut t = template.clone();
        for name in SPECIAL_NAMES {
            if let Some((text, _)) = self.special(name) {
                t = t.with_special_token(name, text.clone());
            }
        }
        t.render(messages, add_generation_prompt)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn special(&self, name: &str) -> &Option<(String, u32)> {
        match name {
            "bos_token" => &self.bos,
            "eos_token" => &self.eos,
            "pad_token" => &self.pad,
            _ => &self.unk,
        }
    }

    /// A special token given as a string or as an added-token object `{"content": ...}`.
    fn set_special_from_json(&mut self, name: &str, v: &Value, file: &Path) -> Result<()> {
        let token = match v {
            Value::Null => return Ok(()),
            Value::String(s) => s.as_str(),
            Value::Object(o) => match o.get("content") {
                Some(Value::String(s)) => s.as_str(),
                _ => {
                    return Err(bad_file(
                        file,
                        format!("field `{name}`: an object without a string `content`"),
                    ))
                }
            },
            other => {
                return Err(bad_file(
                    file,
                    format!("field `{name}`: expected a string, got {other}"),
                ))
            }
        };
        let id = self.token_to_id(token).ok_or_else(|| {
            bad_file(
                file,
                format!("field `{name}`: token {token:?} is not in the vocabulary"),
            )
        })?;
        let slot = match name {
            "bos_token" => &mut self.bos,
            "eos_token" => &mut self.eos,
            "pad_token" => &mut self.pad,
            _ => &mut self.unk,
        };
        *slot = Some((token.to_string(), id));
        Ok(())
    }

    fn err(&self, msg: String) -> Error {
        Error::InvalidArgument {
            op: OP,
            msg: format!("{}: {msg}", self.file.display()),
        }
    }
}

/// Builds the `tokenizers` tokenizer from the bytes of `tokenizer.json`. The JSON is parsed
/// first (strings and escapes included), with serde's line and column: `tokenizers` panics on
/// some malformed JSON inside the `decoder` section (a lone surrogate escape, say) instead of
/// returning an error. A panic that still escapes it is
/// caught and reported as an error naming the file.
fn parse_tokenizer(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<Value>(bytes)
        .map_err(|e| bad_file(path, format!("malformed JSON: {e}")))?;
    let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes));
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(bad_file(path, format!("not a valid tokenizer: {e}"))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(bad_file(
                path,
                format!("not a valid tokenizer (the tokenizers crate failed: {what})"),
            ))
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        context: format!("reading {}", path.display()),
        source: e,
    })?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad_file(path, "expected a JSON object")),
        Err(e) => Err(bad_file(path, format!("malformed JSON: {e}"))),
    }
}

/// `chat_template` as a string, or as a list of `{"name", "template"}` (the one named
/// `default` is taken, as transformers does without a `chat_template` argument).
fn template_from_json(v: &Value, file: &Path) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(list) => {
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let tmpl = item.get("template").and_then(Value::as_str);
                match (name, tmpl) {
                    (Some("default"), Some(t)) => return Ok(t.to_string()),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(bad_file(
                            file,
                            "field `chat_template`: list items must be {\"name\": string, \
                             \"template\": string}",
                        ))
                    }
                }
            }
            Err(bad_file(
                file,
                "field `chat_template`: a list of named templates without one named \"default\"",
            ))
        }
        other => Err(bad_file(
            file,
            format!("field `chat_template`: expected a string or a list, got {other}"),
        )),
    }
}
