//! [`TextDecoder`]: incremental detokenisation for streaming. Each new token id is appended to
//! the running ids, the ids are decoded, and the part of the text past what was already given
//! out is returned, held back while the text ends in an incomplete UTF-8 sequence (a byte-level
//! token that is half of a character decodes to U+FFFD). So the pieces never hold half a
//! character, and their concatenation is the decoded text of all ids (transformers'
//! `TextStreamer` decodes the running ids the same way).

use super::tokenizer::Tokenizer;
use crate::{Error, Result};

const OP: &str = "text_decoder";

/// Turns a stream of token ids into a stream of text pieces. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct TextDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    text: String,
}

impl<'a> TextDecoder<'a> {
    /// A decoder with no ids yet; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        TextDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Appends a token id and returns the new text it completes, if any (`None` while the
    /// text ends in an incomplete character, or when the token decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let full = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if full.ends_with('\u{FFFD}') || !full.starts_with(&self.text) {
            return Ok(None);
        }
        Ok(self.take_suffix(full))
    }

    /// Returns the text not given out yet, incomplete characters included (as U+FFFD, as
    /// [`Tokenizer::decode`] gives them), once no more ids come. Errors when the decoded text
    /// no longer begins with what was already given out (a tokenizer whose decoder rewrites
    /// earlier text), since that text cannot be taken back.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let full = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if !full.starts_with(&self.text) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!(
                    "the decoded text {full:?} no longer begins with the text already streamed {:?}",
                    self.text
                ),
            });
        }
        Ok(self.take_suffix(full))
    }

    /// The text given out so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The token ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn take_suffix(&mut self, full: String) -> Option<String> {
        if full.len() == self.text.len() {
            return None;
        }
        let piece = full[self.text.len()..].to_string();
        self.text = full;
        Some(piece)
    }
}
