//! `isoformer-engine prepare`: builds `GTEx_final.csv` from the raw public files, as the spec describes it:
//! the GTEx transcript TPM GCT (averaged per tissue over samples, then log(1 + x)), the sample attributes
//! (sample → tissue, `SMTS`), a GENCODE GTF (protein-coding transcripts: exons, CDS, UTRs) and the genome
//! FASTA (spliced RNA, its 5′UTR / CDS / 3′UTR, and the translated protein). Genes are split 90/5/5 into
//! train/validation/test by a stable hash of the unversioned gene id and the seed.
//!
//! Inputs must be plain text (decompress `.gz` files first). Everything streams: the GCT is read one
//! transcript at a time, whatever the number of samples.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::fasta::Genome;
use super::window::reverse_complement;
use crate::runtime::input::open_regular;
use crate::runtime::output::AtomicOutput;
use crate::{Error, Result};

pub struct PrepareInputs {
    pub gct: PathBuf,
    pub attributes: PathBuf,
    pub gtf: PathBuf,
    pub genome: PathBuf,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub cache_dir: PathBuf,
}

#[derive(Default, Debug)]
struct Transcript {
    gene_id: String,
    chrom: String,
    strand: char,
    exons: Vec<(u64, u64)>,
    cds: Vec<(u64, u64)>,
}

fn open_text(path: &Path) -> Result<BufReader<std::fs::File>> {
    let mut f = open_regular(path)?;
    let mut magic = [0u8; 2];
    use std::io::Read;
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: "gzip-compressed: decompress it first (`gunzip -k`)".into(),
        });
    }
    let f = open_regular(path)?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

fn unversioned(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

/// FNV-1a: a hash that never changes between versions or machines, so splits are reproducible.
fn stable_hash(s: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The split of a gene: 90 % train, 5 % validation, 5 % test.
pub fn split_of(gene_id: &str, seed: u64) -> &'static str {
    match stable_hash(unversioned(gene_id), seed) % 100 {
        0..=89 => "train",
        90..=94 => "validation",
        _ => "test",
    }
}

/// The standard genetic code; `None` for codons with other letters.
pub fn translate(cds: &[u8]) -> String {
    const BASES: &[u8; 4] = b"TCAG";
    const CODE: &[u8; 64] = b"FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG";
    let mut out = String::with_capacity(cds.len() / 3);
    for codon in cds.chunks_exact(3) {
        let idx = codon.iter().try_fold(0usize, |acc, b| {
            BASES.iter().position(|x| x == b).map(|p| acc * 4 + p)
        });
        let aa = idx.map_or('X', |i| CODE[i] as char);
        if aa == '*' {
            break;
        }
        out.push(aa);
    }
    out
}

fn attribute<'a>(attrs: &'a str, key: &str) -> Option<&'a str> {
    attrs.split(';').find_map(|kv| {
        let kv = kv.trim();
        let rest = kv.strip_prefix(key)?.trim_start();
        Some(rest.trim_matches('"'))
    })
}

fn read_gtf(path: &Path) -> Result<HashMap<String, Transcript>> {
    let mut out: HashMap<String, Transcript> = HashMap::new();
    for (i, line) in open_text(path)?.lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            msg,
        };
        let c: Vec<&str> = line.split('\t').collect();
        if c.len() != 9 {
            return Err(bad(format!("{} columns, a GTF line has 9", c.len())));
        }
        let feature = c[2];
        if !matches!(feature, "exon" | "CDS") {
            continue;
        }
        let kind =
            attribute(c[8], "transcript_type").or_else(|| attribute(c[8], "transcript_biotype"));
        if kind != Some("protein_coding") {
            continue;
        }
        let (Some(tid), Some(gid)) = (attribute(c[8], "transcript_id"), attribute(c[8], "gene_id"))
        else {
            return Err(bad("missing transcript_id or gene_id".into()));
        };
        let start: u64 = c[3]
            .parse()
            .map_err(|_| bad(format!("start '{}' is not a number", c[3])))?;
        let end: u64 = c[4]
            .parse()
            .map_err(|_| bad(format!("end '{}' is not a number", c[4])))?;
        let strand = match c[6] {
            "+" => '+',
            "-" => '-',
            other => return Err(bad(format!("strand '{other}'"))),
        };
        let t = out.entry(tid.to_string()).or_default();
        t.gene_id = gid.to_string();
        t.chrom = c[0].to_string();
        t.strand = strand;
        if feature == "exon" {
            t.exons.push((start, end));
        } else {
            t.cds.push((start, end));
        }
    }
    Ok(out)
}

