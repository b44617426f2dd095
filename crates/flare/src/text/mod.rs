//! Text in and out of a model: a [`Tokenizer`] read from a Hugging Face model directory
//! (`tokenizer.json` through the `tokenizers` crate, special tokens and the chat template from
//! `tokenizer_config.json` or `chat_template.jinja`), chat templates rendered with minijinja the
//! way transformers' `apply_chat_template` renders them ([`ChatTemplate`], [`ChatMessage`]), and
//! incremental detokenisation for streaming ([`TextDecoder`]).
//!
//! ```no_run
//! use flare::text::{ChatMessage, Tokenizer};
//! let tok = Tokenizer::from_dir("qwen2-0.5b-instruct")?;
//! let prompt = tok.apply_chat_template(&[ChatMessage::new("user", "Hello!")], true)?;
//! let ids = tok.encode(&prompt, false)?;
//! assert_eq!(tok.decode(&ids, false)?, prompt);
//! # Ok::<(), flare::Error>(())
//! ```

mod chat;
mod stream;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::TextDecoder;
pub use tokenizer::Tokenizer;
