//! `isoformer-engine bench …`

use clap::{Args, Subcommand};

use crate::bench::gemm::GemmBench;
use crate::{DType, DeviceRequest, Result};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// GEMM throughput, C[m,n] = A[m,k]·B[k,n]. Prints the median as `<number> GFLOP/s`.
    Gemm(GemmArgs),
    /// Data loader throughput (samples/s) over a dataset, as `train` would read it.
    Loader(LoaderArgs),
    /// One IsoFormer training step with frozen encoders on random weights: time and peak memory, the first
    /// step filling the embedding cache and the next ones reading it.
    Step(StepArgs),
    /// One training step of an ESM-2 or NT-v2 encoder from its weights: forward, a mean-squared loss on
    /// the last hidden state, backward, AdamW on every parameter. Prints each step's time and loss.
    EncoderStep(EncoderStepArgs),
    /// The GPU's figures from the binary alone: bf16 GEMM TFLOP/s at several sizes, flash attention
    /// forward and backward at head dims 64, 128 and 384, and a training step of an ESM-2 150M-shape
    /// encoder, each next to the GPU's bf16 peak.
    Gpu(GpuArgs),
}

#[derive(Args, Debug)]
pub struct GpuArgs {
    /// cuda (default), or emu to check the paths on the host emulator (use --quick there).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Tiny shapes: every path in seconds (for the emulator and smoke tests).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Args, Debug)]
pub struct EncoderStepArgs {
    /// esm2, nt or enformer.
    #[arg(long)]
    pub model: String,
    /// A directory with config.json and model.safetensors.
    #[arg(long)]
    pub weights: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence, <cls> and <eos> included (enformer: base pairs).
    #[arg(long, default_value_t = 512)]
    pub len: usize,
    /// Steps to run (the first one also plans the activations).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// none (keep every activation) or blocks (per-block checkpointing).
    #[arg(long, default_value = "none")]
    pub recompute: String,
    /// Take the steps' buffers from one arena at the offsets the planner derives from their lifetimes.
    #[arg(long)]
    pub arena: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct StepArgs {
    /// A built-in config name or a JSON file (default: the released model's sizes).
    #[arg(long, default_value = "isoformer")]
    pub config: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 2048)]
    pub rna_tokens: usize,
    #[arg(long, default_value_t = 1024)]
    pub protein_tokens: usize,
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Run the encoders every step (no embedding cache).
    #[arg(long)]
    pub no_cache: bool,
    /// Train from this released-layout IsoFormer checkpoint, with the config's encoder modes (default:
    /// random weights, frozen encoders).
    #[arg(long)]
    pub weights: Option<std::path::PathBuf>,
    /// The batch: the first --batch rows of a TSV with dna_seq, rna_seq, protein_seq (default: random
    /// sequences of the given token counts).
    #[arg(long)]
    pub input: Option<std::path::PathBuf>,
    /// Cache directory (default: a new temporary one).
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 or bf16 on the CPU; kernel devices compute in bf16.
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Args, Debug)]
pub struct LoaderArgs {
    #[command(flatten)]
    pub data: crate::cli::data::DataArgs,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Stop after this many batches (default: one epoch of the training split).
    #[arg(long)]
    pub batches: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct GemmArgs {
    #[arg(long, default_value_t = 1024)]
    pub m: usize,
    #[arg(long, default_value_t = 1024)]
    pub n: usize,
    #[arg(long, default_value_t = 1024)]
    pub k: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Element type: f32, or bf16 (bf16 storage with f32 accumulation).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda, emu or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Step(a) => {
            use crate::backend::any::AnyBackend;
            use crate::training::bench_step::{run_step_bench, StepBenchSpec};
            crate::cli::plan::check_token_counts(a.rna_tokens, a.protein_tokens)?;
            let spec = StepBenchSpec {
                config: crate::models::isoformer::IsoformerConfig::resolve(&a.config)?,
                batch: a.batch,
                rna_tokens: a.rna_tokens,
                protein_tokens: a.protein_tokens,
                steps: a.steps,
                cache_dir: a.cache_dir.clone().unwrap_or_else(|| {
                    std::env::temp_dir()
                        .join(format!("isoformer-step-cache-{}", std::process::id()))
                }),
                no_cache: a.no_cache,
                weights: a.weights.clone(),
                input: a.input.clone(),
            };
            let dtype = a.dtype.as_deref().map(DType::parse).transpose()?;
            let backend = AnyBackend::open_as(DeviceRequest::parse(&a.device)?.resolve()?, dtype)?;
            let lines = match &backend {
                AnyBackend::Cpu(b) => run_step_bench(b.as_ref(), &spec),
                AnyBackend::Emu(b) => run_step_bench(b.as_ref(), &spec),
                AnyBackend::Cuda(b) => run_step_bench(b.as_ref(), &spec),
            }?;
            for (i, (secs, rss, cached)) in lines.iter().enumerate() {
                println!(
                    "step {} {:.4} s  peak RSS {:.2} GB  encoders: {}",
                    i + 1,
                    secs,
                    *rss as f64 / 1e9,
                    if *cached { "embedding cache" } else { "run" }
                );
            }
            if a.cache_dir.is_none() {
                let _ = std::fs::remove_dir_all(&spec.cache_dir);
            }
            Ok(())
        }
        BenchCommand::Gpu(a) => {
            use crate::backend::any::AnyBackend;
            use crate::backend::Backend;
            use crate::bench::gpu::{bf16_peak_tflops, run_gpu_bench, GpuBenchSizes};
            let device = DeviceRequest::parse(&a.device)?.resolve()?;
            if device == crate::Device::Cpu {
                return Err(crate::Error::invalid(
                    "--device",
                    "bench gpu measures a kernel device: cuda, or emu (with --quick) to check the paths",
                ));
            }
            let sizes = if a.quick {
                GpuBenchSizes::quick()
            } else {
                GpuBenchSizes::full()
            };
            let backend = AnyBackend::open(device)?;
            let (name, figures) = match &backend {
                AnyBackend::Cpu(b) => (b.name(), run_gpu_bench(b.as_ref(), &sizes)?),
                AnyBackend::Emu(b) => (b.name(), run_gpu_bench(b.as_ref(), &sizes)?),
                AnyBackend::Cuda(b) => (b.name(), run_gpu_bench(b.as_ref(), &sizes)?),
            };
            let peak = bf16_peak_tflops(&name);
            println!(
                "{name}; bf16 dense peak: {}",
                peak.map_or("unknown for this GPU".to_string(), |p| format!(
                    "{p:.0} TFLOP/s"
                ))
            );
            for f in &figures {
                let share = peak.map_or(String::new(), |p| {
                    format!(" ({:.0}% of peak)", 100.0 * f.tflops / p)
                });
                println!(
                    "{:<70} {:>10.3} ms {:>9.2} TFLOP/s{share}",
                    f.name,
                    f.seconds * 1e3,
                    f.tflops
                );
            }
            Ok(())
        }
        BenchCommand::EncoderStep(a) => {
            use crate::backend::any::AnyBackend;
            use crate::training::bench_encoder::{
                plan_encoder_step, run_encoder_step_bench, EncoderStepSpec, StepModel,
            };
            let model = match a.model.to_ascii_lowercase().as_str() {
                "esm2" | "esm" | "esm-2" => StepModel::Esm2,
                "nt" | "nt-v2" | "ntv2" => StepModel::NucleotideTransformer,
                "enformer" => StepModel::Enformer,
                other => {
                    return Err(crate::Error::invalid(
                        "--model",
                        format!("'{other}' (expected esm2, nt or enformer)"),
                    ))
                }
            };
            if a.steps == 0 {
                return Err(crate::Error::invalid("--steps", "at least one step is run"));
            }
            let (config, weights) = crate::embed::resolve_weights(&a.weights, None)?;
            let spec = EncoderStepSpec {
                config,
                weights,
                model,
                batch: a.batch,
                len: a.len,
                steps: a.steps,
                recompute: crate::models::recompute::Recompute::parse(&a.recompute)?,
            };
            let backend = AnyBackend::open(DeviceRequest::parse(&a.device)?.resolve()?)?;
            use crate::backend::Backend;
            let plan = plan_encoder_step(&spec, backend.compute_dtype())?;
            let gib = |b: usize| b as f64 / 1024f64.powi(3);
            let planned = if a.arena {
                println!(
                    "planned peak {:.3} GiB (parameters, gradients, AdamW moments, and an arena of {:.3} GiB for \
                     the step buffers placed by lifetime; {:.3} GiB without it; recompute {})",
                    gib(plan.peak_with_arena),
                    gib(plan.arena.bytes),
                    gib(plan.peak),
                    spec.recompute
                );
                match &backend {
                    AnyBackend::Cpu(b) => b.use_arena(plan.arena.clone()),
                    AnyBackend::Emu(b) => b.use_arena(plan.arena.clone()),
                    AnyBackend::Cuda(b) => b.use_arena(plan.arena.clone()),
                }?;
                plan.peak_with_arena
            } else {
                println!(
                    "planned peak {:.3} GiB (parameters, gradients, AdamW moments, activations; recompute {})",
                    gib(plan.peak),
                    spec.recompute
                );
                plan.peak
            };
            let steps = match &backend {
                AnyBackend::Cpu(b) => run_encoder_step_bench(b.as_ref(), &spec),
                AnyBackend::Emu(b) => run_encoder_step_bench(b.as_ref(), &spec),
                AnyBackend::Cuda(b) => run_encoder_step_bench(b.as_ref(), &spec),
            }?;
            for (i, s) in steps.iter().enumerate() {
                println!("step {} {:.3} s loss {:.6}", i + 1, s.seconds, s.loss);
            }
            let rss = crate::training::bench_step::peak_rss_bytes();
            if rss > 0 {
                println!(
                    "peak RSS {:.3} GiB ({:.3}× the plan)",
                    rss as f64 / 1024f64.powi(3),
                    rss as f64 / planned.max(1) as f64
                );
            }
            Ok(())
        }
        BenchCommand::Gemm(a) => {
            let bench = GemmBench {
                m: a.m,
                n: a.n,
                k: a.k,
                threads: a
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                dtype: DType::parse(&a.dtype)?,
                device: DeviceRequest::parse(&a.device)?.resolve()?,
                warmup: a.warmup,
                repeats: a.repeats,
            };
            let r = bench.run()?;
            if bench.dtype == DType::BF16 && bench.device == crate::Device::Cpu {
                let kernel = crate::ops::gemm_bf16::Bf16Kernel::best();
                println!("bf16 kernel: {}", kernel.name());
            }
            println!(
                "gemm {} m={} n={} k={} device={} threads={} runs={} median={:.3} ms (min {:.3}, max {:.3})",
                bench.dtype,
                bench.m,
                bench.n,
                bench.k,
                bench.device,
                bench.threads,
                r.timing.runs,
                r.timing.median.as_secs_f64() * 1e3,
                r.timing.min.as_secs_f64() * 1e3,
                r.timing.max.as_secs_f64() * 1e3,
            );
            println!("{:.1} GFLOP/s", r.gflops);
            Ok(())
        }
        BenchCommand::Loader(a) => {
            let start = std::time::Instant::now();
            let ds = std::sync::Arc::new(crate::data::Dataset::open(a.data.config()?)?);
            let opened = start.elapsed();
            let mut cfg = crate::data::LoaderConfig::new(crate::data::Split::Train, a.batch);
            cfg.seed = a.seed;
            let loader = crate::data::Loader::new(ds, cfg)?;
            let limit = a.batches.unwrap_or(usize::MAX);
            let start = std::time::Instant::now();
            let (mut samples, mut bases) = (0usize, 0usize);
            for batch in loader.take(limit) {
                let batch = batch?;
                samples += batch.samples.len();
                bases += batch
                    .samples
                    .iter()
                    .map(|s| s.dna.len() + s.rna.len())
                    .sum::<usize>();
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "loader: opened and validated in {:.2} s; {samples} samples ({:.1} MB of sequence) in {secs:.2} s",
                opened.as_secs_f64(),
                bases as f64 / 1e6
            );
            println!("{:.1} samples/s", samples as f64 / secs);
            Ok(())
        }
    }
}
