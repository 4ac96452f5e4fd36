//! Property tests: the CSV/TSV, FASTA and FAI parsers, and dataset opening, never panic on mangled input;
//! they return a value or an error. Seeded, so a failure reproduces.

use std::path::Path;

use isoformer_engine::data::fasta::{FaiIndex, Genome};
use isoformer_engine::data::records::{Record, RecordReader};
use isoformer_engine::data::{DataConfig, Dataset, EdgePolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/gtex");

/// Byte-level mutations that keep much of the structure: flips, insertions of format-significant bytes,
/// deletions, duplicated slices, truncation.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    const SPECIAL: &[u8] = b",\t\n\r\">+-0123456789.eNaAcGtT \xff\x00";
    for _ in 0..rng.random_range(1..8) {
        let at = rng.random_range(0..=v.len());
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            1 => v.insert(at, SPECIAL[rng.random_range(0..SPECIAL.len())]),
            2 if at < v.len() => {
                let n = rng.random_range(1..=(v.len() - at).min(20));
                v.drain(at..at + n);
            }
            3 if at < v.len() => {
                let n = rng.random_range(1..=(v.len() - at).min(40));
                let slice: Vec<u8> = v[at..at + n].to_vec();
                let to = rng.random_range(0..=v.len());
                v.splice(to..to, slice);
            }
            4 => v.truncate(at),
            _ => {
                let i = rng.random_range(0..=v.len());
                v.insert(i, b'\n');
            }
        }
    }
    v
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    (0..rng.random_range(0..200))
        .map(|_| rng.random())
        .collect()
}

fn read_all_records(bytes: &[u8], delim: u8) {
    let mut r = RecordReader::new(bytes, Path::new("fuzz"), delim, 1, 0);
    let mut rec = Record::default();
    while let Ok(true) = r.next_record(&mut rec) {
        let _ = rec.fields().count();
    }
}

#[test]
fn record_reader_never_panics() {
    let csv = std::fs::read(Path::new(FIXTURE).join("GTEx_final.csv")).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..2000 {
        read_all_records(&mutate(&mut rng, &csv), b',');
        read_all_records(&mutate(&mut rng, &csv), b'\t');
        read_all_records(&random_bytes(&mut rng), b',');
    }
}

#[test]
fn fasta_and_fai_parsers_never_panic() {
    let fa = std::fs::read(Path::new(FIXTURE).join("genome.fa")).unwrap();
    let fai = FaiIndex::build(&fa, Path::new("g.fa")).unwrap().to_text();
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..2000 {
        let _ = FaiIndex::build(&mutate(&mut rng, &fa), Path::new("g.fa"));
        let _ = FaiIndex::build(&random_bytes(&mut rng), Path::new("g.fa"));
        let _ = FaiIndex::parse(
            &String::from_utf8_lossy(&mutate(&mut rng, fai.as_bytes())),
            Path::new("g.fai"),
        );
    }
}

#[test]
fn genome_with_a_corrupt_index_errors_instead_of_panicking() {
    let dir = std::env::temp_dir().join(format!("isoformer-fuzz-genome-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fa_bytes = std::fs::read(Path::new(FIXTURE).join("genome.fa")).unwrap();
    let fai = FaiIndex::build(&fa_bytes, Path::new("g.fa"))
        .unwrap()
        .to_text();
    let mut rng = StdRng::seed_from_u64(3);
    for i in 0..300 {
        let fa = dir.join(format!("g{i}.fa"));
        std::fs::write(
            &fa,
            if i % 2 == 0 {
                fa_bytes.clone()
            } else {
                mutate(&mut rng, &fa_bytes)
            },
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("g{i}.fa.fai")),
            mutate(&mut rng, fai.as_bytes()),
        )
        .unwrap();
        if let Ok(g) = Genome::open(&fa, &dir.join("cache")) {
            let mut out = Vec::new();
            for e in g.index().entries.clone() {
                let a = rng.random_range(0..=e.length.saturating_add(5));
                let b = rng.random_range(0..=e.length.saturating_add(5));
                let _ = g.fetch_into(&e.name, a.min(b), a.max(b), &mut out);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dataset_opening_never_panics_on_mangled_csv() {
    let dir = std::env::temp_dir().join(format!("isoformer-fuzz-ds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(Path::new(FIXTURE).join("genome.fa"), dir.join("genome.fa")).unwrap();
    let csv = std::fs::read(Path::new(FIXTURE).join("GTEx_final.csv")).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    for i in 0..300 {
        std::fs::write(dir.join("GTEx_final.csv"), mutate(&mut rng, &csv)).unwrap();
        let mut c = DataConfig::new(&dir);
        c.dna_len = 40;
        c.skip_bad_rows = i % 2 == 0;
        c.edge = if i % 3 == 0 {
            EdgePolicy::PadN
        } else {
            EdgePolicy::Drop
        };
        c.cache_dir = dir.join("cache");
        if let Ok(ds) = Dataset::open(c) {
            for r in ds.rows() {
                let _ = ds.sample(r);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
