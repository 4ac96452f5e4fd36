//! The IsoFormer dataset: `GTEx_final.csv` (coordinates, RNA, protein, one column per tissue) with the DNA cut
//! from a genome FASTA, or the ready-made TSV layout (`dna_seq, rna_seq, protein_seq, labels_0..N`).
//!
//! Opening a dataset streams every file once: each row is parsed and validated, and a compact index entry
//! (file, byte offset, line, split, lengths) is kept. Samples are then read back by offset through a memory
//! map, so memory stays bounded by the index (a few bytes per row) whatever the file size.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::fasta::{default_cache_dir, Genome};
use super::records::{Record, RecordReader};
use super::window::{
    crop_left, crop_right, normalize_dna, normalize_protein, normalize_rna, EdgePolicy, Strand,
    Window,
};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// `train`, `test`, and the validation split under any usual spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "validation" | "valid" | "val" | "eval" | "evaluation" => Some(Split::Validation),
            "test" | "testing" => Some(Split::Test),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    fn from_file_name(path: &Path) -> Option<Self> {
        let stem = path.file_stem()?.to_string_lossy().to_ascii_lowercase();
        let head = stem
            .split(|c: char| !c.is_ascii_alphabetic())
            .next()
            .unwrap_or("");
        Split::parse(head)
    }
}

/// The longest DNA window a dataset serves (16 Mb).
pub const MAX_DNA_LEN: usize = 1 << 24;

#[derive(Clone, Debug)]
pub struct DataConfig {
    pub data_dir: PathBuf,
    /// FASTA genome; default: the single `*.fa`/`*.fasta` in `data_dir`. Not needed for the TSV layout.
    pub genome: Option<PathBuf>,
    /// DNA window length in bases (TSV layout: centre-cropped to this length when given).
    pub dna_len: usize,
    pub edge: EdgePolicy,
    /// RNA letters kept (from the 3′ end). Default 12,282 = 2,047 six-mers, NT-v2's 2,048 tokens with `<cls>`.
    pub rna_max_len: usize,
    /// Residues kept (from the N-terminus). Default 2,046: ESM-2's 2,048 tokens with `<cls>` and `<eos>`.
    pub protein_max_len: usize,
    pub skip_bad_rows: bool,
    pub cache_dir: PathBuf,
}

impl DataConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        DataConfig {
            data_dir: data_dir.into(),
            genome: None,
            dna_len: 196_608,
            edge: EdgePolicy::Drop,
            rna_max_len: 12_282,
            protein_max_len: 2_046,
            skip_bad_rows: false,
            cache_dir: default_cache_dir(),
        }
    }
}

/// Column positions of the GTEx CSV, found by header name.
#[derive(Clone, Debug)]
struct GtexColumns {
    transcript_id: usize,
    split: usize,
    chrom: usize,
    strand: usize,
    start: usize,
    end: usize,
    rna: usize,
    protein: Option<usize>,
    tissues: Vec<usize>,
}

/// Column positions of the TSV layout.
#[derive(Clone, Debug)]
struct TsvColumns {
    transcript_id: Option<usize>,
    dna: usize,
    rna: usize,
    protein: Option<usize>,
    labels: Vec<usize>,
    split: Split,
}

#[derive(Clone, Debug)]
enum Columns {
    Gtex(GtexColumns),
    Tsv(TsvColumns),
}

/// Columns of the GTEx CSV that are not tissues.
const GTEX_METADATA: &[&str] = &[
    "transcript_id_gtex",
    "transcript_id",
    "gene_id_gtex",
    "gene_id",
    "gene_name",
    "split",
    "chr",
    "chrom",
    "chromosome",
    "strand",
    "start",
    "end",
    "rna",
    "5utr",
    "cds",
    "3utr",
    "protein",
    "",
    "unnamed: 0",
    "index",
];

struct DataFile {
    path: PathBuf,
    map: Mmap,
    delimiter: u8,
    columns: Columns,
    n_columns: usize,
}

