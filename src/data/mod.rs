//! From records to training examples: chat templates, tokenization and the loss
//! mask (which tokens are trained), then truncation, packing and batches.

pub mod batch;
pub mod demo;
pub mod inspect;
pub mod records;
pub mod template;
pub mod tools;

pub use batch::sees;
pub use records::{decode, parse_records, Format, Message, Pair, Parsed, Record};
pub use template::ChatTemplate;

use crate::error::{Error, Result};

/// A built-in data set's JSONL: `demo` (the demo's instructions), `demo-pretrain` (the
/// statements its base was pretrained on), `demo-dpo` (its DPO stage's pairs),
/// `tools` (the real-model demo's requests and tool calls).
pub fn builtin(name: &str) -> Option<String> {
    Some(match name {
        "demo" => demo::data(),
        "demo-pretrain" => demo::pretrain_jsonl(3, demo::PRETRAIN_RECORDS),
        "demo-dpo" => demo::preference_data(),
        "tools" => tools::data(),
        _ => return None,
    })
}

/// The text of the data called `name`, for both front ends: the built-in set of that
/// name, or else the bytes `read` gives (a file's or an upload's), which must be
/// UTF-8 (an error names the line).
pub fn text(name: &str, read: impl FnOnce() -> Result<Vec<u8>>) -> Result<String> {
    match builtin(name) {
        Some(text) => Ok(text),
        None => decode(read()?, name),
    }
}

/// Parse, validate and tokenize the text of data `name` (`text`'s) into training
/// sequences: records (`parse_records`), then template, mask, truncation and packing
/// (`batch::prepare`).
pub fn load(tok: &Tokenizer, text: &str, name: &str, max_seq_len: usize, pack: bool, train_on_prompt: bool) -> Result<batch::Dataset> {
    let records = parse_records(text, name)?;
    batch::prepare(tok, &records, max_seq_len, pack, train_on_prompt)
}

/// `load` of a data file, or of a built-in set by its name: what the CLI reads.
pub fn load_path(tok: &Tokenizer, path: &std::path::Path, max_seq_len: usize, pack: bool, train_on_prompt: bool) -> Result<batch::Dataset> {
    let name = path.display().to_string();
    let text = text(&name, || std::fs::read(path).map_err(|e| Error::io(path, e)))?;
    load(tok, &text, &name, max_seq_len, pack, train_on_prompt)
}

/// Tokens that close a turn in the templates we know; a trained span ends after the
/// last one it contains (its trailing newline is left untrained).
const END_MARKERS: [&str; 5] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>"];

/// A token's byte range in its text: (start, end).
pub type Span = (usize, usize);

/// A tokenizer (`tokenizer.json`) with the model's chat template and special tokens.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    pub pad_id: u32,
    end_markers: Vec<String>,
}

/// One tokenized record: ids, which are trained, and the rendered text with each
/// token's byte span in it (for previews).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    pub text: String,
    pub offsets: Vec<(usize, usize)>,
    pub format: Format,
    pub place: String,
    /// Tokens cut by truncation.
    pub truncated: usize,
}

