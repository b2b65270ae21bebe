//! `webtune export-run`: a run handed over to TRL + accelerate, for when it outgrows one
//! machine. The tokens each side trains are the same by construction: `train.jsonl`
//! holds the sequences of every optimizer step, in webtune's order, as webtune trains
//! them (template, answer-only mask, truncation and packing done), and `train.py`
//! trains them without re-tokenizing or shuffling, from webtune's own starting adapter.
//!
//! The files (`files`), written by the CLI into a directory and zipped by the page:
//! - `train.jsonl` (and `valid.jsonl`): JSON lines, one sequence (or preference pair)
//!   each. JSONL rather than Parquet: no new crate (it must build for wasm too), the
//!   rows stay readable, and `datasets.load_dataset("json")` reads them as they are.
//!   SFT rows: `step`, `input_ids`, `labels` (−100 where no loss is taken, as
//!   transformers shifts them) and `position_ids` (restarting at each packed example,
//!   which keeps attention within it: transformers finds packed sequences from the
//!   positions). Each step holds exactly `rows_per_step` rows (the effective batch); a
//!   step short of it (an epoch's last) is filled with one-token rows that train
//!   nothing, which changes no gradient, since the loss is normalised by trained tokens.
//!   DPO rows: `step`, `prompt_ids`, `chosen_ids`, `rejected_ids`, as TRL's
//!   DPOTrainer tokenizes them.
//! - `initial-adapter/`: the PEFT adapter the run starts from (fresh from the seed, or
//!   `--init-adapter`), so both sides start from the same weights.
//! - `run.json`: everything else `train.py` reads; `train.py`, `requirements.txt`,
//!   `accelerate/*.yaml` and `README.md`.

use super::export::Files;
use super::{plan, RunOptions};
use crate::data::batch::{Dataset, Sequence};
use crate::error::{Error, Result};
use crate::model::source::Source;

/// The script `train.py` (the same for every run: it reads `run.json`).
pub const TRAIN_PY: &str = include_str!("handover/train.py");

/// The package versions `train.py` was checked with (`tests/reference/check_export_run.py`).
pub const REQUIREMENTS: &str = "torch==2.15.0\ntransformers==5.24.0\npeft==0.21.2\ntrl==1.16.0\naccelerate==1.16.0\ndatasets==5.2.0\nsafetensors==0.8.0\n";

/// Where the base model comes from, as transformers loads it: a Hub id or a path, and
/// for a GGUF base the file (`from_pretrained(model, gguf_file=…)`).
#[derive(Clone, Debug, PartialEq)]
pub struct Base {
    pub model: String,
    pub gguf_file: Option<String>,
}

impl Base {
    /// The base of `source`, opened from `given` (the `--model` argument): a Hub id
    /// stays an id; a local directory or GGUF file becomes an absolute path.
    pub fn of(source: &Source, given: &str) -> Result<Base> {
        if matches!(given, "demo" | "demo-random") {
            return Err(Error::Options(format!(
                "--model {given}: the demo model is webtune's own, which transformers cannot load; export a run of a Hugging Face model (a Hub id, a directory or a GGUF file)"
            )));
        }
        let path = std::path::Path::new(given);
        let local = !given.is_empty() && (path.exists() || cfg!(target_arch = "wasm32"));
        let (model, file) = if local {
            let abs = std::fs::canonicalize(path).map(|p| p.display().to_string()).unwrap_or_else(|_| given.to_string());
            match given.to_ascii_lowercase().ends_with(".gguf") {
                true => {
                    let p = std::path::Path::new(&abs);
                    let dir = p.parent().map(|d| d.display().to_string()).unwrap_or_else(|| ".".into());
                    (dir, p.file_name().map(|f| f.to_string_lossy().into_owned()))
                }
                false => (abs, None),
            }
        } else {
            // A Hub id, `org/name[:file.gguf]` (`Source::name` keeps `org/name/file.gguf`).
            match source.name.strip_suffix(".gguf").and(source.name.rsplit_once('/')) {
                Some((repo, file)) if source.name.matches('/').count() >= 2 => (repo.to_string(), Some(file.to_string())),
                _ => (source.name.clone(), None),
            }
        };
        Ok(Base { model, gguf_file: file })
    }
}

