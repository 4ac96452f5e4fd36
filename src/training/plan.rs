//! Memory of a training or inference step, measured by running the real step on the recording backend
//! (no arithmetic, no weights): parameters, gradients and optimiser moments by category, and the peak of
//! everything the step allocates on top. `isoformer-engine plan` prints it, with the largest batch that fits
//! a budget.
//!
//! Recompute policies are planned by running the step under each: [`choose_recompute`] picks, for every
//! trained encoder whose config says `auto`, the assignment that fits a budget with the fewest extra
//! FLOPs (counted by the recording backend).

use super::adamw::AdamW;
use super::bench_step::{as_samples, random_sequences, sample_letters};
use super::params::IsoformerParams;
use super::step::{
    optimizer_update, predict, predict_cached, train_micro_step, CachedOutputs, StepBuffers,
};
use crate::backend::cpu::CpuBackend;
use crate::backend::kernel::KernelBackend;
use crate::backend::record::{RecordingBackend, StepLifetimes};
use crate::backend::run_plan::{plan_run, RunArena};
use crate::gpu::emulator::EmuDevice;
use crate::models::isoformer::{
    EncoderMode, Isoformer, IsoformerActivations, IsoformerConfig, Modality, RecomputeChoice,
    MAX_INPUT_ELEMENTS,
};
use crate::models::recompute::Recompute;
use crate::runtime::DType;
use crate::Result;

#[derive(Clone, Debug)]
pub struct PlanSpec {
    pub config: IsoformerConfig,
    pub batch: usize,
    /// RNA and protein lengths in tokens. Above the config's budgets, they raise them: the tokenizers would
    /// cut longer sequences to the budget, so the plan is for a model that reads them (as `bench step`).
    pub rna_tokens: usize,
    pub protein_tokens: usize,
    pub train: bool,
    /// f32 for the CPU, bf16 for kernel devices.
    pub compute: DType,
    /// The dtype of the parameters' compute copy: the compute dtype, except on the CPU's bf16 backend
    /// (bf16 weights, f32 activations).
    pub weights: DType,
    /// Every encoder frozen, their outputs read from the embedding cache: the step runs the aggregator
    /// and head only.
    pub cached: bool,
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
    /// FLOPs of the step's matrix products (linear layers, convolutions, attention), recompute included.
    pub flops: u64,
    /// `step_peak` by module (each encoder, the aggregator and head, and `other`: inputs, targets and
    /// the loss), as live at the peak.
    pub step_by_module: Vec<(String, usize)>,
    /// The step's buffers placed by their lifetimes (offsets reused between buffers never needed at the
    /// same time): the arena a backend given this plan ([`crate::backend::Backend::use_arena`]) allocates.
    pub step_with_reuse: usize,
    /// The most step-buffer bytes needed at one op: no placement can go below it.
    pub step_live_floor: usize,
    /// The backend's own scratch, outside its allocations, at the most any op of the step needs: the
    /// CPU's attention workspace, kernel devices' column buffers and partial sums. A run reserves it once,
    /// before its first step.
    pub scratch: usize,
}

impl PlanReport {
    pub fn total(&self) -> usize {
        self.trainable_params
            + self.frozen_params
            + self.gradients
            + self.moments
            + self.step_peak
            + self.scratch
    }

    /// What the step needs of a budget: the plan plus 5% and 256 MiB for what it does not count (the
    /// process, host-side inputs, a GPU context). Measured RSS
    /// has been 1.02–1.10× the plan.
    pub fn required(&self) -> usize {
        let total = self.total();
        total.saturating_add(total / 20).saturating_add(256 << 20)
    }
}

/// Plans one step.
pub fn plan_step(spec: &PlanSpec) -> Result<PlanReport> {
    Ok(plan_step_with_lifetimes(spec)?.0)
}

