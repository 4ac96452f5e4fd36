//! Memory of a training or inference step, measured by running the real step on the recording backend
//! (no arithmetic, no weights): parameters, gradients and optimiser moments by category, and the peak of
//! everything the step allocates on top. `isoformer-engine plan` prints it, with the largest batch that fits
//! a budget.
//!
//! What this does not plan yet (the memory-planning issue): buffer lifetimes and reuse across modules, and
//! recompute policies; the figures are what the engine allocates today.

use super::adamw::AdamW;
use super::bench_step::{as_samples, random_sequences};
use super::params::IsoformerParams;
use super::step::{forward_backward, predict, StepBuffers};
use crate::backend::record::RecordingBackend;
use crate::models::isoformer::{
    Isoformer, IsoformerActivations, IsoformerConfig, MAX_INPUT_ELEMENTS,
};
use crate::runtime::DType;
use crate::Result;

#[derive(Clone, Debug)]
pub struct PlanSpec {
    pub config: IsoformerConfig,
    pub batch: usize,
    pub rna_tokens: usize,
    pub protein_tokens: usize,
    pub train: bool,
    /// f32 for the CPU, bf16 for kernel devices.
    pub compute: DType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlanReport {
    /// Trainable parameters (f32 masters, plus their compute copy where the backend has one).
    pub trainable_params: usize,
    /// Frozen encoders' weights (compute dtype).
    pub frozen_params: usize,
    pub gradients: usize,
    pub moments: usize,
    /// Everything the step allocates beyond the above, at its peak (activations, saved statistics,
    /// gradients of activations, LoRA merges, scratch).
    pub step_peak: usize,
}

impl PlanReport {
    pub fn total(&self) -> usize {
        self.trainable_params + self.frozen_params + self.gradients + self.moments + self.step_peak
    }
}

/// Plans one step.
pub fn plan_step(spec: &PlanSpec) -> Result<PlanReport> {
    let model = Isoformer::new(spec.config.clone())?;
    let b = RecordingBackend::new(spec.compute);
    let mut params = IsoformerParams::zeros(&b, &model, spec.train)?;
    let elems = |layout: &crate::runtime::Layout| layout.total_bytes() / 4;
    let compute_size = spec.compute.size_in_bytes();
    let train_elems = elems(params.train_layout());
    let copy = if spec.compute == DType::F32 {
        0
    } else {
        train_elems * compute_size
    };
    let frozen = params
        .frozen
        .as_ref()
        .map_or(0, |f| elems(f.layout()) * compute_size);
    let report_base = PlanReport {
        trainable_params: train_elems * 4 + copy,
        frozen_params: frozen,
        gradients: if spec.train { train_elems * 4 } else { 0 },
        moments: if spec.train { train_elems * 8 } else { 0 },
        step_peak: 0,
    };
    let baseline = b.live_bytes();
    b.reset_peak();
    let (dna, rna, protein) =
        random_sequences(&model, spec.batch, spec.rna_tokens, spec.protein_tokens);
    let inputs = model.prepare_inputs(&as_samples(&dna, &rna, &protein))?;
    if spec.train {
        let targets = vec![0.0f32; spec.batch * model.cfg.num_tissues];
        let mut bufs = StepBuffers::default();
        forward_backward(
            &b,
            &model,
            &mut params,
            &inputs,
            &targets,
            &mut bufs,
            1.0,
            None,
        )?;
        let optimizer = AdamW::single_group(params.train_layout(), 1e-4, 0.0)?;
        params.optimizer_step(&b, &optimizer, 1.0, Some(1.0))?;
    } else {
        predict(
            &b,
            &model,
            &params,
            &inputs,
            &mut IsoformerActivations::default(),
        )?;
    }
    Ok(PlanReport {
        step_peak: b.peak_bytes().saturating_sub(baseline),
        ..report_base
    })
}

/// The largest batch (up to `limit`) whose step fits `budget` bytes, or 0 when even one does not.
pub fn largest_batch(spec: &PlanSpec, budget: usize, limit: usize) -> Result<usize> {
    // A batch's inputs are made on the host for the plan too: stay within what one batch may hold.
    let per_sample = spec.config.dna_sequence_length.saturating_mul(4).max(1);
    let limit = limit.min(MAX_INPUT_ELEMENTS / per_sample).max(1);
    let fits = |batch: usize| -> Result<bool> {
        let s = PlanSpec {
            batch,
            ..spec.clone()
        };
        Ok(plan_step(&s)?.total() <= budget)
    };
    if !fits(1)? {
        return Ok(0);
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while hi <= limit && fits(hi)? {
        lo = hi;
        hi *= 2;
    }
    let mut hi = hi.min(limit + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inference plan holds no gradients or optimiser moments (evaluation and prediction allocate none),
    /// and its step is smaller than a training step's.
    #[test]
    fn inference_plans_no_gradients_or_moments() {
        let config = IsoformerConfig::resolve("demo").unwrap();
        let spec = |train| PlanSpec {
            config: config.clone(),
            batch: 2,
            rna_tokens: 64,
            protein_tokens: 64,
            train,
            compute: DType::F32,
        };
        let (infer, train) = (
            plan_step(&spec(false)).unwrap(),
            plan_step(&spec(true)).unwrap(),
        );
        assert_eq!((infer.gradients, infer.moments), (0, 0));
        assert_eq!(train.gradients, train.trainable_params);
        assert_eq!(train.moments, 2 * train.trainable_params);
        assert!(infer.step_peak > 0 && infer.step_peak < train.step_peak);
    }
}
