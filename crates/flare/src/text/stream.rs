//! [`TextDecoder`]: incremental detokenisation for streaming. Each new token id is appended to
//! the running ids, the recent ids are decoded, and the part of the text past what was already
//! given out is returned, held back while the text ends in an incomplete UTF-8 sequence (a
//! byte-level token that is half of a character decodes to U+FFFD). So the pieces never hold
//! half a character, and they add up to the decoded text of all ids.
//!
//! Decoding all ids at every step (as transformers' `TextStreamer` does within a line) costs
//! O(n) per token; instead, as text-generation-inference does, only a window is decoded: the
//! ids since the last piece plus the ones before them that produced it (`prefix`), so that
//! decoders that treat the first token specially (SentencePiece's leading space) see the same
//! context, and the new piece is the text past the prefix's.

use super::tokenizer::Tokenizer;
use crate::{Error, Result};

const OP: &str = "text_decoder";

/// Turns a stream of token ids into a stream of text pieces: each piece is new text past what
/// was given out, never half a character, and the pieces add up to the decoded text of all ids.
#[derive(Debug, Clone)]
pub struct TextDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// The text given out.
    text: String,
    /// The window is `ids[prefix_offset..]`; `ids[prefix_offset..read_offset]` produced the
    /// last piece.
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextDecoder<'a> {
    /// A decoder with no ids yet; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        TextDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            text: String::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Appends a token id and returns the new text it completes, if any (`None` while the
    /// text ends in an incomplete character, or when the token decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let window = &self.ids[self.prefix_offset..];
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let new = self.tokenizer.decode(window, self.skip_special_tokens)?;
        if new.len() <= prefix.len() || new.ends_with('\u{FFFD}') || !new.starts_with(&prefix) {
            return Ok(None);
        }
        let piece = new[prefix.len()..].to_string();
        self.text.push_str(&piece);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }

    /// Returns the text not given out yet, incomplete characters included (as U+FFFD, as
    /// [`Tokenizer::decode`] gives them), once no more ids come. Errors when the decoded text
    /// no longer begins with what was already given out (a tokenizer whose decoder rewrites
    /// earlier text), since that text cannot be taken back.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let full = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let Some(rest) = full.strip_prefix(self.text.as_str()) else {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "the decoded text {full:?} no longer begins with the text already streamed {:?}",
                    self.text
                ),
            });
        };
        if rest.is_empty() {
            return Ok(None);
        }
        let piece = rest.to_string();
        self.text = full;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }

    /// The text given out so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The token ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