/// Plans one step, with the lifetimes and offsets of its buffers.
pub fn plan_step_with_lifetimes(spec: &PlanSpec) -> Result<(PlanReport, StepLifetimes)> {
    let mut config = spec.config.clone();
    config.num_tokens_per_seq_nuctf_rna = config.num_tokens_per_seq_nuctf_rna.max(spec.rna_tokens);
    config.num_protein_tokens_per_seq = config.num_protein_tokens_per_seq.max(spec.protein_tokens);
    let model = Isoformer::new(config)?;
    let b = RecordingBackend::new(spec.compute).with_weight_dtype(spec.weights);
    let mut params = IsoformerParams::zeros(&b, &model, spec.train)?;
    let elems = |layout: &crate::runtime::Layout| layout.total_bytes() / 4;
    let weight_size = spec.weights.size_in_bytes();
    let train_elems = elems(params.train_layout());
    let copy = if spec.weights == DType::F32 {
        0
    } else {
        train_elems * weight_size
    };
    let frozen = params
        .frozen
        .as_ref()
        .map_or(0, |f| elems(f.layout()) * weight_size);
    let report_base = PlanReport {
        trainable_params: train_elems * 4 + copy,
        frozen_params: frozen,
        gradients: if spec.train { train_elems * 4 } else { 0 },
        moments: if spec.train { train_elems * 8 } else { 0 },
        step_peak: 0,
        flops: 0,
        step_by_module: Vec::new(),
        step_with_reuse: 0,
        step_live_floor: 0,
        scratch: 0,
    };
    b.mark_step_buffers();
    let baseline = b.live_bytes();
    b.reset_peak();
    let (dna, rna, protein) =
        random_sequences(&model, spec.batch, spec.rna_tokens, spec.protein_tokens)?;
    let inputs = model.prepare_inputs(&as_samples(&dna, &rna, &protein))?;
    let targets = vec![0.0f32; spec.batch * model.cfg.num_tissues];
    let optimizer = AdamW::single_group(params.train_layout(), 1e-4, 0.0)?;
    let mut bufs = StepBuffers::default();
    let mut acts = IsoformerActivations::default();
    // Cached steps read every encoder's output as the cache gives it, `[batch, len, width]`.
    let cached: Option<CachedOutputs> = spec.cached.then(|| {
        (0..model.encoders.len())
            .map(|e| {
                let (_, len) = model.encoder_output_rows(e, &inputs);
                vec![0.0; spec.batch * len * model.cfg.width(model.encoders[e].modality)]
            })
            .collect()
    });
    let mut step = |params: &mut IsoformerParams<RecordingBackend>| -> Result<()> {
        let c = cached.as_ref();
        match (spec.train, c) {
            (true, _) => {
                train_micro_step(&b, &model, params, &inputs, &targets, &mut bufs, 1.0, c)?;
                optimizer_update(&b, params, &optimizer, 1.0, Some(1.0))?;
            }
            (false, Some(c)) => drop(predict_cached(&b, &model, params, &inputs, &mut bufs, c)?),
            (false, None) => drop(predict(&b, &model, params, &inputs, &mut acts)?),
        }
        Ok(())
    };
    // The first step plans and allocates; the second is what every later step does. The uses of both
    // give the step buffers' lifetimes.
    step(&mut params)?;
    b.step_boundary();
    let flops_before = b.flops();
    step(&mut params)?;
    let lifetimes = b.end_window();
    let flops = b.flops() - flops_before;
    let step_peak = b.peak_bytes().saturating_sub(baseline);
    let mut step_by_module: Vec<(String, usize)> = b
        .bytes_at_peak()
        .into_iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, bytes)| (m.to_string(), bytes))
        .collect();
    let order = |m: &str| {
        model
            .cfg
            .modalities
            .iter()
            .position(|x| x.name() == m)
            .unwrap_or(usize::MAX)
    };
    step_by_module.sort_by_key(|(m, _)| order(m));
    let named: usize = step_by_module.iter().map(|(_, b)| b).sum();
    step_by_module.push(("other".into(), step_peak.saturating_sub(named)));
    let report = PlanReport {
        step_peak,
        flops,
        step_by_module,
        step_with_reuse: lifetimes.arena_bytes(),
        step_live_floor: lifetimes.live_floor(),
        scratch: backend_scratch(spec.compute, &lifetimes),
        ..report_base
    };
    Ok((report, lifetimes))
}