/// A validated row, by reference: enough to read it back and to batch it by length.
#[derive(Clone, Copy, Debug)]
pub struct RowRef {
    file: u16,
    pub split: Split,
    pub line: u32,
    offset: u64,
    /// RNA and protein lengths after cropping (protein 0 when missing).
    pub rna_len: u32,
    pub protein_len: u32,
}

/// One sample as the model sees it, before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub transcript_id: String,
    pub split: Split,
    /// Oriented window: A/C/G/T/N, reverse-complemented on the minus strand.
    pub dna: Vec<u8>,
    pub rna: String,
    /// `None` when the row has no protein; that modality is then masked.
    pub protein: Option<String>,
    pub targets: Vec<f32>,
}

/// What opening the dataset found.
#[derive(Clone, Debug, Default)]
pub struct DataReport {
    pub rows_read: usize,
    pub rows_per_split: [usize; 3],
    /// Windows that left their chromosome: dropped (default) or padded with N.
    pub edge_dropped: usize,
    pub edge_padded: usize,
    pub bad_rows: usize,
    /// The first few bad rows' messages.
    pub bad_examples: Vec<String>,
    pub missing_protein: usize,
    pub rna_cropped: usize,
    pub protein_cropped: usize,
    /// The smallest and the largest expression value of the kept rows, with where each is.
    pub expression_min: Option<ExpressionAt>,
    pub expression_max: Option<ExpressionAt>,
}

/// One expression value of a dataset, with its file, line and tissue (an index into the tissues).
#[derive(Clone, Debug, PartialEq)]
pub struct ExpressionAt {
    pub value: f32,
    pub path: PathBuf,
    pub line: usize,
    pub tissue: usize,
}

impl std::fmt::Display for ExpressionAt {
    /// The value as the file gives it, in scientific notation when very large or small (`3e38`, not 39
    /// digits).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.value.abs();
        if a != 0.0 && !(1e-4..1e7).contains(&a) {
            write!(f, "{:e}", self.value)
        } else {
            write!(f, "{}", self.value)
        }
    }
}

/// How a dataset's tissues (`found`) differ from a model's (`expected`), column by column, or `None` when
/// they are the same in the same order: predictions and targets are paired by column.
pub fn tissue_mismatch(expected: &[String], found: &[String]) -> Option<String> {
    if expected == found {
        return None;
    }
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let reordered = sorted(expected) == sorted(found);
    let k = expected
        .iter()
        .zip(found)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(found.len()));
    let name = |v: &[String]| v.get(k).map_or("(none)".to_string(), |t| format!("'{t}'"));
    Some(format!(
        "its tissue columns differ from the checkpoint's{}: column {} is {} there and {} in the checkpoint",
        if reordered {
            " (the same tissues in another order)"
        } else {
            ""
        },
        k + 1,
        name(found),
        name(expected)
    ))
}

/// Above this no value is log(1+TPM): TPMs sum to 10⁶ in a sample, so log(1 + 10⁶) ≈ 13.8 bounds them, and
/// z-scores of such values stay far below it too.
pub const EXPRESSION_CEILING: f32 = 20.0;

impl DataReport {
    /// A note when the expression values cannot be IsoFormer's log(1+TPM) targets (raw TPMs, counts),
    /// which train poorly: their largest values dominate the z-scored loss.
    pub fn expression_note(&self, tissues: &[String]) -> Option<String> {
        let max = self.expression_max.as_ref()?;
        (max.value > EXPRESSION_CEILING).then(|| {
            format!(
                "expression values reach {} ({}:{}, tissue '{}'), more than any log(1+TPM) (at most \
                 log(1 + 10⁶) ≈ 13.8): IsoFormer's targets are log(1+TPM), as in the released dataset; \
                 transform raw TPMs with log1p before training",
                max,
                max.path.display(),
                max.line,
                tissues.get(max.tissue).map_or("?", String::as_str)
            )
        })
    }
}

/// Per-tissue mean and standard deviation of the training targets (f64 accumulation).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetStats {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A row after parsing and validation, before any genome access.
struct ParsedRow {
    transcript_id: String,
    split: Split,
    locus: Option<(String, Strand, u64, u64)>,
    dna: Option<String>,
    rna: String,
    protein: Option<String>,
    targets: Vec<f32>,
}

