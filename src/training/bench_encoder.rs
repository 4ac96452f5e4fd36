//! A timed training step of one transformer encoder (ESM-2 or NT-v2) from a weights directory: forward,
//! a mean-squared loss on the last hidden state, backward through every layer, and an AdamW step on all
//! parameters. The same step `tools/bench_vs_torch.py` runs in PyTorch on the same weights, so the two
//! can be compared side by side.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::adamw::AdamW;
use crate::backend::state::{ParamSet, TrainState};
use crate::backend::{Backend, Role, Tensor};
use crate::models::config::EsmConfig;
use crate::models::transformer::{EncoderActivations, TransformerConfig, TransformerEncoder};
use crate::models::weights::{ModelParams, Prefixes, WeightFile};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct EncoderStepSpec {
    /// `config.json` (Hugging Face's ESM format, also NT-v2's).
    pub config: std::path::PathBuf,
    /// The safetensors weights.
    pub weights: std::path::PathBuf,
    /// NT-v2 (SwiGLU, its tokenizer's vocabulary) rather than ESM-2.
    pub nucleotide_transformer: bool,
    pub batch: usize,
    /// Tokens per sequence, `<cls>` and `<eos>` included.
    pub len: usize,
    pub steps: usize,
}

/// One step's wall time and loss.
#[derive(Clone, Copy, Debug)]
pub struct EncoderStep {
    pub seconds: f64,
    pub loss: f32,
}

/// Runs `spec.steps` training steps on `b` (the first one plans and allocates the activations).
pub fn run_encoder_step_bench<B: Backend>(
    b: &B,
    spec: &EncoderStepSpec,
) -> Result<Vec<EncoderStep>> {
    let c = EsmConfig::from_file(&spec.config)?;
    let tc = if spec.nucleotide_transformer {
        TransformerConfig::nucleotide_transformer_v2(&c)
    } else {
        TransformerConfig::esm2(&c)
    };
    let encoder = TransformerEncoder::new(tc)?;
    let host = ModelParams::load(
        encoder.layout().clone(),
        std::sync::Arc::new(WeightFile::open(Path::new(&spec.weights))?),
        &Prefixes(vec!["esm.".into(), "".into()]),
        false,
    )?;
    time_encoder_steps(
        b,
        &encoder,
        |i| host.get(i),
        spec.batch,
        spec.len,
        spec.steps,
    )
}

/// `steps` timed training steps of `encoder` on `b` from host parameters `get(i)` (entry i of its
/// layout), on a random batch of `batch` full sequences of `len` tokens.
pub fn time_encoder_steps<'h, B: Backend>(
    b: &B,
    encoder: &TransformerEncoder,
    get: impl Fn(usize) -> &'h [f32],
    batch: usize,
    len: usize,
    steps: usize,
) -> Result<Vec<EncoderStep>> {
    if batch == 0 || len < 3 || steps == 0 {
        return Err(Error::invalid(
            "encoder step",
            "batch and steps must be positive and len at least 3",
        ));
    }
    let (vocab, hidden) = (encoder.cfg.vocab, encoder.cfg.hidden);
    let params = ParamSet::upload(b, encoder.layout().clone(), get, true)?;
    let mut state = TrainState::new(b, params)?;
    let optimizer = AdamW::single_group(encoder.layout(), 1e-4, 0.01)?;

    // Sizes from flags are checked, and the backend buffers (which report a failed allocation as an
    // error) are made before the host token ids, which are smaller.
    let n = crate::error::checked_product("encoder step", &[batch, len, hidden])?;
    let target = Tensor::new(b, Role::Exact, n)?;
    let mut dhidden = Tensor::new(b, Role::Activation, n)?;
    // Random residue tokens between <cls> (0) and <eos> (2); every sequence full length.
    let mut rng = StdRng::seed_from_u64(0);
    let first_residue = 4u32.min(vocab as u32 - 1);
    let last_residue = (vocab as u32).min(24).max(first_residue + 1);
    let ids: Vec<u32> = (0..batch)
        .flat_map(|_| {
            let mut row = vec![0u32; len];
            row[1..len - 1]
                .iter_mut()
                .for_each(|t| *t = rng.random_range(first_residue..last_residue));
            row[len - 1] = 2;
            row
        })
        .collect();
    let lens = vec![len; batch];
    let mut acts = EncoderActivations::default();
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        state.zero_grads(b)?;
        b.zero(dhidden.view_mut())?;
        let loss = {
            let (views, mut grads) = state.params_and_grads()?;
            encoder.forward(b, &views, &ids, &lens, len, &mut acts, true)?;
            let loss = b.mse(acts.hidden()?, target.view())?;
            b.mse_backward(dhidden.view_mut(), acts.hidden()?, target.view(), 1.0)?;
            encoder.backward(b, &views, &mut acts, dhidden.view(), &mut grads)?;
            loss
        };
        optimizer.step(b, &mut state, 1.0, None)?;
        b.synchronize()?;
        out.push(EncoderStep {
            seconds: t0.elapsed().as_secs_f64(),
            loss,
        });
    }
    Ok(out)
}