/// The scratch of its own that the backend a plan is for (the CPU for f32 compute, kernel devices for
/// bf16, which the emulator and CUDA share) needs for these steps' ops.
fn backend_scratch(compute: DType, lifetimes: &StepLifetimes) -> usize {
    match compute {
        DType::F32 => lifetimes.scratch_bytes(&CpuBackend::new()),
        _ => lifetimes.scratch_bytes(&KernelBackend::new(EmuDevice::default())),
    }
}

/// The shape of one step of a run: its batch size and its inputs' token counts.
struct StepShape {
    batch: usize,
    rna_tokens: usize,
    protein_tokens: usize,
}

impl std::fmt::Display for StepShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {} with {} RNA and {} protein tokens",
            self.batch, self.rna_tokens, self.protein_tokens
        )
    }
}

/// Plans the step buffers of a training run of `config` whose batches have `batch_sizes` samples: at
/// the largest step the run makes (the largest batch at the config's longest inputs), then checks that
/// this placement also serves its smallest steps (every batch size at the shortest inputs, and at the
/// longest), whose buffers are prefixes of the planned ones ([`plan_run`]). `compute` and `weights` are
/// the backend's dtypes of activations and of the parameters' compute copy.
pub fn plan_run_arena(
    config: &IsoformerConfig,
    batch_sizes: &[usize],
    (compute, weights): (DType, DType),
    train: bool,
    cached: bool,
) -> Result<RunArena> {
    let Some(&largest) = batch_sizes.iter().max() else {
        return Ok(Err("no batches".into()));
    };
    let (rna, protein) = (
        config.num_tokens_per_seq_nuctf_rna,
        config.num_protein_tokens_per_seq,
    );
    let shape = |batch: usize, rna_tokens: usize, protein_tokens: usize| StepShape {
        batch,
        rna_tokens,
        protein_tokens,
    };
    let mut sizes = batch_sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let mut smaller = Vec::new();
    for &batch in &sizes {
        // `<cls>` and one token (NT-v2), `<cls>`, one residue and `<eos>` (ESM-2).
        smaller.push(shape(batch, 2, 3));
        if batch != largest {
            smaller.push(shape(batch, rna, protein));
        }
    }
    plan_run(&shape(largest, rna, protein), &smaller, |s| {
        let spec = PlanSpec {
            config: config.clone(),
            batch: s.batch,
            rna_tokens: s.rna_tokens,
            protein_tokens: s.protein_tokens,
            train,
            compute,
            weights,
            cached,
        };
        Ok(plan_step_with_lifetimes(&spec)?.1)
    })
}

/// The encoders whose recompute policy is `auto` and that a training step runs a backward through
/// (fine-tuned or LoRA; frozen ones keep nothing).
pub fn auto_encoders(config: &IsoformerConfig, train: bool) -> Vec<Modality> {
    config
        .modalities
        .iter()
        .copied()
        .filter(|&m| {
            train
                && config.train.recompute.get(m) == RecomputeChoice::Auto
                && config.train.encoders.get(m) != EncoderMode::Frozen
        })
        .collect()
}

/// `config` with every `auto` encoder of `auto` set to `policies` (same order).
fn with_policies(
    config: &IsoformerConfig,
    auto: &[Modality],
    policies: &[Recompute],
) -> IsoformerConfig {
    let mut c = config.clone();
    for (&m, &p) in auto.iter().zip(policies) {
        let choice = match p {
            Recompute::None => RecomputeChoice::None,
            Recompute::Blocks => RecomputeChoice::Blocks,
        };
        c.train.recompute.set(m, choice);
    }
    c
}

/// `config` with every `auto` encoder of a training step recomputing its blocks: the least memory.
pub fn most_recompute(config: &IsoformerConfig, train: bool) -> IsoformerConfig {
    let auto = auto_encoders(config, train);
    with_policies(config, &auto, &vec![Recompute::Blocks; auto.len()])
}

/// A resolved recompute assignment and its plan.
#[derive(Clone, Debug)]
pub struct RecomputePlan {
    /// The config with every `auto` choice made.
    pub config: IsoformerConfig,
    /// Each modality's policy (frozen encoders: none).
    pub policies: Vec<(Modality, Recompute)>,
    pub report: PlanReport,
    pub fits: bool,
}

