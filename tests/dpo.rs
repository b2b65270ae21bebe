//! DPO against TRL's DPOTrainer (1.16): `tests/fixtures/dpo/` from
//! `tests/reference/gen_dpo.py` holds preference data in TRL's three forms, a fresh and
//! an SFT-trained starting adapter, and per case five steps' losses, gradient norms and
//! the six metrics TRL logs, on a tiny Qwen3 at Qwen3's vocabulary (151,936) with the
//! real Qwen3 tokenizer and chat template.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;
use webtune::cli::{self, TrainArgs};
use webtune::data::parse_records;
use webtune::train::{Options, RunOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/dpo")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

/// The tiny Qwen3 with the real Qwen3 tokenizer (npm) as one model directory.
fn qwen3_model(test: &str) -> PathBuf {
    qwen3_model_at(&std::env::temp_dir().join(format!("webtune-dpo-{test}-{}", std::process::id())))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Each record of the three forms is tokenized as TRL tokenizes it: the prompt, then
/// the chosen and the rejected completion (with Qwen3's empty think block, `<|im_end|>`
/// and its newline; the text form's completion ends with EOS), completions trained.
#[test]
fn preference_records_tokenize_as_trl_does() {
    let dir = qwen3_model("tokens");
    let md = cli::ModelDir::open(&dir).unwrap();
    let tok = &md.tokenizer;
    assert!(!tok.template.fallback);
    let exp = expected();
    for name in ["conversational", "implicit", "text"] {
        let path = fixture().join(format!("{name}.jsonl"));
        let records = parse_records(&std::fs::read_to_string(&path).unwrap(), name).unwrap();
        let want = exp["tokens"][name].as_array().unwrap();
        assert_eq!(records.len(), want.len());
        for (r, w) in records.iter().zip(want) {
            let (c, j) = tok.pair(r).unwrap();
            let prompt = ids(&w["prompt"]);
            for (e, side) in [(&c, "chosen"), (&j, "rejected")] {
                let full: Vec<u32> = prompt.iter().copied().chain(ids(&w[side])).collect();
                assert_eq!(e.ids, full, "{}: {side} ids", r.place);
                let trained: Vec<bool> = (0..full.len()).map(|i| i >= prompt.len()).collect();
                assert_eq!(e.trained, trained, "{}: {side} trained tokens", r.place);
            }
        }
        // The dataset keeps every pair, chosen then rejected.
        let ds = webtune::data::batch::prepare(tok, &records, 512, false, false).unwrap();
        assert!(ds.pairs && ds.items() == want.len() && ds.sequences.len() == 2 * want.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `webtune train --method dpo` for five steps from the fixture's starting adapter
/// gives TRL's loss, gradient norm and every logged metric at each step, to 1e-4.
fn trl_case(case: &Value) {
    trl_case_with(case, false)
}

/// `webtune train --method dpo` arguments for a fixture case (`tag` names its temp
/// folders); with `validate`, the data is also the validation set, evaluated after
/// the last step.
fn dpo_args(case: &Value, tag: &str, validate: bool) -> TrainArgs {
    let name = case["name"].as_str().unwrap();
    let dir = qwen3_model(&format!("{name}-{tag}"));
    let out = std::env::temp_dir().join(format!("webtune-dpo-out-{name}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let loss_type: Vec<&str> = case["loss_type"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    // cDPO is TRL's sigmoid and robust losses weighted together (see gen_dpo.py); here
    // it is the sigmoid loss with label smoothing.
    let loss = if loss_type == ["sigmoid", "robust"] { "sigmoid" } else { loss_type[0] };
    // RPO is TRL's sigmoid and sft losses, the second weighted α: --rpo-alpha α.
    let rpo_alpha = if loss_type == ["sigmoid", "sft"] { case["loss_weights"][1].as_f64().unwrap() } else { 0.0 };
    let steps = case["steps"].as_u64().unwrap();
    let run = RunOptions {
        max_seq_len: 512,
        eval_every: validate.then_some(steps),
        train: Options {
            lr: case["lr"].as_f64().unwrap(),
            schedule: "constant".into(),
            warmup: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            steps: Some(steps),
            shuffle: false,
            method: "dpo".into(),
            beta: case["beta"].as_f64().unwrap(),
            dpo_loss: loss.into(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            rpo_alpha,
            ..Options::default()
        },
        ..RunOptions::default()
    };
    let data = fixture().join(format!("{}.jsonl", case["data"].as_str().unwrap()));
    TrainArgs {
        model: dir,
        data: data.clone(),
        out,
        valid: validate.then_some(data),
        resume: None,
        init_adapter: Some(fixture().join(case["adapter"].as_str().unwrap())),
        run,
        quiet: true,
    }
}

/// `trl_case`; with `validate`, the data is also the validation set, evaluated after
/// the last step against the reference taken before the first.
fn trl_case_with(case: &Value, validate: bool) {
    let name = case["name"].as_str().unwrap();
    let g = gpu_f32();
    let steps = case["steps"].as_u64().unwrap();
    let args = dpo_args(case, "trl", validate);
    let (dir, out) = (args.model.clone(), args.out.clone());
    let hist = futures::executor::block_on(cli::train(g, &args)).unwrap();
    assert_eq!(hist.len() as u64, steps);
    let series = |f: &dyn Fn(&webtune::train::StepStats) -> f64| hist.iter().map(|s| f(s) as f32).collect::<Vec<f32>>();
    let want = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    close(&format!("{name}: loss"), &series(&|s| s.loss), &want(&case["losses"]), 1e-6, 1e-4);
    close(&format!("{name}: grad_norm"), &series(&|s| s.grad_norm), &want(&case["grad_norm"]), 1e-6, 1e-4);
    let m = &case["metrics"];
    let d = |s: &webtune::train::StepStats| s.dpo.clone().expect("DPO metrics");
    for (key, f) in [
        ("rewards/chosen", &(|s: &webtune::train::StepStats| d(s).rewards_chosen) as &dyn Fn(&webtune::train::StepStats) -> f64),
        ("rewards/rejected", &|s| d(s).rewards_rejected),
        ("rewards/accuracies", &|s| d(s).rewards_accuracies),
        ("rewards/margins", &|s| d(s).rewards_margins),
        ("logps/chosen", &|s| d(s).logps_chosen),
        ("logps/rejected", &|s| d(s).logps_rejected),
    ] {
        close(&format!("{name}: {key}"), &series(f), &want(&m[key]), 1e-6, 1e-4);
    }
    if validate {
        // After five steps the pairs' DPO loss is below the loss of the fifth step,
        // which TRL measured before that step's update.
        let v = hist.last().unwrap().valid_loss.expect("a validation loss at the last step") as f32;
        let last = want(&case["losses"])[steps as usize - 1];
        assert!(v.is_finite() && v < last && v > 0.0, "{name}: valid loss {v} after the last step, train loss {last} before it");
        assert!(hist[..steps as usize - 1].iter().all(|s| s.valid_loss.is_none()));
    }
    // The metrics file names them as TRL does.
    let line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(first.get("rewards/margins").is_some() && first.get("logps/chosen").is_some(), "{first}");
    assert!(out.join("adapter_model.safetensors").exists());
    for p in [&dir, &out] {
        let _ = std::fs::remove_dir_all(p);
    }
}

fn case(name: &str) -> Value {
    expected()["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}")).clone()
}

#[test]
fn dpo_from_a_fresh_adapter_matches_trl() {
    trl_case_with(&case("sigmoid-fresh"), true);
}

/// A DPO run resumed from its step-2 checkpoint keeps the reference it started with
/// (the SFT adapter, which the resumed model no longer is, saved with the checkpoint),
/// for the training and the validation pairs: steps 3–5 give TRL's losses and the same
/// validation loss.
#[test]
fn a_resumed_dpo_run_keeps_its_references_and_continues_exactly() {
    let c = case("sigmoid-sft");
    let g = gpu_f32();
    let mut args = dpo_args(&c, "resume", true);
    args.run.save_every = Some(2);
    let whole = futures::executor::block_on(cli::train(g, &args)).unwrap();
    let ckpt = args.out.join("checkpoint-2");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    // The SFT adapter it started from, not log-probabilities: LoRA runs take those again.
    assert!(state.get("reference").is_none() && state.get("valid_reference").is_none(), "{state}");
    assert_eq!(state["reference_adapter"], true);
    assert!(ckpt.join("reference_adapter.safetensors").exists());
    args.resume = Some(ckpt);
    let resumed = futures::executor::block_on(cli::train(g, &args)).unwrap();
    let losses = |h: &[webtune::train::StepStats]| h.iter().map(|s| s.loss as f32).collect::<Vec<f32>>();
    let want: Vec<f32> = c["losses"].as_array().unwrap()[2..].iter().map(|x| x.as_f64().unwrap() as f32).collect();
    close("resumed losses (TRL)", &losses(&resumed), &want, 1e-6, 1e-4);
    close("resumed losses (uninterrupted)", &losses(&resumed), &losses(&whole[2..]), 1e-6, 1e-5);
    let valid = |h: &[webtune::train::StepStats]| vec![h.last().unwrap().valid_loss.unwrap() as f32];
    close("validation loss after resuming", &valid(&resumed), &valid(&whole), 1e-6, 1e-5);
    for p in [&args.model, &args.out] {
        let _ = std::fs::remove_dir_all(p);
    }
}

#[test]
fn dpo_from_an_sft_adapter_with_an_implicit_prompt_matches_trl() {
    trl_case(&case("sigmoid-sft"));
}

#[test]
fn ipo_on_text_pairs_matches_trl() {
    trl_case(&case("ipo-text"));
}

#[test]
fn conservative_and_robust_dpo_match_trl() {
    trl_case(&case("cdpo"));
    trl_case(&case("robust"));
}


/// RPO: DPO plus the mean NLL of the chosen completions weighted 0.5 (`--rpo-alpha
/// 0.5`; TRL's loss_type ["sigmoid", "sft"], loss_weights [1, 0.5]), from the SFT-like
/// adapter: TRL's losses, gradient norms and metrics step by step.
#[test]
fn rpo_matches_trl() {
    trl_case(&case("rpo"));
}

/// TRL's DPOTrainer runs with dropout off (`disable_dropout=True`, its default), so
/// from the SFT adapter saved with LoRA dropout 0.1 it trains as from the same adapter
/// without: webtune's DPO gives the fixture's losses and gradient norms all the same.
/// `--dpo-dropout` (TRL's `disable_dropout=False`) keeps the adapter's dropout, and the
/// losses move; with SFT it is refused by name.
#[test]
fn dpo_runs_without_the_adapters_dropout_as_trl_does() {
    let c = case("rpo");
    let g = gpu_f32();
    let mut args = dpo_args(&c, "dropout", false);
    let adapter = std::env::temp_dir().join(format!("webtune-dpo-dropout-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&adapter).unwrap();
    let from = args.init_adapter.clone().unwrap();
    std::fs::copy(from.join("adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["lora_dropout"], 0.0);
    config["lora_dropout"] = 0.1.into();
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    args.init_adapter = Some(adapter.clone());
    let losses = |h: &[webtune::train::StepStats]| h.iter().map(|s| s.loss as f32).collect::<Vec<f32>>();
    let want = |k: &str| c[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let off = futures::executor::block_on(cli::train(g, &args)).unwrap();
    close("losses from an adapter with dropout 0.1 (TRL, dropout disabled)", &losses(&off), &want("losses"), 1e-6, 1e-4);
    close("grad norms (TRL)", &off.iter().map(|s| s.grad_norm as f32).collect::<Vec<_>>(), &want("grad_norm"), 1e-6, 1e-4);
    let _ = std::fs::remove_dir_all(&args.out);
    args.run.train.dpo_dropout = true;
    let on = futures::executor::block_on(cli::train(g, &args)).unwrap();
    let (a, b) = (losses(&on), want("losses"));
    let moved = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "with --dpo-dropout the losses {a:?} should move from dropout-free {b:?}");
    let sft = Options { dpo_dropout: true, ..Options::default() };
    let err = sft.check().unwrap_err().to_string();
    assert!(err.contains("--dpo-dropout is for --method dpo"), "{err}");
    // A resume that adds or drops it is refused, naming the flag.
    let dpo = Options { method: "dpo".into(), ..Options::default() };
    assert_eq!(dpo.changes(&Options { dpo_dropout: true, ..dpo.clone() }), ["--dpo-dropout: was not given, now given"]);
    for p in [&args.model, &args.out, &adapter] {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// A LoRA DPO run takes each pair's reference as a step first uses it, as TRL does per
/// batch, from the model as the run started: from the base (a fresh adapter, every B
/// zero), the adapter off; from a trained adapter (`--init-adapter`), that adapter's
/// values swapped in. After step 1 of 2-pair steps over 4 pairs only step 1's pairs have
/// one, equal to the starting model's log-probabilities. A checkpoint holds no
/// log-probabilities (from a trained adapter: the adapter, `reference_adapter.safetensors`),
/// and the step-2 checkpoint of a 4-step run, resumed with 6 steps and no starting
/// adapter given, gives steps 3–6 of a 6-step run (constant lr), as does an older
/// webtune's checkpoint (every pair's log-probabilities, no adapter), kept when saved again.
#[test]
fn lora_dpo_takes_each_reference_when_a_step_first_uses_it() {
    use futures::executor::block_on as block;
    use std::rc::Rc;
    use webtune::train::export::Export;
    use webtune::train::Run;
    let c = case("sigmoid-sft");
    let g = gpu_f32();
    let args = dpo_args(&c, "lazy", false);
    let (lora, sft) = cli::read_adapter(&fixture().join("sft")).unwrap();
    let md = cli::ModelDir::open(&args.model).unwrap();
    let ds = Rc::new(webtune::data::load_path(&md.tokenizer, &args.data, 512, false, false).unwrap());
    assert_eq!(ds.items(), 4);
    let source = Rc::new(md.source);
    let pad = source.tokenizer.pad_id;
    let opts = |steps: u64| {
        let mut o = args.run.clone();
        (o.train.batch_size, o.train.steps, o.train.lr) = (2, Some(steps), 1e-2);
        o.set_lora(&lora);
        o
    };
    for start in ["the base", "the SFT adapter"] {
        let begin = |run: &mut Run| {
            if start == "the SFT adapter" {
                run.init_adapter(g, &sft).unwrap();
            }
        };
        let mut whole = Run::new(g, source.clone(), ds.clone(), None, opts(6)).unwrap();
        begin(&mut whole);
        let starting = block(webtune::train::pair_logps(g, &whole.model, &ds, 4, pad)).unwrap();
        if start == "the SFT adapter" {
            // The starting adapter moves the log-probabilities away from the base's.
            whole.model.adapter_enabled = false;
            let base = block(webtune::train::pair_logps(g, &whole.model, &ds, 4, pad)).unwrap();
            whole.model.adapter_enabled = true;
            assert!(starting.iter().zip(&base).all(|(s, b)| (s[0] - b[0]).abs() > 1e-3), "{start}: {starting:?} against the base's {base:?}");
        }
        assert!(whole.trainer.reference.is_empty());
        let mut losses = vec![block(whole.next(g)).unwrap().stats.loss];
        let step1: Vec<usize> = whole.trainer.plan[0].iter().flatten().copied().collect();
        assert_eq!(step1.len(), 2);
        for (i, r) in whole.trainer.reference.iter().enumerate() {
            if step1.contains(&i) {
                for side in 0..2 {
                    let want = starting[i][side];
                    assert!((r[side] - want).abs() <= 1e-6 * want.abs(), "{start}: pair {i}: reference {r:?}, the starting model's {:?}", starting[i]);
                }
            } else {
                assert!(r[0].is_nan() && r[1].is_nan(), "{start}: pair {i} is not in step 1 and has a reference {r:?}");
            }
        }
        while !whole.done() {
            losses.push(block(whole.next(g)).unwrap().stats.loss);
        }
        assert!(whole.trainer.reference.iter().all(|r| r[0].is_finite() && r[1].is_finite()));

        let mut short = Run::new(g, source.clone(), ds.clone(), None, opts(4)).unwrap();
        begin(&mut short);
        for _ in 0..2 {
            block(short.next(g)).unwrap();
        }
        let ckpt = block(short.files(g, Export::Checkpoint)).unwrap();
        let file = |name: &str| ckpt.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone());
        let state: Value = serde_json::from_slice(&file("trainer_state.json").unwrap()).unwrap();
        assert!(state.get("reference").is_none() && state.get("valid_reference").is_none(), "{start}: {state}");
        let adapter = file("reference_adapter.safetensors");
        assert_eq!((state.get("reference_adapter").is_some(), adapter.is_some()), (start == "the SFT adapter", start == "the SFT adapter"), "{start}: {state}");
        if let Some(bytes) = adapter {
            let mut saved = webtune::model::weights::TensorMap::new();
            webtune::model::weights::parse(&bytes, "reference_adapter.safetensors", &mut saved).unwrap();
            assert_eq!(saved.len(), sft.len());
            assert!(sft.iter().all(|(n, t)| saved.get(n).is_some_and(|x| x.shape == t.shape && x.data == t.data)));
        }
        let get = |f: &str| file(f).ok_or_else(|| webtune::Error::Io(f.into()));
        let mut resumed = Run::new(g, source.clone(), ds.clone(), None, opts(6)).unwrap();
        let r = resumed.resume(g, &get, "step 2").unwrap();
        assert_eq!((r.step, r.total), (2, 6));
        let more: Vec<f32> = (0..4).map(|_| block(resumed.next(g)).unwrap().stats.loss as f32).collect();
        let want: Vec<f32> = losses[2..].iter().map(|&v| v as f32).collect();
        close(&format!("{start}: resumed with more steps (uninterrupted)"), &more, &want, 1e-6, 1e-5);

        // A checkpoint of an older webtune holds every pair's log-probabilities and no
        // adapter: the resume uses them, and its own checkpoints hold them again.
        let mut old = state.clone();
        old.as_object_mut().unwrap().remove("reference_adapter");
        old["reference"] = serde_json::json!(starting);
        let old = serde_json::to_vec(&old).unwrap();
        let get_old = |f: &str| match f {
            "trainer_state.json" => Ok(old.clone()),
            "reference_adapter.safetensors" => Err(webtune::Error::Io(f.into())),
            _ => get(f),
        };
        let mut legacy = Run::new(g, source.clone(), ds.clone(), None, opts(6)).unwrap();
        legacy.resume(g, &get_old, "an older checkpoint").unwrap();
        let more: Vec<f32> = (0..4).map(|_| block(legacy.next(g)).unwrap().stats.loss as f32).collect();
        close(&format!("{start}: resumed from an older checkpoint"), &more, &want, 1e-6, 1e-5);
        let again = block(legacy.files(g, Export::Checkpoint)).unwrap();
        let again: Value = serde_json::from_slice(&again.iter().find(|(n, _)| n == "trainer_state.json").unwrap().1).unwrap();
        assert_eq!(again["reference"].as_array().map(Vec::len), Some(4), "{start}: {again}");
    }
    let _ = std::fs::remove_dir_all(&args.model);
}

/// A DPO run continued from a trained adapter whose values lie in several flat groups
/// (bindings capped at 256 KiB: the demo's LoRA on all seven projections, 311 KB of
/// values, in 2 or more): the reference each step takes (step 2's with the trained
/// adapter swapped out), and the starting adapter the
/// run swaps in and back (the page's "before" answers after a reload), are that
/// adapter's, group by group: the pairs' log-probabilities equal those the run started
/// with, and after the swap back those of the trained adapter. `pair_logps` asked for
/// more pairs at once than a binding holds gives them too.
#[test]
fn a_dpo_run_from_an_adapter_in_several_flat_groups_keeps_it_whole() {
    use futures::executor::block_on as block;
    use std::rc::Rc;
    use webtune::train::{pair_logps, Run};
    let g = max_binding(256 << 10);
    let md = cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let load = |data: &str, records: usize, len: usize| {
        let text: Vec<String> = webtune::data::builtin(data).unwrap().lines().take(records).map(String::from).collect();
        Rc::new(webtune::data::load(&md.tokenizer, &text.join("\n"), data, len, false, false).unwrap())
    };
    let sft_opts = RunOptions { lora_targets: "all-linear".into(), train: Options { batch_size: 4, ..RunOptions::demo(3).train }, ..RunOptions::demo(3) };
    let dpo_opts = RunOptions { train: Options { batch_size: 4, ..RunOptions::demo_dpo(3).train }, ..RunOptions::demo_dpo(3) };
    let (records, pairs) = (load("demo", 12, sft_opts.max_seq_len), load("demo-dpo", 8, dpo_opts.max_seq_len));
    let source = Rc::new(md.source);
    let pad = source.tokenizer.pad_id;
    let mut sft = Run::new(&g, source.clone(), records, None, sft_opts).unwrap();
    while !sft.done() {
        block(sft.next(&g)).unwrap();
    }
    let mut dpo = block(sft.continued(&g, pairs.clone(), dpo_opts)).unwrap();
    assert!(dpo.model.flat_groups() >= 2, "{} flat groups", dpo.model.flat_groups());
    assert!(dpo.keeps_starting_adapter());
    let starting = block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap();
    dpo.model.adapter_enabled = false;
    let base = block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap();
    dpo.model.adapter_enabled = true;
    assert!(starting.iter().zip(&base).any(|(s, b)| (s[0] - b[0]).abs() > 1e-3), "the SFT adapter changes nothing: {starting:?}");
    let same = |what: &str, got: &[[f32; 2]], want: &[[f32; 2]]| {
        for (i, (x, w)) in got.iter().zip(want).enumerate() {
            for s in 0..2 {
                assert!((x[s] - w[s]).abs() <= 1e-5 * w[s].abs().max(1.0), "{what}: pair {i}: {x:?}, want {w:?}");
            }
        }
    };
    // Asked for all 8 pairs at once, more rows than a 256 KiB binding holds, it runs
    // them in batches that fit (before, the kernels' "split it" error).
    same("all 8 pairs asked at once", &block(pair_logps(&g, &dpo.model, &pairs, 8, pad)).unwrap(), &starting);
    block(dpo.next(&g)).unwrap();
    let taken: Vec<usize> = (0..pairs.items()).filter(|&i| dpo.trainer.reference[i][0].is_finite()).collect();
    assert_eq!(taken.len(), 4, "step 1 takes its 4 pairs' references");
    let refs: Vec<[f32; 2]> = taken.iter().map(|&i| dpo.trainer.reference[i]).collect();
    same("step 1's references", &refs, &taken.iter().map(|&i| starting[i]).collect::<Vec<_>>());
    let trained = block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap();
    assert!(trained.iter().zip(&starting).any(|(t, s)| (t[0] - s[0]).abs() > 1e-4), "step 1 changed nothing");
    // Step 2's pairs take theirs from the starting adapter swapped in for the trained one.
    block(dpo.next(&g)).unwrap();
    let rest: Vec<usize> = (0..pairs.items()).filter(|i| !taken.contains(i)).collect();
    let refs: Vec<[f32; 2]> = rest.iter().map(|&i| dpo.trainer.reference[i]).collect();
    same("step 2's references", &refs, &rest.iter().map(|&i| starting[i]).collect::<Vec<_>>());
    let trained = block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap();
    dpo.swap_starting_adapter(&g).unwrap();
    same("the starting adapter swapped in", &block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap(), &starting);
    dpo.swap_starting_adapter(&g).unwrap();
    same("the trained adapter swapped back", &block(pair_logps(&g, &dpo.model, &pairs, 1, pad)).unwrap(), &trained);
}

/// DPO from a trained adapter keeps that adapter on the GPU as its reference, beside a
/// scratch copy to swap it through: the memory plan counts both (half as much again as
/// LoRA's values, gradients and moments), so a budget that fits a micro-batch of 4
/// pairs without them runs micro-batches of 2 with them, and says so. A fresh adapter's
/// run (the base is its reference) keeps 4; a resumed run, which takes the reference
/// adapter from its checkpoint, plans as the run it continues; and a budget the
/// reference adapter overfills packs the frozen weights before they load.
#[test]
fn the_reference_adapter_is_in_the_memory_plan() {
    use futures::executor::block_on as block;
    use std::rc::Rc;
    use webtune::model::memory::{estimate, Plan};
    use webtune::model::Frozen;
    use webtune::train::{export::Export, Run};
    let g = gpu();
    let md = cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let load = |data: &str, records: usize, len: usize| {
        let text: Vec<String> = webtune::data::builtin(data).unwrap().lines().take(records).map(String::from).collect();
        Rc::new(webtune::data::load(&md.tokenizer, &text.join("\n"), data, len, false, false).unwrap())
    };
    let sft_opts = RunOptions { lora_targets: "all-linear".into(), train: Options { batch_size: 4, ..RunOptions::demo(3).train }, ..RunOptions::demo(3) };
    let dpo_opts = RunOptions { lora_targets: "all-linear".into(), train: Options { batch_size: 4, ..RunOptions::demo_dpo(2).train }, ..RunOptions::demo_dpo(2) };
    let (records, pairs) = (load("demo", 12, sft_opts.max_seq_len), load("demo-dpo", 8, dpo_opts.max_seq_len));
    let source = Rc::new(md.source);
    // The budget: between a step of 4 pairs without the reference adapter and with it.
    // A pair is a row (its prompt once): the plan counts the longest pair's row.
    let longest = pairs.longest_row();
    assert!(longest < 2 * pairs.sequences.iter().map(|s| s.ids.len()).max().unwrap());
    let base = dpo_opts.memory_plan(&source.cfg, &source.weights, longest, g.caps.shader_f16, g.caps.max_binding, g.caps.variant == webtune::gpu::Variant::Tiled).unwrap();
    assert!(!dpo_opts.grad_checkpoint);
    let need = |pairs: usize, reference_adapter: bool| estimate(&source.cfg, &Plan { batch: pairs, seq: longest, reference_adapter, ..base.clone() });
    let (without, with) = (need(4, false), need(4, true));
    assert_eq!(2 * with.training_state, 3 * without.training_state, "two more copies of LoRA's values: {with:?} against {without:?}");
    let budget = (without.total() + with.total()) / 2;
    assert!(need(2, true).total() <= budget && budget < with.total());
    let opts = RunOptions { memory_budget: Some(budget.to_string()), ..dpo_opts };

    let fresh = Run::new(g, source.clone(), pairs.clone(), None, opts.clone()).unwrap();
    assert!(!fresh.keeps_starting_adapter());
    assert_eq!((fresh.micro, &fresh.plan_note), (4, &None), "a fresh adapter's run keeps no copy");

    let mut sft = Run::new(g, source.clone(), records, None, sft_opts).unwrap();
    while !sft.done() {
        block(sft.next(g)).unwrap();
    }
    let mut dpo = block(sft.continued(g, pairs.clone(), opts.clone())).unwrap();
    assert!(dpo.keeps_starting_adapter());
    let note = dpo.plan_note.clone().unwrap_or_default();
    assert_eq!(dpo.micro, 2, "{note}");
    assert!(note.contains("batch 4 runs as 2 micro-batches of up to 2") && note.contains("memory budget"), "{note}");
    assert_eq!(dpo.total_steps(), 2);
    let est = dpo.estimate(g).unwrap();
    assert_eq!(est, need(2, true));
    assert!(est.total() <= budget);
    let step = block(dpo.next(g)).unwrap();
    assert!(step.stats.loss.is_finite());

    // Resumed from its checkpoint: the reference adapter comes back, and so does the plan.
    let files = block(dpo.files(g, Export::Checkpoint)).unwrap();
    let get = |f: &str| files.iter().find(|(n, _)| n == f).map(|(_, b)| b.clone()).ok_or_else(|| webtune::Error::Options(format!("no {f}")));
    // (As the CLI resumes it: the adapter's shape as the run trained it, no --init-adapter.)
    let (source_cfg, pairs_again) = (source.cfg.clone(), pairs.clone());
    let mut again = Run::new(g, source, pairs, None, dpo.opts.clone()).unwrap();
    assert_eq!(again.micro, 4);
    again.resume(g, &get, "checkpoint").unwrap();
    assert!(again.keeps_starting_adapter());
    assert_eq!((again.micro, &again.plan_note), (2, &dpo.plan_note));
    let resumed = block(again.next(g)).unwrap();
    let carried = block(dpo.next(g)).unwrap();
    assert!((resumed.stats.loss - carried.stats.loss).abs() <= 1e-5, "step 2: resumed {} against {}", resumed.stats.loss, carried.stats.loss);

    // A budget below one checkpointed pair with the reference adapter and the frozen
    // weights as they are, above it with them packed as Q8_0: the continued run packs
    // them before it loads, where a fresh adapter's run needs not.
    let one = |frozen: Frozen, reference_adapter: bool| estimate(&source_cfg, &Plan { batch: 1, seq: longest, grad_checkpoint: true, frozen, reference_adapter, ..base.clone() }).total();
    let q8 = Frozen::Quantize(webtune::quant::QType::Q8_0);
    let budget = (one(q8, true) + one(base.frozen, true)) / 2;
    assert!(one(base.frozen, false) <= budget, "without the reference adapter the weights fit as they are");
    let tight = RunOptions { memory_budget: Some(budget.to_string()), ..opts.clone() };
    let fresh = Run::new(g, again.source.clone(), pairs_again.clone(), None, tight.clone()).unwrap();
    assert_eq!(fresh.opts.quantize, None, "{:?}", fresh.plan_note);
    let packed = block(sft.continued(g, pairs_again, tight)).unwrap();
    assert!(packed.keeps_starting_adapter());
    let note = packed.plan_note.clone().unwrap_or_default();
    assert_eq!(packed.opts.quantize.as_deref(), Some("q8"), "{note}");
    assert!(note.contains("packed as Q8_0 (as --quantize q8)") && note.contains("gradient checkpointing"), "{note}");
    assert!(packed.estimate(g).unwrap().total() <= budget);
}

/// `webtune eval` on preference pairs reports each side's loss per completion token and
/// how often the chosen completion has the higher log-probability, from the pairs'
/// log-probabilities (`pair_logps`) and completion tokens; with chosen and rejected
/// swapped in the file, the sides swap.
#[test]
fn eval_on_pairs_reports_each_side_and_the_preference() {
    use futures::executor::block_on as block;
    let dir = std::env::temp_dir().join(format!("webtune-eval-pairs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text: Vec<String> = webtune::data::builtin("demo-dpo").unwrap().lines().take(64).map(String::from).collect();
    let swapped: Vec<String> = text
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let chosen = v["chosen"].take();
            v["chosen"] = v["rejected"].take();
            v["rejected"] = chosen;
            v.to_string()
        })
        .collect();
    let (pairs, other) = (dir.join("pairs.jsonl"), dir.join("swapped.jsonl"));
    std::fs::write(&pairs, text.join("\n")).unwrap();
    std::fs::write(&other, swapped.join("\n")).unwrap();
    let eval = |data: &PathBuf| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_webtune")).args(["eval", "--model", "demo", "--data", data.to_str().unwrap(), "--batch-size", "16"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str::<Value>(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    let (p, q) = (eval(&pairs), eval(&other));
    let md = cli::ModelDir::open(std::path::Path::new("demo")).unwrap();
    let ds = webtune::data::load(&md.tokenizer, &text.join("\n"), "pairs", 512, false, false).unwrap();
    let m = cli::load_for_inference(gpu(), &md, None).unwrap();
    let lp = block(webtune::train::pair_logps(gpu(), &m, &ds, 16, md.tokenizer.pad_id)).unwrap();
    assert_eq!(p["pairs"], 64);
    for (side, name) in [(0, "chosen"), (1, "rejected")] {
        let tokens: usize = (0..64).map(|i| ds.sequences[2 * i + side].trained_targets()).sum();
        let loss = -lp.iter().map(|x| x[side] as f64).sum::<f64>() / tokens as f64;
        assert_eq!(p[name]["tokens"], tokens);
        let got = p[name]["loss"].as_f64().unwrap();
        assert!((got - loss).abs() <= 1e-6 * loss, "{name}: {got}, want {loss}");
        assert!((p[name]["perplexity"].as_f64().unwrap() - got.exp()).abs() <= 1e-9 * got.exp());
        let other = ["rejected", "chosen"][side];
        assert_eq!(q[other]["tokens"], tokens);
        assert!((q[other]["loss"].as_f64().unwrap() - got).abs() <= 1e-6 * got, "swapped: {q}");
    }
    let share = lp.iter().filter(|x| x[0] > x[1]).count() as f64 / 64.0;
    assert_eq!(p["prefers_chosen"].as_f64().unwrap(), share);
    assert_eq!(q["prefers_chosen"].as_f64().unwrap(), lp.iter().filter(|x| x[1] > x[0]).count() as f64 / 64.0);
    assert!(share > 0.0 && share < 1.0, "{share}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pair's row holds its prompt once (`PairBatch`): each side's log-probability is
/// the one its sequence gives alone, on the demo pairs (whose prompts are most of a
/// row) and on Qwen3's chat pairs from TRL's fixtures, and the rows are shorter than
/// the two sides laid out apart.
#[test]
fn a_pairs_shared_prompt_gives_each_side_its_own_log_probability() {
    use futures::executor::block_on as block;
    use webtune::data::batch::{Batch, PairBatch};
    use webtune::model::{Inputs, Shape};
    let check = |md: &cli::ModelDir, text: &str, n: usize, least_saved: f64| {
        let ds = webtune::data::load(&md.tokenizer, text, "pairs", 512, false, false).unwrap();
        let m = cli::load_for_inference(gpu(), md, None).unwrap();
        let pad = md.tokenizer.pad_id;
        let shared = block(webtune::train::pair_logps(gpu(), &m, &ds, 8, pad)).unwrap();
        assert_eq!(shared.len(), n.min(ds.items()));
        let (mut apart, mut together) = (0, 0);
        for (i, lp) in shared.iter().enumerate() {
            let (c, r) = (&ds.sequences[2 * i], &ds.sequences[2 * i + 1]);
            apart += c.ids.len() + r.ids.len();
            together += PairBatch::row_len(c, r);
            for (side, s) in [c, r].into_iter().enumerate() {
                let b = Batch::new(&[s], pad);
                let inp = Inputs::new(gpu(), Shape { b: 1, t: b.t }, &b.ids, &b.pos, &b.seg).unwrap();
                let rs = gpu().upload("row seq", &vec![0u32; b.t], &[b.t]).unwrap();
                let alone = block(gpu().read::<f32>(&m.sequence_logps(gpu(), &inp, &b.targets, &rs).unwrap())).unwrap()[0];
                assert!((lp[side] - alone).abs() <= 1e-4 * alone.abs().max(1.0), "pair {i} side {side}: {} shared, {alone} alone", lp[side]);
            }
        }
        let saved = 1.0 - together as f64 / apart as f64;
        assert!(saved >= least_saved, "rows {together} tokens against {apart} apart ({saved:.2} saved)");
    };
    let text: Vec<String> = webtune::data::builtin("demo-dpo").unwrap().lines().take(12).map(String::from).collect();
    check(&cli::ModelDir::open(std::path::Path::new("demo")).unwrap(), &text.join("\n"), 12, 0.3);
    let md = cli::ModelDir::open(&qwen3_model("shared-prompt")).unwrap();
    let pairs = std::fs::read_to_string(fixture().join("conversational.jsonl")).unwrap();
    check(&md, &pairs, 64, 0.1);
}
