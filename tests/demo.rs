//! The built-in demo: its data and held-out split, the accuracy metric, the pretrained
//! base answering functional requests, and a short run whose loss falls.

mod common;

use common::*;
use webtune::check::Rng;
use webtune::demo::{accuracy, answer, apply, data_jsonl, exact, held_out, instruction, pretrain_jsonl, HeldOutTest, STATEMENTS, TASKS};

/// The phrasing of a question: the word replaced by {w}.
fn phrasing(q: &str) -> String {
    let w = q.split(|c: char| !c.is_ascii_alphabetic()).filter(|s| s.len() >= 3 && s.chars().all(|c| c.is_ascii_lowercase())).find(|s| {
        // the random word is the one token not in any phrasing
        !TASKS.iter().any(|t| t.phrasings.iter().chain([&t.held_out]).any(|p| p.split(|c: char| !c.is_ascii_alphabetic()).any(|x| x.eq_ignore_ascii_case(s))))
    });
    match w {
        Some(w) => q.replacen(w, "{w}", 1),
        None => q.to_string(),
    }
}

/// The DPO test sorts greedy answers by form: the taught sentence (any result), a bare
/// result (any, of the task's word count), or neither.
#[test]
fn answers_are_sorted_into_the_sentence_the_bare_result_and_garbled() {
    use webtune::demo::{form, held_out_requests, Form, BRIEF_HELD_OUT};
    for (op, w, a, want) in [
        ("reverse", "cat", "cat reversed is tac.", Form::Sentence),
        ("reverse", "cat", " cat reversed is tca.", Form::Sentence),
        ("reverse", "cat", "tac", Form::Bare),
        ("reverse", "cat", "tca", Form::Bare),
        ("upper", "cat", "cat in capital letters is CAT.", Form::Sentence),
        ("upper", "cat", "CAT", Form::Bare),
        ("twice", "cat", "cat two times is cat cat.", Form::Sentence),
        ("twice", "cat", "cat cat", Form::Bare),
        ("twice", "cat", "cat", Form::Other),
        ("count", "cat", "cat has 3 letters.", Form::Sentence),
        ("count", "cat", "3", Form::Bare),
        ("count", "cat", "cat has 3 letters", Form::Other),
        ("reverse", "cat", "cat reversed is .", Form::Other),
        ("reverse", "cat", "dog reversed is tac.", Form::Other),
        ("reverse", "cat", "tac tac is", Form::Other),
        ("reverse", "cat", "", Form::Other),
        ("reverse", "cat", "tac.", Form::Other),
    ] {
        assert_eq!(form(op, w, a), want, "{op} {w}: {a:?}");
    }
    // Each answer form of every held-out request is what it is.
    let brief = held_out_requests(11, 32, true);
    let plain = held_out_requests(11, 32, false);
    assert_eq!(brief, held_out_requests(11, 32, true));
    assert!(brief.iter().all(|r| r.question.ends_with(BRIEF_HELD_OUT)) && plain.iter().all(|r| !r.question.contains(BRIEF_HELD_OUT)));
    for r in brief.iter().chain(&plain) {
        assert_eq!(form(r.op, &r.word, &answer(r.op, &r.word)), Form::Sentence, "{r:?}");
        assert_eq!(form(r.op, &r.word, &apply(r.op, &r.word)), Form::Bare, "{r:?}");
    }
    assert_eq!(webtune::demo::held_out_brief(11, 32).iter().map(|(q, _)| q.clone()).collect::<Vec<_>>(), brief.iter().map(|r| r.question.clone()).collect::<Vec<_>>());
}

