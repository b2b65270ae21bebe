//! The demo's synthetic data sets, generated deterministically (nothing to
//! download): pretraining statements about random words, instructions that ask for
//! the same operations (`demo`), and preference pairs for the DPO stage (`demo-dpo`).
//! `data::builtin` serves them by name; the demo module re-exports them beside the
//! demo's tokenizer and model.

use serde_json::json;

use crate::rng::Rng;

/// The demo's tasks: an operation on a word, named in the pretraining text, with the
/// phrasings instruction tuning uses and one held-out phrasing each that recombines
/// words of the others (the test of following instructions, not memorising them).
pub struct Task {
    pub op: &'static str,
    pub phrasings: &'static [&'static str],
    pub held_out: &'static str,
}

pub const TASKS: [Task; 4] = [
    Task {
        op: "reverse",
        phrasings: &[
            "Reverse the word {w}.", "Reverse {w}.", "Write {w} backwards.", "Spell {w} backwards, please.",
            "Please reverse {w}.", "What is {w} backwards?", "Write the word {w} backwards.", "Reverse the word {w}, please.",
        ],
        held_out: "Reverse {w}, please.",
    },
    Task {
        op: "upper",
        phrasings: &[
            "Write {w} in capital letters.", "Uppercase {w}.", "Write the word {w} in upper case, please.", "Please write {w} in upper case.",
            "Uppercase {w}, please.", "Write the word {w} in capital letters.", "Put {w} in upper case.", "Put the word {w} in capitals.",
        ],
        held_out: "Uppercase the word {w}.",
    },
    Task {
        op: "twice",
        phrasings: &[
            "Repeat {w} twice.", "Say the word {w} two times.", "Write {w} two times, please.", "Please repeat {w}, twice.",
            "Repeat {w} two times.", "Write the word {w} twice.", "Say {w} twice, please.", "Please say {w} two times.",
        ],
        held_out: "Repeat the word {w} two times.",
    },
    Task {
        op: "count",
        phrasings: &[
            "How many letters are in {w}?", "Count the letters in the word {w}.", "Count the letters of {w}, please.", "Please count the letters of {w}.",
            "How many letters are in the word {w}?", "How many letters does the word {w} contain?", "Count the letters in {w}.", "{w}: how many letters?",
        ],
        held_out: "How many letters does {w} have?",
    },
];

/// The answer of task `op` for word `w`.
pub fn apply(op: &str, w: &str) -> String {
    match op {
        "reverse" => w.chars().rev().collect(),
        "upper" => w.to_uppercase(),
        "twice" => format!("{w} {w}"),
        _ => w.chars().count().to_string(),
    }
}