/// Of every assignment of policies to the `auto` encoders, the one that fits `budget` with the fewest
/// FLOPs (then the lowest peak); when none fits, the one with the lowest peak, with `fits` false. Also
/// returns every assignment considered, in order.
pub fn choose_recompute(
    spec: &PlanSpec,
    budget: usize,
) -> Result<(RecomputePlan, Vec<RecomputePlan>)> {
    use rayon::prelude::*;
    let auto = auto_encoders(&spec.config, spec.train);
    // The assignments are planned in parallel (each on its own recording backend), then compared in order.
    let candidates: Vec<RecomputePlan> = (0..1usize << auto.len())
        .into_par_iter()
        .map(|code| {
            let policies: Vec<Recompute> = (0..auto.len())
                .map(|i| Recompute::ALL[(code >> i) & 1])
                .collect();
            let config = with_policies(&spec.config, &auto, &policies);
            let report = plan_step(&PlanSpec {
                config: config.clone(),
                ..spec.clone()
            })?;
            let fits = report.required() <= budget;
            Ok(RecomputePlan {
                policies: resolved_policies(&config, spec.train),
                config,
                report,
                fits,
            })
        })
        .collect::<Result<_>>()?;
    let mut best: Option<RecomputePlan> = None;
    let mut all = Vec::new();
    for candidate in candidates {
        let fits = candidate.fits;
        let better = match &best {
            None => true,
            Some(b) => match (fits, b.fits) {
                (true, false) => true,
                (false, true) => false,
                (true, true) => {
                    (candidate.report.flops, candidate.report.total())
                        < (b.report.flops, b.report.total())
                }
                (false, false) => candidate.report.total() < b.report.total(),
            },
        };
        if better {
            best = Some(candidate.clone());
        }
        all.push(candidate);
    }
    Ok((best.expect("at least one assignment"), all))
}

/// Each modality's policy in a step of `config` (frozen encoders and inference keep nothing; `auto`
/// unresolved means none).
fn resolved_policies(config: &IsoformerConfig, train: bool) -> Vec<(Modality, Recompute)> {
    config
        .modalities
        .iter()
        .map(|&m| {
            let trained = train && config.train.encoders.get(m) != EncoderMode::Frozen;
            let p = match config.train.recompute.get(m) {
                RecomputeChoice::Blocks if trained => Recompute::Blocks,
                _ => Recompute::None,
            };
            (m, p)
        })
        .collect()
}

