//! `isoformer-engine data check|export`: validate a dataset, and write exactly what the model sees.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::data::export::export_tsv;
use crate::data::{DataConfig, Dataset, EdgePolicy, ExpressionAt, Split};
use crate::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Validate a dataset and summarise it: rows per split, windows at the edges, bad rows, lengths.
    Check(DataArgs),
    /// Write the samples as the model sees them to a TSV file.
    Export(ExportArgs),
}

/// `prepare`: build GTEx_final.csv from the raw public files.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// GTEx transcript TPM GCT (decompressed), e.g. GTEx_Analysis_2017-06-05_v8_RSEMv1.3.0_transcript_tpm.gct
    #[arg(long)]
    pub gct: PathBuf,
    /// GTEx sample attributes (SAMPID → SMTS tissue), e.g. GTEx_Analysis_v8_Annotations_SampleAttributesDS.txt
    #[arg(long)]
    pub attributes: PathBuf,
    /// GENCODE GTF (decompressed) matching the GCT's transcripts (v26 for GTEx v8).
    #[arg(long)]
    pub gtf: PathBuf,
    /// hg38 genome FASTA.
    #[arg(long)]
    pub genome: PathBuf,
    /// Output directory (receives GTEx_final.csv).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the 90/5/5 gene split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run_prepare(a: PrepareArgs) -> Result<()> {
    let inputs = crate::data::prepare::PrepareInputs {
        gct: a.gct,
        attributes: a.attributes,
        gtf: a.gtf,
        genome: a.genome,
        out_dir: a.out.clone(),
        seed: a.seed,
        cache_dir: crate::data::fasta::default_cache_dir(),
    };
    let n = crate::data::prepare::prepare(&inputs)?;
    eprintln!(
        "wrote {n} transcripts to {}",
        a.out.join("GTEx_final.csv").display()
    );
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Directory with GTEx_final.csv (or train/validation/test *.tsv files).
    #[arg(long)]
    pub data: PathBuf,
    /// Genome FASTA (default: the single *.fa / *.fasta in --data).
    #[arg(long)]
    pub genome: Option<PathBuf>,
    /// DNA window length in bases.
    #[arg(long, default_value_t = 196_608)]
    pub dna_len: usize,
    /// What to do with windows that leave the chromosome: drop, or pad with N.
    #[arg(long, default_value = "drop")]
    pub edge: String,
    /// RNA letters kept, from the 3' end.
    #[arg(long, default_value_t = 12_282)]
    pub rna_max_len: usize,
    /// Protein residues kept, from the N-terminus.
    #[arg(long, default_value_t = 2_046)]
    pub protein_max_len: usize,
    /// Skip and count malformed rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Only this split (train, validation, test).
    #[arg(long)]
    pub split: Option<String>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output TSV file.
    #[arg(long)]
    pub out: PathBuf,
}

impl DataArgs {
    pub fn config(&self) -> Result<DataConfig> {
        let edge = match self.edge.as_str() {
            "drop" => EdgePolicy::Drop,
            "pad" | "pad-n" | "padn" => EdgePolicy::PadN,
            other => {
                return Err(Error::invalid(
                    "--edge",
                    format!("'{other}' (expected drop or pad)"),
                ))
            }
        };
        let mut c = DataConfig::new(&self.data);
        c.genome = self.genome.clone();
        c.dna_len = self.dna_len;
        c.edge = edge;
        c.rna_max_len = self.rna_max_len;
        c.protein_max_len = self.protein_max_len;
        c.skip_bad_rows = self.skip_bad_rows;
        Ok(c)
    }
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Check(args) => {
            let ds = Dataset::open(args.config()?)?;
            print_summary(&ds);
            Ok(())
        }
        DataCommand::Export(args) => {
            super::check_tsv_name("--out", &args.out)?;
            let split = args
                .split
                .as_deref()
                .map(|s| {
                    Split::parse(s).ok_or_else(|| {
                        Error::invalid(
                            "--split",
                            format!("'{s}' (expected train, validation or test)"),
                        )
                    })
                })
                .transpose()?;
            let ds = Dataset::open(args.data.config()?)?;
            let n = export_tsv(&ds, split, args.limit, &args.out)?;
            eprintln!("wrote {n} rows to {}", args.out.display());
            Ok(())
        }
    }
}

fn stats(mut v: Vec<u32>) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort_unstable();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    format!(
        "min {} / median {} / mean {:.1} / max {}",
        v[0],
        v[v.len() / 2],
        mean,
        v[v.len() - 1]
    )
}

fn print_summary(ds: &Dataset) {
    let r = ds.report();
    let c = ds.config();
    println!("dataset: {}", c.data_dir.display());
    if let Some(g) = ds.genome() {
        println!(
            "genome: {} ({} sequences; index {})",
            g.path().display(),
            g.index().entries.len(),
            g.index_source.display()
        );
    }
    println!("tissues: {}", ds.tissues().len());
    println!("rows read: {}", r.rows_read);
    for s in Split::ALL {
        println!("  {:<10} {}", s.name(), r.rows_per_split[s as usize]);
    }
    let edge_action = match c.edge {
        EdgePolicy::Drop => format!("dropped {}", r.edge_dropped),
        EdgePolicy::PadN => format!("padded with N {}", r.edge_padded),
    };
    println!(
        "windows of {} bp leaving the chromosome: {edge_action}",
        c.dna_len
    );
    println!(
        "bad rows: {}{}",
        r.bad_rows,
        if c.skip_bad_rows { " (skipped)" } else { "" }
    );
    for e in &r.bad_examples {
        println!("  {e}");
    }
    let rows = ds.rows();
    println!(
        "rna length (after cropping to {}): {}",
        c.rna_max_len,
        stats(rows.iter().map(|r| r.rna_len).collect())
    );
    println!("  cropped: {}", r.rna_cropped);
    let prot: Vec<u32> = rows
        .iter()
        .filter(|r| r.protein_len > 0)
        .map(|r| r.protein_len)
        .collect();
    println!(
        "protein length (after cropping to {}): {}",
        c.protein_max_len,
        stats(prot)
    );
    println!(
        "  cropped: {}, missing (masked): {}",
        r.protein_cropped, r.missing_protein
    );
    let tissues = ds.tissues();
    let at = |e: &ExpressionAt| {
        format!(
            "{e} (line {}, {})",
            e.line,
            tissues.get(e.tissue).map_or("?", String::as_str)
        )
    };
    if let (Some(lo), Some(hi)) = (&r.expression_min, &r.expression_max) {
        println!("expression: min {} / max {}", at(lo), at(hi));
    }
    if let Some(note) = r.expression_note(tissues) {
        println!("note: {note}");
    }
    if let Some(stats) = ds.train_target_stats() {
        let flat: Vec<&str> = tissues
            .iter()
            .zip(&stats.std)
            .filter(|(_, &sd)| sd == 0.0)
            .map(|(t, _)| t.as_str())
            .collect();
        if !flat.is_empty() {
            println!(
                "note: the training targets are all equal in {}: nothing to learn there, and no R² or \
                 correlation where a split's targets are equal too (n/a)",
                flat.join(", ")
            );
        }
    }
}
