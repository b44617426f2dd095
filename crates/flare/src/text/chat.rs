//! Chat templates: the Jinja templates of Hugging Face tokenizers, rendered with minijinja in
//! the environment transformers builds for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, `raise_exception(msg)`, a `tojson` filter that writes JSON
//! as Python's `json.dumps` does (`", "` and `": "` separators, no HTML escaping, non-ASCII kept,
//! optional `indent`), Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, ... from minijinja-contrib's pycompat), `strftime_now(format)` (UTC), values
//! printed as Python prints them (`True`, `False`, `None`), and the variables `messages`,
//! `add_generation_prompt`, `tools` and `documents` (both `none`: flare passes no tools) and the
//! special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`). transformers' own
//! `{% generation %}...{% endgeneration %}` tag (marking assistant text for its assistant-token
//! mask) renders its body, as in transformers.

use std::io;

use minijinja::value::{Kwargs, Value, ValueKind};
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
        let source = rewrite_generation_tags(&source.into());
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
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        tmpl.render(ctx)
            .map_err(|e| render_error("rendering the chat template", e))
    }
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` (with any `-` whitespace
/// control) as `{% if true %}` / `{% endif %}`, a block tag minijinja knows that renders its
/// body and takes the same whitespace handling.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The environment transformers' `_compile_jinja_template` builds, in minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Bool => Ok(out.write_str(if value.is_true() { "True" } else { "False" })?),
        ValueKind::None => Ok(out.write_str("None")?),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env
}

/// `strftime_now(format)`: the current time (UTC) formatted with the common `strftime`
/// directives (`%Y %y %m %d %e %H %M %S %j %b %B %a %A %%`); others are an error.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs, &format)
        .map(Value::from)
        .map_err(|msg| minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Formats seconds since the Unix epoch (UTC) with a subset of `strftime`.
fn format_utc(secs: i64, format: &str) -> std::result::Result<String, String> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("strftime_now: unsupported directive %{other}")),
            None => return Err("strftime_now: the format ends with %".into()),
        }
    }
    Ok(out)
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
    fn format_utc_matches_python() {
        // datetime.fromtimestamp(1700000000, timezone.utc).strftime(...)
        assert_eq!(
            format_utc(1_700_000_000, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %e %%").unwrap(),
            "2023-11-14 22:13:20 Tue Tuesday Nov November 318 23 14 %"
        );
        // Leap day, before the epoch.
        assert_eq!(
            format_utc(951_782_400, "%d %b %Y %j").unwrap(),
            "29 Feb 2000 060"
        );
        assert_eq!(
            format_utc(-86_400, "%Y-%m-%d %A").unwrap(),
            "1969-12-31 Wednesday"
        );
        assert!(format_utc(0, "%Q").is_err());
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let year: i64 = t.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            rewrite_generation_tags("a{% generation %}b{%- endgeneration -%} c{{ x }}{% if y %}"),
            "a{% if true %}b{%- endif -%} c{{ x }}{% if y %}"
        );
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("a", "x")], false).unwrap(),
            "[x]"
        );
    }

    #[test]
    fn syntax_errors_fail_at_load() {
        assert!(ChatTemplate::new("{% for m in messages %}").is_err());
    }
}