/// A random lowercase word of 3 to 6 letters (so nothing can be memorised).
pub fn word(rng: &mut Rng) -> String {
    let n = 3 + rng.below(4) as usize;
    (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect()
}

/// How pretraining text states each operation: descriptions of a word and the
/// result, never a request. `{w}` is the word and `{a}` the result; the word sits at
/// different distances from the result, so the base must find it by its content.
pub const STATEMENTS: [(&str, &[&str]); 4] = [
    ("reverse", &["{w} reversed is {a}.", "{w} spelled backwards is {a}.", "the reverse of {w} is {a}.", "reverse({w}) = {a}", "backwards, {w} reads {a}."]),
    ("upper", &["{w} in capital letters is {a}.", "{w} in upper case is {a}.", "upper({w}) = {a}", "the uppercase form of {w} is {a}."]),
    ("twice", &["{w} two times is {a}.", "{w} repeated twice is {a}.", "twice({w}) = {a}", "{w} said two times: {a}."]),
    ("count", &["{w} has {a} letters.", "the number of letters in {w} is {a}.", "count({w}) = {a}", "there are {a} letters in {w}."]),
];

/// Statements that name a word and do nothing with it (so not every word is an operand).
const FILLER: [&str; 4] = ["{w} is a word.", "the word {w} came up.", "we saw {w} here.", "{w} and more."];

/// Pretraining text for the base: documents of one to three statements about random
/// words (`hello reversed is olleh. the word cat came up.`), with no chat turns and no
/// instructions.
pub fn pretrain_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let k = 1 + rng.below(3) as usize;
            let doc: Vec<String> = (0..k)
                .map(|_| {
                    let w = word(&mut rng);
                    if rng.below(6) == 0 {
                        return FILLER[rng.below(FILLER.len() as u64) as usize].replace("{w}", &w);
                    }
                    let (op, forms) = STATEMENTS[rng.below(4) as usize];
                    forms[rng.below(forms.len() as u64) as usize].replace("{w}", &w).replace("{a}", &apply(op, &w))
                })
                .collect();
            json!({"text": doc.join(" ")}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An instruction (a trained phrasing, or the held-out one) and its answer.
pub fn instruction(rng: &mut Rng, held_out: bool) -> (String, String) {
    let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
    let w = word(rng);
    let p = if held_out { t.held_out } else { t.phrasings[rng.below(t.phrasings.len() as u64) as usize] };
    (p.replace("{w}", &w), answer(t.op, &w))
}

/// The answer to a request: its result stated in the base's own words, with the
/// task's first statement form (`cat reversed is tac.`). The tuned model restates the
/// request as a statement the base learnt to complete.
pub fn answer(op: &str, w: &str) -> String {
    let (_, forms) = STATEMENTS.iter().find(|(o, _)| *o == op).expect("a task op");
    forms[0].replace("{w}", w).replace("{a}", &apply(op, w))
}

/// `n` chat records with the trained phrasings, as JSONL. One request in `BRIEF_SHARE`
/// ends with a brief ask (`BRIEF_ASKS`) and still gets the sentence: SFT teaches to find
/// the word before such an ask, not to honour it (the DPO stage's preference).
pub fn data_jsonl(seed: u64, n: usize) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let (mut q, a) = instruction(&mut rng, false);
            if rng.below(BRIEF_SHARE) == 0 {
                q = format!("{q} {}", BRIEF_ASKS[rng.below(BRIEF_ASKS.len() as u64) as usize]);
            }
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The seed of the held-out test that `webtune` and the page ask.
pub const TEST_SEED: u64 = 11;

/// `n` held-out (question, answer) pairs: held-out phrasings, fresh words.
pub fn held_out(seed: u64, n: usize) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed ^ 0xDEAD_BEEF);
    (0..n).map(|_| instruction(&mut rng, true)).collect()
}

/// The demo's sequence length: the longest request (with a brief ask), chat markup and answer fit.
pub const MAX_SEQ_LEN: usize = 128;

/// Records in the demo data set (`webtune train --data demo`, the page's demo data).
pub const DATA_RECORDS: usize = 2048;

/// The demo data set: `DATA_RECORDS` chat records with the trained phrasings.
pub fn data() -> String {
    data_jsonl(7, DATA_RECORDS)
}

/// The DPO stage's preference: a request that asks for the bare result gets it, one
/// that does not gets the sentence SFT taught. These are the asks the SFT data (answered
/// with the sentence all the same) and DPO's pairs use, and the one held out for the
/// test, recombining their words as the tasks' held-out phrasings do.
pub const BRIEF_ASKS: [&str; 8] = [
    "Just the answer.", "Answer only.", "Only the result, please.", "No sentence, just the result.",
    "Reply with the answer only.", "The result alone, please.", "Reply with just the result.", "Give the word alone.",
];
pub const BRIEF_HELD_OUT: &str = "Reply with the result alone.";

/// One SFT request in this many ends with a brief ask (`data_jsonl`).
const BRIEF_SHARE: u64 = 4;

/// Held-out requests (phrasings and words never trained on) with the held-out brief
/// ask, and their bare results.
pub fn held_out_brief(seed: u64, n: usize) -> Vec<(String, String)> {
    held_out_requests(seed, n, true).into_iter().map(|r| (r.question, apply(r.op, &r.word))).collect()
}

/// A held-out request of the DPO stage's test: its question, task and word.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub question: String,
    pub op: &'static str,
    pub word: String,
}

