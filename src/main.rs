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
