//! Instruction-tuning records: JSONL or a JSON array, each record in one of the
//! formats TRL and the common datasets use, detected per record.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    /// `messages`: [{role, content}], with an optional system turn.
    Messages,
    /// `prompt` + `completion` (TRL's prompt-completion, no chat template).
    PromptCompletion,
    /// Alpaca: `instruction` + optional `input` + `output`.
    Alpaca,
    /// Dolly: `instruction` + optional `context` + `response`.
    Dolly,
    /// `text`: every token is trained.
    Text,
    /// Preference pairs (DPO), TRL's forms: `prompt` + `chosen` + `rejected` as strings,
    Preference,
    /// the same as message lists,
    PreferenceChat,
    /// or `chosen` + `rejected` conversations sharing their first turns (the prompt).
    PreferenceImplicit,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::PromptCompletion => "prompt/completion",
            Format::Alpaca => "alpaca",
            Format::Dolly => "dolly",
            Format::Text => "text",
            Format::Preference => "preference",
            Format::PreferenceChat => "preference (conversational)",
            Format::PreferenceImplicit => "preference (implicit prompt)",
        }
    }
}

/// What a record asks the model to learn.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Rendered with the chat template; assistant turns are trained.
    Chat(Vec<Message>),
    /// Plain prompt then completion; the completion (and EOS) is trained.
    PromptCompletion { prompt: String, completion: String },
    /// Plain text; everything (and EOS) is trained.
    Text(String),
    /// A preference pair (DPO): the chosen and the rejected completion of one prompt.
    Preference(Pair),
}

/// A prompt with a chosen and a rejected completion, as TRL's preference datasets hold them.
#[derive(Clone, Debug, PartialEq)]
pub enum Pair {
    /// Rendered with the chat template: the prompt's turns, then each completion's.
    Chat { prompt: Vec<Message>, chosen: Vec<Message>, rejected: Vec<Message> },
    /// Plain strings; each completion ends with EOS.
    Text { prompt: String, chosen: String, rejected: String },
}

/// A record with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub record: Record,
    pub format: Format,
    /// "data.jsonl:12" or "data.json record 3": used in every message about it.
    pub place: String,
}

fn err(place: &str, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{place}: field `{field}` {msg}"))
}

