//! The data pipeline against the committed fixtures: a 3-chromosome FASTA with a GTEx-layout CSV, and DNA
//! windows computed independently with pyfaidx (`tools/make_data_fixtures.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isoformer_engine::data::fasta::{FaiIndex, Genome};
use isoformer_engine::data::loader::epoch_plan;
use isoformer_engine::data::{
    DataConfig, Dataset, EdgePolicy, Loader, LoaderConfig, Split, TargetStats,
};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data");

/// A fresh copy of the fixture dataset (tests write indexes and edit files).
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isoformer-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["genome.fa", "GTEx_final.csv"] {
        std::fs::copy(Path::new(FIXTURE).join("gtex").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn config(dir: &Path, dna_len: usize, edge: EdgePolicy) -> DataConfig {
    let mut c = DataConfig::new(dir);
    c.dna_len = dna_len;
    c.edge = edge;
    c.cache_dir = dir.join("cache");
    c
}

/// transcript id → (inside, padded window) per window length, from the pyfaidx reference.
fn expected_windows() -> HashMap<(String, usize), (bool, String)> {
    let text = std::fs::read_to_string(Path::new(FIXTURE).join("expected_windows.tsv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (
                (c[0].to_string(), c[1].parse().unwrap()),
                (c[2] == "1", c[3].to_string()),
            )
        })
        .collect()
}

#[test]
fn windows_match_pyfaidx_on_both_strands_and_at_the_edges() {
    let expected = expected_windows();
    for len in [40, 41] {
        for edge in [EdgePolicy::Drop, EdgePolicy::PadN] {
            let dir = scratch(&format!("win{len}{edge:?}"));
            let ds = Dataset::open(config(&dir, len, edge)).unwrap();
            let mut seen = 0;
            for row in ds.rows() {
                let s = ds.sample(row).unwrap();
                let (inside, window) = &expected[&(s.transcript_id.clone(), len)];
                assert!(
                    *inside || edge == EdgePolicy::PadN,
                    "{} leaves its chromosome but was kept",
                    s.transcript_id
                );
                assert_eq!(
                    std::str::from_utf8(&s.dna).unwrap(),
                    window,
                    "{} at length {len}",
                    s.transcript_id
                );
                seen += 1;
            }
            let outside = expected
                .iter()
                .filter(|((_, l), (inside, _))| *l == len && !inside)
                .count();
            let r = ds.report();
            match edge {
                EdgePolicy::Drop => assert_eq!((r.edge_dropped, seen), (outside, 10 - outside)),
                EdgePolicy::PadN => assert_eq!((r.edge_padded, seen), (outside, 10)),
            }
            assert!(outside >= 3, "the fixture must exercise the edges");
        }
    }
}

#[test]
fn splits_columns_and_sequences_follow_the_schema() {
    let dir = scratch("schema");
    let ds = Dataset::open(config(&dir, 40, EdgePolicy::PadN)).unwrap();
    assert_eq!(
        ds.tissues(),
        ["Adipose Tissue", "Brain", "Liver", "Whole Blood"]
    );
    let r = ds.report();
    // train ×4 (one spelled "Train"), valid/eval/validation ×3, test ×2 … with every edge row padded in.
    assert_eq!(r.rows_per_split, [5, 3, 2]);
    assert_eq!(r.missing_protein, 2);
    let samples: HashMap<String, _> = ds
        .rows()
        .iter()
        .map(|row| ds.sample(row).unwrap())
        .map(|s| (s.transcript_id.clone(), s))
        .collect();
    assert_eq!(samples["ENST03"].protein, None);
    assert_eq!(samples["ENST03"].split, Split::Validation);
    assert!(
        samples["ENST02"]
            .rna
            .chars()
            .all(|c| c.is_ascii_uppercase()),
        "RNA is upper-cased"
    );
    assert_eq!(
        samples["ENST01"].targets,
        vec![0.776363, 1.956469, 0.034076, 0.017993]
    );
}

#[test]
fn rna_keeps_its_three_prime_end_and_protein_its_start() {
    let dir = scratch("crop");
    let mut c = config(&dir, 40, EdgePolicy::PadN);
    c.rna_max_len = 5;
    c.protein_max_len = 3;
    let full = Dataset::open(config(&dir, 40, EdgePolicy::PadN)).unwrap();
    let cropped = Dataset::open(c).unwrap();
    for (a, b) in full.rows().iter().zip(cropped.rows()) {
        let (a, b) = (full.sample(a).unwrap(), cropped.sample(b).unwrap());
        assert_eq!(b.rna, a.rna[a.rna.len() - 5..]);
        assert_eq!(
            b.protein,
            a.protein.map(|p| p[..3.min(p.len())].to_string())
        );
    }
    assert!(cropped.report().rna_cropped > 0 && cropped.report().protein_cropped > 0);
}

/// Replaces line `line` (1-based) of the fixture CSV and returns the error or report.
fn with_line(
    tag: &str,
    line: usize,
    edit: impl Fn(&str) -> String,
    skip: bool,
) -> Result<Dataset, String> {
    let dir = scratch(tag);
    let path = dir.join("GTEx_final.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let out: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i + 1 == line {
                edit(l)
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
    let mut c = config(&dir, 40, EdgePolicy::Drop);
    c.skip_bad_rows = skip;
    Dataset::open(c).map_err(|e| e.to_string())
}

#[test]
fn bad_rows_name_the_file_and_line_or_are_skipped_and_counted() {
    let field = |i: usize, v: &'static str| {
        move |l: &str| {
            let mut c: Vec<String> = l.split(',').map(String::from).collect();
            c[i] = v.to_string();
            c.join(",")
        }
    };
    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(&str, usize, Edit, &str)> = vec![
        (
            "cols",
            3,
            Box::new(|l: &str| format!("{l},extra")),
            "17 columns, the header has 16",
        ),
        (
            "nan",
            4,
            Box::new(field(10, "NaN")),
            "expression for 'Brain' is not finite",
        ),
        (
            "text",
            5,
            Box::new(field(11, "high")),
            "expression for 'Liver' is not a number ('high')",
        ),
        (
            "chrom",
            6,
            Box::new(field(3, "chr99")),
            "chromosome 'chr99' is not in the genome",
        ),
        (
            "rna",
            7,
            Box::new(field(13, "ACGTXACG")),
            "invalid RNA letter 'X' at position 5",
        ),
        (
            "tab_id",
            3,
            Box::new(field(0, "ENST\tX")),
            "holds the control character '\\t'",
        ),
        (
            "empty_rna",
            11,
            Box::new(field(13, "")),
            "empty RNA sequence",
        ),
        (
            "protein",
            2,
            Box::new(field(15, "MK7L")),
            "invalid amino-acid letter '7'",
        ),
        (
            "strand",
            8,
            Box::new(field(4, "*")),
            "strand '*' is neither + nor -",
        ),
        (
            "split",
            9,
            Box::new(field(2, "holdout")),
            "unknown split 'holdout'",
        ),
        (
            "coords",
            10,
            Box::new(field(5, "0")),
            "start '0' is not a 1-based position",
        ),
    ];
    for (tag, line, edit, want) in cases {
        let err = with_line(tag, line, &edit, false).unwrap_err();
        assert!(
            err.contains(&format!("GTEx_final.csv:{line}:")) && err.contains(want),
            "{tag}: {err}"
        );
        let ds = with_line(tag, line, &edit, true).unwrap();
        assert_eq!(ds.report().bad_rows, 1, "{tag}");
        assert!(ds.report().bad_examples[0].contains(want));
    }
}

#[test]
fn tsv_layout_with_splits_from_file_names() {
    let dir = std::env::temp_dir().join(format!("isoformer-data-tsv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let header = "dna_seq\trna_seq\tprotein_seq\tlabels_0\tlabels_1\n";
    std::fs::write(
        dir.join("train_0.tsv"),
        format!("{header}acgtnACGTRY\tACGU\tMKV\t1.5\t2\nAAAA\tCC\t\t0\t1\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("validation.tsv"),
        format!("{header}GGGGGGGG\tTT\tW\t3\t4\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("test.tsv"),
        format!("{header}CCCCCCCCCC\tAA\tMM\t5\t6\n"),
    )
    .unwrap();
    let mut c = config(&dir, 8, EdgePolicy::Drop);
    c.genome = None;
    let ds = Dataset::open(c.clone()).unwrap();
    assert_eq!(ds.tissues(), ["labels_0", "labels_1"]);
    assert_eq!(
        ds.report().rows_per_split,
        [1, 1, 1],
        "the 4-base DNA is shorter than the window and dropped"
    );
    assert_eq!(ds.report().edge_dropped, 1);
    let s = ds.sample(&ds.split_rows(Split::Train)[0]).unwrap();
    assert_eq!(
        std::str::from_utf8(&s.dna).unwrap(),
        "CGTNACGT",
        "centre-cropped from ACGTNACGTNN"
    );
    assert_eq!(
        (s.rna.as_str(), s.protein.as_deref(), &s.targets[..]),
        ("ACGT", Some("MKV"), &[1.5f32, 2.0][..])
    );
    c.edge = EdgePolicy::PadN;
    let ds = Dataset::open(c.clone()).unwrap();
    let short = ds
        .split_rows(Split::Train)
        .into_iter()
        .map(|r| ds.sample(&r).unwrap())
        .find(|s| s.protein.is_none())
        .unwrap();
    assert_eq!(std::str::from_utf8(&short.dna).unwrap(), "NNAAAANN");
    // A character that is no IUPAC nucleotide code is refused, not read as N.
    std::fs::write(
        dir.join("test.tsv"),
        format!("{header}CCCCCCCCCC\tAA\tMM\t5\t6\nCCCC-CCCCC\tAA\tMM\t5\t6\n"),
    )
    .unwrap();
    let e = Dataset::open(c.clone()).err().unwrap().to_string();
    assert!(
        e.contains("test.tsv:3") && e.contains("invalid DNA letter '-' at position 5"),
        "{e}"
    );
}

#[test]
fn fasta_index_is_built_beside_or_in_the_cache_and_gzip_is_explained() {
    let dir = scratch("fai");
    let fa = dir.join("genome.fa");
    let g = Genome::open(&fa, &dir.join("cache")).unwrap();
    assert_eq!(g.index_source, dir.join("genome.fa.fai"));
    assert_eq!(g.length("chr2"), Some(357));
    // Next time the saved index is used as it is.
    let text = std::fs::read_to_string(dir.join("genome.fa.fai")).unwrap();
    assert_eq!(FaiIndex::parse(&text, &fa).unwrap(), *g.index());
    // When the index cannot be written beside the FASTA, it goes to the cache.
    std::fs::remove_file(dir.join("genome.fa.fai")).unwrap();
    std::fs::create_dir(dir.join("genome.fa.fai")).unwrap();
    let g = Genome::open(&fa, &dir.join("cache")).unwrap();
    assert!(
        g.index_source.starts_with(dir.join("cache")),
        "{}",
        g.index_source.display()
    );
    // A stale index (for another file) is not trusted.
    std::fs::remove_dir(dir.join("genome.fa.fai")).unwrap();
    std::fs::write(dir.join("genome.fa.fai"), "chr1\t1000\t3\t10\t11\n").unwrap();
    let g = Genome::open(&fa, &dir.join("cache2")).unwrap();
    assert_eq!(g.length("chr1"), Some(1000));
    let mut out = Vec::new();
    g.fetch_into("chr1", 0, 5, &mut out).unwrap();
    assert!(out.iter().all(|b| b"ACGTN".contains(b)));
    // gzip
    std::fs::write(dir.join("g.fa.gz"), [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
    let err = Genome::open(&dir.join("g.fa.gz"), &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gzip") && err.contains("gunzip"), "{err}");
}

#[test]
fn loader_is_deterministic_bucketed_and_complete() {
    let dir = scratch("loader");
    let ds = Arc::new(Dataset::open(config(&dir, 41, EdgePolicy::PadN)).unwrap());
    let mut cfg = LoaderConfig::new(Split::Train, 2);
    cfg.seed = 7;
    let ids = |cfg: &LoaderConfig| -> Vec<Vec<String>> {
        Loader::new(ds.clone(), cfg.clone())
            .unwrap()
            .map(|b| {
                b.unwrap()
                    .samples
                    .into_iter()
                    .map(|s| s.transcript_id)
                    .collect()
            })
            .collect()
    };
    let a = ids(&cfg);
    assert_eq!(a, ids(&cfg), "same seed, same order");
    let mut all: Vec<String> = a.concat();
    all.sort();
    assert_eq!(
        all,
        ["ENST01", "ENST02", "ENST05", "ENST09", "ENST10"],
        "every training row once"
    );
    let orders: std::collections::HashSet<Vec<Vec<String>>> = (0..8)
        .map(|s| {
            ids(&LoaderConfig {
                seed: s,
                ..cfg.clone()
            })
        })
        .collect();
    assert!(orders.len() > 1, "the seed changes the order");
    // Bucketing: within a pool, batches hold neighbouring lengths.
    let rows = ds.split_rows(Split::Train);
    let plan = epoch_plan(
        &rows,
        &LoaderConfig {
            shuffle: false,
            ..cfg.clone()
        },
    );
    let lens: Vec<Vec<u32>> = plan
        .iter()
        .map(|b| b.iter().map(|r| r.rna_len).collect())
        .collect();
    let flat: Vec<u32> = lens.concat();
    assert!(flat.windows(2).all(|w| w[0] <= w[1]), "{lens:?}");
    // Dropping the loader early does not hang its thread.
    let mut l = Loader::new(
        ds.clone(),
        LoaderConfig {
            prefetch: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert!(l.next().is_some());
    drop(l);
}

#[test]
fn target_statistics_come_from_the_training_split_and_round_trip() {
    let dir = scratch("stats");
    let ds = Dataset::open(config(&dir, 40, EdgePolicy::PadN)).unwrap();
    let train: Vec<Vec<f32>> = ds
        .split_rows(Split::Train)
        .iter()
        .map(|r| ds.sample(r).unwrap().targets)
        .collect();
    let stats = ds.train_target_stats().unwrap().clone();
    for k in 0..4 {
        let v: Vec<f64> = train.iter().map(|t| t[k] as f64).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(
            (stats.mean[k] as f64 - mean).abs() < 1e-6 && (stats.std[k] as f64 - std).abs() < 1e-6
        );
    }
    let mut t = train[0].clone();
    stats.normalize(&mut t);
    stats.denormalize(&mut t);
    for (a, b) in t.iter().zip(&train[0]) {
        assert!((a - b).abs() < 1e-5);
    }
    let path = dir.join("stats.safetensors");
    stats.save(ds.tissues(), &path).unwrap();
    assert_eq!(TargetStats::load(&path, ds.tissues()).unwrap(), stats);
    assert!(TargetStats::load(&path, &ds.tissues()[..3]).is_err());
    // A tissue whose training targets are all equal has a standard deviation of exactly 0, which is how
    // `data check` and the metrics know it. With E[x²] − E[x]², 1,201 rows of 0.7 left 7·10⁻⁸.
    let csv = dir.join("GTEx_final.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let mut rows = vec![lines.next().unwrap().to_string()];
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let copies = if fields[2] == "train" { 300 } else { 1 }; // plus one "Train" row
        for copy in 0..copies {
            let mut f = fields.clone();
            let id = format!("{}_{copy}", fields[0]);
            f[0] = &id;
            f[12] = "0.7"; // Whole Blood
            rows.push(f.join(","));
        }
    }
    std::fs::write(&csv, rows.join("\n") + "\n").unwrap();
    let ds = Dataset::open(config(&dir, 40, EdgePolicy::PadN)).unwrap();
    assert_eq!(ds.split_rows(Split::Train).len(), 1201);
    let stats = ds.train_target_stats().unwrap();
    assert_eq!((stats.mean[3], stats.std[3]), (0.7, 0.0));
}

#[test]
fn tissue_mismatches_name_the_first_column_that_differs() {
    use isoformer_engine::data::tissue_mismatch;
    let v = |names: &[&str]| -> Vec<String> { names.iter().map(|s| s.to_string()).collect() };
    let model = v(&["Brain", "Liver", "Lung"]);
    assert_eq!(tissue_mismatch(&model, &model), None);
    let e = tissue_mismatch(&model, &v(&["Brain", "Lung", "Liver"])).unwrap();
    assert!(
        e.contains("same tissues in another order")
            && e.contains("column 2 is 'Lung' there and 'Liver' in the checkpoint"),
        "{e}"
    );
    let e = tissue_mismatch(&model, &v(&["Brain", "Liver", "Skin"])).unwrap();
    assert!(
        !e.contains("another order") && e.contains("column 3 is 'Skin'"),
        "{e}"
    );
    let e = tissue_mismatch(&model, &v(&["Brain", "Liver"])).unwrap();
    assert!(e.contains("column 3 is (none) there and 'Lung'"), "{e}");
}
