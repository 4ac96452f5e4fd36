//! A timed training step of one encoder (ESM-2, NT-v2 or the Enformer trunk) from a weights directory:
//! forward, a mean-squared loss on the last hidden state (Enformer: the embeddings, batchnorm on batch
//! statistics), backward through every layer, and an AdamW step on all parameters, under a recompute
//! policy. The same step `tools/bench_vs_torch.py` runs in PyTorch on the same weights, so the two can be
//! compared side by side. [`plan_encoder_step`] runs the same code on the recording backend: the memory
//! the step is planned to take.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::adamw::{AdamW, ParamGroup};
use crate::backend::record::RecordingBackend;
use crate::backend::state::{ParamSet, TrainState};
use crate::backend::{Backend, Role, Tensor, View, ViewMut};
use crate::models::config::{EnformerConfig, EsmConfig};
use crate::models::enformer::{BatchNormMode, EnformerActivations, EnformerNames, EnformerTrunk};
use crate::models::isoformer::MAX_INPUT_ELEMENTS;
use crate::models::recompute::Recompute;
use crate::models::transformer::{EncoderActivations, TransformerConfig, TransformerEncoder};
use crate::models::weights::{ModelParams, Prefixes, WeightFile};
use crate::runtime::{ArenaPlan, DType};
use crate::{Error, Result};

/// Which encoder a step trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepModel {
    Esm2,
    /// NT-v2 (SwiGLU, its tokenizer's vocabulary).
    NucleotideTransformer,
    /// The Enformer trunk (no output heads), on random one-hot DNA.
    Enformer,
}

#[derive(Clone, Debug)]
pub struct EncoderStepSpec {
    /// `config.json` (Hugging Face's ESM format, also NT-v2's; enformer-pytorch's for Enformer).
    pub config: std::path::PathBuf,
    /// The safetensors weights.
    pub weights: std::path::PathBuf,
    pub model: StepModel,
    pub batch: usize,
    /// Tokens per sequence, `<cls>` and `<eos>` included (Enformer: base pairs).
    pub len: usize,
    pub steps: usize,
    pub recompute: Recompute,
}

/// An encoder with its parameters on the host, ready to be timed or planned.
enum LoadedNet {
    Transformer(TransformerEncoder),
    Enformer(Box<EnformerTrunk>),
}

fn load(spec: &EncoderStepSpec) -> Result<(LoadedNet, ModelParams)> {
    let file = std::sync::Arc::new(WeightFile::open(Path::new(&spec.weights))?);
    match spec.model {
        StepModel::Esm2 | StepModel::NucleotideTransformer => {
            let c = EsmConfig::from_file(&spec.config)?;
            let tc = if spec.model == StepModel::NucleotideTransformer {
                TransformerConfig::nucleotide_transformer_v2(&c)
            } else {
                TransformerConfig::esm2(&c)
            };
            let mut encoder = TransformerEncoder::new(tc)?;
            encoder.set_recompute(spec.recompute);
            let host = ModelParams::load(
                encoder.layout().clone(),
                file,
                &Prefixes(vec!["esm.".into(), "".into()]),
                false,
            )?;
            Ok((LoadedNet::Transformer(encoder), host))
        }
        StepModel::Enformer => {
            let mut c = EnformerConfig::from_file(&spec.config)?;
            c.output_heads.clear();
            let mut trunk = EnformerTrunk::new(c)?;
            trunk.set_recompute(spec.recompute);
            let names = EnformerNames {
                prefixes: vec!["".into(), "enformer.".into()],
            };
            let host = ModelParams::load(trunk.layout().clone(), file, &names, false)?;
            Ok((LoadedNet::Enformer(Box::new(trunk)), host))
        }
    }
}

/// The plan of a step of `spec`, from the same code run on the recording backend for the CPU (`F32`)
/// or a kernel device (`BF16`).
#[derive(Clone, Debug)]
pub struct EncoderStepPlan {
    /// Bytes held at the peak with one allocation per buffer (parameters, gradients, AdamW moments and
    /// the step's activations), as the engine allocates without an arena.
    pub peak: usize,
    /// The step buffers placed by their lifetimes in one arena.
    pub arena: ArenaPlan,
    /// Bytes held with that arena: what came before the steps plus the arena.
    pub peak_with_arena: usize,
}

pub fn plan_encoder_step(spec: &EncoderStepSpec, compute: DType) -> Result<EncoderStepPlan> {
    let (net, host) = load(spec)?;
    let b = RecordingBackend::new(compute);
    // Two steps: the first allocates, the second is what every later step does.
    let two = EncoderStepSpec {
        steps: 2,
        ..spec.clone()
    };
    time_loaded(&b, &net, &host, &two)?;
    let lifetimes = b.end_window();
    let arena = lifetimes.arena_plan();
    Ok(EncoderStepPlan {
        peak: b.peak_bytes(),
        peak_with_arena: b.bytes_before_steps() + arena.bytes,
        arena,
    })
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
    let (net, host) = load(spec)?;
    time_loaded(b, &net, &host, spec)
}

