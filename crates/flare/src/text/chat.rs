//! Chat templates: the Jinja templates of Hugging Face tokenizers, rendered with minijinja in
//! the environment transformers builds for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, `raise_exception(msg)`, a `tojson` filter that writes JSON
//! as Python's `json.dumps` does (`", "` and `": "` separators, no HTML escaping, non-ASCII kept,
//! optional `indent`), Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, ... from minijinja-contrib's pycompat), and the variables `messages`,
//! `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`).

use std::io;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const OP: &str = "chat_template";

/// One message of a conversation: `{"role": "user", "content": "Hi"}`. Deserializes from the
/// JSON objects of chat data sets (other fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template (Jinja source) and the special tokens it may refer to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatTemplate {
    source: String,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// A template from its Jinja source. The source is checked for syntax errors here, so that
    /// a broken template fails when it is loaded rather than at the first message.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let env = environment();
        env.template_from_str(&source)
            .map_err(|e| render_error("compiling the chat template", e))?;
        Ok(ChatTemplate {
            source,
            special_tokens: Vec::new(),
        })
    }

    /// Sets a special token the template can read as a variable (`bos_token`, `eos_token`,
    /// `pad_token`, `unk_token`, ...), replacing an earlier value of the same name.
    pub fn with_special_token(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let value = value.into();
        match self.special_tokens.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.special_tokens.push((name, value)),
        }
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. Errors: the template's own `raise_exception` (an
    /// unsupported role, say) and any rendering error, as [`Error::InvalidArgument`] whose
    /// message carries minijinja's explanation.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| render_error("compiling the chat template", e))?;
        let mut ctx: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(n, v)| (n.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push(("messages".into(), Value::from_serialize(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        tmpl.render(ctx)
            .map_err(|e| render_error("rendering the chat template", e))
    }
}

/// The environment transformers' `_compile_jinja_template` builds, in minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            value.serialize(&mut ser)
        }
    };
    res.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson failed").with_source(e)
    })?;
    let text = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson wrote invalid UTF-8")
            .with_source(e)
    })?;
    Ok(Value::from_safe_string(text))
}

/// serde_json's compact output with Python's default separators `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

fn render_error(what: &str, e: minijinja::Error) -> Error {
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::InvalidArgument { op: OP, msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_separators() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let env = environment();
        let out = env
            .render_str(
                t.source(),
                minijinja::context! { x => serde_json::json!({"a": [1, "é<"], "b": {}}) },
            )
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, \"é<\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"é<\"\n  ],\n  \"b\": {}\n}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let t = ChatTemplate::new("{{ raise_exception('only user and assistant') }}").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("only user and assistant"), "{err}");
    }

    #[test]
    fn syntax_errors_fail_at_load() {
        assert!(ChatTemplate::new("{% for m in messages %}").is_err());
    }
}