impl Example {
    pub fn trained_count(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

impl Tokenizer {
    /// From the bytes of `tokenizer.json` and the text of `tokenizer_config.json`
    /// (optional: without it there is no template beyond the fallback).
    pub fn new(tokenizer_json: &[u8], tokenizer_config: Option<&str>, source: &str) -> Result<Tokenizer> {
        Self::from_files(
            |name| match name {
                "tokenizer.json" => Some(tokenizer_json.to_vec()),
                "tokenizer_config.json" => tokenizer_config.map(|c| c.as_bytes().to_vec()),
                _ => None,
            },
            source,
        )
    }

    /// From a model's files as `get` returns them by name: `tokenizer.json`, and the
    /// optional `tokenizer_config.json` and chat template files (`template::TEMPLATE_FILES`).
    pub fn from_files(get: impl Fn(&str) -> Option<Vec<u8>>, source: &str) -> Result<Tokenizer> {
        let json = get("tokenizer.json").ok_or_else(|| Error::Tokenizer(format!("{source}: no tokenizer.json")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&json).map_err(|e| Error::Tokenizer(format!("{source}/tokenizer.json: {e}")))?;
        let config_bytes = get("tokenizer_config.json");
        let tokenizer_config = config_bytes.as_deref().and_then(|b| std::str::from_utf8(b).ok());
        let template = ChatTemplate::from_files(&get, source)?;
        let id = |t: &str| if t.is_empty() { None } else { inner.token_to_id(t) };
        let eos_id = id(&template.eos_token).ok_or_else(|| {
            Error::Tokenizer(format!("{source}: tokenizer_config.json names no eos_token that tokenizer.json knows (`{}`)", template.eos_token))
        })?;
        let bos_id = id(&template.bos_token);
        let pad_id = tokenizer_config
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .and_then(|v| template::token_text(v.get("pad_token")))
            .and_then(|t| id(&t))
            .unwrap_or(eos_id);
        let mut end_markers: Vec<String> = END_MARKERS.iter().filter(|m| inner.token_to_id(m).is_some()).map(|m| m.to_string()).collect();
        if !end_markers.contains(&template.eos_token) {
            end_markers.push(template.eos_token.clone());
        }
        Ok(Tokenizer { inner, template, eos_id, bos_id, pad_id, end_markers })
    }

    /// `tokenizer.json`, and where present `tokenizer_config.json` and the chat
    /// template files, of a model directory.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: &std::path::Path) -> Result<Tokenizer> {
        let json = dir.join("tokenizer.json");
        if !json.exists() {
            return Err(Error::Io(format!("{}: no such file", json.display())));
        }
        Self::from_files(|name| std::fs::read(dir.join(name)).ok(), &dir.display().to_string())
    }

    /// Token ids and byte offsets (`Span`s) of `text`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of a prompt: a user turn with the chat template and the generation
    /// prompt when `chat`, else the plain text with the tokenizer's special tokens.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            let text = self.template.render(&[Message::new("user", prompt)], true)?;
            Ok(self.encode(&text, false)?.0)
        } else {
            Ok(self.encode(prompt, true)?.0)
        }
    }