/// Sample id → tissue (`SMTS`) from the GTEx sample attributes.
fn read_attributes(path: &Path) -> Result<HashMap<String, String>> {
    let mut lines = open_text(path)?.lines();
    let header = lines
        .next()
        .ok_or_else(|| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: "empty file".into(),
        })?
        .map_err(|e| Error::io(path, e))?;
    let cols: Vec<&str> = header.split('\t').collect();
    let find = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| Error::Parse {
                path: path.to_path_buf(),
                line: Some(1),
                msg: format!("no '{name}' column"),
            })
    };
    let (sid, smts) = (find("SAMPID")?, find("SMTS")?);
    let mut out = HashMap::new();
    for line in lines {
        let line = line.map_err(|e| Error::io(path, e))?;
        let c: Vec<&str> = line.split('\t').collect();
        if let (Some(s), Some(t)) = (c.get(sid), c.get(smts)) {
            if !t.trim().is_empty() {
                out.insert(s.to_string(), t.trim().to_string());
            }
        }
    }
    Ok(out)
}

/// Spliced sequences of a transcript, 5′→3′: (RNA, 5′UTR, CDS, 3′UTR).
fn sequences(
    t: &Transcript,
    genome: &Genome,
    chrom: &str,
) -> Result<(String, String, String, String)> {
    let mut exons = t.exons.clone();
    exons.sort_unstable();
    let mut rna = Vec::new();
    // Transcript coordinate of each genomic base, to place the CDS inside the RNA.
    let mut positions = Vec::new();
    for &(s, e) in &exons {
        genome.fetch_into(chrom, s - 1, e, &mut rna)?;
        positions.extend(s..=e);
    }
    let (cds_lo, cds_hi) = (
        t.cds.iter().map(|c| c.0).min().unwrap_or(0),
        t.cds.iter().map(|c| c.1).max().unwrap_or(0),
    );
    let first = positions.iter().position(|&p| p == cds_lo).unwrap_or(0);
    let last = positions
        .iter()
        .rposition(|&p| p == cds_hi)
        .map_or(rna.len(), |i| i + 1);
    let (mut left, mut cds, mut right) = (
        rna[..first].to_vec(),
        rna[first..last].to_vec(),
        rna[last..].to_vec(),
    );
    if t.strand == '-' {
        reverse_complement(&mut rna);
        reverse_complement(&mut left);
        reverse_complement(&mut cds);
        reverse_complement(&mut right);
        std::mem::swap(&mut left, &mut right);
    }
    let s = |v: Vec<u8>| String::from_utf8(v).expect("bases are ASCII");
    Ok((s(rna), s(left), s(cds), s(right)))
}

