//! What will be trained, made visible: each record as the model sees it with trained
//! and masked tokens told apart, and a summary of the whole file (formats, skips,
//! lengths, truncation, trained fraction, packing, duplicates, warnings).

use std::collections::{BTreeMap, HashMap};

use super::batch::{pack, truncate};
use super::{Example, Format, Message, Parsed, Record, Tokenizer};
use crate::error::Result;

/// How a preview marks trained text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// ANSI colours: trained text green, masked text dim.
    Color,
    /// Plain text: trained runs inside ⟦ ⟧.
    Brackets,
}

/// Runs of (text, trained) in token order; with `tokens`, one run per token.
pub fn runs(tok: &Tokenizer, e: &Example, tokens: bool) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut shown = 0; // source bytes already shown: spans may overlap (SentencePiece's ▁)
    for (i, &id) in e.ids.iter().enumerate() {
        // Prefer the exact source text where the token has a span in it; tokens with
        // none (an added BOS or EOS) show their decoded text.
        let (a, b) = e.offsets.get(i).copied().unwrap_or((0, 0));
        let text = if b > a && b <= e.text.len() {
            let start = a.max(shown);
            let t = if b > start && e.text.is_char_boundary(start) && e.text.is_char_boundary(b) { e.text[start..b].to_string() } else { String::new() };
            shown = shown.max(b);
            t
        } else {
            tok.decode_with_special(&[id])
        };
        match out.last_mut() {
            Some((t, tr)) if !tokens && *tr == e.trained[i] => t.push_str(&text),
            _ => out.push((text, e.trained[i])),
        }
    }
    out
}

/// One record as the model will see it, truncated: one example, or for a preference
/// pair its chosen and its rejected sequence (labelled as such).
pub fn record_examples(tok: &Tokenizer, r: &Parsed, max_seq_len: usize, train_on_prompt: bool) -> Result<Vec<(&'static str, Example)>> {
    let mut out = match r.record {
        Record::Preference(_) => {
            let (c, j) = tok.pair(r)?;
            vec![("chosen", c), ("rejected", j)]
        }
        _ => vec![("", tok.example(r, train_on_prompt)?)],
    };
    for (_, e) in out.iter_mut() {
        truncate(e, max_seq_len);
    }
    Ok(out)
}

