//! Chat templates: the Jinja template of a model, found where transformers finds it
//! (`chat_template.jinja`, `chat_template.json`, `tokenizer_config.json`), rendered with
//! minijinja and the helpers Hugging Face templates call.

use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;

use super::records::Message;
use crate::error::{Error, Result};

/// Used when a model ships no chat template (base models): each turn is a role tag
/// line, the content, and the EOS token, so the model learns to end its answers.
pub const FALLBACK_TEMPLATE: &str = "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// True when the model had no template and `FALLBACK_TEMPLATE` is used.
    pub fallback: bool,
    /// The file the template came from, or with the fallback the model it was for.
    pub origin: String,
    /// The template's Jinja text (a GGUF export writes it as `tokenizer.chat_template`).
    pub source: String,
}

/// The files of a model that may hold its chat template, in the order transformers
/// reads them: the first that has one wins.
pub const TEMPLATE_FILES: [&str; 3] = ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"];

/// The template of a `chat_template` value: a string, or a list of named templates
/// (the one named `default`).
fn template_of(v: Option<&Value>, place: &str) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n));
            let t = named("default").ok_or_else(|| {
                let names: Vec<&str> = list.iter().filter_map(|t| t.get("name").and_then(|x| x.as_str())).collect();
                Error::Template(format!("{place}: `chat_template` lists templates {} but none named `default`", names.join(", ")))
            })?;
            match t.get("template") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(Error::Template(format!("{place}: the `default` entry of `chat_template` has no `template` string"))),
            }
        }
        Some(other) => Err(Error::Template(format!("{place}: `chat_template` is {other}, expected a string or a list of named templates"))),
    }
}

/// A special token as tokenizer_config.json writes it: a string or {"content": ...}.
pub fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// Today's date as strftime would print it, for templates that date the system prompt.
fn strftime_now(fmt: String) -> String {
    let days = crate::clock::days_since_epoch();
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%B", month)
        .replace("%b", &month[..3])
}

impl ChatTemplate {
    fn build(source: String, bos_token: String, eos_token: String, fallback: bool, place: &str) -> Result<ChatTemplate> {
        let origin = place.to_string();
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.clone()).map_err(|e| Error::Template(format!("{place}: {e}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token, fallback, origin, source })
    }

    /// The template of a `tokenizer_config.json` alone (`source` names it in errors);
    /// the documented fallback when it has none.
    pub fn from_tokenizer_config(text: &str, source: &str) -> Result<ChatTemplate> {
        Self::from_files(|name| (name == "tokenizer_config.json").then(|| text.as_bytes().to_vec()), source)
    }

    /// The template of a model whose files `get` returns by name (`source/name` in
    /// errors), looked for in `TEMPLATE_FILES` order as transformers does; the special
    /// tokens come from `tokenizer_config.json`. The fallback when no file has one.
    pub fn from_files(get: impl Fn(&str) -> Option<Vec<u8>>, source: &str) -> Result<ChatTemplate> {
        let json = |name: &str| -> Result<Option<Value>> {
            let Some(bytes) = get(name) else { return Ok(None) };
            serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Template(format!("{source}/{name}: {e}")))
        };
        let config = json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let bos = token_text(config.get("bos_token")).unwrap_or_default();
        let eos = token_text(config.get("eos_token")).unwrap_or_default();
        for file in TEMPLATE_FILES {
            let place = format!("{source}/{file}");
            let template = match file {
                "chat_template.jinja" => match get(file) {
                    Some(bytes) => Some(String::from_utf8(bytes).map_err(|e| Error::Template(format!("{place}: not UTF-8 ({e})")))?),
                    None => None,
                },
                "chat_template.json" => match json(file)? {
                    Some(v) => Some(template_of(v.get("chat_template"), &place)?.ok_or_else(|| {
                        Error::Template(format!("{place}: no `chat_template` in it"))
                    })?),
                    None => None,
                },
                _ => template_of(config.get("chat_template"), &place)?,
            };
            if let Some(t) = template {
                return Self::build(t, bos, eos, false, &place);
            }
        }
        Self::build(FALLBACK_TEMPLATE.to_string(), bos, eos, true, source)
    }

    /// Where the template came from, in one line; for the fallback, a warning that
    /// says so and shows it rendering a short conversation.
    pub fn describe(&self) -> String {
        if !self.fallback {
            return format!("chat template: {}", self.origin);
        }
        let sample = [Message::new("user", "Hi"), Message::new("assistant", "Hello")];
        format!(
            "{} has no chat template (none in {}): chat records use webtune's fallback template, which renders a user and an assistant turn as {:?}",
            self.origin,
            TEMPLATE_FILES.join(", "),
            self.render(&sample, false).unwrap_or_default()
        )
    }

    /// A template from its source text.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        Self::build(source.to_string(), bos_token.into(), eos_token.into(), false, "template")
    }

    /// Render `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<_> = messages.iter().map(|m| context! { role => m.role, content => m.content }).collect();
        let tmpl = self.env.get_template("chat").expect("added at build");
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }
}