#[test]
fn the_demo_data_is_deterministic_correct_and_holds_out_phrasings() {
    assert_eq!(data_jsonl(7, 50), data_jsonl(7, 50));
    assert_ne!(data_jsonl(7, 50), data_jsonl(8, 50));
    assert_eq!(apply("reverse", "abc"), "cba");
    assert_eq!(apply("upper", "abc"), "ABC");
    assert_eq!(apply("twice", "abc"), "abc abc");
    assert_eq!(apply("count", "abcd"), "4");
    // Answers state the result in the base's words.
    assert_eq!(answer("reverse", "abc"), "abc reversed is cba.");
    assert_eq!(answer("upper", "abc"), "abc in capital letters is ABC.");
    assert_eq!(answer("twice", "abc"), "abc two times is abc abc.");
    assert_eq!(answer("count", "abcd"), "abcd has 4 letters.");
    let trained: Vec<&str> = TASKS.iter().flat_map(|t| t.phrasings.iter().copied()).collect();
    let held: Vec<&str> = TASKS.iter().map(|t| t.held_out).collect();
    let mut rng = Rng::new(1);
    for _ in 0..200 {
        let (q, _) = instruction(&mut rng, false);
        let p = phrasing(&q);
        assert!(trained.contains(&p.as_str()), "{q} → {p}");
        assert!(!held.contains(&p.as_str()));
    }
    for (q, a) in held_out(11, 100) {
        let p = phrasing(&q);
        assert!(held.contains(&p.as_str()) && !trained.contains(&p.as_str()), "{q}");
        let t = TASKS.iter().find(|t| t.held_out == p).unwrap();
        let w = q.split(|c: char| !c.is_ascii_alphabetic()).find(|s| s.len() >= 3 && p.replacen("{w}", s, 1) == q).unwrap();
        assert_eq!(a, answer(t.op, w));
    }
    // The pretraining text states every operation, and holds no chat turn, request or
    // instruction phrasing.
    let pre = pretrain_jsonl(3, 400);
    for (op, _) in STATEMENTS {
        let w = ["reversed", "capital", "twice", "letters"][TASKS.iter().position(|t| t.op == op).unwrap()];
        assert!(pre.contains(w), "{op}");
    }
    for l in pre.lines() {
        assert!(["<|", "please", "Write", "Repeat", "Count", "How many", "Reverse", "Uppercase", "Say", "Spell", "Put"].iter().all(|x| !l.contains(x)), "{l}");
    }
}

#[test]
fn accuracy_is_exact_match_after_trimming() {
    let expected = vec![("q1".to_string(), "cba".to_string()), ("q2".to_string(), "4".to_string()), ("q3".to_string(), "ABC".to_string()), ("q4".to_string(), "x x".to_string())];
    let answers = vec![" cba\n".to_string(), "4 letters".to_string(), "ABC".to_string(), "x  x".to_string()];
    assert_eq!(accuracy(&answers, &expected, exact), 0.5);
    assert_eq!(accuracy(&[], &[], exact), 0.0);
}

/// The held-out tests the CLI and the page ask by name: the demo's (exact answers) and
/// the tool calls' (checked field by field); another name is refused, saying which exist.
#[test]
fn held_out_tests_by_name() {
    let demo = HeldOutTest::named("demo", 5).unwrap();
    assert_eq!(demo.pairs, held_out(webtune::demo::TEST_SEED, 5));
    let answers: Vec<String> = demo.pairs.iter().enumerate().map(|(i, (_, e))| if i % 2 == 0 { format!(" {e}\n") } else { "no".into() }).collect();
    assert_eq!(demo.marks(&answers), [true, false, true, false, true]);
    let tools = HeldOutTest::named("tools", 4).unwrap();
    let e = tools.pairs[0].1.clone();
    let spaced = e.replace(", ", ",  ");
    assert_eq!(tools.marks(&[spaced, e.replace('}', ", \"x\": 1}"), String::new(), tools.pairs[3].1.clone()]), [true, false, false, true]);
    let err = HeldOutTest::named("poems", 3).err().unwrap().to_string();
    assert!(err.contains("poems") && err.contains("demo or tools"), "{err}");
}

