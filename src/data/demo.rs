//! The built-in demo dataset: synthetic transcripts in the real dataset's schema (a `GTEx_final.csv` and a
//! genome FASTA they are cut from), so the real loading path runs, with expression planted by
//! biologically flavoured rules plus noise.
//!
//! Each transcript is a single exon placed on its own stretch of a synthetic chromosome, on either strand:
//! 5′UTR + CDS (ATG … stop) + 3′UTR; about one in ten is non-coding (no CDS, no protein). Its expression in
//! tissue `t`, in log(1 + TPM) units, is `base_t + Σ_k w_{t,k}·f_k + noise` with these features:
//! - a TATA box 25–35 bp upstream of the TSS (DNA), and the number of E-boxes (`CACGTG`) in the promoter,
//!   whose weight is tissue-specific (high in brain, heart, muscle);
//! - the GC content of the 200 bp upstream (a CpG-island-like promoter);
//! - AU-rich elements (`ATTTA`) in the 3′UTR, which lower expression, and the 3′UTR length (RNA);
//! - the hydrophobic fraction of the protein, with tissue-specific weight, and whether it is coding.
//!
//! The signal explains about 85 % of the label variance; the rest is noise no model can learn.

use std::fmt::Write as _;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::prepare::translate;
use crate::runtime::output::write_atomically;
use crate::Result;

/// GTEx's 30 tissues (the dataset's V1 labels, in file order).
pub const TISSUES: [&str; 30] = [
    "Adipose Tissue",
    "Adrenal Gland",
    "Bladder",
    "Blood",
    "Blood Vessel",
    "Brain",
    "Breast",
    "Cervix Uteri",
    "Colon",
    "Esophagus",
    "Fallopian Tube",
    "Heart",
    "Kidney",
    "Liver",
    "Lung",
    "Muscle",
    "Nerve",
    "Ovary",
    "Pancreas",
    "Pituitary",
    "Prostate",
    "Salivary Gland",
    "Skin",
    "Small Intestine",
    "Spleen",
    "Stomach",
    "Testis",
    "Thyroid",
    "Uterus",
    "Vagina",
];

#[derive(Clone, Debug)]
pub struct DemoSpec {
    pub genes: usize,
    pub seed: u64,
    /// Permute the label rows across transcripts (the control: nothing is learnable).
    pub shuffle_labels: bool,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            genes: 4000,
            seed: 7,
            shuffle_labels: false,
        }
    }
}

/// Flank around each transcript on its chromosome: the 1,024 bp window around any TSS stays on its own
/// stretch.
const FLANK: usize = 700;
const TRANSCRIPTS_PER_CHROMOSOME: usize = 400;

fn random_bases(rng: &mut StdRng, n: usize, gc: f64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let strong = rng.random_bool(gc);
            match (strong, rng.random_bool(0.5)) {
                (true, true) => b'G',
                (true, false) => b'C',
                (false, true) => b'A',
                (false, false) => b'T',
            }
        })
        .collect()
}

fn plant(seq: &mut [u8], at: usize, motif: &[u8]) {
    if at + motif.len() <= seq.len() {
        seq[at..at + motif.len()].copy_from_slice(motif);
    }
}

fn reverse_complement(s: &[u8]) -> Vec<u8> {
    s.iter()
        .rev()
        .map(|b| match b {
            b'A' => b'T',
            b'T' => b'A',
            b'C' => b'G',
            b'G' => b'C',
            x => *x,
        })
        .collect()
}

