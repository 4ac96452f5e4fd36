//! `isoformer-engine plan`: the memory of a step, measured on the recording backend.

use clap::Args;

use crate::models::isoformer::IsoformerConfig;
use crate::models::isoformer::Modality;
use crate::models::recompute::Recompute;
use crate::runtime::DType;
use crate::training::plan::{choose_recompute, largest_batch, most_recompute, PlanSpec};
use crate::{Error, Result};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A built-in config name or a JSON file.
    #[arg(long, default_value = "isoformer")]
    pub config: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// DNA window in bases (default: the config's).
    #[arg(long)]
    pub dna_len: Option<usize>,
    /// RNA and protein lengths in tokens (default: the config's budgets, the worst case).
    #[arg(long)]
    pub rna_tokens: Option<usize>,
    #[arg(long)]
    pub protein_tokens: Option<usize>,
    /// Plan a training step (the default).
    #[arg(long, conflicts_with = "infer")]
    pub train: bool,
    /// Plan an inference step.
    #[arg(long)]
    pub infer: bool,
    /// The backend planned for: cpu (f32) or cuda / emu (bf16 activations). No GPU is needed.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Memory budget, e.g. 80GiB, 24GB, 512MiB (default on the CPU: this machine's memory; needed for cuda).
    #[arg(long)]
    pub budget: Option<String>,
}

