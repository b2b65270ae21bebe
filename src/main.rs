//! The `webtune` command line: parses the arguments (clap) and runs the command. The
//! longer commands (train, generate, chat, merge, data inspect, the demo, random-model)
//! live in `webtune::cli`; the short ones (eval, info, memory, bench, serve) are here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use webtune::cli;
use webtune::gpu::{Gpu, Variant, WideMatmul};
use webtune::model::generate::Sampling;
use webtune::train::RunOptions;

// Counts host allocations, so `info --model` and the train log report a load's peak.
#[global_allocator]
static ALLOC: webtune::alloc::Counting = webtune::alloc::Counting;

#[derive(Parser)]
#[command(name = "webtune", version, about = "Fine-tune small language models with hand-written WGSL kernels (no command: the demo)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model on instruction data (LoRA by default, --full for every weight).
    Train(Box<TrainCmd>),
    /// Hand a run over to TRL + accelerate for many GPUs: the options of `train`; writes
    /// the data as webtune trains it, the starting adapter, train.py, accelerate configs
    /// and a README into --out.
    ExportRun(Box<TrainCmd>),
    /// Continue a prompt.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn with the chat template and the generation prompt.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// What an adapter changed: ‖ΔW‖/‖W‖ per layer and projection, and the base's and
    /// the tuned model's next-token top-k along an answer.
    LoraChange {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        /// A user turn (the chat template wraps it).
        #[arg(long, default_value = "Hello! What can you do?")]
        prompt: String,
        /// The answer to follow (default: the tuned model's greedy answer).
        #[arg(long)]
        answer: Option<String>,
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// One JSON object `{changes, positions}` instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// Talk with a model; /reset starts over, /exit leaves.
    Chat {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Loss and perplexity on a data file, masked as in training; prints one JSON line.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 512)]
        max_seq_len: usize,
        /// Sequences a batch (fewer where a batch would overfill a storage binding).
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
    },
    /// Merge a LoRA adapter into its base model and write a full model: a Hugging Face
    /// directory, or one GGUF file when --out ends in .gguf.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The tensor type of a GGUF output: f16, q8_0, q4_0, q4_1 or f32 (norms stay f32;
        /// matrices whose rows are not whole blocks f16).
        #[arg(long = "type", default_value = "f16")]
        gguf_type: String,
        /// The adapter was trained on a base quantized on load (`train --quantize`):
        /// merge into those dequantized weights, as PEFT advises for QLoRA.
        #[arg(long)]
        quantize: Option<String>,
    },
    /// Write a PEFT adapter as a llama.cpp LoRA adapter (GGUF; llama-cli --lora FILE).
    ExportLora {
        #[arg(long)]
        adapter: PathBuf,
        /// The base model (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Instruction-tune the built-in demo model and show held-out accuracy before and
    /// after; then, with --dpo-steps, a DPO stage on preference pairs. With --model, a
    /// real model learns to turn requests into tool calls instead.
    Demo {
        #[arg(long, default_value = "webtune-demo")]
        out: PathBuf,
        /// A real model to teach tool calls: `smollm2` (SmolLM2-135M-Instruct, fetched
        /// by scripts/fetch-models.sh), a model directory, a .gguf file or a Hub id.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Training steps (default: 300 for the built-in demo, 24 with --model).
        #[arg(long)]
        steps: Option<u64>,
        /// Steps of the optional DPO stage after SFT (0: none).
        #[arg(long, default_value_t = 0)]
        dpo_steps: u64,
        /// The DPO stage's RPO weight (an NLL term on the chosen answers; default: the
        /// demo_dpo preset's).
        #[arg(long)]
        rpo_alpha: Option<f64>,
    },
    /// Look at data before training on it.
    Data {
        #[command(subcommand)]
        what: DataCmd,
    },
    /// Serve the web page (index.html and web/) on 127.0.0.1.
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// A directory holding index.html and web/, read from disk (default: the page
        /// built into this binary; a binary built before web/pkg serves the source
        /// tree it was built from).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Measure the kernels on this adapter.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Show the GPU adapter, its limits and features; with --model, load the model and
    /// report its GPU memory and the load's peak host memory.
    Info {
        /// A model directory to load (frozen weights, as eval loads them).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Write a model directory of random bf16 weights shaped by a config.json (to try
    /// a model's size, memory and load without its weights).
    RandomModel {
        /// A Hugging Face config.json (e.g. configs/Qwen3-0.6B.json).
        #[arg(long)]
        config: PathBuf,
        /// The directory to write: config.json and model.safetensors (and the demo's
        /// character tokenizer where it holds no tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        /// Weights are uniform in ±scale (norm weights are 1).
        #[arg(long, default_value_t = 0.02)]
        scale: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Estimate the GPU memory of a training step from a model's config alone.
    Memory {
        /// A Hugging Face config.json (e.g. configs/SmolLM2-135M.json), or any model the
        /// other commands take: a directory, a .gguf file (whose packed blocks are
        /// counted as they are kept), `demo`, or a Hub id.
        #[arg(long, alias = "model")]
        config: PathBuf,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 512)]
        max_seq_len: usize,
        #[arg(long, default_value_t = 16)]
        lora_rank: usize,
        /// Train every weight instead of LoRA pairs.
        #[arg(long)]
        full: bool,
        /// Keep every layer's activations instead of recomputing them.
        #[arg(long)]
        no_grad_checkpoint: bool,
        /// Frozen weights in f32 (adapters without shader-f16).
        #[arg(long)]
        f32_weights: bool,
        /// Frozen weights packed: q8, q4 or nf4 (QLoRA).
        #[arg(long)]
        quantize: Option<String>,
        /// sft, or dpo (chosen and rejected in one batch: twice the sequences).
        #[arg(long, default_value = "sft")]
        method: String,
        /// DPO with LoRA from a trained adapter (train's --init-adapter): the run keeps
        /// it on the GPU as the reference, beside a scratch copy to swap it through.
        #[arg(long)]
        from_adapter: bool,
        /// The plan `train` would choose within this budget (512MiB, 2GiB): its
        /// micro-batches and whether it turns on gradient checkpointing (with 128 MiB
        /// bindings, lavapipe's and WebGPU's default).
        #[arg(long)]
        memory_budget: Option<String>,
    },
}

