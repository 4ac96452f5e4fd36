//! The `isoformer-engine` command line.

pub mod bench;
pub mod data;
pub mod embed;
pub mod plan;
pub mod train;

use clap::{Parser, Subcommand};

use crate::Result;

#[derive(Parser, Debug)]
#[command(
    name = "isoformer-engine",
    version,
    about = "Run, train and benchmark IsoFormer and its encoders"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure kernel throughput on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Embed DNA (Enformer), RNA (NT-v2) or protein (ESM-2) sequences.
    Embed(embed::EmbedArgs),
    /// Build GTEx_final.csv from the GTEx TPM GCT, sample attributes, a GENCODE GTF and the genome.
    Prepare(data::PrepareArgs),
    /// Validate and export datasets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train IsoFormer (default: the built-in demo on the built-in demo data).
    Train(train::TrainArgs),
    /// Evaluate a checkpoint on a split of a dataset.
    Eval(train::EvalArgs),
    /// Predict expression per tissue with a checkpoint.
    Predict(train::PredictArgs),
    /// Memory of a training or inference step at any size, without weights: by category, the peak, and
    /// the largest batch that fits a budget.
    Plan(plan::PlanArgs),
    /// Write the synthetic demo dataset (GTEx_final.csv and genome.fa).
    DemoData(train::DemoDataArgs),
    /// Print the devices and CPU features this build can use.
    Info,
}

/// Runs a command on a worker of rayon's global pool rather than on the calling thread. The ops' parallel
/// loops are then entered from inside the pool: the calling worker takes a share of the work instead of
/// handing every loop to the pool and sleeping on a latch until it is done. With the small ops of a
/// training step that handover cost a system call pair per op (the demo's `train`, side by side: 87–99 →
/// 58–78 s wall, system time 29–31 → 8–10 s, identical metrics).
pub fn run(cli: Cli) -> Result<()> {
    // Workers get the main thread's 8 MiB of stack, so code that ran on the main thread has as much as
    // before. A global pool already built (a library user's) is kept as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| run_command(cli))
}

/// Refuses an output name whose extension promises another format than the tab-separated text that
/// `predict` and `data export` write (pandas reads a tab-separated `predictions.csv` as one column).
pub(crate) fn check_tsv_name(flag: &str, path: &std::path::Path) -> Result<()> {
    const OTHER_FORMATS: [&str; 9] = [
        "csv",
        "safetensors",
        "npy",
        "npz",
        "pt",
        "parquet",
        "json",
        "h5",
        "xlsx",
    ];
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if OTHER_FORMATS.iter().any(|f| ext.eq_ignore_ascii_case(f)) => {
            Err(crate::Error::invalid(
                flag,
                format!(
                    "{}: the file is tab-separated text, not .{ext}; name it *.tsv",
                    path.display()
                ),
            ))
        }
        _ => Ok(()),
    }
}

fn run_command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Data(cmd) => data::run(cmd),
        Command::Prepare(args) => data::run_prepare(args),
        Command::Embed(args) => embed::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Predict(args) => train::run_predict(args),
        Command::DemoData(args) => train::run_demo_data(args),
        Command::Plan(args) => plan::run(args),
        Command::Info => {
            info();
            Ok(())
        }
    }
}

fn info() {
    use crate::gpu::KernelDevice;
    println!("isoformer-engine {}", env!("CARGO_PKG_VERSION"));
    println!("devices:");
    println!("  cpu   the default and the reference: f32, or bf16 with --dtype bf16");
    println!("  emu   the CUDA kernels run on the CPU, to check them (bf16 activations; slow)");
    match crate::gpu::cuda::CudaDevice::new(0) {
        Ok(gpu) => {
            let gib = gpu.total_memory().map_or(String::new(), |b| {
                format!(", {:.0} GiB", b as f64 / 1024f64.powi(3))
            });
            println!("  {}{gib}", gpu.name());
        }
        Err(e) => println!("  cuda  unavailable: {e}"),
    }
    println!("cpu threads: {}", rayon::current_num_threads());
    #[cfg(target_arch = "x86_64")]
    {
        let features = [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bf16", std::is_x86_feature_detected!("avx512bf16")),
            ("amx-bf16", crate::ops::amx::available()),
        ];
        let on: Vec<&str> = features
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        println!("cpu features: {}", on.join(" "));
    }
    // What `--dtype bf16` multiplies with on this CPU (the fastest kernel it runs).
    println!(
        "bf16 GEMM: {}",
        crate::ops::gemm_bf16::Bf16Kernel::available()[0].name()
    );
}
