//! Chat templates: the Jinja template in a model's `tokenizer_config.json`, rendered
//! with minijinja and the helpers Hugging Face templates call.

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
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source).map_err(|e| Error::Template(format!("{place}: {e}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token, fallback })
    }

    /// The template of a `tokenizer_config.json` (`source` names it in errors); the
    /// documented fallback when it has none.
    pub fn from_tokenizer_config(text: &str, source: &str) -> Result<ChatTemplate> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Template(format!("{source}: {e}")))?;
        let bos = token_text(v.get("bos_token")).unwrap_or_default();
        let eos = token_text(v.get("eos_token")).unwrap_or_default();
        let template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        match template {
            Some(t) => Self::build(t, bos, eos, false, source),
            None => Self::build(FALLBACK_TEMPLATE.to_string(), bos, eos, true, source),
        }
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