#[derive(Args)]
struct TrainCmd {
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json), or `demo`.
    #[arg(long)]
    model: PathBuf,
    /// JSONL or JSON array: messages, prompt/completion, Alpaca, Dolly or text records; or `demo`.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: a PEFT adapter (or a full model with --full), checkpoints, metrics.jsonl.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    valid: Option<PathBuf>,
    /// A checkpoint directory (out/checkpoint-N) to continue from.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from an existing PEFT adapter instead of fresh LoRA weights.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Keep frozen weights in f32 even where the adapter has shader-f16 (to compare
    /// with adapters that have none, like the browser's SwiftShader).
    #[arg(long)]
    f32_weights: bool,
    /// The products over frozen weights on cooperative matrices (tensor cores: f16
    /// operands, f32 sums): `on` or `off`; default: `on` with the GPU kernels where the
    /// adapter offers them (native Vulkan and Metal). `--f32-weights` keeps them off.
    #[arg(long, value_parser = parse_on_off)]
    coop_matrix: Option<bool>,
    #[command(flatten)]
    run: RunOptions,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Show records as the model sees them (trained tokens marked) and a summary.
    Inspect {
        /// A model directory (its tokenizer and chat template are used), or `demo`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 512)]
        max_seq_len: usize,
        #[arg(long)]
        pack: bool,
        /// How many records to show.
        #[arg(long, default_value_t = 3)]
        show: usize,
        /// Show a seeded sample of records instead of the first ones.
        #[arg(long)]
        sample: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Mark token boundaries with |.
        #[arg(long)]
        tokens: bool,
        #[arg(long)]
        train_on_prompt: bool,
        /// Print only the summary, as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Matmul and attention GFLOP/s at SmolLM2-135M training shapes, GB/s for the memory-bound ops.
    Kernels {
        /// Minimum seconds to time each kernel.
        #[arg(long, default_value_t = 1.0)]
        min_secs: f64,
        /// Only the cases whose name contains this text (e.g. `matmul`, `attention`).
        #[arg(long, default_value = "")]
        only: String,
        /// Kernel variants: `tiled` (GPUs) or `register` (CPU drivers); default: the adapter's.
        #[arg(long, value_parser = parse_variant)]
        variant: Option<Variant>,
        /// Which products run matmul's wide kernel (128×128 a workgroup, 8×8 an
        /// invocation): `off`, `large` (those that fill its tiles) or `all`; default:
        /// `large` with the register variant, `off` with the tiled one.
        #[arg(long, value_parser = parse_wide)]
        wide_matmul: Option<WideMatmul>,
        /// The row kernels' reductions (RMSNorm, cross-entropy rows, gradient norm):
        /// `on` adds within subgroups, `off` keeps trees in workgroup memory; default:
        /// `on` with the tiled variant where the adapter has subgroups.
        #[arg(long, value_parser = parse_on_off)]
        subgroup_sums: Option<bool>,
        /// Matmul on cooperative matrices (tensor cores) for the products over frozen
        /// weights: `on` or `off`; default: `on` with the tiled variant where the
        /// adapter offers them (native Vulkan and Metal).
        #[arg(long, value_parser = parse_on_off)]
        coop_matrix: Option<bool>,
        /// Split-K: products with few tiles and a long inner dimension (the head's dx
        /// over the vocabulary, a weight's gradient over the tokens) run their k-ranges
        /// at once and add them up: `on` or `off` (the default, until a GPU measures it).
        #[arg(long, value_parser = parse_on_off)]
        split_k: Option<bool>,
    },
    /// Whole training steps (the options of `train`; --steps is how many to measure,
    /// after one warm-up step): tokens/s, GPU time against host time, dispatches, and
    /// the buffers and bind groups each step creates.
    Train {
        /// A model directory, or `demo`.
        #[arg(long)]
        model: PathBuf,
        /// Training data (JSONL), or `demo`.
        #[arg(long, default_value = "demo")]
        data: PathBuf,
        /// Build buffers, uniforms, bind groups and passes per use, as before reuse.
        #[arg(long)]
        no_reuse: bool,
        /// Keep frozen weights in f32 even where the adapter has shader-f16.
        #[arg(long)]
        f32_weights: bool,
        /// Kernel variants: `tiled` (GPUs) or `register` (CPU drivers); default: the adapter's.
        #[arg(long, value_parser = parse_variant)]
        variant: Option<Variant>,
        /// Which products run matmul's wide kernel (128×128 a workgroup, 8×8 an
        /// invocation): `off`, `large` (those that fill its tiles) or `all`; default:
        /// `large` with the register variant, `off` with the tiled one.
        #[arg(long, value_parser = parse_wide)]
        wide_matmul: Option<WideMatmul>,
        /// The row kernels' reductions (RMSNorm, cross-entropy rows, gradient norm):
        /// `on` adds within subgroups, `off` keeps trees in workgroup memory; default:
        /// `on` with the tiled variant where the adapter has subgroups.
        #[arg(long, value_parser = parse_on_off)]
        subgroup_sums: Option<bool>,
        /// Matmul on cooperative matrices (tensor cores) for the products over frozen
        /// weights: `on` or `off`; default: `on` with the tiled variant where the
        /// adapter offers them (native Vulkan and Metal).
        #[arg(long, value_parser = parse_on_off)]
        coop_matrix: Option<bool>,
        /// Split-K: products with few tiles and a long inner dimension (the head's dx
        /// over the vocabulary, a weight's gradient over the tokens) run their k-ranges
        /// at once and add them up: `on` or `off` (the default, until a GPU measures it).
        #[arg(long, value_parser = parse_on_off)]
        split_k: Option<bool>,
        #[command(flatten)]
        run: Box<RunOptions>,
    },
}

