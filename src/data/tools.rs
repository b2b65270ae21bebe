//! The real-model demo's data (`webtune demo --model smollm2`, the page's "Real
//! model" preset): spoken requests turned into tool calls, a skill an instruct model
//! lacks. "Will it rain in Lyon tomorrow?" → `{"tool": "weather", "city": "Lyon",
//! "day": "tomorrow"}`, over four tools, many phrasings and many arguments, generated
//! here (the project's own data, under its license). The held-out test uses phrasings
//! and argument values that training never sees, and `correct` scores an answer
//! strictly: it must parse as JSON and equal the expected call field by field.
//! `data::builtin` serves the training set as `tools`.

use serde_json::{json, Value};

use crate::rng::Rng;

/// A tool: its name, and the phrasings of a request for it, trained and held out.
/// `{city}`, `{day}`, `{minutes}`, `{name}`, `{text}`, `{to}` are its arguments.
pub struct Tool {
    pub name: &'static str,
    pub phrasings: &'static [&'static str],
    pub held_out: &'static [&'static str],
}

pub const TOOLS: [Tool; 4] = [
    Tool {
        name: "weather",
        phrasings: &[
            "Will it rain in {city} {day}?", "What's the weather in {city} {day}?", "Weather for {city} {day}, please.",
            "Is it going to be sunny in {city} {day}?", "How cold will it be in {city} {day}?", "Do I need an umbrella in {city} {day}?",
            "What will the weather be like in {city} {day}?", "Check the weather in {city} for {day}.",
        ],
        held_out: &["Should I expect snow in {city} {day}?", "Give me the forecast for {city} {day}.", "Is {city} going to be windy {day}?"],
    },
    Tool {
        name: "timer",
        phrasings: &[
            "Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.", "Remind me in {minutes} minutes.",
            "Timer: {minutes} minutes, please.", "Count down {minutes} minutes for me.", "Can you set a {minutes}-minute timer?",
            "I need a timer of {minutes} minutes.", "Put a timer on for {minutes} minutes.",
        ],
        held_out: &["Can you time {minutes} minutes for me?", "Let me know when {minutes} minutes have passed.", "Ping me after {minutes} minutes."],
    },
    Tool {
        name: "call",
        phrasings: &[
            "Call {name}.", "Phone {name}, please.", "Ring {name} for me.", "Can you call {name}?", "Get {name} on the phone.",
            "Please call {name}.", "I'd like to call {name}.", "Start a call with {name}.",
        ],
        held_out: &["Dial {name} now.", "I want to talk to {name}, call them.", "Could you phone {name} for me?"],
    },
    Tool {
        name: "translate",
        phrasings: &[
            "Translate {text} into {to}.", "How do you say {text} in {to}?", "What is {text} in {to}?", "Say {text} in {to}, please.",
            "Give me the {to} word for {text}.", "Translate the word {text} to {to}.", "What's the {to} for {text}?",
            "Put {text} into {to}.",
        ],
        held_out: &["In {to}, what's the word {text}?", "I need {text} translated to {to}.", "How would a {to} speaker say {text}?"],
    },
];

/// Argument values, trained and held out (disjoint).
const CITIES: [&[&str]; 2] = [
    &["Lyon", "Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Oslo", "Dublin", "Vienna", "Prague", "Lisbon", "Boston", "Denver", "Cairo", "Seoul", "Lima", "Chicago", "Sydney", "Milan", "Zurich"],
    &["Nantes", "Munich", "Seville", "Turin", "Osaka", "Bergen", "Cork", "Graz", "Porto", "Austin", "Quito", "Hanoi"],
];
const DAYS: [&str; 2] = ["today", "tomorrow"];
const MINUTES: [&[u32]; 2] = [&[1, 2, 4, 5, 8, 10, 15, 20, 30, 40, 50, 60], &[3, 7, 12, 25, 45, 90]];
const NAMES: [&[&str]; 2] = [
    &["Alice", "Bob", "Maria", "Tom", "Sara", "Paul", "Emma", "Leo", "Nina", "Omar", "Chloe", "Ivan", "Lucy", "Sam"],
    &["Hugo", "Julia", "Marco", "Elena", "Yusuf", "Grace", "Felix", "Aisha"],
];
const WORDS: [&[&str]; 2] = [
    &["apple", "house", "water", "book", "friend", "night", "bread", "river", "green", "window", "chair", "music"],
    &["cheese", "mountain", "school", "flower", "coffee", "garden"],
];
const LANGUAGES: [&[&str]; 2] = [&["French", "Spanish", "German", "Italian", "Japanese"], &["Portuguese", "Dutch"]];

/// The seed of the training set `data::builtin` serves as `tools`, and its size.
pub const DATA_SEED: u64 = 5;
pub const RECORDS: usize = 512;
/// The seed of the held-out test.
pub const TEST_SEED: u64 = 11;
/// The demo's training steps (of 4 requests, `RunOptions::tools`) by default.
pub const STEPS: u64 = 24;
/// Held-out requests the demo asks (a quarter per tool).
pub const HELD_OUT: usize = 32;
/// Tokens an answer may take: the longest call, a translation of "mountain" to
/// Portuguese, is 22 SmolLM2 tokens with its end token; the base's prose is cut here
/// (each of its tokens is a pass over every held-out request still answering).
pub const ANSWER_TOKENS: usize = 32;