pub struct Dataset {
    config: DataConfig,
    files: Vec<DataFile>,
    genome: Option<Genome>,
    tissues: Vec<String>,
    rows: Vec<RowRef>,
    report: DataReport,
    train_stats: Option<TargetStats>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.config.data_dir)
            .field("rows", &self.rows.len())
            .finish()
    }
}

/// A transcript id as predictions and exports write it, in a TSV column of its own: a tab, line break or
/// other control character in it would shift or split that row, so it is a bad row instead.
fn transcript_id(raw: &str) -> std::result::Result<String, String> {
    let id = raw.trim();
    match id.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "transcript id {id:?} holds the control character {c:?}"
        )),
        None => Ok(id.to_string()),
    }
}

fn open_map(path: &Path) -> Result<Mmap> {
    let file = crate::runtime::input::open_regular(path)?;
    // SAFETY: read-only map of a data file that is not modified while we run.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn files_with_ext(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if path.is_file() && exts.iter().any(|e| name.ends_with(e)) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

impl Dataset {
    /// Finds the files in `config.data_dir`, validates every row, and indexes the usable ones.
    pub fn open(config: DataConfig) -> Result<Self> {
        if config.dna_len == 0 || config.dna_len > MAX_DNA_LEN {
            return Err(Error::invalid(
                "--dna-len",
                format!(
                    "{} is outside 1..={MAX_DNA_LEN} bp (Enformer reads 196,608; the limit keeps a window's buffers \
                     far below any machine's memory)",
                    config.dna_len
                ),
            ));
        }
        // A crop to nothing would hand the model empty transcripts (an error where the rows are read) or
        // proteins the encoders cannot tell from missing ones.
        for (flag, v) in [
            ("--rna-max-len", config.rna_max_len),
            ("--protein-max-len", config.protein_max_len),
        ] {
            if v == 0 {
                return Err(Error::invalid(flag, "must be positive"));
            }
        }
        let dir = config.data_dir.clone();
        if !dir.is_dir() {
            return Err(Error::invalid(
                "data directory",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let csv = dir.join("GTEx_final.csv");
        let (files, tissues) = if csv.is_file() {
            let f = Self::open_file(&csv, b',', None)?;
            let tissues = f.1;
            (vec![f.0], tissues)
        } else {
            let tsvs = files_with_ext(&dir, &[".tsv"])?;
            if tsvs.is_empty() {
                return Err(Error::invalid(
                    "data directory",
                    format!(
                        "{} holds neither GTEx_final.csv nor *.tsv files",
                        dir.display()
                    ),
                ));
            }
            let mut files = Vec::new();
            let mut tissues: Option<Vec<String>> = None;
            for path in tsvs {
                let split = Split::from_file_name(&path).ok_or_else(|| Error::Parse {
                    path: path.clone(),
                    line: None,
                    msg: "cannot tell the split from the file name (expected train*, validation*/valid*/val*, or test*)".into(),
                })?;
                let (f, t) = Self::open_file(&path, b'\t', Some(split))?;
                match &tissues {
                    Some(prev) if *prev != t => {
                        return Err(Error::Parse {
                            path,
                            line: Some(1),
                            msg: "label columns differ from the other TSV files".into(),
                        })
                    }
                    _ => tissues = Some(t),
                }
                files.push(f);
            }
            (files, tissues.unwrap_or_default())
        };
        let needs_genome = files.iter().any(|f| matches!(f.columns, Columns::Gtex(_)));
        let genome = if needs_genome {
            let path = match &config.genome {
                Some(p) => p.clone(),
                None => {
                    let found = files_with_ext(&dir, &[".fa", ".fasta", ".fa.gz", ".fasta.gz"])?;
                    match found.len() {
                        1 => found[0].clone(),
                        0 => {
                            return Err(Error::invalid(
                                "genome",
                                format!("no *.fa or *.fasta in {}; pass --genome", dir.display()),
                            ))
                        }
                        _ => {
                            return Err(Error::invalid(
                                "genome",
                                format!(
                                    "several FASTA files in {}; choose one with --genome",
                                    dir.display()
                                ),
                            ))
                        }
                    }
                }
            };
            Some(Genome::open(&path, &config.cache_dir)?)
        } else {
            None
        };
        let mut ds = Dataset {
            config,
            files,
            genome,
            tissues,
            rows: Vec::new(),
            report: DataReport::default(),
            train_stats: None,
        };
        ds.index_rows()?;
        Ok(ds)
    }

    fn open_file(
        path: &Path,
        delimiter: u8,
        split: Option<Split>,
    ) -> Result<(DataFile, Vec<String>)> {
        let map = open_map(path)?;
        let mut reader = RecordReader::new(&map[..], path, delimiter, 1, 0);
        let mut header = Record::default();
        if !reader.next_record(&mut header)? {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: "empty file (no header)".into(),
            });
        }
        // A UTF-8 byte-order mark (spreadsheet exports) is not part of the first column's name.
        let names: Vec<String> = header
            .fields()
            .enumerate()
            .map(|(i, s)| {
                let s = if i == 0 {
                    s.trim_start_matches('\u{feff}')
                } else {
                    s
                };
                s.trim().to_string()
            })
            .collect();
        let find = |cands: &[&str]| {
            names
                .iter()
                .position(|n| cands.iter().any(|c| n.eq_ignore_ascii_case(c)))
        };
        let missing = |what: &str| Error::Parse {
            path: path.to_path_buf(),
            line: Some(1),
            msg: format!("no '{what}' column in the header"),
        };
        let (columns, tissues) = match split {
            None => {
                let tissues: Vec<usize> = (0..names.len())
                    .filter(|&i| !GTEX_METADATA.contains(&names[i].to_ascii_lowercase().as_str()))
                    .collect();
                if tissues.is_empty() {
                    return Err(Error::Parse {
                        path: path.to_path_buf(),
                        line: Some(1),
                        msg: "no tissue columns in the header".into(),
                    });
                }
                let cols = GtexColumns {
                    transcript_id: find(&["transcript_id_gtex", "transcript_id"])
                        .ok_or_else(|| missing("transcript_id_gtex"))?,
                    split: find(&["split"]).ok_or_else(|| missing("split"))?,
                    chrom: find(&["chr", "chrom", "chromosome"]).ok_or_else(|| missing("chr"))?,
                    strand: find(&["strand"]).ok_or_else(|| missing("strand"))?,
                    start: find(&["start"]).ok_or_else(|| missing("start"))?,
                    end: find(&["end"]).ok_or_else(|| missing("end"))?,
                    rna: find(&["rna"]).ok_or_else(|| missing("RNA"))?,
                    protein: find(&["protein"]),
                    tissues: tissues.clone(),
                };
                (
                    Columns::Gtex(cols),
                    tissues.iter().map(|&i| names[i].clone()).collect(),
                )
            }
            Some(split) => {
                let mut labels: Vec<(usize, usize)> = names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        n.strip_prefix("labels_")
                            .and_then(|k| k.parse::<usize>().ok())
                            .map(|k| (k, i))
                    })
                    .collect();
                labels.sort();
                if labels.is_empty() || labels.iter().enumerate().any(|(j, (k, _))| j != *k) {
                    return Err(Error::Parse {
                        path: path.to_path_buf(),
                        line: Some(1),
                        msg: "expected label columns labels_0..labels_N".into(),
                    });
                }
                let cols = TsvColumns {
                    transcript_id: find(&["transcript_id", "transcript_id_gtex"]),
                    dna: find(&["dna_seq"]).ok_or_else(|| missing("dna_seq"))?,
                    rna: find(&["rna_seq"]).ok_or_else(|| missing("rna_seq"))?,
                    protein: find(&["protein_seq"]),
                    labels: labels.iter().map(|(_, i)| *i).collect(),
                    split,
                };
                (
                    Columns::Tsv(cols),
                    labels.iter().map(|(k, _)| format!("labels_{k}")).collect(),
                )
            }
        };
        Ok((
            DataFile {
                path: path.to_path_buf(),
                map,
                delimiter,
                columns,
                n_columns: names.len(),
            },
            tissues,
        ))
    }

    /// Parses one record of `file`; the error text is what a user needs to fix the row.
    fn parse_row(&self, file: &DataFile, rec: &Record) -> std::result::Result<ParsedRow, String> {
        if rec.len() != file.n_columns {
            return Err(format!(
                "{} columns, the header has {}",
                rec.len(),
                file.n_columns
            ));
        }
        let field = |i: usize| rec.get(i).unwrap_or("");
        let targets_from = |cols: &[usize],
                            names: &[String]|
         -> std::result::Result<Vec<f32>, String> {
            cols.iter()
                .zip(names)
                .map(|(&c, name)| {
                    let raw = field(c).trim();
                    match raw.parse::<f32>() {
                        Ok(v) if v.is_finite() => Ok(v),
                        Ok(_) => Err(format!("expression for '{name}' is not finite ({raw})")),
                        Err(_) => Err(format!("expression for '{name}' is not a number ('{raw}')")),
                    }
                })
                .collect()
        };
        let protein = |c: Option<usize>| c.map_or(Ok(None), |c| normalize_protein(field(c)));
        match &file.columns {
            Columns::Gtex(c) => {
                let split = Split::parse(field(c.split))
                    .ok_or_else(|| format!("unknown split '{}'", field(c.split)))?;
                let strand = Strand::parse(field(c.strand))
                    .ok_or_else(|| format!("strand '{}' is neither + nor -", field(c.strand)))?;
                let coord = |i: usize, what: &str| -> std::result::Result<u64, String> {
                    field(i)
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|&v| v >= 1)
                        .ok_or_else(|| format!("{what} '{}' is not a 1-based position", field(i)))
                };
                let (start, end) = (coord(c.start, "start")?, coord(c.end, "end")?);
                if start > end {
                    return Err(format!("start {start} is after end {end}"));
                }
                let chrom = field(c.chrom).trim().to_string();
                let genome = self
                    .genome
                    .as_ref()
                    .expect("the GTEx layout always opens a genome");
                let chrom = resolve_chromosome(genome, &chrom).ok_or_else(|| {
                    format!(
                        "chromosome '{chrom}' is not in the genome {}",
                        genome.path().display()
                    )
                })?;
                Ok(ParsedRow {
                    transcript_id: transcript_id(field(c.transcript_id))?,
                    split,
                    locus: Some((chrom, strand, start, end)),
                    dna: None,
                    rna: normalize_rna(field(c.rna))?,
                    protein: protein(c.protein)?,
                    targets: targets_from(&c.tissues, &self.tissues)?,
                })
            }
            Columns::Tsv(c) => {
                let dna = normalize_dna(field(c.dna))?;
                if dna.is_empty() {
                    return Err("empty dna_seq".into());
                }
                Ok(ParsedRow {
                    transcript_id: match c.transcript_id {
                        Some(i) => transcript_id(field(i))?,
                        None => format!("{}:{}", file_label(&file.path), rec.line),
                    },
                    split: c.split,
                    locus: None,
                    dna: Some(dna),
                    rna: normalize_rna(field(c.rna))?,
                    protein: protein(c.protein)?,
                    targets: targets_from(&c.labels, &self.tissues)?,
                })
            }
        }
    }

    /// The single validation pass (what `data check` reports).
    fn index_rows(&mut self) -> Result<()> {
        let mut rows = Vec::new();
        let mut report = DataReport::default();
        let n_tissues = self.tissues.len();
        // Welford's running mean and sum of squared deviations: no cancellation, and exactly 0 for a
        // tissue whose training targets are all equal (so it is recognised as such).
        let (mut mean, mut m2, mut n_train) =
            (vec![0.0f64; n_tissues], vec![0.0f64; n_tissues], 0usize);
        for (fi, file) in self.files.iter().enumerate() {
            let mut reader = RecordReader::new(&file.map[..], &file.path, file.delimiter, 1, 0);
            let mut rec = Record::default();
            reader.next_record(&mut rec)?; // header
            while reader.next_record(&mut rec)? {
                report.rows_read += 1;
                let outcome = self
                    .parse_row(file, &rec)
                    .and_then(|row| self.window_status(&row).map(|edge| (row, edge)));
                let (row, edge) = match outcome {
                    Ok(v) => v,
                    Err(msg) => {
                        if !self.config.skip_bad_rows {
                            let msg = format!("{msg} (use --skip-bad-rows to skip such rows)");
                            return Err(Error::Parse {
                                path: file.path.clone(),
                                line: Some(rec.line),
                                msg,
                            });
                        }
                        report.bad_rows += 1;
                        if report.bad_examples.len() < 10 {
                            report.bad_examples.push(format!(
                                "{}:{}: {msg}",
                                file.path.display(),
                                rec.line
                            ));
                        }
                        continue;
                    }
                };
                match edge {
                    WindowFit::Inside => {}
                    WindowFit::Outside if self.config.edge == EdgePolicy::Drop => {
                        report.edge_dropped += 1;
                        continue;
                    }
                    WindowFit::Outside => report.edge_padded += 1,
                }
                report.rows_per_split[row.split as usize] += 1;
                report.missing_protein += row.protein.is_none() as usize;
                report.rna_cropped += (row.rna.len() > self.config.rna_max_len) as usize;
                let plen = row.protein.as_ref().map_or(0, |p| p.len());
                report.protein_cropped += (plen > self.config.protein_max_len) as usize;
                for (k, &t) in row.targets.iter().enumerate() {
                    let at = || ExpressionAt {
                        value: t,
                        path: file.path.clone(),
                        line: rec.line,
                        tissue: k,
                    };
                    if report.expression_min.as_ref().is_none_or(|m| t < m.value) {
                        report.expression_min = Some(at());
                    }
                    if report.expression_max.as_ref().is_none_or(|m| t > m.value) {
                        report.expression_max = Some(at());
                    }
                }
                if row.split == Split::Train {
                    n_train += 1;
                    for (k, &t) in row.targets.iter().enumerate() {
                        let delta = t as f64 - mean[k];
                        mean[k] += delta / n_train as f64;
                        m2[k] += delta * (t as f64 - mean[k]);
                    }
                }
                rows.push(RowRef {
                    file: fi as u16,
                    split: row.split,
                    line: rec.line as u32,
                    offset: rec.offset,
                    rna_len: row.rna.len().min(self.config.rna_max_len) as u32,
                    protein_len: plen.min(self.config.protein_max_len) as u32,
                });
            }
        }
        if n_train > 1 {
            // The population standard deviation (over n).
            self.train_stats = Some(TargetStats {
                mean: mean.iter().map(|&m| m as f32).collect(),
                std: m2
                    .iter()
                    .map(|&q| (q / n_train as f64).sqrt() as f32)
                    .collect(),
            });
        }
        self.rows = rows;
        self.report = report;
        Ok(())
    }

    fn window_status(&self, row: &ParsedRow) -> std::result::Result<WindowFit, String> {
        match (&row.locus, &row.dna) {
            (Some((chrom, strand, start, end)), _) => {
                let genome = self.genome.as_ref().expect("GTEx rows come with a genome");
                let len = genome
                    .length(chrom)
                    .expect("chromosome resolved against this genome");
                let w = Window::around_tss(*start, *end, *strand, self.config.dna_len)?;
                Ok(if w.inside(len) {
                    WindowFit::Inside
                } else {
                    WindowFit::Outside
                })
            }
            // A given sequence shorter than the window is handled like a window past the chromosome's end.
            (None, Some(dna)) => Ok(if dna.len() >= self.config.dna_len {
                WindowFit::Inside
            } else {
                WindowFit::Outside
            }),
            (None, None) => unreachable!("every layout gives a locus or a sequence"),
        }
    }

    pub fn config(&self) -> &DataConfig {
        &self.config
    }

    /// The files the dataset reads (tables and genome): an output must never be one of them.
    pub fn input_files(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = self.files.iter().map(|f| f.path.as_path()).collect();
        if let Some(g) = &self.genome {
            out.push(g.path());
        }
        out
    }

    pub fn tissues(&self) -> &[String] {
        &self.tissues
    }

    pub fn report(&self) -> &DataReport {
        &self.report
    }

    pub fn genome(&self) -> Option<&Genome> {
        self.genome.as_ref()
    }

    /// Rows that passed validation, in file order.
    pub fn rows(&self) -> &[RowRef] {
        &self.rows
    }

    /// Rows of one split, in file order.
    pub fn split_rows(&self, split: Split) -> Vec<RowRef> {
        self.rows
            .iter()
            .filter(|r| r.split == split)
            .copied()
            .collect()
    }

    /// Per-tissue mean and standard deviation over the training rows (None with fewer than two).
    pub fn train_target_stats(&self) -> Option<&TargetStats> {
        self.train_stats.as_ref()
    }

    /// Reads a row back and builds its sample: DNA window, cropped RNA and protein, targets.
    pub fn sample(&self, row: &RowRef) -> Result<Sample> {
        let file = &self.files[row.file as usize];
        let mut reader = RecordReader::new(
            &file.map[row.offset as usize..],
            &file.path,
            file.delimiter,
            row.line as usize,
            row.offset,
        );
        let mut rec = Record::default();
        if !reader.next_record(&mut rec)? {
            return Err(Error::Parse {
                path: file.path.clone(),
                line: Some(row.line as usize),
                msg: "row vanished since indexing".into(),
            });
        }
        let parsed = self.parse_row(file, &rec).map_err(|msg| Error::Parse {
            path: file.path.clone(),
            line: Some(rec.line),
            msg,
        })?;
        let len = self.config.dna_len;
        let mut dna = Vec::with_capacity(len);
        match (&parsed.locus, &parsed.dna) {
            (Some((chrom, strand, start, end)), _) => {
                let genome = self.genome.as_ref().expect("GTEx rows come with a genome");
                Window::around_tss(*start, *end, *strand, len)
                    .map_err(|msg| Error::Parse {
                        path: file.path.clone(),
                        line: Some(rec.line),
                        msg,
                    })?
                    .fetch(genome, chrom, &mut dna)?;
            }
            (None, Some(given)) => {
                let given = given.as_bytes();
                if given.len() >= len {
                    let start = (given.len() - len) / 2;
                    dna.extend_from_slice(&given[start..start + len]);
                } else {
                    let left = (len - given.len()) / 2;
                    dna.resize(left, b'N');
                    dna.extend_from_slice(given);
                    dna.resize(len, b'N');
                }
            }
            (None, None) => unreachable!("every layout gives a locus or a sequence"),
        }
        Ok(Sample {
            transcript_id: parsed.transcript_id,
            split: parsed.split,
            dna,
            rna: crop_left(&parsed.rna, self.config.rna_max_len).to_string(),
            protein: parsed
                .protein
                .map(|p| crop_right(&p, self.config.protein_max_len).to_string()),
            targets: parsed.targets,
        })
    }
}