/// `80GiB`, `24GB`, `512MiB`, `1.5TiB` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::invalid("--budget", format!("'{s}' is not a size like 80GiB")))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0f64.powi(2),
        "gib" => 1024.0f64.powi(3),
        "tib" => 1024.0f64.powi(4),
        "pb" => 1e15,
        "eb" => 1e18,
        "pib" => 1024.0f64.powi(5),
        other => {
            return Err(Error::invalid(
                "--budget",
                format!("unknown unit '{other}' in '{s}'"),
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(Error::invalid(
            "--budget",
            format!("'{s}' is outside 1 byte ..= 1 EB"),
        ));
    }
    Ok(bytes as usize)
}

/// This machine's memory (`MemTotal`), where the system says.
pub fn machine_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The smallest sequences the encoders take: `<cls>` and one 6-mer; `<cls>`, one residue and `<eos>`.
pub fn check_token_counts(rna_tokens: usize, protein_tokens: usize) -> Result<()> {
    if rna_tokens < 2 {
        return Err(Error::invalid(
            "--rna-tokens",
            format!("{rna_tokens} leaves no 6-mer next to <cls> (at least 2)"),
        ));
    }
    if protein_tokens < 3 {
        return Err(Error::invalid(
            "--protein-tokens",
            format!("{protein_tokens} leaves no residue next to <cls> and <eos> (at least 3)"),
        ));
    }
    Ok(())
}

fn gib(b: usize) -> String {
    format!("{:.2} GiB", b as f64 / 1024f64.powi(3))
}

pub fn run(a: PlanArgs) -> Result<()> {
    let mut config = IsoformerConfig::resolve(&a.config)?;
    if let Some(l) = a.dna_len {
        config.dna_sequence_length = l;
    }
    // Longer sequences than the config's budgets raise them (`PlanSpec`), within the config's limits.
    let rna_tokens = a.rna_tokens.unwrap_or(config.num_tokens_per_seq_nuctf_rna);
    let protein_tokens = a
        .protein_tokens
        .unwrap_or(config.num_protein_tokens_per_seq);
    check_token_counts(rna_tokens, protein_tokens)?;
    config.validate().map_err(|m| Error::invalid("config", m))?;
    let compute = match a.device.to_ascii_lowercase().as_str() {
        "cpu" => DType::F32,
        "cuda" | "gpu" | "emu" | "emulator" => DType::BF16,
        other => {
            return Err(Error::invalid(
                "--device",
                format!("'{other}' (expected cpu, cuda or emu)"),
            ))
        }
    };
    let budget = match (&a.budget, compute) {
        (Some(b), _) => parse_bytes(b)?,
        (None, DType::F32) => machine_memory().ok_or_else(|| {
            Error::invalid(
                "--budget",
                "cannot read this machine's memory; pass --budget",
            )
        })?,
        // A GPU on this machine: its memory; none: the budget must be given.
        (None, _) => crate::gpu::cuda::CudaDevice::new(0)
            .and_then(|gpu| gpu.total_memory())
            .map_err(|e| {
                Error::invalid(
                    "--budget",
                    format!("planning for a GPU with none here ({e}) needs --budget (e.g. 80GiB)"),
                )
            })?,
    };
    if a.batch == 0 || a.batch > 1 << 16 {
        return Err(Error::invalid(
            "--batch",
            format!("{} is outside 1..=65536", a.batch),
        ));
    }
    let spec = PlanSpec {
        rna_tokens,
        protein_tokens,
        config,
        batch: a.batch,
        train: !a.infer,
        compute,
        weights: compute,
        cached: false,
    };
    let (chosen, candidates) = choose_recompute(&spec, budget)?;
    let r = &chosen.report;
    println!(
        "{} step of '{}' on {} (compute {}), batch {}, DNA {} bp, RNA {} tokens, protein {} tokens",
        if spec.train { "training" } else { "inference" },
        spec.config.name,
        a.device,
        compute,
        spec.batch,
        spec.config.dna_sequence_length,
        spec.rna_tokens,
        spec.protein_tokens
    );
    println!("recompute: {}", policy_line(&chosen.policies));
    for (name, bytes) in [
        (
            if spec.train {
                "trainable parameters"
            } else {
                "parameters"
            },
            r.trainable_params,
        ),
        ("frozen encoder weights", r.frozen_params),
        ("gradients", r.gradients),
        ("AdamW moments", r.moments),
        ("activations and scratch (peak)", r.step_peak),
    ] {
        println!("  {name:<32} {:>12}", gib(bytes));
    }
    for (module, bytes) in &r.step_by_module {
        println!("    {module:<30} {:>12}", gib(*bytes));
    }
    println!(
        "    {:<30} {:>12}  (step buffers placed by lifetime in one arena; at least {} live at once)",
        "with lifetime-based reuse",
        gib(r.step_with_reuse),
        gib(r.step_live_floor)
    );
    println!(
        "  {:<32} {:>12}  (the ops' own workspace, reserved once)",
        "backend scratch",
        gib(r.scratch)
    );
    println!("  {:<32} {:>12}", "peak", gib(r.total()));
    println!(
        "  {:<32} {:>12}",
        "matrix products per step",
        tflop(r.flops)
    );
    println!(
        "budget {}: {} (the peak plus 5% and 256 MiB for the process: {})",
        gib(budget),
        if chosen.fits {
            "fits"
        } else {
            "does not fit under any recompute policy"
        },
        gib(r.required())
    );
    if candidates.len() > 1 {
        println!(
            "recompute policies of the trained encoders set to auto (cheapest fitting one chosen):"
        );
        println!("  {:<40} {:>12} {:>12}  fits", "policy", "peak", "compute");
        for c in &candidates {
            println!(
                "  {:<40} {:>12} {:>12}  {}",
                policy_line(&c.policies),
                gib(c.report.total()),
                tflop(c.report.flops),
                if c.fits { "yes" } else { "no" }
            );
        }
    }
    let leanest = PlanSpec {
        config: most_recompute(&spec.config, spec.train),
        ..spec.clone()
    };
    println!(
        "largest batch that fits: {}{}",
        largest_batch(&leanest, budget, 4096)?,
        if candidates.len() > 1 {
            " (recomputing the blocks of every auto encoder)"
        } else {
            ""
        }
    );
    Ok(())
}

fn tflop(flops: u64) -> String {
    format!("{:.2} TFLOP", flops as f64 / 1e12)
}

fn policy_line(policies: &[(Modality, Recompute)]) -> String {
    if policies.is_empty() {
        return "none".into();
    }
    policies
        .iter()
        .map(|(m, p)| format!("{} {}", m.name(), p.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_bytes("24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_bytes("1.5 MiB").unwrap(), 1_572_864);
        assert_eq!(parse_bytes("1EB").unwrap(), 1_000_000_000_000_000_000);
        assert!(parse_bytes("2EB").is_err());
        assert_eq!(parse_bytes("2PiB").unwrap(), 2 << 50);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("-3GB").is_err());
    }
}