fn time_loaded<B: Backend>(
    b: &B,
    net: &LoadedNet,
    host: &ModelParams,
    spec: &EncoderStepSpec,
) -> Result<Vec<EncoderStep>> {
    match net {
        LoadedNet::Transformer(encoder) => time_encoder_steps(
            b,
            encoder,
            |i| host.get(i),
            spec.batch,
            spec.len,
            spec.steps,
        ),
        LoadedNet::Enformer(trunk) => {
            time_enformer_steps(b, trunk, host, spec.batch, spec.len, spec.steps)
        }
    }
}

/// `steps` timed training steps of the Enformer trunk on random one-hot DNA of `seq_len` bp.
fn time_enformer_steps<B: Backend>(
    b: &B,
    trunk: &EnformerTrunk,
    host: &ModelParams,
    batch: usize,
    seq_len: usize,
    steps: usize,
) -> Result<Vec<EncoderStep>> {
    if batch == 0 || steps == 0 {
        return Err(Error::invalid(
            "encoder step",
            "batch and steps must be positive",
        ));
    }
    let bins = trunk.output_bins(seq_len)?;
    let one_hot_len = host_input_elements(&[batch, seq_len, 4])?;
    let n = crate::error::checked_product("encoder step", &[batch, bins, 2 * trunk.cfg.dim])?;
    let params = ParamSet::upload(b, trunk.layout().clone(), |i| host.get(i), true)?;
    host.release_mapped_pages();
    let mut state = TrainState::new(b, params)?;
    // Running statistics are buffers, not trained (learning rate 0), as in PyTorch.
    let (buffers, weights): (Vec<_>, Vec<_>) = trunk
        .layout()
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| (i, e.spec.name.clone()))
        .partition(|(i, _)| trunk.is_buffer(*i));
    let group =
        |name: &str, lr: f32, weight_decay: f32, entries: Vec<(usize, String)>| ParamGroup {
            name: name.into(),
            lr,
            weight_decay,
            params: entries.into_iter().map(|(_, n)| n).collect(),
        };
    let optimizer = AdamW::new(
        trunk.layout(),
        vec![
            group("weights", 1e-4, 0.01, weights),
            group("running statistics", 0.0, 0.0, buffers),
        ],
        0.9,
        0.999,
        1e-8,
    )?;
    let target = Tensor::new(b, Role::Exact, n)?;
    let mut d_emb = Tensor::new(b, Role::Activation, n)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut one_hot = vec![0.0f32; one_hot_len];
    for pos in one_hot.chunks_exact_mut(4) {
        pos[rng.random_range(0..4)] = 1.0;
    }
    let mut acts = EnformerActivations::default();
    timed_steps(b, &mut state, &optimizer, steps, |views, grads| {
        b.zero(d_emb.view_mut())?;
        trunk.forward(
            b,
            views,
            &one_hot,
            batch,
            seq_len,
            &mut acts,
            true,
            BatchNormMode::Train,
        )?;
        let emb: View<'_, B> = acts.embeddings()?;
        let loss = b.mse(emb, target.view())?;
        b.mse_backward(d_emb.view_mut(), emb, target.view(), 1.0)?;
        trunk.backward(b, views, &mut acts, d_emb.view(), grads)?;
        Ok(loss)
    })
}

/// The element count of the host-side batch (token ids, one-hot DNA) of `dims`, refused above
/// [`MAX_INPUT_ELEMENTS`] before anything is allocated: the recording backend plans any size without
/// memory, so the host buffer is the first real allocation a planned step makes.
fn host_input_elements(dims: &[usize]) -> Result<usize> {
    let n = crate::error::checked_product("encoder step", dims)?;
    if n > MAX_INPUT_ELEMENTS {
        return Err(Error::invalid(
            "encoder step",
            format!("a batch of {n} input values is above the limit of {MAX_INPUT_ELEMENTS}; lower --batch or --len"),
        ));
    }
    Ok(n)
}

/// `steps` timed training steps: zeroed gradients, `forward_backward` (which returns the loss), AdamW.
fn timed_steps<B: Backend>(
    b: &B,
    state: &mut TrainState<B>,
    optimizer: &AdamW,
    steps: usize,
    mut forward_backward: impl FnMut(&[View<'_, B>], &mut [ViewMut<'_, B>]) -> Result<f32>,
) -> Result<Vec<EncoderStep>> {
    let mut out = Vec::with_capacity(steps);
    // The steps' own buffers start here (a recording backend plans them; an arena plan places them).
    b.begin_steps()?;
    for i in 0..steps {
        if i == 1 {
            b.warm_step();
        }
        let t0 = Instant::now();
        state.zero_grads(b)?;
        let loss = {
            let (views, mut grads) = state.params_and_grads()?;
            forward_backward(&views, &mut grads)?
        };
        optimizer.step(b, state, 1.0, None)?;
        b.synchronize()?;
        out.push(EncoderStep {
            seconds: t0.elapsed().as_secs_f64(),
            loss,
        });
    }
    Ok(out)
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
    host_input_elements(&[batch, len])?;
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
    timed_steps(b, &mut state, &optimizer, steps, |views, grads| {
        b.zero(dhidden.view_mut())?;
        encoder.forward(b, views, &ids, &lens, len, &mut acts, true)?;
        let loss = b.mse(acts.hidden()?, target.view())?;
        b.mse_backward(dhidden.view_mut(), acts.hidden()?, target.view(), 1.0)?;
        encoder.backward(b, views, &mut acts, dhidden.view(), grads)?;
        Ok(loss)
    })
}