/// The largest batch (up to `limit`) whose step fits `budget` bytes, or 0 when even one does not.
pub fn largest_batch(spec: &PlanSpec, budget: usize, limit: usize) -> Result<usize> {
    // A batch's inputs are made on the host for the plan too: stay within what one batch may hold (its
    // letters, and the DNA's one-hot values).
    let per_sample = spec
        .config
        .dna_sequence_length
        .saturating_mul(4)
        .max(sample_letters(
            &spec.config,
            spec.rna_tokens,
            spec.protein_tokens,
        ))
        .max(1);
    let limit = limit.min(MAX_INPUT_ELEMENTS / per_sample).max(1);
    let fits = |batch: usize| -> Result<bool> {
        let s = PlanSpec {
            batch,
            ..spec.clone()
        };
        Ok(plan_step(&s)?.required() <= budget)
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
    use crate::models::isoformer::Aggregator;

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
            weights: DType::F32,
            cached: false,
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

    /// Lengths above the config's budgets are planned at those lengths, not cut to the budget; a batch
    /// whose letters exceed what one batch may hold is an error, not an allocation.
    #[test]
    fn longer_sequences_than_the_budget_are_planned_and_huge_batches_refused() {
        let config = IsoformerConfig::resolve("demo").unwrap();
        let spec = |rna_tokens, batch| PlanSpec {
            config: config.clone(),
            batch,
            rna_tokens,
            protein_tokens: config.num_protein_tokens_per_seq,
            train: true,
            compute: DType::F32,
            weights: DType::F32,
            cached: false,
        };
        let budget = config.num_tokens_per_seq_nuctf_rna;
        let at = plan_step(&spec(budget, 1)).unwrap();
        let twice = plan_step(&spec(2 * budget, 1)).unwrap();
        assert!(
            twice.step_peak > at.step_peak && twice.flops > at.flops,
            "{budget} tokens: {at:?}; {}: {twice:?}",
            2 * budget
        );
        let e = plan_step(&spec(1 << 20, 1 << 12)).unwrap_err().to_string();
        assert!(
            e.contains("letters") && e.contains("lower the batch"),
            "{e}"
        );
    }

    fn released(rna: usize, protein: usize) -> PlanSpec {
        PlanSpec {
            config: IsoformerConfig::resolve("isoformer").unwrap(),
            batch: 1,
            rna_tokens: rna,
            protein_tokens: protein,
            train: true,
            compute: DType::F32,
            weights: DType::F32,
            cached: false,
        }
    }

    /// Per-block recompute lowers every encoder's planned memory and costs FLOPs (about one forward of
    /// the encoder); the chooser takes no recompute when it fits, the cheapest fitting assignment
    /// otherwise, and says when nothing fits.
    #[test]
    fn recompute_trades_flops_for_memory_and_the_cheapest_fitting_policy_is_chosen() {
        let spec = released(512, 256);
        let none = plan_step(&spec).unwrap();
        let blocks = plan_step(&PlanSpec {
            config: most_recompute(&spec.config, true),
            ..spec.clone()
        })
        .unwrap();
        assert!(blocks.total() < none.total(), "{blocks:?} vs {none:?}");
        assert!(blocks.flops > none.flops);
        // Recompute costs at most one more forward: below 1.5× the step's FLOPs.
        assert!((blocks.flops as f64) < 1.5 * none.flops as f64);
        for module in ["dna", "rna", "protein"] {
            let at = |r: &PlanReport| {
                r.step_by_module
                    .iter()
                    .find(|(m, _)| m == module)
                    .map(|(_, b)| *b)
                    .unwrap()
            };
            assert!(at(&blocks) < at(&none), "{module}");
        }
        let (roomy, all) = choose_recompute(&spec, none.required()).unwrap();
        assert_eq!(all.len(), 8, "three auto encoders: 2³ assignments");
        assert!(roomy.fits);
        assert!(roomy.policies.iter().all(|(_, p)| *p == Recompute::None));
        let (tight, all) = choose_recompute(&spec, none.required() - 1).unwrap();
        assert!(tight.fits && tight.report.total() < none.total());
        assert!(tight.policies.iter().any(|(_, p)| *p == Recompute::Blocks));
        let cheapest = all
            .iter()
            .filter(|c| c.fits)
            .map(|c| c.report.flops)
            .min()
            .unwrap();
        assert_eq!(tight.report.flops, cheapest);
        let (none_fit, _) = choose_recompute(&spec, blocks.required() - 1).unwrap();
        assert!(!none_fit.fits);
        assert_eq!(none_fit.report.total(), blocks.total());
    }

    /// The lifetimes of a real step's buffers (the demo model, training and inference, with and without
    /// recompute): buffers needed at the same op never share a byte, and reuse saves memory.
    #[test]
    fn a_real_steps_buffers_never_overlap_while_alive() {
        let mut config = IsoformerConfig::resolve("demo").unwrap();
        config.train.encoders.dna = EncoderMode::Finetune;
        config.train.encoders.rna = EncoderMode::Finetune;
        for (train, policy) in [
            (true, RecomputeChoice::None),
            (true, RecomputeChoice::Blocks),
            (false, RecomputeChoice::None),
        ] {
            let mut c = config.clone();
            for m in c.modalities.clone() {
                c.train.recompute.set(m, policy);
            }
            let spec = PlanSpec {
                config: c,
                batch: 3,
                rna_tokens: 40,
                protein_tokens: 30,
                train,
                compute: DType::F32,
                weights: DType::F32,
                cached: false,
            };
            let (report, lt) = plan_step_with_lifetimes(&spec).unwrap();
            assert!(lt.sizes.len() > 20, "the step's buffers are seen");
            let meet = |i: usize, j: usize| {
                lt.lives[i]
                    .iter()
                    .any(|a| lt.lives[j].iter().any(|b| a.overlaps(b)))
            };
            for i in 0..lt.sizes.len() {
                for j in i + 1..lt.sizes.len() {
                    let (oi, oj) = (lt.offsets[i], lt.offsets[j]);
                    let collide = oi < oj + lt.sizes[j] && oj < oi + lt.sizes[i];
                    assert!(
                        !(collide && meet(i, j)),
                        "{train} {policy:?}: buffers {i} and {j} overlap while both are needed"
                    );
                }
            }
            assert!(report.step_live_floor <= report.step_with_reuse);
            assert!(
                report.step_with_reuse < report.step_peak,
                "{train} {policy:?}: reuse saves memory ({} vs {})",
                report.step_with_reuse,
                report.step_peak
            );
        }
    }

    /// A run plans its step buffers once, at its largest step, and that placement must serve every
    /// smaller step: for each aggregator, with and without recompute, the steps make each buffer once
    /// at its largest size (none grown within a step), and every batch size and input length below the
    /// largest is admitted.
    #[test]
    fn the_largest_steps_plan_serves_every_smaller_step() {
        for aggregator in [
            Aggregator::CrossAttention,
            Aggregator::ModalityCentred,
            Aggregator::LinearMean,
            Aggregator::Perceiver,
        ] {
            for policy in [RecomputeChoice::None, RecomputeChoice::Blocks] {
                let mut config = IsoformerConfig::resolve("demo").unwrap();
                config.aggregator = aggregator;
                config.num_tokens_per_seq_nuctf_rna = 40;
                config.num_protein_tokens_per_seq = 30;
                for m in config.modalities.clone() {
                    config.train.recompute.set(m, policy);
                }
                let what = format!("{aggregator:?} {policy:?}");
                let spec = |batch, rna_tokens, protein_tokens| PlanSpec {
                    config: config.clone(),
                    batch,
                    rna_tokens,
                    protein_tokens,
                    train: true,
                    compute: DType::F32,
                    weights: DType::F32,
                    cached: false,
                };
                let (_, worst) = plan_step_with_lifetimes(&spec(3, 40, 30)).unwrap();
                assert_eq!(worst.regrown, 0, "{what}: buffers grown within a step");
                for batch in [1, 2, 3] {
                    for (rna, protein) in [(2, 3), (3, 30), (20, 4), (40, 15), (40, 30)] {
                        let (_, small) =
                            plan_step_with_lifetimes(&spec(batch, rna, protein)).unwrap();
                        assert_eq!(
                            worst.admits(&small),
                            Ok(()),
                            "{what}: batch {batch}, {rna} and {protein} tokens"
                        );
                    }
                }
                for train in [true, false] {
                    let run =
                        plan_run_arena(&config, &[3, 3, 1], (DType::F32, DType::F32), train, false)
                            .unwrap();
                    assert!(run.is_ok(), "{what} train {train}: {:?}", run.err());
                }
            }
        }
    }

    /// A policy set in the config is kept: it is not an `auto` choice.
    #[test]
    fn configured_policies_are_not_overridden() {
        let mut spec = released(256, 128);
        spec.config.train.recompute.dna = RecomputeChoice::Blocks;
        spec.config.train.recompute.rna = RecomputeChoice::None;
        let (chosen, all) = choose_recompute(&spec, usize::MAX).unwrap();
        assert_eq!(all.len(), 2, "only the protein encoder is auto");
        assert_eq!(
            chosen.policies,
            vec![
                (Modality::Dna, Recompute::Blocks),
                (Modality::Rna, Recompute::None),
                (Modality::Protein, Recompute::None)
            ]
        );
        let parsed = IsoformerConfig::parse(
            r#"{"train": {"recompute": {"dna": "blocks", "rna": "auto"}}}"#,
            "c.json".as_ref(),
        )
        .unwrap();
        assert_eq!(parsed.train.recompute.dna, RecomputeChoice::Blocks);
        assert_eq!(parsed.train.recompute.protein, RecomputeChoice::Auto);
        let bad = IsoformerConfig::parse(
            r#"{"train": {"recompute": {"dna": "sometimes"}}}"#,
            "c.json".as_ref(),
        );
        assert!(bad.is_err());
    }
}
