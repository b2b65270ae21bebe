//! `webtune export-run`: a run handed over to TRL + accelerate trains exactly the tokens
//! webtune trains. The exported rows are checked against the batches webtune builds for
//! each step (chat, prompt/completion and packed SFT data, and DPO pairs), options TRL
//! cannot express are refused by name, and `train.py` and the accelerate configs parse
//! where Python is installed. `tests/reference/check_export_run.py` runs the export under
//! TRL (one process, and DDP over two) against webtune's losses.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use webtune::cli::{self, TrainArgs};
use webtune::data::batch::Batch;
use webtune::train::{plan, Options, RunOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp(name: &str) -> PathBuf {
    common::fresh_dir(&format!("handover-{name}"))
}

/// The tiny Qwen3 with the real tokenizer, a copy per test (they run at once).
fn qwen3_model(test: &str) -> PathBuf {
    common::qwen3_model_at(&temp(&format!("model-{test}")))
}

/// Chat records (with and without a system turn, one of two turns) and
/// prompt/completion records, 11 in all.
fn sft_data(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for (i, city) in ["Lyon", "Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth", "Accra", "Hanoi", "Turin", "Bern"].iter().enumerate() {
        let record = if i % 3 == 0 {
            serde_json::json!({"prompt": format!("What is {city} known for?"), "completion": format!(" {city} is known for its old streets, number {i}.")})
        } else {
            let mut m = vec![];
            if i % 2 == 0 {
                m.push(serde_json::json!({"role": "system", "content": "You are brief."}));
            }
            m.push(serde_json::json!({"role": "user", "content": format!("Will it rain in {city} tomorrow?")}));
            m.push(serde_json::json!({"role": "assistant", "content": format!("{{\"tool\": \"weather\", \"city\": \"{city}\"}}")}));
            if i % 4 == 1 {
                m.push(serde_json::json!({"role": "user", "content": "And the day after?"}));
                m.push(serde_json::json!({"role": "assistant", "content": format!("{{\"tool\": \"weather\", \"city\": \"{city}\", \"day\": 2}}")}));
            }
            serde_json::json!({ "messages": m })
        };
        lines.push_str(&format!("{record}\n"));
    }
    let path = dir.join("sft.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn args(model: &Path, data: &Path, out: &Path, run: RunOptions) -> TrainArgs {
    TrainArgs { model: model.into(), data: data.into(), out: out.into(), valid: None, resume: None, init_adapter: None, run, quiet: true }
}

fn rows(dir: &Path, file: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(file)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn nums(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// Every step's rows are the sequences webtune's plan puts in that step, in order: the
/// ids and positions of its batch, labels that transformers shifts onto webtune's
/// next-token targets, and one-token rows training nothing up to the effective batch.
#[test]
fn exported_sft_rows_are_the_batches_webtune_trains() {
    let model = qwen3_model("sft");
    let data = sft_data(&model);
    for pack in [false, true] {
        let out = temp(if pack { "sft-packed" } else { "sft" });
        let run = RunOptions {
            lora_rank: 4,
            lora_alpha: 8.0,
            max_seq_len: 64,
            pack,
            train: Options { batch_size: 3, grad_accum: 2, steps: Some(4), ..Options::default() },
            ..RunOptions::default()
        };
        let written = cli::export_run(&args(&model, &data, &out, run.clone())).unwrap();
        for f in ["run.json", "train.jsonl", "train.py", "requirements.txt", "README.md", "initial-adapter/adapter_config.json", "initial-adapter/adapter_model.safetensors", "accelerate/ddp.yaml", "accelerate/fsdp.yaml", "accelerate/deepspeed-zero3.yaml", "accelerate/multi-node.yaml"] {
            assert!(written.iter().any(|w| w == f) && out.join(f).is_file(), "{f} missing from {written:?}");
        }
        // webtune's own preparation of the same data.
        let md = cli::ModelDir::open(&model).unwrap();
        let ds = webtune::data::load_path(&md.tokenizer, &data, 64, pack, false).unwrap();
        let steps = plan(ds.items(), &run.train).unwrap();
        let exported = rows(&out, "train.jsonl");
        assert_eq!(exported.len(), 4 * 6, "4 steps of 3 × 2 rows");
        let mut fillers = 0;
        for (s, micro) in steps.iter().enumerate() {
            let items: Vec<usize> = micro.iter().flatten().copied().collect();
            let these: Vec<&Value> = exported.iter().filter(|r| r["step"] == s).collect();
            assert_eq!(these.len(), 6, "step {s}");
            for (k, row) in these.iter().enumerate() {
                let (ids, labels, pos) = (nums(&row["input_ids"]), nums(&row["labels"]), nums(&row["position_ids"]));
                let Some(&i) = items.get(k) else {
                    assert_eq!((ids.len(), labels, pos), (1, vec![-100], vec![0]), "filler row {k} of step {s}");
                    fillers += 1;
                    continue;
                };
                let b = Batch::new(&[&ds.sequences[i]], md.tokenizer.pad_id);
                assert_eq!(ids, b.ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), "ids of step {s} row {k}");
                assert_eq!(pos, b.pos.iter().map(|&x| x as i64).collect::<Vec<_>>(), "positions of step {s} row {k}");
                // transformers predicts labels[t + 1] at position t: webtune's target at t.
                assert_eq!(labels[0], -100);
                assert_eq!(labels[1..].to_vec(), b.targets[..b.t - 1].iter().map(|&x| x as i64).collect::<Vec<_>>(), "labels of step {s} row {k}");
                assert_eq!(b.targets[b.t - 1], -100);
            }
        }
        // 11 records (fewer sequences packed) do not fill 4 steps of 6 exactly.
        assert!(fillers > 0, "no step was short, so no filler row was checked");
        if pack {
            assert!(ds.sequences.iter().any(|s| s.seg.iter().any(|&g| g > 0)), "nothing was packed");
        }
        let run_json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!((run_json["steps"].as_u64(), run_json["rows_per_step"].as_u64()), (Some(4), Some(6)));
        assert_eq!((run_json["lora"]["r"].as_u64(), run_json["lora"]["alpha"].as_f64(), run_json["lr"].as_f64()), (Some(4), Some(8.0), Some(2e-4)));
        assert_eq!(run_json["lr_scheduler_type"], "cosine");
        // The starting adapter is webtune's fresh one from the seed, under PEFT's names.
        let adapter = cli::read_adapter(&out.join("initial-adapter")).unwrap().1;
        let webtune::model::Tuning::Lora(lora) = run.tuning() else { panic!("a LoRA run") };
        let fresh = webtune::model::fresh_lora(&md.cfg, &lora, run.train.seed);
        assert_eq!(adapter.len(), fresh.len());
        for (name, t) in &fresh {
            assert_eq!(adapter[name].data, t.data, "{name}");
        }
        python_parses(&out);
    }
}

/// DPO pairs as TRL's DPOTrainer takes them: the shared prompt, then each side's
/// completion, concatenating to webtune's chosen and rejected sequences with the
/// completion exactly the trained tokens.
#[test]
fn exported_dpo_rows_are_the_pairs_webtune_trains() {
    let model = qwen3_model("dpo");
    let data = root().join("tests/fixtures/dpo/conversational.jsonl");
    let out = temp("dpo");
    let run = RunOptions { lora_rank: 4, max_seq_len: 128, train: Options { method: "dpo".into(), batch_size: 2, steps: Some(3), rpo_alpha: 0.5, ..Options::default() }, ..RunOptions::default() };
    cli::export_run(&args(&model, &data, &out, run.clone())).unwrap();
    let md = cli::ModelDir::open(&model).unwrap();
    let ds = webtune::data::load_path(&md.tokenizer, &data, 128, false, false).unwrap();
    let steps = plan(ds.items(), &run.train).unwrap();
    let exported = rows(&out, "train.jsonl");
    let order: Vec<(usize, usize)> = steps.iter().enumerate().flat_map(|(s, m)| m.iter().flatten().map(move |&i| (s, i))).collect();
    assert_eq!(exported.len(), order.len());
    for (row, &(s, i)) in exported.iter().zip(&order) {
        assert_eq!(row["step"], s);
        let (p, c, r) = (nums(&row["prompt_ids"]), nums(&row["chosen_ids"]), nums(&row["rejected_ids"]));
        for (side, seq) in [(&c, &ds.sequences[2 * i]), (&r, &ds.sequences[2 * i + 1])] {
            let ids: Vec<i64> = p.iter().chain(side.iter()).copied().collect();
            assert_eq!(ids, seq.ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), "pair {i}");
            let trained: Vec<bool> = (0..ids.len()).map(|t| t >= p.len()).collect();
            assert_eq!(trained, seq.trained, "pair {i}: the completion is exactly the trained tokens");
        }
    }
    let run_json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["dpo"]["rpo_alpha"].as_f64(), Some(0.5));
    assert_eq!(run_json["dpo"]["beta"].as_f64(), Some(0.1));
    // LoRA dropout (0.05 here) is off in DPO on both sides: TRL's disable_dropout.
    assert_eq!(run_json["dpo"]["disable_dropout"], true);
    assert_eq!(run_json["lora"]["dropout"].as_f64().map(|x| x as f32), Some(0.05));
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(!readme.contains("LoRA dropout ("), "{readme}");
    python_parses(&out);
}

/// What TRL cannot train the same way is refused, naming the option.
#[test]
fn options_trl_cannot_express_are_refused_by_name() {
    let model = qwen3_model("refused");
    let data = sft_data(&model);
    let out = temp("refused");
    let refuse = |a: TrainArgs, want: &str| {
        let err = cli::export_run(&a).unwrap_err().to_string();
        assert!(err.contains(want), "`{err}` does not name {want}");
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "a refused export wrote files");
    };
    let _ = std::fs::remove_dir_all(&out);
    let run = |f: &dyn Fn(&mut RunOptions)| {
        let mut r = RunOptions { max_seq_len: 64, ..RunOptions::default() };
        f(&mut r);
        args(&model, &data, &out, r)
    };
    refuse(run(&|r| r.quantize = Some("q8".into())), "--quantize q8");
    refuse(run(&|r| r.quantize = Some("q4".into())), "--quantize q4");
    refuse(run(&|r| (r.quantize, r.full) = (Some("nf4".into()), true)), "--full");
    refuse(TrainArgs { resume: Some(out.join("checkpoint-2")), ..run(&|_| ()) }, "--resume");
    refuse(TrainArgs { model: "demo".into(), ..run(&|_| ()) }, "--model demo");
    // Four DPO pairs in batches of 3: the second step would hold one pair.
    let dpo = root().join("tests/fixtures/dpo/conversational.jsonl");
    let short = RunOptions { max_seq_len: 128, train: Options { method: "dpo".into(), batch_size: 3, steps: Some(2), ..Options::default() }, ..RunOptions::default() };
    refuse(args(&model, &dpo, &out, short), "--batch-size 3");
}