/// How the frozen weights are held, for TRL: `None` (loaded in f32), or 4-bit NF4
/// (bitsandbytes); webtune's Q8_0/Q4_0 packing has no equivalent there.
fn quantization(o: &RunOptions) -> Result<Option<&'static str>> {
    match o.quantize.as_deref() {
        Some("nf4") if o.full => Err(Error::Options("--quantize nf4 with --full: frozen 4-bit weights cannot be fully tuned".into())),
        Some("nf4") => Ok(Some("nf4")),
        Some(q @ ("q8" | "q4")) => Err(Error::Options(format!(
            "--quantize {q}: webtune's {} blocks have no counterpart in bitsandbytes, so TRL could not train the same frozen weights; export with --quantize nf4 (bitsandbytes' 4-bit NormalFloat, bit for bit) or without --quantize",
            if q == "q8" { "Q8_0" } else { "Q4_0" }
        ))),
        _ => Ok(None),
    }
}

/// One SFT row: the sequence's ids, its labels as transformers takes them (the token
/// itself where webtune trains the previous position's prediction of it, else −100)
/// and its positions.
fn sft_row(step: Option<usize>, s: &Sequence) -> serde_json::Value {
    let targets = s.targets();
    let mut labels = vec![-100i64; s.ids.len()];
    for (t, &y) in targets.iter().enumerate() {
        if y >= 0 {
            labels[t + 1] = y as i64;
        }
    }
    let mut row = serde_json::json!({"input_ids": s.ids, "labels": labels, "position_ids": s.pos});
    if let Some(step) = step {
        row["step"] = step.into();
    }
    row
}

/// A row that trains nothing: it fills a step short of the effective batch.
fn filler_row(step: usize, pad_id: u32) -> serde_json::Value {
    serde_json::json!({"step": step, "input_ids": [pad_id], "labels": [-100], "position_ids": [0]})
}

/// One DPO row: the shared prompt, then each side's completion, split where the trained
/// tokens start (the same place on both sides).
fn dpo_row(step: Option<usize>, chosen: &Sequence, rejected: &Sequence, place: &str) -> Result<serde_json::Value> {
    let start = |s: &Sequence| s.trained.iter().position(|&t| t).unwrap_or(s.ids.len());
    let (pc, pr) = (start(chosen), start(rejected));
    if pc != pr || chosen.ids[..pc] != rejected.ids[..pr] {
        return Err(Error::Data(format!("{place}: the chosen and rejected sides do not share their prompt tokens, which TRL's DPOTrainer needs")));
    }
    if chosen.trained[pc..].iter().chain(&rejected.trained[pr..]).any(|&t| !t) {
        return Err(Error::Data(format!("{place}: a completion holds untrained tokens, which TRL's DPOTrainer cannot express")));
    }
    let mut row = serde_json::json!({"prompt_ids": chosen.ids[..pc], "chosen_ids": chosen.ids[pc..], "rejected_ids": rejected.ids[pr..]});
    if let Some(step) = step {
        row["step"] = step.into();
    }
    Ok(row)
}

fn lines(rows: &[serde_json::Value]) -> Vec<u8> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&r.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// The rows of `data` as the run trains them, step by step (`train::plan`): with the
/// number of rows each step holds.
pub fn train_rows(data: &Dataset, o: &RunOptions, pad_id: u32) -> Result<(Vec<serde_json::Value>, usize)> {
    let t = &o.train;
    let steps = plan(data.items(), t)?;
    let per_step = t.batch_size * t.grad_accum;
    let mut rows = Vec::with_capacity(steps.len() * per_step);
    for (s, micro) in steps.iter().enumerate() {
        let items: Vec<usize> = micro.iter().flatten().copied().collect();
        if data.pairs {
            if items.len() != per_step {
                return Err(Error::Options(format!(
                    "step {} of the DPO run holds {} pairs, not {per_step} (--batch-size {} × --grad-accum {}): TRL means the DPO loss per micro-batch, so a short step would weigh its pairs differently; choose a batch that divides the {} pairs, or --steps that stays within whole batches",
                    s + 1,
                    items.len(),
                    t.batch_size,
                    t.grad_accum,
                    data.items()
                )));
            }
            for i in items {
                rows.push(dpo_row(Some(s), &data.sequences[2 * i], &data.sequences[2 * i + 1], &data.examples[2 * i].place)?);
            }
        } else {
            let n = items.len();
            rows.extend(items.iter().map(|&i| sft_row(Some(s), &data.sequences[i])));
            rows.extend((n..per_step).map(|_| filler_row(s, pad_id)));
        }
    }
    Ok((rows, per_step))
}

