//! Test support shared by every op's tests (and, later, by the device suites): seeded random inputs, the
//! max-abs-relative comparison, and an f64 central finite-difference gradient check.
//!
//! The finite differences are taken through an independent naive f64 forward written in the test, never
//! through the code under test, so one check validates both the forward and the backward.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// max |got − want| / max(max |want|, floor). Returns the error so tests can report it.
pub fn max_rel_error(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(
        got.len(),
        want.len(),
        "length mismatch between result and reference"
    );
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(floor);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    err / scale
}

/// Asserts a result against an f64 reference within `tol` (max-abs error over max-abs reference).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = max_rel_error(got, want, 1e-12);
    assert!(
        err <= tol,
        "{what}: max relative error {err:.3e} exceeds {tol:.1e}"
    );
}

/// Checks analytic gradients of `L = Σ dout ⋅ f(inputs)` against f64 central differences of `naive`.
///
/// `inputs` are the f32 values the op saw; `analytic[i]` is the op's gradient with respect to `inputs[i]`
/// (`None` for inputs that are not differentiated, such as ids). `tol` bounds the max-abs error relative to
/// the largest finite-difference gradient of that input.
pub fn check_gradients(
    what: &str,
    inputs: &[&[f32]],
    analytic: &[Option<&[f32]>],
    dout: &[f32],
    naive: impl Fn(&[Vec<f64>]) -> Vec<f64>,
    tol: f64,
) {
    assert_eq!(inputs.len(), analytic.len());
    let mut x: Vec<Vec<f64>> = inputs.iter().map(|v| to_f64(v)).collect();
    let loss = |x: &[Vec<f64>]| -> f64 {
        let out = naive(x);
        assert_eq!(
            out.len(),
            dout.len(),
            "{what}: naive output length differs from dout"
        );
        out.iter().zip(dout).map(|(o, &d)| o * d as f64).sum()
    };
    for (i, grad) in analytic.iter().enumerate() {
        let Some(grad) = grad else { continue };
        assert_eq!(
            grad.len(),
            inputs[i].len(),
            "{what}: gradient {i} has the wrong length"
        );
        let mut fd = vec![0.0f64; grad.len()];
        for j in 0..grad.len() {
            let orig = x[i][j];
            let h = 1e-4 * orig.abs().max(1.0);
            x[i][j] = orig + h;
            let up = loss(&x);
            x[i][j] = orig - h;
            let down = loss(&x);
            x[i][j] = orig;
            fd[j] = (up - down) / (2.0 * h);
        }
        let err = max_rel_error(grad, &fd, 1e-6);
        assert!(
            err <= tol,
            "{what}: gradient of input {i}: max relative error {err:.3e} exceeds {tol:.1e}"
        );
    }
}

/// Entry points of the fuzz targets (`tools/fuzz`) and their corpus replay (`tests/fuzz_corpus.rs`): each
/// takes arbitrary bytes and must return, never panic.
pub mod fuzz {
    use std::path::Path;

    /// The safetensors header parser and tensor index.
    pub fn safetensors_header(data: &[u8]) {
        let _ = crate::models::weights::index_tensors(data, Path::new("fuzz.safetensors"));
    }

    /// The CSV/TSV record reader, both delimiters, to the end of the input.
    pub fn csv_records(data: &[u8]) {
        for delimiter in [b',', b'\t'] {
            let mut reader = crate::data::records::RecordReader::new(
                data,
                Path::new("fuzz.csv"),
                delimiter,
                1,
                0,
            );
            let mut rec = crate::data::records::Record::default();
            while let Ok(true) = reader.next_record(&mut rec) {
                let _ = rec.fields().count();
            }
        }
    }

    /// The FASTA index builder, the FAI parser, and reads through a built index.
    pub fn fasta_index(data: &[u8]) {
        use crate::data::fasta::FaiIndex;
        if let Ok(index) = FaiIndex::build(data, Path::new("fuzz.fa")) {
            let _ = FaiIndex::parse(&index.to_text(), Path::new("fuzz.fa.fai"));
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = FaiIndex::parse(text, Path::new("fuzz.fai"));
        }
    }
}

/// erf by its Maclaurin series in f64: independent of the engine's fit, exact to ~1e-13 for |x| ≤ 4.
pub fn erf_series(x: f64) -> f64 {
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 * sum.abs().max(1e-300) {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}