/// The page's download of the same files: one stored ZIP archive that Python's
/// zipfile reads back file for file, folders included.
#[test]
fn the_files_zip_as_the_page_downloads_them() {
    let files = vec![
        ("run.json".to_string(), b"{\"steps\": 3}".to_vec()),
        ("initial-adapter/adapter_model.safetensors".to_string(), (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect()),
        ("accelerate/ddp.yaml".to_string(), Vec::new()),
    ];
    let zip = webtune::train::export::zip(&files).unwrap();
    // The end record counts the three entries.
    let end = &zip[zip.len() - 22..];
    assert_eq!(&end[..4], &[0x50, 0x4b, 0x05, 0x06]);
    assert_eq!(u16::from_le_bytes([end[10], end[11]]), 3);
    let dir = temp("zip");
    std::fs::write(dir.join("run.zip"), &zip).unwrap();
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("no python3 here: the archive is not read back");
        return;
    }
    let read = "import sys, zipfile, json\nz = zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nprint(json.dumps({i.filename: list(z.read(i)) for i in z.infolist()}))";
    let out = std::process::Command::new("python3").args(["-c", read]).arg(dir.join("run.zip")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back: std::collections::BTreeMap<String, Vec<u8>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back.len(), 3);
    for (name, bytes) in &files {
        assert_eq!(&back[name], bytes, "{name}");
    }
}