/// The SFT stage, then the DPO stage (60 steps of 16 pairs from the SFT adapter, with
/// an NLL term on the chosen answers: RPO, α = 1).
#[test]
fn a_short_demo_run_lowers_the_loss_and_lifts_the_accuracy_then_dpo_shifts_the_preference() {
    let g = gpu();
    let out = std::env::temp_dir().join(format!("webtune-demo-{}", std::process::id()));
    let r = futures::executor::block_on(webtune::cli::demo(g, &out, 100, 60, Some(1.0), true)).unwrap();
    let first: f64 = r.losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = r.losses[r.losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < 0.5 * first, "loss {first:.3} → {last:.3}");
    // The base answers `reverse(word)` but no instruction.
    assert!(r.before < 0.1, "before {}", r.before);
    // A third of the demo's steps already lifts the held-out accuracy clearly (the
    // full demo reaches more than 50%).
    eprintln!("held-out accuracy {} → {} in 100 steps", r.before, r.after);
    assert!(r.after >= r.before + 0.25, "accuracy {} → {}", r.before, r.after);
    assert!(out.join("adapter_model.safetensors").exists());
    // DPO: on held-out pairs (held-out phrasings, ask and words), the chosen answer is
    // preferred more often where the request asks for the bare result, and the plain
    // requests keep preferring the sentence. (Measured: 53% → 100% and 97% → 100%.)
    let d = r.dpo.expect("the DPO stage ran");
    let (b, a) = (&d.before, &d.after);
    eprintln!(
        "DPO: brief {} → {}, plain {} → {}; greedy: bare form {} → {}, bare result {} → {}, sentence form {} → {}, garbled {} → {}",
        b.prefers_brief, a.prefers_brief, b.prefers_plain, a.prefers_plain, b.bare_form, a.bare_form, b.bare, a.bare, b.sentence_form, a.sentence_form, b.garbled, a.garbled
    );
    assert!(a.prefers_brief >= b.prefers_brief + 0.3, "brief requests {} → {}", b.prefers_brief, a.prefers_brief);
    assert!(a.prefers_plain >= 0.9, "plain requests {} → {}", b.prefers_plain, a.prefers_plain);
    // The greedy answers are sorted into forms, and the measures agree with them.
    assert_eq!((a.answers.len(), a.plain_answers.len()), (32, 32));
    assert!(a.bare <= a.bare_form && (0.0..=1.0).contains(&a.garbled), "{a:?}");
    // And DPO changes what the model says: SFT answered every brief ask with the
    // sentence; after DPO most held-out brief requests get a bare result. (Measured:
    // 0% → 81% after 100 SFT steps.)
    assert!(a.bare_form >= b.bare_form + 0.4, "bare results for brief requests {} → {}", b.bare_form, a.bare_form);
    assert!(d.losses.len() == 60 && d.losses[59] < 0.5 * d.losses[0], "{:?}", d.losses);
    assert!(d.margins[59] > d.margins[0] + 0.5, "{:?}", d.margins);
    assert!(out.join("dpo/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn the_pretrained_base_completes_statements_but_follows_no_instruction() {
    let g = gpu();
    let md = webtune::cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let tok = &md.tokenizer;
    let m = webtune::model::Model::load(g, md.cfg.clone(), &md.weights, webtune::model::Tuning::Frozen, 0).unwrap();
    let mut rng = Rng::new(99);
    let mut right = Vec::new();
    for i in 0..16 {
        let (op, forms) = STATEMENTS[i % 4];
        let (w, form) = (webtune::demo::word(&mut rng), forms[(i / 4) % forms.len()]);
        // The statement up to its result: `hello reversed is ` → `olleh`.
        let prefix = form[..form.find("{a}").unwrap()].replace("{w}", &w);
        let ids = tok.prompt_ids(&prefix, false).unwrap();
        let out = tok.decode(&futures::executor::block_on(m.generate(g, &ids, 16, &Default::default(), |_| {})).unwrap());
        let want = apply(op, &w);
        let ok = out.starts_with(&want) && !out[want.len()..].starts_with(|c: char| c.is_ascii_alphanumeric());
        right.push((ok, prefix, out));
    }
    assert!(right.iter().filter(|r| r.0).count() >= 12, "{right:?}");
    let held = held_out(11, 16);
    let a = futures::executor::block_on(webtune::demo::answers(g, &m, tok, &held, webtune::demo::ANSWER_TOKENS)).unwrap();
    assert!(accuracy(&a, &held, exact) < 0.1, "{a:?}");
}