/// `n` held-out requests (held-out phrasings, fresh words), with the held-out brief ask
/// when `brief` (the requests of `held_out_brief`), else plain.
pub fn held_out_requests(seed: u64, n: usize, brief: bool) -> Vec<Request> {
    let mut rng = Rng::new(seed ^ if brief { 0xB81E_F000 } else { 0x9A1B_0000 });
    (0..n)
        .map(|_| {
            let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
            let word = word(&mut rng);
            let q = t.held_out.replace("{w}", &word);
            let question = if brief { format!("{q} {BRIEF_HELD_OUT}") } else { q };
            Request { question, op: t.op, word }
        })
        .collect()
}

/// The form of an answer to a request for task `op` on word `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// The sentence SFT teaches (`cat reversed is tac.`), its result right or wrong.
    Sentence,
    /// A bare result (`tac`), right or wrong: one word of letters or digits (two for
    /// `twice`) and nothing else.
    Bare,
    /// Neither: garbled, or another form.
    Other,
}

/// The form of `answer` (see `Form`): the sentence is the task's statement with any
/// non-empty result in place of `{a}`.
pub fn form(op: &str, w: &str, answer: &str) -> Form {
    let a = answer.trim();
    // A result: as many words as the task's (two for `twice`), of letters or digits.
    let result = |r: &str| {
        let words: Vec<&str> = r.split(' ').collect();
        words.len() == if op == "twice" { 2 } else { 1 } && words.iter().all(|x| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric()))
    };
    let (before, after) = answer_pattern(op, w);
    match a.strip_prefix(&before).and_then(|rest| rest.strip_suffix(&after)) {
        Some(r) if result(r) => Form::Sentence,
        _ if result(a) => Form::Bare,
        _ => Form::Other,
    }
}

/// The sentence answer of `op` on `w` around its result (`answer`'s statement split at
/// `{a}`): (before, after).
fn answer_pattern(op: &str, w: &str) -> (String, String) {
    let (_, forms) = STATEMENTS.iter().find(|(o, _)| *o == op).expect("a task op");
    let (before, after) = forms[0].split_once("{a}").expect("a statement holds its result");
    (before.replace("{w}", w), after.replace("{w}", w))
}

/// One preference pair for a task request: with a brief ask (`ask`), the bare result is
/// chosen over the sentence; without, the sentence over the bare result.
pub fn preference(rng: &mut Rng, held_out: bool, brief: bool) -> serde_json::Value {
    let t = &TASKS[rng.below(TASKS.len() as u64) as usize];
    let w = word(rng);
    let p = if held_out { t.held_out } else { t.phrasings[rng.below(t.phrasings.len() as u64) as usize] };
    let (bare, sentence) = (apply(t.op, &w), answer(t.op, &w));
    let mut q = p.replace("{w}", &w);
    if brief {
        q = format!("{q} {}", if held_out { BRIEF_HELD_OUT } else { BRIEF_ASKS[rng.below(BRIEF_ASKS.len() as u64) as usize] });
    }
    let (chosen, rejected) = if brief { (bare, sentence) } else { (sentence, bare) };
    let turn = |c: &str| json!([{"role": "assistant", "content": c}]);
    json!({"prompt": [{"role": "user", "content": q}], "chosen": turn(&chosen), "rejected": turn(&rejected)})
}

/// `n` preference pairs as JSONL, brief and plain requests alternating (`held_out`:
/// held-out phrasings and ask, fresh words).
pub fn preference_jsonl(seed: u64, n: usize, held_out: bool) -> String {
    let mut rng = Rng::new(if held_out { seed ^ 0xDEAD_BEEF } else { seed });
    (0..n).map(|i| preference(&mut rng, held_out, i % 2 == 0).to_string()).collect::<Vec<_>>().join("\n")
}

/// The DPO stage's training pairs (`--data demo-dpo`).
pub fn preference_data() -> String {
    preference_jsonl(13, DPO_RECORDS, false)
}

/// Pairs in the DPO stage's data.
pub const DPO_RECORDS: usize = 512;

/// Records of pretraining text (`--data demo-pretrain`).
pub const PRETRAIN_RECORDS: usize = 40_000;