/// `train.py` compiles and the accelerate configs are YAML, where Python is here.
fn python_parses(dir: &Path) {
    let python = std::process::Command::new("python3").arg("--version").output();
    if python.is_err() {
        eprintln!("no python3 here: train.py and the configs are not parsed");
        return;
    }
    let st = std::process::Command::new("python3").args(["-m", "py_compile"]).arg(dir.join("train.py")).status().unwrap();
    assert!(st.success(), "train.py does not compile");
    let check = "import sys, json\ntry:\n    import yaml\nexcept ImportError:\n    sys.exit(0)\nfor f in sys.argv[1:]:\n    c = yaml.safe_load(open(f))\n    assert c['distributed_type'] in ('MULTI_GPU', 'FSDP', 'DEEPSPEED'), f\n    assert c['num_processes'] >= 2, f\n";
    let configs: Vec<PathBuf> = ["ddp", "fsdp", "deepspeed-zero3", "multi-node"].iter().map(|c| dir.join(format!("accelerate/{c}.yaml"))).collect();
    let st = std::process::Command::new("python3").args(["-c", check]).args(&configs).status().unwrap();
    assert!(st.success(), "an accelerate config does not parse");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
    assert!(json["model"].as_str().is_some_and(|m| Path::new(m).is_absolute()), "a local base is named by its absolute path: {}", json["model"]);
}