/// The `i`-th request (tools in turn, so every set is balanced): its text and the
/// call it asks for, as the JSON text the model is to answer with (the tool first,
/// then the arguments in order).
pub fn request(rng: &mut Rng, i: usize, held_out: bool) -> (String, String) {
    let t = &TOOLS[i % TOOLS.len()];
    let h = held_out as usize;
    let mut pick = |xs: &[&'static str]| xs[rng.below(xs.len() as u64) as usize];
    let args: Vec<(&str, Value)> = match t.name {
        "weather" => vec![("city", json!(pick(CITIES[h]))), ("day", json!(pick(&DAYS)))],
        "timer" => vec![("minutes", json!(MINUTES[h][rng.below(MINUTES[h].len() as u64) as usize]))],
        "call" => vec![("name", json!(pick(NAMES[h])))],
        _ => vec![("text", json!(pick(WORDS[h]))), ("to", json!(pick(LANGUAGES[h])))],
    };
    let phrasings = if held_out { t.held_out } else { t.phrasings };
    let mut text = phrasings[rng.below(phrasings.len() as u64) as usize].to_string();
    let mut call = format!("{{\"tool\": \"{}\"", t.name);
    for (k, v) in &args {
        let plain = v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
        text = text.replace(&format!("{{{k}}}"), &plain);
        call += &format!(", \"{k}\": {v}");
    }
    (text, call + "}")
}

/// `n` chat records with the trained phrasings and arguments, as JSONL.
pub fn data_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let (q, a) = request(&mut rng, i, false);
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The training set (`--data tools`).
pub fn data() -> String {
    data_jsonl(DATA_SEED, RECORDS)
}

/// `n` held-out (request, expected call) pairs: held-out phrasings and arguments.
pub fn held_out(seed: u64, n: usize) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed);
    (0..n).map(|i| request(&mut rng, i, true)).collect()
}

/// The strict check: the answer, trimmed, parses as JSON and equals the expected call
/// field by field (the same fields, strings equal exactly, numbers as numbers; the
/// order of the fields is free).
pub fn correct(answer: &str, expected: &str) -> bool {
    let want: Value = serde_json::from_str(expected).expect("an expected call is JSON");
    serde_json::from_str::<Value>(answer.trim()).is_ok_and(|got| got.is_object() && got == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_requests_share_no_phrasing_or_argument_with_training() {
        let train: Vec<(String, String)> = (0..RECORDS).map({
            let mut rng = Rng::new(DATA_SEED);
            move |i| request(&mut rng, i, false)
        }).collect();
        let held = held_out(TEST_SEED, 48);
        for (q, a) in &held {
            assert!(!train.iter().any(|(tq, _)| tq == q), "{q} is also trained");
            let call: Value = serde_json::from_str(a).unwrap();
            for (k, v) in call.as_object().unwrap() {
                if k != "tool" && k != "day" {
                    assert!(!train.iter().any(|(_, ta)| serde_json::from_str::<Value>(ta).unwrap()[k] == *v), "{k} = {v} is also trained");
                }
            }
        }
        // Each tool a quarter of each set.
        for t in &TOOLS {
            assert_eq!(held.iter().filter(|(_, a)| a.contains(&format!("\"tool\": \"{}\"", t.name))).count(), 12);
        }
    }

    #[test]
    fn the_check_parses_and_compares_every_field() {
        let e = r#"{"tool": "weather", "city": "Lyon", "day": "tomorrow"}"#;
        assert!(correct(e, e));
        assert!(correct(r#" {"day":"tomorrow","tool":"weather","city":"Lyon"}"#, e));
        assert!(!correct(r#"{"tool": "weather", "city": "lyon", "day": "tomorrow"}"#, e));
        assert!(!correct(r#"{"tool": "weather", "city": "Lyon"}"#, e));
        assert!(!correct(r#"{"tool": "weather", "city": "Lyon", "day": "tomorrow", "unit": "C"}"#, e));
        assert!(!correct(r#"{"tool": "weather", "city": "Lyon", "day": "tomorrow"} Sure!"#, e));
        assert!(!correct("It will rain in Lyon tomorrow.", e));
        let t = r#"{"tool": "timer", "minutes": 25}"#;
        assert!(correct(r#"{"tool": "timer", "minutes": 25}"#, t));
        assert!(!correct(r#"{"tool": "timer", "minutes": "25"}"#, t));
        assert_eq!(crate::demo::accuracy(&[e.to_string(), "no".into()], &[("q".into(), e.into()), ("q".into(), e.into())], correct), 0.5);
    }

    #[test]
    fn records_are_chat_turns_whose_answer_is_the_call() {
        let text = data_jsonl(1, 8);
        let recs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(recs.len(), 8);
        let (q, a) = (recs[1]["messages"][0]["content"].as_str().unwrap(), recs[1]["messages"][1]["content"].as_str().unwrap());
        let m: u64 = serde_json::from_str::<Value>(a).unwrap()["minutes"].as_u64().unwrap();
        assert!(q.contains(&m.to_string()) && a.starts_with(r#"{"tool": "timer", "minutes": "#), "{q} → {a}");
    }
}