const HYDROPHOBIC_CODONS: [&[u8; 3]; 6] = [b"GCT", b"GTT", b"CTG", b"ATT", b"TTT", b"ATG"];
const POLAR_CODONS: [&[u8; 3]; 8] = [
    b"AAA", b"GAA", b"CAG", b"AAC", b"TCT", b"ACT", b"GAT", b"CGT",
];

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Writes `GTEx_final.csv` and `genome.fa` into `dir`; returns the number of transcripts.
pub fn write_demo_data(dir: &Path, spec: &DemoSpec) -> Result<usize> {
    // Every split needs genes of its own (a tenth each for validation and test); the upper bound keeps the
    // genome and table far below any machine's memory and disk.
    if !(10..=1_000_000).contains(&spec.genes) {
        return Err(crate::Error::invalid(
            "--genes",
            format!("{} is outside 10..=1000000", spec.genes),
        ));
    }
    crate::runtime::output::create_output_dir(dir)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    // Tissue weights: a shared effect plus a tissue-specific one per feature.
    let n_features = 7;
    let mut weights = vec![vec![0.0f64; n_features]; TISSUES.len()];
    let shared = [0.9, 0.5, 0.3, -0.6, -0.3, 0.0, 0.5];
    for (t, row) in weights.iter_mut().enumerate() {
        for (k, w) in row.iter_mut().enumerate() {
            *w = shared[k] + rng.random_range(-0.35..0.35);
        }
        let name = TISSUES[t];
        if ["Brain", "Heart", "Muscle", "Nerve", "Pituitary"].contains(&name) {
            row[2] += 0.8; // E-box driven
            row[5] += 0.6; // hydrophobic (membrane) proteins
        }
        if ["Liver", "Pancreas", "Blood", "Spleen"].contains(&name) {
            row[5] -= 0.6;
        }
    }
    let base: Vec<f64> = (0..TISSUES.len())
        .map(|_| rng.random_range(1.5..3.0))
        .collect();

    struct Tx {
        id: String,
        gene: String,
        split: &'static str,
        chrom: usize,
        strand: char,
        start: usize,
        end: usize,
        utr5: Vec<u8>,
        cds: Vec<u8>,
        utr3: Vec<u8>,
        features: [f64; 7],
    }
    let mut txs: Vec<Tx> = Vec::new();
    let mut chromosomes: Vec<Vec<u8>> = Vec::new();
    let mut gene_order: Vec<usize> = (0..spec.genes).collect();
    gene_order.shuffle(&mut rng);
    let split_of = |rank: usize| -> &'static str {
        match rank * 10 / spec.genes.max(1) {
            0..=7 => "train",
            8 => "validation",
            _ => "test",
        }
    };
    for (g, &rank) in gene_order.iter().enumerate() {
        let gene = format!("ENSGDEMO{g:07}.1");
        let split = split_of(rank);
        let n_tx = rng.random_range(1..=2);
        for i in 0..n_tx {
            if chromosomes.is_empty() || txs.len().is_multiple_of(TRANSCRIPTS_PER_CHROMOSOME) {
                chromosomes.push(Vec::new());
            }
            let chrom = chromosomes.len() - 1;
            // Promoter (upstream of the TSS) with planted motifs.
            let cpg = rng.random_bool(0.5);
            let mut upstream = random_bases(&mut rng, FLANK, 0.42);
            let gc_region = random_bases(&mut rng, 200, if cpg { 0.68 } else { 0.40 });
            upstream[FLANK - 200..].copy_from_slice(&gc_region);
            let tata = rng.random_bool(0.5);
            if tata {
                let at = FLANK - rng.random_range(25..=35);
                plant(&mut upstream, at, b"TATAAA");
            }
            let eboxes = rng.random_range(0..=3usize);
            for _ in 0..eboxes {
                let at = FLANK - rng.random_range(50..300);
                plant(&mut upstream, at, b"CACGTG");
            }
            // Transcript.
            let coding = rng.random_bool(0.9);
            let utr5_len = rng.random_range(40..160);
            let utr5 = random_bases(&mut rng, utr5_len, 0.5);
            let hydro = rng.random_range(0.1..0.7);
            let cds: Vec<u8> = if coding {
                let codons = rng.random_range(60..250);
                let mut c = b"ATG".to_vec();
                for _ in 0..codons {
                    let codon = if rng.random_bool(hydro) {
                        HYDROPHOBIC_CODONS[rng.random_range(0..HYDROPHOBIC_CODONS.len())]
                    } else {
                        POLAR_CODONS[rng.random_range(0..POLAR_CODONS.len())]
                    };
                    c.extend_from_slice(codon);
                }
                c.extend_from_slice(b"TAA");
                c
            } else {
                Vec::new()
            };
            let utr3_len = rng.random_range(100..700);
            let mut utr3 = random_bases(&mut rng, utr3_len, 0.45);
            // AU-rich elements.
            let ares = rng.random_range(0..=4usize);
            for _ in 0..ares {
                let at = rng.random_range(0..utr3_len - 5);
                plant(&mut utr3, at, b"ATTTA");
            }
            let downstream = random_bases(&mut rng, FLANK, 0.42);
            let mut rna = utr5.clone();
            rna.extend_from_slice(&cds);
            rna.extend_from_slice(&utr3);
            let protein = translate(&cds);
            let hydro_frac = if protein.is_empty() {
                0.0
            } else {
                protein.bytes().filter(|c| b"AVLIFM".contains(c)).count() as f64
                    / protein.len() as f64
            };
            let up_gc = upstream[FLANK - 200..]
                .iter()
                .filter(|b| matches!(b, b'G' | b'C'))
                .count() as f64
                / 200.0;
            let features = [
                tata as u8 as f64 - 0.5,
                (up_gc - 0.54) * 5.0,
                count(&upstream, b"CACGTG") as f64 / 1.5 - 1.0,
                count(&utr3, b"ATTTA") as f64 / 2.0 - 1.0,
                ((utr3_len as f64).ln() - 5.6) * 1.5,
                if coding {
                    (hydro_frac - 0.4) * 5.0
                } else {
                    0.0
                },
                coding as u8 as f64 - 0.9,
            ];
            // Lay the locus out in transcript orientation, then onto the chromosome's strand.
            let mut locus = upstream;
            locus.extend_from_slice(&rna);
            locus.extend_from_slice(&downstream);
            let minus = rng.random_bool(0.5);
            let offset = chromosomes[chrom].len();
            let (strand, start, end) = if minus {
                locus = reverse_complement(&locus);
                // Minus strand: the transcript occupies the locus' middle, its TSS is the right end.
                (('-'), offset + FLANK + 1, offset + FLANK + rna.len())
            } else {
                ('+', offset + FLANK + 1, offset + FLANK + rna.len())
            };
            chromosomes[chrom].extend_from_slice(&locus);
            txs.push(Tx {
                id: format!("ENSTDEMO{:07}{}.1", g, i),
                gene: gene.clone(),
                split,
                chrom,
                strand,
                start,
                end,
                utr5,
                cds,
                utr3,
                features,
            });
        }
    }
    // Labels.
    let mut labels: Vec<Vec<f64>> = txs
        .iter()
        .map(|tx| {
            (0..TISSUES.len())
                .map(|t| {
                    let signal: f64 = weights[t]
                        .iter()
                        .zip(&tx.features)
                        .map(|(w, f)| w * f)
                        .sum();
                    let noise: f64 = (0..4).map(|_| rng.random_range(-0.5..0.5)).sum::<f64>() * 0.5;
                    (base[t] + signal + noise).max(0.0)
                })
                .collect()
        })
        .collect();
    if spec.shuffle_labels {
        labels.shuffle(&mut rng);
    }

    let mut csv = String::new();
    csv.push_str("transcript_id_gtex,gene_id_gtex,split,chr,strand,start,end,5UTR,3UTR");
    for t in TISSUES {
        write!(csv, ",{t}").expect("string");
    }
    csv.push_str(",RNA,CDS,Protein\n");
    for (tx, y) in txs.iter().zip(&labels) {
        let s = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        write!(
            csv,
            "{},{},{},chr{},{},{},{},{},{}",
            tx.id,
            tx.gene,
            tx.split,
            tx.chrom + 1,
            tx.strand,
            tx.start,
            tx.end,
            s(&tx.utr5),
            s(&tx.utr3)
        )
        .expect("string");
        for v in y {
            write!(csv, ",{v:.4}").expect("string");
        }
        let mut rna = tx.utr5.clone();
        rna.extend_from_slice(&tx.cds);
        rna.extend_from_slice(&tx.utr3);
        writeln!(csv, ",{},{},{}", s(&rna), s(&tx.cds), translate(&tx.cds)).expect("string");
    }
    let mut fasta = String::new();
    for (i, c) in chromosomes.iter().enumerate() {
        writeln!(fasta, ">chr{}", i + 1).expect("string");
        for line in c.chunks(60) {
            fasta.push_str(std::str::from_utf8(line).expect("ASCII bases"));
            fasta.push('\n');
        }
    }
    write_atomically(&dir.join("genome.fa"), fasta.as_bytes())?;
    write_atomically(&dir.join("GTEx_final.csv"), csv.as_bytes())?;
    Ok(txs.len())
}