/// The validation rows (no steps).
fn valid_rows(data: &Dataset) -> Result<Vec<serde_json::Value>> {
    if data.pairs {
        (0..data.items()).map(|i| dpo_row(None, &data.sequences[2 * i], &data.sequences[2 * i + 1], &data.examples[2 * i].place)).collect()
    } else {
        Ok(data.sequences.iter().map(|s| sft_row(None, s)).collect())
    }
}

/// Everything `train.py` reads besides the data.
fn run_json(base: &Base, o: &RunOptions, quant: Option<&str>, steps: usize, rows_per_step: usize, valid: bool, pad_id: u32) -> serde_json::Value {
    let t = &o.train;
    let schedule = match t.schedule.as_str() {
        "constant" => "constant_with_warmup",
        other => other,
    };
    let method = t.method.as_str();
    serde_json::json!({
        "written_by": format!("webtune {} export-run", env!("CARGO_PKG_VERSION")),
        "model": base.model,
        "gguf_file": base.gguf_file,
        "method": method,
        "tuning": if o.full { "full" } else { "lora" },
        "initial_adapter": if o.full { None } else { Some("initial-adapter") },
        "lora": if o.full { serde_json::Value::Null } else { serde_json::json!({
            "r": o.lora_rank, "alpha": o.lora_alpha, "dropout": o.lora_dropout,
            "targets": o.targets(), "use_rslora": o.rslora,
        }) },
        "quantization": quant,
        "steps": steps,
        "rows_per_step": rows_per_step,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "lr": t.lr,
        "lr_scheduler_type": schedule,
        "warmup_steps": t.warmup,
        "weight_decay": t.weight_decay,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "max_seq_len": o.max_seq_len,
        "pad_token_id": pad_id,
        "gradient_checkpointing": o.grad_checkpoint,
        "eval_every": o.eval_every.filter(|_| valid),
        "save_every": o.save_every,
        "dpo": (method == "dpo").then(|| serde_json::json!({
            "beta": t.beta, "loss_type": t.dpo_loss, "label_smoothing": t.label_smoothing, "rpo_alpha": t.rpo_alpha,
            "disable_dropout": !t.dpo_dropout,
        })),
        "train_file": "train.jsonl",
        "valid_file": if valid { Some("valid.jsonl") } else { None },
    })
}

/// The accelerate configs: DDP on one node, FSDP, DeepSpeed ZeRO-3, and two nodes.
fn accelerate_configs() -> Files {
    let ddp = "# One node, one process per GPU (DDP). Set num_processes to the GPUs.\ncompute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nmachine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\nuse_cpu: false\n";
    let fsdp = "# One node, parameters, gradients and optimizer state sharded (FSDP 2).\ncompute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nmachine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_cpu_ram_efficient_loading: true\n  fsdp_offload_params: false\n  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n";
    let zero3 = "# One node, DeepSpeed ZeRO stage 3 (needs `pip install deepspeed`).\ncompute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nmachine_rank: 0\nnum_processes: 2\nmixed_precision: 'no'\ndeepspeed_config:\n  zero_stage: 3\n  zero3_init_flag: true\n  zero3_save_16bit_model: true\n  offload_optimizer_device: none\n  offload_param_device: none\n";
    let nodes = "# Two nodes of 8 GPUs (DDP): run the same command on each node with its\n# machine_rank (0 on the main node), main_process_ip set to the main node's address.\ncompute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\nmain_process_ip: 10.0.0.1\nmain_process_port: 29500\nnum_processes: 16\nmixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\n";
    [("ddp", ddp), ("fsdp", fsdp), ("deepspeed-zero3", zero3), ("multi-node", nodes)]
        .iter()
        .map(|(name, body)| (format!("accelerate/{name}.yaml"), body.as_bytes().to_vec()))
        .collect()
}

