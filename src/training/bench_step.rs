//! A timed IsoFormer training step on random weights and random sequences of chosen sizes (the figure a
//! user needs before a real run): frozen encoders, with the embedding cache filled by the first step and
//! read by the next ones. Reports wall time per step and the process's peak resident memory.
//!
//! With `weights` (a released-layout checkpoint) and `input` (a `predict` TSV), it instead trains the
//! config's model as the config says (fine-tuned encoders included) from those weights on those rows:
//! the step `tools/bench_vs_torch.py` runs in PyTorch on the same weights and batch.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::adamw::AdamW;
use super::cache::EmbeddingCache;
use super::params::IsoformerParams;
use super::step::{cached_encoder_outputs, optimizer_update, train_micro_step, StepBuffers};
use crate::backend::Backend;
use crate::data::predict_tsv::{fit_window, PredictTsv};
use crate::models::isoformer::init::initial_sections;
use crate::models::isoformer::release::load_released;
use crate::models::isoformer::{
    EncoderMode, Isoformer, IsoformerConfig, Modality, SampleSeqs, MAX_INPUT_ELEMENTS,
};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct StepBenchSpec {
    pub config: IsoformerConfig,
    pub batch: usize,
    /// RNA and protein lengths in tokens (special tokens included).
    pub rna_tokens: usize,
    pub protein_tokens: usize,
    pub steps: usize,
    pub cache_dir: std::path::PathBuf,
    /// Run the encoders every step instead of caching their outputs.
    pub no_cache: bool,
    /// A released-layout IsoFormer checkpoint; its config's encoder modes are kept.
    pub weights: Option<std::path::PathBuf>,
    /// The batch's rows (the first `batch` of a `predict` TSV) instead of random sequences.
    pub input: Option<std::path::PathBuf>,
}

/// One line per step: (seconds, peak RSS in bytes after the step, whether it read the cache).
pub fn run_step_bench<B: Backend>(b: &B, spec: &StepBenchSpec) -> Result<Vec<(f64, u64, bool)>> {
    if spec.batch == 0 || spec.batch > 1 << 16 || spec.steps == 0 {
        return Err(Error::invalid(
            "bench step",
            format!(
                "--batch {} and --steps {}: the batch must be in 1..=65536 and at least one step run",
                spec.batch, spec.steps
            ),
        ));
    }
    let mut cfg = spec.config.clone();
    if spec.weights.is_none() {
        cfg.random_init = Modality::ALL.to_vec();
        cfg.train.encoders.dna = EncoderMode::Frozen;
        cfg.train.encoders.rna = EncoderMode::Frozen;
        cfg.train.encoders.protein = EncoderMode::Frozen;
        cfg.num_tokens_per_seq_nuctf_rna = cfg.num_tokens_per_seq_nuctf_rna.max(spec.rna_tokens);
        cfg.num_protein_tokens_per_seq = cfg.num_protein_tokens_per_seq.max(spec.protein_tokens);
    }
    let model = Isoformer::new(cfg)?;
    let host = match &spec.weights {
        Some(w) => load_released(&model, w)?,
        None => initial_sections(&model, 0)?,
    };
    let mut params = IsoformerParams::upload(b, &model, &host)?;
    let mut cache = EmbeddingCache::new(&spec.cache_dir, &model, &host)?;
    drop(host);
    let (dna, rna, protein): (Vec<Vec<u8>>, Vec<String>, Vec<Option<String>>) = match &spec.input {
        Some(path) => {
            let rows = PredictTsv::open(path)?.next_batch(spec.batch)?;
            if rows.len() < spec.batch {
                return Err(Error::invalid(
                    "--input",
                    format!(
                        "{} has {} rows, the batch is {}",
                        path.display(),
                        rows.len(),
                        spec.batch
                    ),
                ));
            }
            let len = model.cfg.dna_sequence_length;
            (
                rows.iter()
                    .map(|r| fit_window(r.dna.as_bytes(), len))
                    .collect(),
                rows.iter().map(|r| r.rna.clone()).collect(),
                rows.into_iter().map(|r| r.protein).collect(),
            )
        }
        None => {
            let (d, r, p) =
                random_sequences(&model, spec.batch, spec.rna_tokens, spec.protein_tokens)?;
            (d, r, p.into_iter().map(Some).collect())
        }
    };
    let seqs: Vec<SampleSeqs<'_>> = (0..dna.len())
        .map(|i| SampleSeqs {
            dna: &dna[i],
            rna: &rna[i],
            protein: protein[i].as_deref(),
        })
        .collect();
    let inputs = model.prepare_inputs(&seqs)?;
    // From given weights: the loss and optimiser of the PyTorch counterpart (mean of squared
    // predictions; AdamW at 1e-4 with decay 0.01 on every parameter).
    let (target, decay) = if spec.weights.is_some() {
        (0.0, 0.01)
    } else {
        (0.5, 0.0)
    };
    let optimizer = AdamW::single_group(params.train_layout(), 1e-4, decay)?;
    let targets = vec![target; spec.batch * model.cfg.num_tissues];
    let mut bufs = StepBuffers::default();
    let mut encoder_acts = Vec::new();
    let mut out = Vec::new();
    for _ in 0..spec.steps {
        let hits_before = cache.hits;
        reset_peak_rss();
        let t0 = Instant::now();
        // The first step runs the frozen encoders and fills the cache; later ones read it.
        let cached = if spec.no_cache || spec.weights.is_some() {
            None
        } else {
            let acts = Some(&mut encoder_acts);
            Some(cached_encoder_outputs(
                b, &model, &params, &inputs, &mut cache, acts,
            )?)
        };
        let c = cached.as_ref();
        train_micro_step(b, &model, &mut params, &inputs, &targets, &mut bufs, 1.0, c)?;
        optimizer_update(b, &mut params, &optimizer, 1.0, Some(1.0))?;
        b.synchronize()?;
        out.push((
            t0.elapsed().as_secs_f64(),
            peak_rss_bytes(),
            cache.hits > hits_before,
        ));
    }
    Ok(out)
}

