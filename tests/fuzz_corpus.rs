//! Replays the fuzz corpus (`tools/fuzz/corpus/<target>/`, plus the committed fixtures of each format) and
//! seeded mutations of it (bit flips, truncations, splices) through the fuzz targets' entry points, as an
//! ordinary test on stable: every input returns, none panics. `cargo +nightly fuzz` explores further.

use std::path::Path;

use isoformer_engine::testing::fuzz;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seeds(target: &str, fixtures: &[&str]) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(root.join("tools/fuzz/corpus").join(target))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    for f in fixtures {
        out.push(std::fs::read(root.join(f)).unwrap());
    }
    assert!(!out.is_empty());
    out
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    match rng.random_range(0..4) {
        0 if !v.is_empty() => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => v.truncate(rng.random_range(0..=v.len())),
        2 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            let bytes: [u8; 8] = rng.random();
            v.splice(i..i, bytes);
        }
        _ => {
            let i = rng.random_range(0..=v.len());
            let j = rng.random_range(i..=v.len());
            let copy = v[i..j].to_vec();
            v.extend_from_slice(&copy);
        }
    }
    v
}

fn replay(target: &str, fixtures: &[&str], run: fn(&[u8]), cases: usize) {
    let seeds = seeds(target, fixtures);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for s in &seeds {
        run(s);
    }
    for _ in 0..cases {
        let s = &seeds[rng.random_range(0..seeds.len())];
        run(&mutate(&mut rng, s));
    }
}

#[test]
fn safetensors_header_corpus_replays() {
    replay(
        "safetensors_header",
        &[
            "tests/fixtures/models/esm2/model.safetensors",
            "tests/fixtures/models/enformer/model.safetensors",
        ],
        fuzz::safetensors_header,
        2_000,
    );
}

#[test]
fn csv_records_corpus_replays() {
    replay(
        "csv_records",
        &["tests/fixtures/data/gtex/GTEx_final.csv"],
        fuzz::csv_records,
        3_000,
    );
}

#[test]
fn fasta_index_corpus_replays() {
    replay(
        "fasta_index",
        &["tests/fixtures/data/gtex/genome.fa"],
        fuzz::fasta_index,
        3_000,
    );
}