    /// EOS or a token that closes a turn in the templates we know.
    pub fn is_end_token(&self, id: u32) -> bool {
        id == self.eos_id || self.end_markers.iter().any(|m| self.inner.token_to_id(m) == Some(id))
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// Byte spans of `full` (the whole conversation rendered) that the assistant turns
    /// occupy, found by rendering the conversation prefix by prefix: a turn starts
    /// where the history rendered with the generation prompt ends, and ends where the
    /// history including it ends, or, for templates that render past turns
    /// differently from the last one, after the first end-of-turn token.
    pub fn assistant_spans(&self, messages: &[Message], full: &str, place: &str) -> Result<Vec<(usize, usize)>> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let prompt = self.template.render(&messages[..i], true).map_err(|e| Error::Data(format!("{place}: {e}")))?;
            if !full.starts_with(&prompt) {
                return Err(Error::Data(format!(
                    "{place}: the chat template renders turn {} differently with add_generation_prompt; cannot find the answer to train",
                    i + 1
                )));
            }
            let start = prompt.len();
            let upto = self.template.render(&messages[..=i], false).map_err(|e| Error::Data(format!("{place}: {e}")))?;
            let mut end = if full.starts_with(&upto) && upto.len() > start {
                upto.len()
            } else {
                let content = full[start..].find(m.content.trim()).map(|p| start + p + m.content.trim().len()).unwrap_or(start);
                self.end_markers.iter().filter_map(|mk| full[content..].find(mk.as_str()).map(|p| content + p + mk.len())).min().unwrap_or(full.len())
            };
            // Stop right after the last end-of-turn token in the span.
            if let Some(cut) = self.end_markers.iter().filter_map(|mk| full[start..end].rfind(mk.as_str()).map(|p| start + p + mk.len())).max() {
                end = cut;
            }
            if end > start {
                spans.push((start, end));
            }
        }
        Ok(spans)
    }

    /// Tokenize one record and mark what is trained: assistant turns (with the token
    /// that closes them) for chat records, the completion and EOS for prompt/completion,
    /// everything and EOS for text; everything when `train_on_prompt`.
    pub fn example(&self, p: &Parsed, train_on_prompt: bool) -> Result<Example> {
        let (ids, trained, text, offsets) = match &p.record {
            Record::Chat(messages) => {
                let text = self.template.render(messages, false).map_err(|e| Error::Data(format!("{}: {e}", p.place)))?;
                let spans = self.assistant_spans(messages, &text, &p.place)?;
                let (ids, offsets) = self.encode(&text, false)?;
                let trained = offsets.iter().map(|&(a, b)| train_on_prompt || spans.iter().any(|&(s, e)| a < e && b > s)).collect();
                (ids, trained, text, offsets)
            }
            Record::PromptCompletion { prompt, completion } => {
                // As TRL: the first len(tokenize(prompt)) tokens of tokenize(prompt + completion) are the prompt.
                let (prompt_ids, _) = self.encode(prompt, true)?;
                let text = format!("{prompt}{completion}");
                let (mut ids, mut offsets) = self.encode(&text, true)?;
                let mut trained: Vec<bool> = (0..ids.len()).map(|i| train_on_prompt || i >= prompt_ids.len()).collect();
                self.push_eos(&mut ids, &mut offsets, &mut trained, text.len());
                (ids, trained, text, offsets)
            }
            Record::Preference(_) => {
                return Err(Error::Data(format!("{}: is a preference pair (chosen + rejected); train preference data with --method dpo", p.place)));
            }
            Record::Text(text) => {
                let (mut ids, mut offsets) = self.encode(text, true)?;
                let mut trained = vec![true; ids.len()];
                self.push_eos(&mut ids, &mut offsets, &mut trained, text.len());
                (ids, trained, text.clone(), offsets)
            }
        };
        Ok(Example { ids, trained, text, offsets, format: p.format, place: p.place.clone(), truncated: 0 })
    }

    /// Tokenize a preference pair as TRL's DPOTrainer does: the prompt alone (chat:
    /// rendered with the generation prompt), and the prompt followed by each completion
    /// (chat: the conversation rendered whole; text: the completion ending with EOS);
    /// the completion is what follows the tokens the prompt shares with both. Returns
    /// the chosen and the rejected example, their completions trained.
    pub fn pair(&self, p: &Parsed) -> Result<(Example, Example)> {
        let Record::Preference(pair) = &p.record else {
            return Err(Error::Data(format!(
                "{}: DPO trains on preference pairs (`chosen` + `rejected`, with an optional `prompt`); this record is {}",
                p.place,
                p.format.name()
            )));
        };
        let render = |msgs: &[Message], gen: bool| self.template.render(msgs, gen).map_err(|e| Error::Data(format!("{}: {e}", p.place)));
        let (prompt, texts) = match pair {
            Pair::Chat { prompt, chosen, rejected } => {
                let whole = |c: &[Message]| render(&[prompt.as_slice(), c].concat(), false);
                (self.encode(&render(prompt, true)?, false)?.0, [(whole(chosen)?, false), (whole(rejected)?, false)])
            }
            Pair::Text { prompt, chosen, rejected } => {
                let eos = &self.template.eos_token;
                let end = |c: &str| if c.ends_with(eos.as_str()) { format!("{prompt}{c}") } else { format!("{prompt}{c}{eos}") };
                (self.encode(prompt, true)?.0, [(end(chosen), true), (end(rejected), true)])
            }
        };
        let mut out = Vec::with_capacity(2);
        for (text, special) in &texts {
            out.push((text.clone(), self.encode(text, *special)?));
        }
        let shared = |ids: &[u32]| prompt.iter().zip(ids).take_while(|(a, b)| a == b).count();
        let start = out.iter().map(|(_, (ids, _))| shared(ids)).min().unwrap_or(0);
        let mut examples = out.into_iter().map(|(text, (ids, offsets))| {
            let trained = (0..ids.len()).map(|i| i >= start).collect();
            Example { ids, trained, text, offsets, format: p.format, place: p.place.clone(), truncated: 0 }
        });
        Ok((examples.next().unwrap(), examples.next().unwrap()))
    }

    fn push_eos(&self, ids: &mut Vec<u32>, offsets: &mut Vec<(usize, usize)>, trained: &mut Vec<bool>, at: usize) {
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
            offsets.push((at, at));
            trained.push(true);
        }
    }
}