fn parse_wide(s: &str) -> Result<WideMatmul, String> {
    match s {
        "off" => Ok(WideMatmul::Off),
        "large" => Ok(WideMatmul::Large),
        "all" => Ok(WideMatmul::All),
        _ => Err(format!("`{s}` is not a choice of products for the wide matmul: use off, large or all")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}` is neither on nor off")),
    }
}

fn parse_variant(s: &str) -> Result<Variant, String> {
    match s {
        "tiled" => Ok(Variant::Tiled),
        "register" => Ok(Variant::Register),
        _ => Err(format!("`{s}` is not a kernel variant: use tiled or register")),
    }
}

fn main() {
    // Output piped into a reader that stops (`| head`) ends the process as other Unix
    // tools end, not with Rust's "failed printing to stdout" panic.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Err(e) = futures::executor::block_on(run(cli)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> webtune::Result<()> {
    let command = cli.command.unwrap_or(Command::Demo { out: PathBuf::from("webtune-demo"), model: None, steps: None, dpo_steps: 0, rpo_alpha: None });
    match command {
        Command::Demo { out, model: Some(model), steps, dpo_steps, rpo_alpha } => {
            if dpo_steps > 0 || rpo_alpha.is_some() {
                return Err(webtune::Error::Config("--dpo-steps and --rpo-alpha are the built-in demo's DPO stage; the demo with --model has none".into()));
            }
            let gpu = Gpu::new().await?;
            cli::demo_real(&gpu, &model, &out, steps.unwrap_or(webtune::data::tools::STEPS), webtune::data::tools::HELD_OUT, false).await?;
        }
        Command::Demo { out, model: None, steps, dpo_steps, rpo_alpha } => {
            let gpu = Gpu::new().await?;
            cli::demo(&gpu, &out, steps.unwrap_or(300), dpo_steps, rpo_alpha, false).await?;
        }
        Command::Train(t) => {
            let args = cli::TrainArgs { model: t.model, data: t.data, out: t.out, valid: t.valid, resume: t.resume, init_adapter: t.init_adapter, run: t.run, quiet: false };
            let gpu = Gpu::new_with(webtune::gpu::GpuOptions { no_f16: t.f32_weights, coop_matrix: t.coop_matrix, ..Default::default() }).await?;
            cli::train(&gpu, &args).await?;
        }
        Command::ExportRun(t) => {
            let args = cli::TrainArgs { model: t.model, data: t.data, out: t.out, valid: t.valid, resume: t.resume, init_adapter: t.init_adapter, run: t.run, quiet: false };
            let files = cli::export_run(&args)?;
            println!("{}: {} files for TRL + accelerate (see {}/README.md)", args.out.display(), files.len(), args.out.display());
        }
        Command::Generate { model, adapter, prompt, chat, sampling } => {
            let gpu = Gpu::new().await?;
            let md = cli::ModelDir::open(&model)?;
            let m = cli::load_for_inference(&gpu, &md, adapter.as_deref())?;
            if chat {
                cli::report_template(&md.tokenizer);
            }
            let ids = md.tokenizer.prompt_ids(&prompt, chat)?;
            cli::generate_print(&gpu, &m, &md.tokenizer, &ids, sampling.max_new_tokens, &sampling.sampling()).await?;
            println!();
        }
        Command::LoraChange { model, adapter, prompt, answer, top, json } => {
            let gpu = Gpu::new().await?;
            let md = cli::ModelDir::open(&model)?;
            cli::lora_change(&gpu, &md, &adapter, &prompt, answer.as_deref(), top, json).await?;
        }
        Command::Chat { model, adapter, sampling } => {
            let gpu = Gpu::new().await?;
            let md = cli::ModelDir::open(&model)?;
            let m = cli::load_for_inference(&gpu, &md, adapter.as_deref())?;
            cli::report_template(&md.tokenizer);
            cli::chat(&gpu, &m, &md.tokenizer, sampling.max_new_tokens, &sampling.sampling()).await?;
        }
        Command::Eval { model, adapter, data, max_seq_len, batch_size } => {
            let gpu = Gpu::new().await?;
            let md = cli::ModelDir::open(&model)?;
            cli::report_template(&md.tokenizer);
            let ds = webtune::data::load_path(&md.tokenizer, &data, max_seq_len, false, false)?;
            let m = cli::load_for_inference(&gpu, &md, adapter.as_deref())?;
            if ds.pairs {
                // Preference pairs: each side's loss, and how often the chosen one is preferred.
                let e = webtune::train::evaluate_preferences(&gpu, &m, &ds, batch_size, md.tokenizer.pad_id).await?;
                let side = |loss: f64, tokens: usize| serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens});
                let v = serde_json::json!({"pairs": e.pairs, "chosen": side(e.chosen_loss, e.chosen_tokens), "rejected": side(e.rejected_loss, e.rejected_tokens), "prefers_chosen": e.prefers_chosen});
                println!("{v}");
            } else {
                let (loss, tokens) = webtune::train::evaluate(&gpu, &m, &ds, batch_size, md.tokenizer.pad_id).await?;
                println!("{}", serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens}));
            }
        }
        Command::ExportLora { adapter, model, out } => {
            cli::export_lora(&adapter, model.as_deref(), &out)?;
            println!("wrote {}", out.display());
        }
        Command::Merge { model, adapter, out, gguf_type, quantize } => {
            let frozen = RunOptions { quantize, ..Default::default() }.frozen()?;
            cli::merge(&model, &adapter, &out, &gguf_type, frozen)?;
            println!("wrote {}", out.display());
        }
        Command::Data { what: DataCmd::Inspect { model, data, max_seq_len, pack, show, sample, seed, tokens, train_on_prompt, json } } => {
            cli::inspect(&cli::InspectArgs { model, data, max_seq_len, pack, show, sample, seed, tokens, train_on_prompt, json })?;
        }
        Command::Serve { port, root } => webtune::serve::serve(&webtune::serve::Root::choose(root), port)?,
        Command::Info { model } => {
            let gpu = Gpu::new().await?;
            println!("{}", gpu.describe());
            match model {
                None => {
                    // The limits compute work meets, by their WebGPU names.
                    let l = &gpu.caps.limits;
                    for (name, v) in [
                        ("maxBufferSize", l.max_buffer_size),
                        ("maxStorageBufferBindingSize", l.max_storage_buffer_binding_size),
                        ("maxUniformBufferBindingSize", l.max_uniform_buffer_binding_size as u64),
                        ("maxStorageBuffersPerShaderStage", l.max_storage_buffers_per_shader_stage as u64),
                        ("minStorageBufferOffsetAlignment", l.min_storage_buffer_offset_alignment as u64),
                        ("maxComputeWorkgroupStorageSize", l.max_compute_workgroup_storage_size as u64),
                        ("maxComputeInvocationsPerWorkgroup", l.max_compute_invocations_per_workgroup as u64),
                        ("maxComputeWorkgroupSizeX", l.max_compute_workgroup_size_x as u64),
                        ("maxComputeWorkgroupSizeY", l.max_compute_workgroup_size_y as u64),
                        ("maxComputeWorkgroupSizeZ", l.max_compute_workgroup_size_z as u64),
                        ("maxComputeWorkgroupsPerDimension", l.max_compute_workgroups_per_dimension as u64),
                    ] {
                        println!("{name}: {v}");
                    }
                    let coop: Vec<String> = gpu.caps.coop_shapes.iter().map(webtune::gpu::coop_shape).collect();
                    println!("cooperative matrices: {}", if coop.is_empty() { "none".to_string() } else { coop.join(", ") });
                }
                Some(dir) => {
                    let md = cli::ModelDir::open(&dir)?;
                    let c = &md.cfg;
                    println!(
                        "{}: {}, {} layers, hidden {}, {} heads ({} kv) of {}, vocab {}, tied embeddings {}",
                        dir.display(),
                        c.arch,
                        c.layers,
                        c.hidden,
                        c.heads,
                        c.kv_heads,
                        c.head_dim,
                        c.vocab,
                        c.tie_embeddings
                    );
                    println!("{}", md.tokenizer.template.describe());
                    let (_, report) = cli::load_measured(&gpu, &md, webtune::model::Tuning::Frozen, 0, webtune::model::Frozen::Auto)?;
                    println!("{report}");
                }
            }
        }
        Command::RandomModel { config, out, scale, seed } => {
            cli::check_out(&out, true)?;
            cli::random_model(&config, &out, scale, seed)?;
            println!("wrote {}", out.display());
        }
        Command::Memory { config, batch_size, max_seq_len, lora_rank, full, no_grad_checkpoint, f32_weights, quantize, method, from_adapter, memory_budget } => {
            use webtune::model::{gguf::Gguf, memory, weights::FileBytes, Config, TensorMap, Tensors};
            let name = config.display().to_string();
            let (cfg, weights): (Config, Box<dyn Tensors>) = if config.is_file() && config.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                let g = Gguf::open(Box::new(FileBytes::open(&config)?), &name)?;
                (Config::parse(&g.config_json()?, &name, None)?, Box::new(g))
            } else if config.is_file() || config.join("config.json").is_file() {
                let file = if config.is_dir() { config.join("config.json") } else { config.clone() };
                let text = std::fs::read_to_string(&file).map_err(|e| webtune::Error::io(&file, e))?;
                (Config::parse(&text, &name, None)?, Box::new(TensorMap::new()))
            } else {
                // `demo`, a Hub id: opened as every other command opens a model.
                let md = cli::ModelDir::open(&config)?;
                (md.source.cfg.clone(), Box::new(md.source.weights))
            };
            let mut run = RunOptions {
                lora_rank,
                lora_alpha: 2.0 * lora_rank as f32,
                full,
                grad_checkpoint: !no_grad_checkpoint,
                max_seq_len,
                train: webtune::train::Options { batch_size, method: method.clone(), ..Default::default() },
                quantize,
                memory_budget,
                ..Default::default()
            };
            run.check()?;
            if from_adapter && !run.references_its_adapter() {
                return Err(webtune::Error::Options("--from-adapter: only a LoRA DPO run keeps the adapter it starts from as its reference (add --method dpo, without --full)".into()));
            }
            let row = max_seq_len * run.row_sides();
            let plan_of = |run: &RunOptions| -> webtune::Result<memory::Plan> {
                let plan = run.memory_plan(&cfg, weights.as_ref(), row, !f32_weights, 128 << 20, false)?;
                Ok(memory::Plan { reference_adapter: from_adapter, ..plan })
            };
            let mut plan = plan_of(&run)?;
            let budget = webtune::train::fit::budget(&run, None)?;
            let lowered = webtune::train::fit::lower_frozen(&cfg, &run, &plan, row, budget);
            if let Some((q, note)) = &lowered {
                println!("{note}");
                run.quantize = Some((*q).into());
                plan = plan_of(&run)?;
            }
            if let Some(budget) = budget {
                let fit = webtune::train::fit::fit(&cfg, &run, &plan, row, Some(budget))?;
                match (&fit.note, &lowered) {
                    (Some(note), _) => println!("{note}"),
                    (None, None) => println!("plan: the options as given fit the budget"),
                    (None, Some(_)) => {}
                }
                plan.batch = plan.batch / batch_size * fit.micro;
                plan.grad_checkpoint = fit.grad_checkpoint;
            }
            let m = memory::estimate(&cfg, &plan);
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!("{}: {}, micro-batch {} × {row}, grad checkpointing {}", config.display(), plan.tuning, plan.batch, plan.grad_checkpoint);
            if method == "dpo" {
                let reference = match (full, from_adapter) {
                    (true, _) => "the model as the run starts, every pair's log-probabilities taken before the first step (8 bytes a pair, host memory): no frozen copy of the weights".to_string(),
                    (false, false) => "the base (the adapter off), each pair's log-probabilities taken as a step first uses it: no copy of anything (with --from-adapter, DPO from a trained adapter, it keeps that adapter)".to_string(),
                    (false, true) => format!(
                        "the adapter the run starts from, kept on the GPU beside a scratch copy to swap it through: {:.1} MiB, in the training state",
                        mib(m.training_state - memory::estimate(&cfg, &memory::Plan { reference_adapter: false, ..plan.clone() }).training_state)
                    ),
                };
                println!("DPO: {batch_size} pairs a batch, a row each of at most {row} tokens (both sides, their prompt once); the reference is {reference}");
            }
            println!("weights           {:>9.1} MiB (matrices: {})", mib(m.weights), plan.held(&cfg));
            println!("training state    {:>9.1} MiB", mib(m.training_state));
            println!("activations       {:>9.1} MiB", mib(m.activations));
            println!("total             {:>9.1} MiB", mib(m.total()));
        }
        Command::Bench { what: BenchWhat::Train { model, data, no_reuse, f32_weights, variant, wide_matmul, subgroup_sums, coop_matrix, split_k, mut run } } => {
            let split_k = split_k.unwrap_or(false).then_some(webtune::gpu::SplitK::ON);
            let gpu = Gpu::new_with(webtune::gpu::GpuOptions { no_f16: f32_weights, no_reuse, variant, wide_matmul, subgroup_sums, coop_matrix, split_k, ..Default::default() }).await?;
            let measure = run.train.steps.unwrap_or(5);
            run.train.steps = Some(measure + 2);
            let md = cli::ModelDir::open(&model)?;
            let ds = webtune::data::load_path(&md.tokenizer, &data, run.max_seq_len, run.pack, run.train_on_prompt)?;
            println!("adapter: {}", gpu.describe());
            let longest = ds.sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            let rows = if ds.pairs { format!("pairs, sequences up to {longest} tokens, a pair's row up to {}", ds.longest_row()) } else { format!("sequences up to {longest} tokens") };
            println!(
                "{}: {} layers, hidden {}, vocab {}; {}; batch {} ({rows}); reuse {}",
                model.display(), md.cfg.layers, md.cfg.hidden, md.cfg.vocab, run.tuning(), run.train.batch_size, if no_reuse { "off" } else { "on" }
            );
            // `--quantize q4,q8,f16` measures each in turn, side by side.
            let choices: Vec<Option<String>> = match run.quantize.clone() {
                Some(q) if q.contains(',') => q.split(',').map(|x| Some(x.trim().to_string())).collect(),
                other => vec![other],
            };
            let (source, ds) = (std::rc::Rc::new(md.source), std::rc::Rc::new(ds));
            let mut summary = Vec::new();
            for quantize in choices {
                let run = RunOptions { quantize: quantize.clone(), ..(*run).clone() };
                let mut r = webtune::train::Run::new(&gpu, source.clone(), ds.clone(), None, run)?;
                println!("frozen weights: {} ({:.1} MiB on the GPU)", quantize.as_deref().unwrap_or("as loaded"), r.model.resident_bytes() as f64 / (1u64 << 20) as f64);
                println!("{:>5} {:>7} {:>9} {:>9} {:>10} {:>7} {:>8} {:>8} {:>10} {:>10} {:>12}", "step", "tokens", "ms", "tok/s", "dispatches", "passes", "buffers", "binds", "record ms", "submit ms", "µs/dispatch");
                let b = webtune::bench::train(&gpu, &mut r, measure, |s| {
                    let c = &s.counters;
                    println!(
                        "{:>5} {:>7} {:>9.1} {:>9.1} {:>10} {:>7} {:>8} {:>8} {:>10.2} {:>10.2} {:>12.2}",
                        s.step, s.tokens, 1e3 * s.secs, s.tokens_per_s(), c.dispatches, c.passes, c.buffers, c.bind_groups, 1e3 * c.record_s, 1e3 * c.submit_s, s.us_per_dispatch()
                    );
                })
                .await?;
                let n = b.steps.len().max(1) as f64;
                let mean = |f: &dyn Fn(&webtune::bench::StepRow) -> f64| b.steps.iter().map(f).sum::<f64>() / n;
                println!(
                    "mean: {:.1} tokens/s, {:.0} ms a step, host {:.1} ms recording + {:.1} ms submitting, {:.2} µs per dispatch, {:.1} buffers and {:.1} bind groups created per step",
                    mean(&|s| s.tokens_per_s()), 1e3 * mean(&|s| s.secs), 1e3 * mean(&|s| s.counters.record_s), 1e3 * mean(&|s| s.counters.submit_s),
                    mean(&|s| s.us_per_dispatch()), mean(&|s| s.counters.buffers as f64), mean(&|s| s.counters.bind_groups as f64)
                );
                let total: u64 = b.by_kernel.iter().map(|(_, n)| n).sum();
                println!("dispatches of step {} by kernel ({total} in all):", b.steps.first().map_or(0, |s| s.step));
                for (kernel, n) in &b.by_kernel {
                    println!("  {kernel:<48} {n:>6} {:>5.1}%", 100.0 * *n as f64 / total.max(1) as f64);
                }
                match b.gpu_ms {
                    Some((ms, d)) => {
                        println!("GPU time of one more step (timestamp queries, a pass per dispatch): {ms:.1} ms over {d} dispatches");
                        for k in &b.gpu_by_kernel {
                            println!("  {:<64} {:>10.2} ms {:>5.1}% {:>6} dispatches", k.kernel, k.ms, 100.0 * k.ms / ms.max(1e-9), k.calls);
                        }
                    }
                    None => println!("GPU time: this adapter has no timestamp queries"),
                }
                // The device memory the run held (the model's buffers, and the pool of
                // temporaries at its largest) beside the plan's estimate.
                let (est, mib) = (r.estimate(&gpu)?, |b: u64| b as f64 / (1u64 << 20) as f64);
                let (held, pool) = (r.model.resident_bytes(), gpu.counters().pool_peak);
                println!(
                    "device memory: {:.1} MiB measured (weights and training state {:.1}, a step's temporaries {:.1}); estimated {:.1} (weights {:.1}, training state {:.1}, activations {:.1}) for micro-batch {} with checkpointing {}",
                    mib(held + pool), mib(held), mib(pool), mib(est.total()), mib(est.weights), mib(est.training_state), mib(est.activations), r.micro, if r.model.grad_checkpoint { "on" } else { "off" }
                );
                if let Some(peak) = webtune::alloc::peak_resident() {
                    println!("process peak resident memory: {:.1} MiB (on a CPU adapter the device's memory is this process's)", mib(peak));
                }
                summary.push((quantize.unwrap_or_else(|| "as loaded".into()), mean(&|s| s.tokens_per_s()), r.model.resident_bytes()));
            }
            if summary.len() > 1 {
                println!("{:>12} {:>9} {:>12}", "frozen", "tok/s", "model MiB");
                for (q, tps, bytes) in summary {
                    println!("{q:>12} {tps:>9.2} {:>12.1}", bytes as f64 / (1u64 << 20) as f64);
                }
            }
        }
        Command::Bench { what: BenchWhat::Kernels { min_secs, only, variant, wide_matmul, subgroup_sums, coop_matrix, split_k } } => {
            let split_k = split_k.unwrap_or(false).then_some(webtune::gpu::SplitK::ON);
            let gpu = Gpu::new_with(webtune::gpu::GpuOptions { variant, wide_matmul, subgroup_sums, coop_matrix, split_k, ..Default::default() }).await?;
            println!("adapter: {}", gpu.describe());
            println!("{:<52} {:>10} {:>12}", "kernel", "ms", "rate");
            let rows = webtune::bench::kernels(&gpu, min_secs, &only, |r| {
                println!("{:<52} {:>10.2} {:>8.2} {}", r.name, r.secs * 1e3, r.rate(), r.unit);
            })
            .await?;
            if rows.is_empty() {
                return Err(webtune::Error::Options(format!(
                    "--only `{only}` names no benchmark: give part of a benchmark's name (matmul, frozen, attention, rmsnorm, swiglu, add, cross-entropy, grad norm)"
                )));
            }
        }
    }
    Ok(())
}