/// Streams the GCT and writes `out_dir/GTEx_final.csv` (through a temporary file). Returns rows written.
pub fn prepare(inp: &PrepareInputs) -> Result<usize> {
    crate::runtime::output::create_output_dir(&inp.out_dir)?;
    let out_path = inp.out_dir.join("GTEx_final.csv");
    // The output is opened (and checked against the inputs) before any of the long reading starts.
    let inputs = [
        inp.gct.as_path(),
        inp.attributes.as_path(),
        inp.gtf.as_path(),
        inp.genome.as_path(),
    ];
    let mut out = AtomicOutput::create(&out_path, &inputs)?;
    let tissue_of = read_attributes(&inp.attributes)?;
    let transcripts = read_gtf(&inp.gtf)?;
    let by_unversioned: HashMap<&str, &str> = transcripts
        .keys()
        .map(|k| (unversioned(k), k.as_str()))
        .collect();
    let genome = Genome::open(&inp.genome, &inp.cache_dir)?;
    let mut gct = open_text(&inp.gct)?.lines().enumerate();
    let mut header = None;
    for (i, line) in gct.by_ref() {
        let line = line.map_err(|e| Error::io(&inp.gct, e))?;
        if line.starts_with("#1.")
            || (i == 1 && !line.contains("transcript_id") && !line.contains("Name"))
        {
            continue;
        }
        header = Some(line);
        break;
    }
    let header = header.ok_or_else(|| Error::Parse {
        path: inp.gct.clone(),
        line: None,
        msg: "no header line".into(),
    })?;
    let cols: Vec<&str> = header.split('\t').collect();
    let id_col = cols
        .iter()
        .position(|c| *c == "transcript_id" || *c == "Name")
        .ok_or_else(|| Error::Parse {
            path: inp.gct.clone(),
            line: None,
            msg: "no transcript_id column".into(),
        })?;
    let tissues: Vec<String> = {
        let set: std::collections::BTreeSet<&String> =
            cols.iter().filter_map(|c| tissue_of.get(*c)).collect();
        set.into_iter().cloned().collect()
    };
    if tissues.is_empty() {
        return Err(Error::Parse {
            path: inp.gct.clone(),
            line: None,
            msg: "no sample column has a tissue in the attributes file".into(),
        });
    }
    let tissue_index: BTreeMap<&str, usize> = tissues
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let col_tissue: Vec<Option<usize>> = cols
        .iter()
        .map(|c| tissue_of.get(*c).map(|t| tissue_index[t.as_str()]))
        .collect();

    let written = {
        let w = out.writer();
        let io = |e| Error::io(&out_path, e);
        write!(
            w,
            "transcript_id_gtex,gene_id_gtex,split,chr,strand,start,end,RNA,5UTR,CDS,3UTR,Protein"
        )
        .map_err(io)?;
        for t in &tissues {
            write!(w, ",\"{}\"", t.replace('"', "\"\"")).map_err(io)?;
        }
        writeln!(w).map_err(io)?;
        let mut written = 0;
        let (mut sums, mut counts) = (vec![0.0f64; tissues.len()], vec![0usize; tissues.len()]);
        for (i, line) in gct {
            let line = line.map_err(|e| Error::io(&inp.gct, e))?;
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() != cols.len() {
                return Err(Error::Parse {
                    path: inp.gct.clone(),
                    line: Some(i + 1),
                    msg: format!("{} columns, the header has {}", fields.len(), cols.len()),
                });
            }
            let id = fields[id_col];
            let Some(key) = transcripts
                .get(id)
                .map(|_| id)
                .or_else(|| by_unversioned.get(unversioned(id)).copied())
            else {
                continue;
            };
            let t = &transcripts[key];
            if t.cds.is_empty() || t.exons.is_empty() {
                continue;
            }
            let Some(chrom) = ["", "chr"]
                .iter()
                .map(|p| format!("{p}{}", t.chrom.trim_start_matches("chr")))
                .find(|c| genome.length(c).is_some())
            else {
                continue;
            };
            sums.iter_mut().for_each(|s| *s = 0.0);
            counts.iter_mut().for_each(|c| *c = 0);
            for (c, v) in fields.iter().enumerate() {
                if let Some(ti) = col_tissue[c] {
                    let x: f64 = v.trim().parse().map_err(|_| Error::Parse {
                        path: inp.gct.clone(),
                        line: Some(i + 1),
                        msg: format!("TPM '{v}' in column '{}' is not a number", cols[c]),
                    })?;
                    if !x.is_finite() || x < 0.0 {
                        return Err(Error::Parse {
                            path: inp.gct.clone(),
                            line: Some(i + 1),
                            msg: format!(
                                "TPM '{v}' in column '{}' is not a finite non-negative number",
                                cols[c]
                            ),
                        });
                    }
                    sums[ti] += x;
                    counts[ti] += 1;
                }
            }
            let (rna, utr5, cds, utr3) = sequences(t, &genome, &chrom)?;
            let protein = translate(cds.as_bytes());
            let (start, end) = (
                t.exons.iter().map(|e| e.0).min().unwrap_or(0),
                t.exons.iter().map(|e| e.1).max().unwrap_or(0),
            );
            write!(
                w,
                "{},{},{},{},{},{start},{end},{rna},{utr5},{cds},{utr3},{protein}",
                csv_field(id),
                csv_field(&t.gene_id),
                split_of(&t.gene_id, inp.seed),
                csv_field(&t.chrom),
                t.strand
            )
            .map_err(io)?;
            for (s, c) in sums.iter().zip(&counts) {
                let mean = if *c > 0 { s / *c as f64 } else { 0.0 };
                write!(w, ",{:.6}", mean.ln_1p()).map_err(io)?;
            }
            writeln!(w).map_err(io)?;
            written += 1;
        }
        written
    };
    out.commit()?;
    Ok(written)
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (quotes doubled).
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_with_commas_or_quotes_are_quoted() {
        assert_eq!(csv_field("ENST1.2"), "ENST1.2");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }

    #[test]
    fn translation_and_splits() {
        assert_eq!(translate(b"ATGGCCTAAGGG"), "MA");
        assert_eq!(translate(b"ATGNNNTGG"), "MXW");
        let counts = (0..10_000).fold([0usize; 3], |mut c, i| {
            c[match split_of(&format!("ENSG{i:011}.5"), 7) {
                "train" => 0,
                "validation" => 1,
                _ => 2,
            }] += 1;
            c
        });
        assert!(
            counts[0] > 8_800 && counts[1] > 400 && counts[2] > 400,
            "{counts:?}"
        );
        assert_eq!(
            split_of("ENSG00000000003.14", 7),
            split_of("ENSG00000000003.15", 7),
            "by unversioned gene"
        );
    }
}