/// One record rendered for a terminal or a file.
pub fn preview(tok: &Tokenizer, e: &Example, style: Style, tokens: bool) -> String {
    let mut s = String::new();
    for (text, trained) in runs(tok, e, tokens) {
        let text = if tokens { format!("{text}|") } else { text };
        match (style, trained) {
            (Style::Color, true) => s.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
            (Style::Color, false) => s.push_str(&format!("\x1b[2m{text}\x1b[0m")),
            (Style::Brackets, true) => s.push_str(&format!("⟦{text}⟧")),
            (Style::Brackets, false) => s.push_str(&text),
        }
    }
    s
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Lengths {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    /// (upper bound of the bucket, records) for 8 equal buckets up to max.
    pub histogram: Vec<(usize, usize)>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub records: usize,
    pub formats: BTreeMap<String, usize>,
    pub skipped_nothing_trained: usize,
    /// Token lengths after the template, before truncation.
    pub lengths: Lengths,
    pub truncated: usize,
    pub truncated_tokens: usize,
    pub max_seq_len: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub trained_fraction: f64,
    /// Real tokens / (sequences × max_seq_len), with packing.
    pub packing_efficiency: Option<f64>,
    pub sequences: usize,
    /// Groups of records (by place) with identical text.
    pub exact_duplicates: Vec<Vec<String>>,
    /// Groups equal after lower-casing and dropping punctuation and extra spaces.
    pub near_duplicates: Vec<Vec<String>>,
    pub tokens_per_epoch: usize,
    pub warnings: Vec<String>,
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn record_text(r: &Record) -> String {
    match r {
        Record::Chat(m) => m.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
        Record::PromptCompletion { prompt, completion } => format!("{prompt}{completion}"),
        Record::Text(t) => t.clone(),
        Record::Preference(super::Pair::Text { prompt, chosen, rejected }) => format!("{prompt}\n{chosen}\n{rejected}"),
        Record::Preference(super::Pair::Chat { prompt, chosen, rejected }) => {
            [prompt, chosen, rejected].iter().flat_map(|m| m.iter()).map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
        }
    }
}

fn normalise(s: &str) -> String {
    let kept: String = s.to_lowercase().chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn groups(records: &[Parsed], key: impl Fn(&Parsed) -> String) -> Vec<Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    let mut order = Vec::new();
    for r in records {
        let k = key(r);
        let e = by.entry(k.clone()).or_default();
        if e.is_empty() {
            order.push(k);
        }
        e.push(r.place.clone());
    }
    order.into_iter().filter_map(|k| by.remove(&k)).filter(|g| g.len() > 1).collect()
}

/// Warnings about the chat template itself, from probe conversations.
fn template_warnings(tok: &Tokenizer) -> Vec<String> {
    let mut w = Vec::new();
    if tok.template.fallback {
        w.push(tok.template.describe());
    }
    let user = [Message::new("user", "PROBE-QUESTION")];
    let (Ok(plain), Ok(with_gen)) = (tok.template.render(&user, false), tok.template.render(&user, true)) else {
        return vec!["the chat template fails on a single user turn".into()];
    };
    if plain == with_gen {
        w.push("the chat template ignores add_generation_prompt (it always or never appends an assistant header); answers are found by searching instead".into());
    }
    let before = &plain[..plain.find("PROBE-QUESTION").unwrap_or(0)];
    if before.to_lowercase().contains("system") {
        w.push("the chat template inserts a system prompt when a record has none".into());
    }
    w
}

/// Tokenize, mask and measure every record (nothing is dropped from `records`).
pub fn summarize(tok: &Tokenizer, records: &[Parsed], max_seq_len: usize, pack_sequences: bool, train_on_prompt: bool) -> Result<(Vec<Example>, Summary)> {
    let mut s = Summary { records: records.len(), max_seq_len, ..Summary::default() };
    let mut examples = Vec::new();
    let mut lengths = Vec::new();
    let mut eos_untrained = Vec::new();
    for r in records {
        *s.formats.entry(r.format.name().to_string()).or_default() += 1;
        // A preference pair is its chosen and its rejected sequence, kept or skipped together.
        let mut side = match r.record {
            Record::Preference(_) => {
                let (c, j) = tok.pair(r)?;
                vec![c, j]
            }
            _ => vec![tok.example(r, train_on_prompt)?],
        };
        let side_len = side.len();
        for e in side.iter_mut() {
            lengths.push(e.ids.len());
            // The token that closes each trained answer must be trained too (TRL's
            // completions also keep a template's newline after it).
            if !train_on_prompt && matches!(r.format, Format::Messages | Format::Alpaca | Format::Dolly | Format::PreferenceChat | Format::PreferenceImplicit) {
                let last_trained = e.trained.iter().rposition(|&t| t);
                if last_trained.is_some_and(|i| !e.ids[..=i].iter().rev().take(if side_len == 2 { 2 } else { 1 }).any(|&id| tok.is_end_token(id))) {
                    eos_untrained.push(r.place.clone());
                }
            }
            truncate(e, max_seq_len);
            if e.truncated > 0 {
                s.truncated += 1;
                s.truncated_tokens += e.truncated;
            }
        }
        if side.iter().any(|e| e.trained.iter().skip(1).filter(|&&t| t).count() == 0) {
            s.skipped_nothing_trained += 1;
            continue;
        }
        for e in side {
            s.tokens += e.ids.len();
            s.trained_tokens += e.trained_count();
            examples.push(e);
        }
    }
    let mut sorted = lengths.clone();
    sorted.sort_unstable();
    let max = *sorted.last().unwrap_or(&0);
    let width = max.div_ceil(8).max(1);
    let mut hist: Vec<(usize, usize)> = (1..=8).map(|b| (b * width, 0)).collect();
    for &l in &lengths {
        let b = (l.saturating_sub(1) / width).min(7);
        hist[b].1 += 1;
    }
    s.lengths = Lengths { min: *sorted.first().unwrap_or(&0), median: percentile(&sorted, 0.5), p95: percentile(&sorted, 0.95), max, histogram: hist };
    s.trained_fraction = if s.tokens > 0 { s.trained_tokens as f64 / s.tokens as f64 } else { 0.0 };
    if pack_sequences {
        let packed = pack(&examples, max_seq_len);
        s.sequences = packed.len();
        s.packing_efficiency = Some(s.tokens as f64 / (packed.len() * max_seq_len).max(1) as f64);
        s.tokens_per_epoch = s.tokens;
    } else {
        s.sequences = examples.len();
        s.tokens_per_epoch = s.tokens;
    }
    s.exact_duplicates = groups(records, |r| record_text(&r.record));
    let exact: std::collections::HashSet<&Vec<String>> = s.exact_duplicates.iter().collect();
    s.near_duplicates = groups(records, |r| normalise(&record_text(&r.record))).into_iter().filter(|g| !exact.contains(g)).collect();

    if !eos_untrained.is_empty() {
        s.warnings.push(format!(
            "{} record(s) end their trained answer without a trained end-of-turn/EOS token, so the model will not learn to stop (first: {})",
            eos_untrained.len(),
            eos_untrained[0]
        ));
    }
    if s.skipped_nothing_trained > 0 {
        s.warnings.push(format!("{} record(s) have nothing to train (after truncation) and are skipped", s.skipped_nothing_trained));
    }
    if s.records > 0 && s.truncated * 10 > s.records {
        s.warnings.push(format!("{} of {} records ({:.0}%) are truncated at {max_seq_len} tokens", s.truncated, s.records, 100.0 * s.truncated as f64 / s.records as f64));
    }
    if records.iter().any(|r| matches!(r.record, Record::Chat(_))) {
        s.warnings.extend(template_warnings(tok));
    }
    Ok((examples, s))
}

/// The summary as text, with a small histogram of token lengths.
pub fn summary_text(s: &Summary) -> String {
    let mut o = String::new();
    let formats: Vec<String> = s.formats.iter().map(|(k, v)| format!("{k} {v}")).collect();
    o += &format!("records: {} ({})\n", s.records, formats.join(", "));
    o += &format!("skipped: {} with nothing to train\n", s.skipped_nothing_trained);
    let l = &s.lengths;
    o += &format!("tokens per record: min {}, median {}, p95 {}, max {}\n", l.min, l.median, l.p95, l.max);
    let top = l.histogram.iter().map(|h| h.1).max().unwrap_or(1).max(1);
    let mut lo = 1;
    for &(hi, n) in &l.histogram {
        o += &format!("  {lo:>6}–{hi:<6} {:<30} {n}\n", "█".repeat((n * 30).div_ceil(top)));
        lo = hi + 1;
    }
    o += &format!("truncated: {} records, {} tokens cut (max-seq-len {})\n", s.truncated, s.truncated_tokens, s.max_seq_len);
    o += &format!("trained: {} of {} tokens ({:.1}%)\n", s.trained_tokens, s.tokens, 100.0 * s.trained_fraction);
    if let Some(p) = s.packing_efficiency {
        o += &format!("packing: {} sequences, {:.1}% of their tokens are real\n", s.sequences, 100.0 * p);
    }
    o += &format!("duplicates: {} exact groups, {} near-exact groups\n", s.exact_duplicates.len(), s.near_duplicates.len());
    for g in s.exact_duplicates.iter().chain(&s.near_duplicates).take(5) {
        o += &format!("  {}\n", g.join(" = "));
    }
    o += &format!("tokens per epoch: {}\n", s.tokens_per_epoch);
    for w in &s.warnings {
        o += &format!("warning: {w}\n");
    }
    o
}