/// The export's README: what it holds, how to launch it, and how to bring the result back.
fn readme(base: &Base, o: &RunOptions, steps: usize, rows_per_step: usize, quant: Option<&str>) -> String {
    let t = &o.train;
    let what = if t.method == "dpo" { "TRL's DPOTrainer" } else { "TRL's SFTTrainer" };
    let base_line = match &base.gguf_file {
        Some(f) => format!("`{}` with `gguf_file=\"{f}\"`: transformers dequantizes the GGUF's blocks to float on load, to the values webtune computes with (its Q4_0/Q4_1/Q8_0/Q4_K blocks stay packed on the GPU; the arithmetic is the same, the memory is not)", base.model),
        None => format!("`{}`", base.model),
    };
    let quant_line = match quant {
        Some(_) => "\n- The frozen weights are bitsandbytes 4-bit NF4 (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")`, blocks of 64, no double quantization), bit for bit webtune's `--quantize nf4`; bitsandbytes needs CUDA (or its CPU backend).".to_string(),
        None => match o.quantize.as_deref() {
            Some("f32") => String::new(),
            _ => "\n- webtune held the frozen weights in f16 where the adapter offers it (`--quantize f32` keeps them f32); here they load in f32, so the two curves agree to f16 rounding of the weights. Export from a run with `--quantize f32` for curves equal to 1e-4.".to_string(),
        },
    };
    // DPO runs without dropout unless --dpo-dropout (TRL's disable_dropout, the default).
    let dropout_line = if !o.full && o.lora_dropout > 0.0 && (t.method != "dpo" || t.dpo_dropout) {
        format!("\n- LoRA dropout ({}) draws its masks from each side's own generator, so the curves agree in distribution, not step for step; with `--lora-dropout 0` they agree to 1e-4.", o.lora_dropout)
    } else {
        String::new()
    };
    let rpo_line = if t.method == "dpo" && t.rpo_alpha > 0.0 {
        "\n- RPO: TRL means the NLL term over each micro-batch's chosen tokens; webtune over the whole step's. They agree when a step is one micro-batch on one process."
    } else {
        ""
    };
    format!(
        r#"# A webtune run, handed over to TRL + accelerate

Written by `webtune export-run`. `train.py` trains exactly the tokens webtune trains, with
{what} on accelerate: one process, several GPUs (DDP), FSDP, DeepSpeed ZeRO-3 or
several nodes. Nothing is re-tokenized and nothing is shuffled.

## What is here

| file | what |
| --- | --- |
| `train.jsonl` | every optimizer step's sequences, in webtune's order ({steps} steps × {rows_per_step} rows: the effective batch) |
| `valid.jsonl` | the validation data, if the run had some |
| `initial-adapter/` | the PEFT adapter the run starts from (webtune's fresh one from seed {seed}, or `--init-adapter`) |
| `run.json` | the model, the LoRA config, the optimizer, the schedule, the batch and DPO's settings |
| `train.py` | the trainer: reads `run.json` and the data, writes the result to `out/` |
| `accelerate/*.yaml` | accelerate configs: `ddp`, `fsdp`, `deepspeed-zero3`, `multi-node` |
| `requirements.txt` | the package versions `train.py` was checked with |

The base model: {base_line}.

## Launch

```sh
pip install -r requirements.txt
python train.py                                                     # one process (GPU or CPU)
accelerate launch --config_file accelerate/ddp.yaml --num_processes 8 train.py
accelerate launch --config_file accelerate/fsdp.yaml --num_processes 8 train.py
accelerate launch --config_file accelerate/deepspeed-zero3.yaml --num_processes 8 train.py
accelerate launch --config_file accelerate/multi-node.yaml --machine_rank 0 train.py   # on each node, its rank
accelerate launch --cpu --num_processes 2 train.py                  # DDP over gloo on one CPU machine
```

The effective batch stays {rows_per_step} rows a step for any number of processes: `train.py`
splits it into per-device batch × accumulation × processes (`--per-device-batch N` caps
the per-device batch; the number of processes must divide {rows_per_step}). `--out DIR`
moves the output (default `out/`).

## The same run, step for step

- Data: each step's rows are the sequences webtune trains in that step; a step short of
  the effective batch (an epoch's last) is filled with one-token rows that train nothing.
  Loss is normalised by the step's trained tokens on both sides (transformers'
  `num_items_in_batch`, across devices), so micro-batches and processes do not change it.
- Packed sequences keep their segments: positions restart at each example and
  transformers keeps attention within each.
- The optimizer is AdamW (betas 0.9, 0.999, eps 1e-8, weight decay {wd} on every trained
  tensor, as webtune), lr {lr} with the `{sched}` schedule over {steps} steps and {warmup} warmup
  steps, clipping at {clip}, seed {seed}.{quant_line}{dropout_line}{rpo_line}
- `out/metrics.jsonl` uses webtune's names (`step`, `loss`, `lr`, `grad_norm`,
  `valid_loss`, and DPO's `rewards/*`, `logps/*`), so the two curves line up.

## Back to webtune

The adapter `train.py` writes is a PEFT adapter; webtune reads it everywhere:

```sh
webtune generate --model {model} --adapter out --prompt "Hello" --chat
webtune chat --model {model} --adapter out
webtune train --model {model} --init-adapter out --data more.jsonl --out next
webtune merge --model {model} --adapter out --out merged
```

and the page takes it under "Start from an adapter".
"#,
        steps = steps,
        rows_per_step = rows_per_step,
        seed = t.seed,
        wd = t.weight_decay,
        lr = t.lr,
        sched = t.schedule,
        warmup = t.warmup,
        clip = t.max_grad_norm,
        model = base.model,
    )
}

/// The PEFT adapter a run of `o` starts from: `init` (`--init-adapter`, or the adapter
/// a continued run took over), else fresh pairs from the seed (`model::fresh_lora`);
/// nothing with full tuning.
pub fn initial_adapter(cfg: &crate::model::Config, o: &RunOptions, init: Option<crate::model::TensorMap>, base: &Base) -> Result<Files> {
    let crate::model::Tuning::Lora(l) = o.tuning() else { return Ok(Vec::new()) };
    let tensors = init.unwrap_or_else(|| crate::model::fresh_lora(cfg, &l, o.train.seed));
    Ok(vec![
        ("adapter_config.json".to_string(), crate::peft::config_json(&l, &base.model).into_bytes()),
        ("adapter_model.safetensors".to_string(), crate::model::weights::serialize(&tensors, None)?),
    ])
}

/// The files of a run handed over to TRL + accelerate: `data` and `valid` prepared as
/// the run prepares them, `initial_adapter` the adapter it starts from (LoRA).
pub fn files(source: &Source, base: &Base, o: &RunOptions, data: &Dataset, valid: Option<&Dataset>, initial_adapter: Files) -> Result<Files> {
    let pad_id = source.tokenizer.pad_id;
    // The same checks of the method, the loss and the data as a run's.
    super::Trainer::new(o.train.clone(), data, pad_id)?;
    let quant = quantization(o)?;
    let (rows, per_step) = train_rows(data, o, pad_id)?;
    let steps = rows.len() / per_step.max(1);
    let mut out: Files = vec![
        ("run.json".into(), serde_json::to_string_pretty(&run_json(base, o, quant, steps, per_step, valid.is_some(), pad_id)).expect("serialisable").into_bytes()),
        ("train.jsonl".into(), lines(&rows)),
    ];
    if let Some(v) = valid {
        out.push(("valid.jsonl".into(), lines(&valid_rows(v)?)));
    }
    out.extend(initial_adapter.into_iter().map(|(name, bytes)| (format!("initial-adapter/{name}"), bytes)));
    out.push(("train.py".into(), TRAIN_PY.as_bytes().to_vec()));
    out.push(("requirements.txt".into(), REQUIREMENTS.as_bytes().to_vec()));
    out.extend(accelerate_configs());
    out.push(("README.md".into(), readme(base, o, steps, per_step, quant).into_bytes()));
    Ok(out)
}