/// Restarts the kernel's peak-RSS counter (Linux ≥ 4.0), so the next reading is this step's peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A random batch's DNA windows, RNA and protein sequences.
pub type RandomBatch = (Vec<Vec<u8>>, Vec<String>, Vec<String>);

/// The RNA letters and protein residues of sequences that tokenize to `rna_tokens` and `protein_tokens`.
fn random_lengths(rna_tokens: usize, protein_tokens: usize) -> (usize, usize) {
    (
        rna_tokens.saturating_sub(1).saturating_mul(6),
        protein_tokens.saturating_sub(2).max(1),
    )
}

/// The letters of one random sample ([`random_sequences`]): its DNA window, RNA and protein.
pub fn sample_letters(cfg: &IsoformerConfig, rna_tokens: usize, protein_tokens: usize) -> usize {
    let (rna, protein) = random_lengths(rna_tokens, protein_tokens);
    cfg.dna_sequence_length
        .saturating_add(rna)
        .saturating_add(protein)
}

/// Random sequences of the given sizes for `batch` samples: DNA of the model's window, RNA of
/// `rna_tokens` NT-v2 tokens (6-mers after `<cls>`), proteins of `protein_tokens` ESM-2 tokens. Letters
/// beyond what one batch may hold ([`MAX_INPUT_ELEMENTS`]) are an error before anything is allocated.
pub fn random_sequences(
    model: &Isoformer,
    batch: usize,
    rna_tokens: usize,
    protein_tokens: usize,
) -> Result<RandomBatch> {
    let (rna_letters, protein_residues) = random_lengths(rna_tokens, protein_tokens);
    let letters = batch.saturating_mul(sample_letters(&model.cfg, rna_tokens, protein_tokens));
    if letters > MAX_INPUT_ELEMENTS {
        return Err(Error::invalid(
            "random batch",
            format!(
                "{batch} samples of {} bp DNA, {rna_tokens} RNA tokens and {protein_tokens} protein tokens \
                 are {letters} letters, above the {MAX_INPUT_ELEMENTS} one batch may hold; lower the batch or \
                 the lengths",
                model.cfg.dna_sequence_length
            ),
        ));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let pick = |rng: &mut StdRng, alphabet: &[u8], n: usize| -> String {
        let mut letters = Vec::with_capacity(n);
        if alphabet.len() == 4 {
            // Nucleotides, 32 per random word: planning draws hundreds of kilobases per sample.
            while letters.len() < n {
                let mut bits = rng.next_u64();
                for _ in 0..32.min(n - letters.len()) {
                    letters.push(alphabet[(bits & 3) as usize]);
                    bits >>= 2;
                }
            }
        } else {
            letters.extend((0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]));
        }
        String::from_utf8(letters).expect("ASCII letters")
    };
    let dna = (0..batch)
        .map(|_| pick(&mut rng, b"ACGT", model.cfg.dna_sequence_length).into_bytes())
        .collect();
    let rna = (0..batch)
        .map(|_| pick(&mut rng, b"ACGT", rna_letters))
        .collect();
    let protein = (0..batch)
        .map(|_| pick(&mut rng, b"ACDEFGHIKLMNPQRSTVWY", protein_residues))
        .collect();
    Ok((dna, rna, protein))
}

pub fn as_samples<'a>(
    dna: &'a [Vec<u8>],
    rna: &'a [String],
    protein: &'a [String],
) -> Vec<SampleSeqs<'a>> {
    (0..dna.len())
        .map(|i| SampleSeqs {
            dna: &dna[i],
            rna: &rna[i],
            protein: Some(&protein[i]),
        })
        .collect()
}

/// The process's peak resident set (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}