fn string(obj: &Map<String, Value>, place: &str, field: &str, required: bool) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(err(place, field, "is missing")),
        Some(Value::String(s)) => {
            if required && s.trim().is_empty() {
                Err(err(place, field, "is empty"))
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(other) => Err(err(place, field, format!("must be a string, got {}", kind(other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn user_turn(instruction: String, extra: Option<String>) -> String {
    match extra.filter(|e| !e.trim().is_empty()) {
        Some(e) => format!("{instruction}\n\n{e}"),
        None => instruction,
    }
}

/// A list of `{role, content}` (or ShareGPT's `{from, value}`) in `field`.
fn messages(m: &Value, place: &str, field: &str) -> Result<Vec<Message>> {
    let list = m.as_array().ok_or_else(|| err(place, field, format!("must be an array of {{role, content}}, got {}", kind(m))))?;
    if list.is_empty() {
        return Err(err(place, field, "is empty"));
    }
    let mut msgs = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let o = item.as_object().ok_or_else(|| err(place, &f, format!("must be an object with role and content, got {}", kind(item))))?;
        // ShareGPT's {from, value} is accepted too.
        let role = match o.get("role").or_else(|| o.get("from")) {
            Some(Value::String(r)) => sharegpt_role(r).to_string(),
            None | Some(Value::Null) => return Err(err(place, &format!("{f}.role"), "is missing")),
            Some(other) => return Err(err(place, &format!("{f}.role"), format!("must be a string, got {}", kind(other)))),
        };
        let content = if o.contains_key("content") { o.get("content") } else { o.get("value") };
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(err(place, &format!("{f}.role"), format!("is \"{role}\"; expected system, user or assistant")));
        }
        let content = match content {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(err(place, &format!("{f}.content"), "is empty")),
            None | Some(Value::Null) => return Err(err(place, &format!("{f}.content"), "is missing")),
            Some(other) => return Err(err(place, &format!("{f}.content"), format!("must be a string, got {}", kind(other)))),
        };
        msgs.push(Message { role, content });
    }
    Ok(msgs)
}

/// One record from its JSON value.
pub fn parse_record(v: &Value, place: &str) -> Result<Parsed> {
    let obj = v.as_object().ok_or_else(|| Error::Data(format!("{place}: a record must be a JSON object, got {}", kind(v))))?;
    let parsed = |record, format| Ok(Parsed { record, format, place: place.to_string() });
    if let Some(m) = obj.get("messages").or_else(|| obj.get("conversations")) {
        let field = if obj.contains_key("messages") { "messages" } else { "conversations" };
        let msgs = messages(m, place, field)?;
        if !msgs.iter().any(|m| m.role == "assistant") {
            return Err(err(place, field, "has no assistant turn to learn from"));
        }
        return parsed(Record::Chat(msgs), Format::Messages);
    }
    if obj.contains_key("chosen") || obj.contains_key("rejected") {
        return preference(obj, place);
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = string(obj, place, "prompt", true)?.unwrap();
        let completion = string(obj, place, "completion", true)?.unwrap();
        return parsed(Record::PromptCompletion { prompt, completion }, Format::PromptCompletion);
    }
    if obj.contains_key("instruction") {
        let instruction = string(obj, place, "instruction", true)?.unwrap();
        if obj.contains_key("output") {
            let input = string(obj, place, "input", false)?;
            let output = string(obj, place, "output", true)?.unwrap();
            let msgs = vec![Message::new("user", &user_turn(instruction, input)), Message::new("assistant", &output)];
            return parsed(Record::Chat(msgs), Format::Alpaca);
        }
        if obj.contains_key("response") {
            let context = string(obj, place, "context", false)?;
            let response = string(obj, place, "response", true)?.unwrap();
            let msgs = vec![Message::new("user", &user_turn(instruction, context)), Message::new("assistant", &response)];
            return parsed(Record::Chat(msgs), Format::Dolly);
        }
        return Err(Error::Data(format!(
            "{place}: a record with `instruction` needs `output` (Alpaca) or `response` (Dolly)"
        )));
    }
    if obj.contains_key("text") {
        let text = string(obj, place, "text", true)?.unwrap();
        return parsed(Record::Text(text), Format::Text);
    }
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort();
    Err(Error::Data(format!(
        "{place}: unknown record format (fields: {}); expected `messages`, `prompt` + `completion`, \
         `instruction` + `output` (Alpaca), `instruction` + `response` (Dolly), `text`, or for DPO \
         `chosen` + `rejected` with an optional `prompt`",
        keys.join(", ")
    )))
}

/// A preference record: `chosen` + `rejected` (strings or message lists) with a
/// `prompt` of the same kind, or conversations alone whose shared first turns are the
/// prompt (TRL's implicit prompt, split as its `extract_prompt` does).
fn preference(obj: &Map<String, Value>, place: &str) -> Result<Parsed> {
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null()).ok_or_else(|| err(place, name, "is missing (a preference pair has `chosen` and `rejected`)"));
    let (c, r) = (field("chosen")?, field("rejected")?);
    let parsed = |pair, format| Ok(Parsed { record: Record::Preference(pair), format, place: place.to_string() });
    let assistant_only = |msgs: &[Message], name: &str| -> Result<()> {
        match msgs.iter().position(|m| m.role != "assistant") {
            Some(i) => Err(err(place, &format!("{name}[{i}].role"), format!("is \"{}\"; a completion holds assistant turns (put the rest in `prompt`)", msgs[i].role))),
            None => Ok(()),
        }
    };
    match (c, r, obj.get("prompt").filter(|v| !v.is_null())) {
        (Value::String(_), _, _) | (_, Value::String(_), _) => {
            let prompt = string(obj, place, "prompt", false)?.ok_or_else(|| err(place, "prompt", "is missing: string pairs need their prompt (only conversations may leave it implicit)"))?;
            let chosen = string(obj, place, "chosen", true)?.unwrap();
            let rejected = string(obj, place, "rejected", true)?.unwrap();
            parsed(Pair::Text { prompt, chosen, rejected }, Format::Preference)
        }
        (_, _, Some(p)) => {
            if p.is_string() {
                return Err(err(place, "prompt", "is a string but `chosen` and `rejected` are message lists; make all three message lists"));
            }
            let prompt = messages(p, place, "prompt")?;
            let (chosen, rejected) = (messages(c, place, "chosen")?, messages(r, place, "rejected")?);
            assistant_only(&chosen, "chosen")?;
            assistant_only(&rejected, "rejected")?;
            parsed(Pair::Chat { prompt, chosen, rejected }, Format::PreferenceChat)
        }
        (_, _, None) => {
            let (chosen, rejected) = (messages(c, place, "chosen")?, messages(r, place, "rejected")?);
            let shared = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err(err(place, "chosen", "and `rejected` share no first turn: give the prompt in `prompt`, or start both conversations with it"));
            }
            if shared == chosen.len() || shared == rejected.len() {
                return Err(err(place, "rejected", "has no turn of its own after the prompt it shares with `chosen`"));
            }
            let prompt = chosen[..shared].to_vec();
            let (chosen, rejected) = (chosen[shared..].to_vec(), rejected[shared..].to_vec());
            assistant_only(&chosen, "chosen")?;
            assistant_only(&rejected, "rejected")?;
            parsed(Pair::Chat { prompt, chosen, rejected }, Format::PreferenceImplicit)
        }
    }
}

fn sharegpt_role(from: &str) -> &str {
    match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" => "assistant",
        "system" => "system",
        other => other,
    }
}

/// The text of a data file's bytes (`source` names it in errors): bytes that are not
/// UTF-8 are an error naming the line, as every other data error does.
pub fn decode(bytes: Vec<u8>, source: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let (b, at) = (e.as_bytes(), e.utf8_error().valid_up_to());
        let line_start = b[..at].iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
        let line = b[..at].iter().filter(|&&c| c == b'\n').count() + 1;
        Error::Data(format!(
            "{source}:{line}: not valid UTF-8 (byte {} of the line is 0x{:02x}); save the file as UTF-8",
            at - line_start + 1,
            b[at]
        ))
    })
}

/// Every record of a JSONL file or a JSON array (`source` names the file in errors).
/// Blank lines in JSONL are skipped.
pub fn parse_records(text: &str, source: &str) -> Result<Vec<Parsed>> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(trimmed)
            .map_err(|e| Error::Data(format!("{source}:{}: malformed JSON: {e}", e.line())))?;
        let list = v.as_array().expect("starts with [");
        if list.is_empty() {
            return Err(Error::Data(format!("{source}: the JSON array has no records")));
        }
        return list.iter().enumerate().map(|(i, r)| parse_record(r, &format!("{source} record {}", i + 1))).collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let place = format!("{source}:{}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Data(format!("{place}: malformed JSON: {e}")))?;
        out.push(parse_record(&v, &place)?);
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{source}: no records")));
    }
    Ok(out)
}