enum WindowFit {
    Inside,
    Outside,
}

fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The genome's name for a chromosome: as given, else with the `chr` prefix added or removed (and `MT`/`M`).
fn resolve_chromosome(genome: &Genome, name: &str) -> Option<String> {
    let bare = name.strip_prefix("chr").unwrap_or(name);
    let mut candidates = vec![name.to_string(), bare.to_string(), format!("chr{bare}")];
    if bare == "MT" || bare == "M" {
        candidates.extend(["chrM", "chrMT", "MT", "M"].map(String::from));
    }
    candidates.into_iter().find(|c| genome.length(c).is_some())
}

impl TargetStats {
    /// `(t − mean) / std` per tissue; a tissue with zero spread is only centred.
    pub fn normalize(&self, targets: &mut [f32]) {
        for ((t, m), s) in targets.iter_mut().zip(&self.mean).zip(&self.std) {
            *t = (*t - m) / if *s > 0.0 { *s } else { 1.0 };
        }
    }

    /// The inverse of [`TargetStats::normalize`], for turning predictions back into log(1+TPM).
    pub fn denormalize(&self, values: &mut [f32]) {
        for ((v, m), s) in values.iter_mut().zip(&self.mean).zip(&self.std) {
            *v = *v * if *s > 0.0 { *s } else { 1.0 } + m;
        }
    }
}
