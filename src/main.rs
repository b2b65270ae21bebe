//! The `webtune` command line.

use clap::{Parser, Subcommand};
use webtune::gpu::Gpu;

#[derive(Parser)]
#[command(name = "webtune", version, about = "Fine-tune small language models with hand-written WGSL kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the kernels on this adapter.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Show the GPU adapter, its limits and features.
    Info,
    /// Estimate the GPU memory of a training step from a model's config.json alone.
    Memory {
        /// A Hugging Face config.json (e.g. configs/SmolLM2-135M.json).
        #[arg(long)]
        config: std::path::PathBuf,
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
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = futures::executor::block_on(run(cli)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> webtune::Result<()> {
    match cli.command {
        Command::Info => {
            let gpu = Gpu::new().await?;
            println!("{}", gpu.describe());
            println!("{:#?}", gpu.caps.limits);
        }
        Command::Memory { config, batch_size, max_seq_len, lora_rank, full, no_grad_checkpoint, f32_weights } => {
            use webtune::model::{memory, Config, LoraConfig, Tuning};
            let text = std::fs::read_to_string(&config).map_err(|e| webtune::Error::Io(format!("{}: {e}", config.display())))?;
            let cfg = Config::parse(&text, &config.display().to_string(), None)?;
            let tuning = if full {
                Tuning::Full
            } else {
                let targets = LoraConfig::ALL_TARGETS.map(String::from).to_vec();
                Tuning::Lora(LoraConfig { r: lora_rank, alpha: 2.0 * lora_rank as f32, dropout: 0.05, targets, use_rslora: false })
            };
            let plan = memory::Plan {
                tuning,
                batch: batch_size,
                seq: max_seq_len,
                grad_checkpoint: !no_grad_checkpoint,
                f16_weights: !f32_weights,
                max_binding: 128 << 20,
            };
            let m = memory::estimate(&cfg, &plan);
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!("{}: {:?}, batch {batch_size} × {max_seq_len}, grad checkpointing {}", config.display(), plan.tuning, plan.grad_checkpoint);
            println!("weights           {:>9.1} MiB ({})", mib(m.weights), if plan.f16_weights && !full { "f16" } else { "f32" });
            println!("training state    {:>9.1} MiB", mib(m.training_state));
            println!("activations       {:>9.1} MiB", mib(m.activations));
            println!("total             {:>9.1} MiB", mib(m.total()));
        }
        Command::Bench { what: BenchWhat::Kernels { min_secs, only } } => {
            let gpu = Gpu::new().await?;
            println!("adapter: {}", gpu.describe());
            println!("{:<52} {:>10} {:>12}", "kernel", "ms", "rate");
            webtune::bench::kernels(&gpu, min_secs, &only, |r| {
                println!("{:<52} {:>10.2} {:>8.2} {}", r.name, r.secs * 1e3, r.rate(), r.unit);
            })
            .await?;
        }
    }
    Ok(())
}
