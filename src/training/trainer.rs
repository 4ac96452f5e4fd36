//! The training run: data, parameters, the step loop with gradient accumulation, the schedule, evaluation
//! with early stopping, checkpoints and metrics. Generic over the backend; the CLI picks it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::adamw::{AdamW, ParamGroup};
use super::cache::EmbeddingCache;
use super::checkpoint::{self, Checkpoint, TrainProgress};
use super::metrics::{evaluate, show, SplitMetrics};
use super::params::{is_lora_name, trainable_flags, IsoformerParams};
use super::plan::{choose_recompute, plan_run_arena, PlanSpec};
use super::plots;
use super::schedule::lr_factor;
use super::step::{
    cached_encoder_outputs, fill_embedding_cache, optimizer_update, predict, predict_cached,
    train_micro_step, StepBuffers,
};
use crate::backend::run_plan::begin_run;
use crate::backend::Backend;
use crate::data::loader::epoch_plan;
use crate::data::{DataConfig, Dataset, Loader, LoaderConfig, RowRef, Sample, Split, TargetStats};
use crate::models::isoformer::init::initial_sections;
use crate::models::isoformer::{Isoformer, IsoformerActivations, IsoformerConfig, SampleSeqs};
use crate::models::recompute::Recompute;
use crate::runtime::output::write_atomically;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub config: IsoformerConfig,
    pub data_dir: PathBuf,
    pub out_dir: PathBuf,
    pub resume: Option<PathBuf>,
    /// Optimiser steps in total (a resumed run counts the steps already taken).
    pub max_steps: Option<usize>,
    pub progress_bar: bool,
    /// Where the embeddings of frozen encoders are cached (default: the user cache directory).
    pub cache_dir: Option<PathBuf>,
    /// Refuse, before any work, a configuration whose planned step (longest inputs) exceeds this many bytes.
    pub memory_budget: Option<usize>,
    /// Take the step buffers from one arena planned for the run's largest step (when encoders run in
    /// the step; steps that read cached embeddings allocate theirs one by one).
    pub planned_arena: bool,
    /// Skip (and count) malformed dataset rows instead of stopping at the first.
    pub skip_bad_rows: bool,
}

pub struct TrainOutcome {
    pub steps: usize,
    pub validation: Option<SplitMetrics>,
    pub test: Option<SplitMetrics>,
    pub train_losses: Vec<f32>,
}

/// The dataset as the model reads it: windows of its DNA length, RNA and protein cropped to its budgets.
pub fn open_dataset(
    cfg: &IsoformerConfig,
    data_dir: &Path,
    skip_bad_rows: bool,
) -> Result<Arc<Dataset>> {
    let mut dc = DataConfig::new(data_dir);
    dc.dna_len = cfg.dna_sequence_length;
    dc.rna_max_len = cfg.rna_letters();
    dc.protein_max_len = cfg.protein_residues();
    dc.skip_bad_rows = skip_bad_rows;
    let ds = Dataset::open(dc)?;
    let r = ds.report();
    if r.bad_rows > 0 {
        eprintln!(
            "skipped {} bad row(s) of {}; the first: {}",
            r.bad_rows,
            data_dir.display(),
            r.bad_examples.first().map_or("", String::as_str)
        );
    }
    if ds.tissues().len() != cfg.num_tissues {
        return Err(Error::invalid(
            "dataset",
            format!(
                "{} has {} tissue columns, the config predicts num_tissues = {}",
                data_dir.display(),
                ds.tissues().len(),
                cfg.num_tissues
            ),
        ));
    }
    Ok(Arc::new(ds))
}

fn seqs(batch: &[Sample]) -> Vec<SampleSeqs<'_>> {
    batch
        .iter()
        .map(|s| SampleSeqs {
            dna: &s.dna,
            rna: &s.rna,
            protein: s.protein.as_deref(),
        })
        .collect()
}

/// AdamW groups: the aggregator and head at `lr`, fine-tuned encoders at `encoder_lr`; decay only on
/// matrices; running statistics never move.
fn param_groups<B: Backend>(model: &Isoformer, params: &IsoformerParams<B>) -> Result<AdamW> {
    let t = &model.cfg.train;
    let mut groups: Vec<ParamGroup> = [
        "aggregator",
        "aggregator-no-decay",
        "encoders",
        "encoders-no-decay",
        "running-statistics",
    ]
    .iter()
    .map(|n| ParamGroup {
        name: (*n).into(),
        lr: 0.0,
        weight_decay: 0.0,
        params: Vec::new(),
    })
    .collect();
    groups[0].lr = t.lr;
    groups[0].weight_decay = t.weight_decay;
    groups[1].lr = t.lr;
    groups[2].lr = t.encoder_lr;
    groups[2].weight_decay = t.weight_decay;
    groups[3].lr = t.encoder_lr;
    let sections = model.sections();
    for &s in &params.trainable_sections {
        let top = s == sections.len() - 1;
        for (i, e) in sections[s].layout.entries().iter().enumerate() {
            let name = format!("{}{}", sections[s].prefix, e.spec.name);
            let matrix = e.spec.shape.dims().len() >= 2;
            let g = if model.is_buffer(s, i) {
                4
            } else {
                match (top, matrix) {
                    (true, true) => 0,
                    (true, false) => 1,
                    (false, true) => 2,
                    (false, false) => 3,
                }
            };
            groups[g].params.push(name);
        }
    }
    // LoRA adapters train at the encoders' rate, with decay (both are matrices).
    for e in params.train_layout().entries() {
        if is_lora_name(&e.spec.name) {
            groups[2].params.push(e.spec.name.clone());
        }
    }
    groups.retain(|g| !g.params.is_empty());
    AdamW::new(params.train_layout(), groups, t.beta1, t.beta2, t.adam_eps)
}

/// Transcript ids, predictions and targets (row-major `[samples, tissues]`, original units), and the loss
/// in normalised units.
pub type SplitPredictions = (Vec<String>, Vec<f32>, Vec<f32>, f64);

/// Predictions (original units) and targets (original units) of a split, and the loss in normalised units.
pub fn predict_split<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    data: &Arc<Dataset>,
    split: Split,
    stats: &TargetStats,
    cache: Option<&mut EmbeddingCache>,
) -> Result<SplitPredictions> {
    let (mut ids, mut preds, mut truth) = (Vec::new(), Vec::new(), Vec::new());
    let loss = predict_split_batches(
        b,
        model,
        params,
        data,
        split,
        stats,
        cache,
        |batch_ids, p, t| {
            ids.extend_from_slice(batch_ids);
            preds.extend_from_slice(p);
            truth.extend_from_slice(t);
            Ok(())
        },
    )?;
    Ok((ids, preds, truth, loss))
}

/// Predicts a split batch by batch, in file order, handing each batch's ids, predictions and targets
/// (original units, row-major) to `sink` as soon as it is done, so memory does not grow with the split.
/// Returns the loss in normalised units.
#[allow(clippy::too_many_arguments)]
pub fn predict_split_batches<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    data: &Arc<Dataset>,
    split: Split,
    stats: &TargetStats,
    mut cache: Option<&mut EmbeddingCache>,
    mut sink: impl FnMut(&[String], &[f32], &[f32]) -> Result<()>,
) -> Result<f64> {
    let rows = data.split_rows(split);
    let mut lc = LoaderConfig::new(split, model.cfg.train.batch_size);
    lc.shuffle = false;
    lc.bucket_by_length = false;
    let plan = epoch_plan(&rows, &lc);
    let ds = data.clone();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = ProgressBar::new(rows.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} transcripts  {per_sec}  ETA {eta}")
                .expect("valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    if let Some(c) = cache.as_deref_mut() {
        fill_cache_for(b, model, params, data, &plan, c)?;
    }
    let sizes: Vec<usize> = plan.iter().map(Vec::len).collect();
    begin_planned_steps(b, &model.cfg, &sizes, false, cache.is_some())?;
    let loader = Loader::spawn(plan, 4, move |r| ds.sample(r))?;
    let mut acts = IsoformerActivations::default();
    let mut bufs = StepBuffers::default();
    let (mut sq, mut count) = (0.0f64, 0usize);
    let t = model.cfg.num_tissues;
    for batch in loader {
        let batch = batch?;
        let inputs = model.prepare_inputs(&seqs(&batch.samples))?;
        let mut p = match cache.as_deref_mut() {
            Some(c) => {
                let cached = cached_encoder_outputs(b, model, params, &inputs, c, None)?;
                predict_cached(b, model, params, &inputs, &mut bufs, &cached)?
            }
            None => predict(b, model, params, &inputs, &mut acts)?,
        };
        let mut truth = Vec::with_capacity(p.len());
        for (i, s) in batch.samples.iter().enumerate() {
            let mut norm_t = s.targets.clone();
            stats.normalize(&mut norm_t);
            let row = &mut p[i * t..(i + 1) * t];
            sq += row
                .iter()
                .zip(&norm_t)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            stats.denormalize(row);
            truth.extend_from_slice(&s.targets);
        }
        count += p.len();
        let ids: Vec<String> = batch
            .samples
            .iter()
            .map(|s| s.transcript_id.clone())
            .collect();
        sink(&ids, &p, &truth)?;
        bar.inc(batch.samples.len() as u64);
        // The first batch made every buffer; an arena, if any, has placed them.
        b.warm_step();
    }
    b.warm_step();
    bar.finish_and_clear();
    Ok(sq / count.max(1) as f64)
}

pub fn evaluate_split<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    data: &Arc<Dataset>,
    split: Split,
    stats: &TargetStats,
    cache: Option<&mut EmbeddingCache>,
) -> Result<Option<SplitMetrics>> {
    if data.split_rows(split).is_empty() {
        return Ok(None);
    }
    let (_, pred, truth, loss) = predict_split(b, model, params, data, split, stats, cache)?;
    Ok(Some(evaluate(&pred, &truth, data.tissues(), loss)))
}

/// The way out of a run whose numbers stopped being finite.
const DIVERGED: &str =
    ", so the weights have diverged: lower train.lr or train.encoder_lr, or keep \
     train.max_grad_norm small";

/// Runs a training job; writes `last.safetensors`, `best.safetensors`, `metrics.json` and `config.json` into
/// the output directory.
pub fn train<B: Backend>(b: &B, opts: &TrainOptions) -> Result<TrainOutcome> {
    if opts.max_steps == Some(0) {
        return Err(Error::invalid(
            "--max-steps",
            "0 trains nothing; give at least 1 (`eval` evaluates a checkpoint)",
        ));
    }
    let resume = opts.resume.as_deref().map(Checkpoint::load).transpose()?;
    if let (Some(ck), Some(max)) = (&resume, opts.max_steps) {
        // `--max-steps` counts every step of the run, so a checkpoint past it cannot be brought back.
        if max < ck.progress.step {
            return Err(Error::invalid(
                "--max-steps",
                format!(
                    "{max} is below the checkpoint's step {}: a resumed run cannot go back; give more \
                     steps, or evaluate the checkpoint with `eval`",
                    ck.progress.step
                ),
            ));
        }
    }
    let cfg = match &resume {
        Some(ck) => ck.config.clone(),
        None => opts.config.clone(),
    };
    let mut model = Isoformer::new(cfg.clone())?;
    // The config as the steps run it: `auto` recompute choices made.
    let mut planned_config = cfg.clone();
    if let Some(budget) = opts.memory_budget {
        let spec = PlanSpec {
            config: cfg.clone(),
            batch: cfg.train.batch_size,
            rna_tokens: cfg.num_tokens_per_seq_nuctf_rna,
            protein_tokens: cfg.num_protein_tokens_per_seq,
            train: true,
            compute: b.compute_dtype(),
            weights: b.weight_dtype(),
            // Conservative: the frozen encoders run (to fill the cache) outside the steps.
            cached: false,
        };
        // Encoders set to `auto` get the recompute policy that fits with the fewest extra FLOPs.
        let (chosen, _) = choose_recompute(&spec, budget)?;
        let r = &chosen.report;
        if !chosen.fits {
            let gib = |x: usize| x as f64 / 1024f64.powi(3);
            return Err(Error::invalid(
                "memory",
                format!(
                    "a training step of '{}' at batch {} with the longest inputs needs {:.2} GiB at its peak \
                     (parameters {:.2}, gradients and moments {:.2}, activations {:.2}; {:.2} with headroom for \
                     the process), more than the {:.2} GiB available even with per-block recompute where the \
                     config allows it; lower \
                     train.batch_size or the token budgets, or freeze encoders (`isoformer-engine plan` \
                     shows the numbers)",
                    cfg.name,
                    spec.batch,
                    gib(r.total()),
                    gib(r.trainable_params + r.frozen_params),
                    gib(r.gradients + r.moments),
                    gib(r.step_peak),
                    gib(r.required()),
                    gib(budget)
                ),
            ));
        }
        for &(m, policy) in &chosen.policies {
            model.set_recompute(m, policy);
        }
        planned_config = chosen.config.clone();
        if chosen.policies.iter().any(|(_, p)| *p != Recompute::None) {
            let list: Vec<String> = chosen
                .policies
                .iter()
                .map(|(m, p)| format!("{} {}", m.name(), p.name()))
                .collect();
            eprintln!(
                "recompute: {} (a step needs {:.2} GiB of the {:.2} GiB budget)",
                list.join(", "),
                r.total() as f64 / 1024f64.powi(3),
                budget as f64 / 1024f64.powi(3)
            );
        }
    }
    let data = open_dataset(&cfg, &opts.data_dir, opts.skip_bad_rows)?;
    let train_rows = data.split_rows(Split::Train);
    if train_rows.is_empty() {
        let r = data.report();
        return Err(Error::invalid(
            "dataset",
            format!(
                "{} has no training rows: of {} rows read, {} are in the training split; {} windows of {} bp \
                 were dropped for leaving their chromosome (in the TSV layout: DNA shorter than the window, \
                 dna_sequence_length) and {} rows were malformed (`data check` lists them)",
                opts.data_dir.display(),
                r.rows_read,
                r.rows_per_split[Split::Train as usize],
                r.edge_dropped,
                cfg.dna_sequence_length,
                r.bad_rows
            ),
        ));
    }
    if let Some(note) = data.report().expression_note(data.tissues()) {
        eprintln!("note: {note}");
    }
    if data.split_rows(Split::Validation).is_empty() {
        eprintln!(
            "note: {} has no validation rows: no validation between epochs and no early stopping; \
             best.safetensors is the last checkpoint",
            opts.data_dir.display()
        );
    }
    crate::runtime::output::create_output_dir(&opts.out_dir)?;
    // Held until the run ends: a second run into the same folder is refused rather than interleaved.
    let _out_lock = crate::runtime::output::lock_output_dir(&opts.out_dir)?;
    write_atomically(&opts.out_dir.join("config.json"), cfg.to_json().as_bytes())?;

    let t = &cfg.train;
    let (host, mut progress) = match &resume {
        Some(ck) => (ck.sections(&model)?, ck.progress.clone()),
        None => {
            let stats = data.train_target_stats().cloned().ok_or_else(|| {
                Error::invalid(
                    "dataset",
                    "fewer than two training rows: no target statistics",
                )
            })?;
            (
                initial_sections(&model, t.seed)?,
                TrainProgress {
                    step: 0,
                    epoch: 0,
                    batch_in_epoch: 0,
                    seed: t.seed,
                    train_losses: Vec::new(),
                    val_losses: Vec::new(),
                    best_val_loss: None,
                    evals_since_best: 0,
                    target_mean: stats.mean.clone(),
                    target_std: stats.std.clone(),
                    tissues: data.tissues().to_vec(),
                },
            )
        }
    };
    if let Some(why) = crate::data::tissue_mismatch(&progress.tissues, data.tissues()) {
        return Err(Error::invalid(
            "--resume",
            format!("{}: {why}", opts.data_dir.display()),
        ));
    }
    // The training targets' statistics fingerprint the training split: a resume on other data is allowed
    // (it is how a checkpoint is fine-tuned further), but it is then not the checkpoint's run continued.
    if resume.is_some() && data.train_target_stats() != Some(&progress.target_stats()) {
        eprintln!(
            "note: the training split of {} differs from the checkpoint's (its targets' statistics differ): \
             the run continues on this data, with the checkpoint's target normalisation, and is not \
             bit-identical to the checkpoint's run continued",
            opts.data_dir.display()
        );
    }
    let stats = progress.target_stats();
    let lora = resume.as_ref().map(|ck| ck.lora_values());
    let mut params = IsoformerParams::upload_with_lora(b, &model, &host, lora.as_ref())?;
    // Frozen encoders compute each sequence's embedding once; the cache is keyed by their weights.
    let all_frozen = !trainable_flags(&model)[..model.encoders.len()]
        .iter()
        .any(|&t| t);
    let mut cache = if all_frozen {
        let dir = opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| crate::data::fasta::default_cache_dir().join("embeddings"));
        Some(EmbeddingCache::new(&dir, &model, &host)?)
    } else {
        None
    };
    drop(host);
    if let Some(ck) = &resume {
        ck.restore_moments(b, &mut params)?;
    }
    let optimizer = param_groups(&model, &params)?;

    let mut lc = LoaderConfig::new(Split::Train, t.batch_size);
    lc.seed = progress.seed;
    let batches_per_epoch = epoch_plan(&train_rows, &lc).len();
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum_steps);
    let total_steps = steps_per_epoch * t.epochs;
    let stop_at = opts.max_steps.map_or(total_steps, |m| m.min(total_steps));
    if resume.is_some() && progress.step >= stop_at {
        eprintln!(
            "note: the checkpoint is at step {} of this run's {stop_at}: nothing more to train; its \
             evaluation follows",
            progress.step
        );
    }

    let bar = if opts.progress_bar {
        let bar = ProgressBar::new(stop_at as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {per_sec}  loss {msg}  ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(progress.step as u64);
        bar
    } else {
        ProgressBar::hidden()
    };
    // The step buffers start here: placed by the plan when there is one. Frozen encoders' embeddings
    // are all cached first, so that the steps only read them.
    let first_epoch = epoch_plan(&train_rows, &lc);
    if let Some(c) = cache.as_mut() {
        fill_cache_for(b, &model, &params, &data, &first_epoch, c)?;
    }
    if opts.planned_arena {
        let sizes: Vec<usize> = first_epoch.iter().map(Vec::len).collect();
        let line = begin_planned_steps(b, &planned_config, &sizes, true, cache.is_some())?;
        eprintln!("step buffers: {line}");
    } else {
        b.begin_steps()?;
    }
    let mut stepped = false;
    let mut bufs = StepBuffers::default();
    let mut stopped_early = false;
    let started = Instant::now();
    let last_path = opts.out_dir.join("last.safetensors");
    let best_path = opts.out_dir.join("best.safetensors");
    let ctx = RunContext {
        model: &model,
        data: &data,
        stats: &stats,
        best_path: &best_path,
    };
    'epochs: while progress.epoch < t.epochs && progress.step < stop_at {
        lc.epoch = progress.epoch as u64;
        let plan = epoch_plan(&train_rows, &lc);
        let skip = progress.batch_in_epoch;
        let ds = data.clone();
        let norm = stats.clone();
        let loader = Loader::spawn(plan[skip.min(plan.len())..].to_vec(), 4, move |r| {
            let mut s = ds.sample(r)?;
            norm.normalize(&mut s.targets);
            Ok(s)
        })?;
        params.train.zero_grads(b)?;
        let (mut micro, mut loss_sum) = (0usize, 0.0f32);
        let n_batches = plan.len();
        for (k, batch) in loader.enumerate() {
            let batch = batch?;
            let index = skip + k;
            let inputs = model.prepare_inputs(&seqs(&batch.samples))?;
            let targets: Vec<f32> = batch
                .samples
                .iter()
                .flat_map(|s| s.targets.iter().copied())
                .collect();
            // The last group of an epoch may be short: scale by its real size.
            let group = t
                .grad_accum_steps
                .min(n_batches - (index - index % t.grad_accum_steps));
            let cached = match cache.as_mut() {
                Some(c) => Some(cached_encoder_outputs(
                    b, &model, &params, &inputs, c, None,
                )?),
                None => None,
            };
            let loss = train_micro_step(
                b,
                &model,
                &mut params,
                &inputs,
                &targets,
                &mut bufs,
                1.0 / group as f32,
                cached.as_ref(),
            )
            .map_err(|e| {
                // Named by step, as the loss check below: a forward that overflowed (the MSE refuses a
                // non-finite prediction) means the previous updates diverged.
                let hint = if matches!(e, Error::NonFinite { .. }) {
                    format!("; the forward overflowed{DIVERGED}")
                } else {
                    String::new()
                };
                Error::invalid(
                    "training",
                    format!(
                        "step {} (epoch {}, batch {index}): {e}{hint}",
                        progress.step + 1,
                        progress.epoch
                    ),
                )
            })?;
            if !loss.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!(
                        "the loss is {loss} at step {} (epoch {}, batch {index}){DIVERGED}",
                        progress.step + 1,
                        progress.epoch
                    ),
                ));
            }
            loss_sum += loss / group as f32;
            micro += 1;
            if micro < group {
                continue;
            }
            let factor = lr_factor(
                progress.step + 1,
                t.warmup_steps,
                total_steps,
                t.min_lr_ratio,
            );
            optimizer_update(b, &mut params, &optimizer, factor, t.max_grad_norm).map_err(|e| {
                Error::invalid("training", format!("step {}: {e}", progress.step + 1))
            })?;
            if !stepped {
                // Every step buffer is made: later allocations (evaluations) come from the heap.
                b.warm_step();
                stepped = true;
            }
            progress.step += 1;
            progress.batch_in_epoch = index + 1;
            progress.train_losses.push(loss_sum);
            bar.set_position(progress.step as u64);
            bar.set_message(format!("{loss_sum:.4}"));
            micro = 0;
            loss_sum = 0.0;
            let eval_now = t.eval_every_steps.is_some_and(|n| progress.step % n == 0);
            if eval_now && validate(b, &ctx, &params, &mut progress, cache.as_mut(), &bar)? {
                stopped_early = true;
                break 'epochs;
            }
            // At the epoch's last batch the loop ends by itself, so the epoch's validation still runs.
            if progress.step >= stop_at && index + 1 < n_batches {
                break 'epochs;
            }
        }
        progress.epoch += 1;
        progress.batch_in_epoch = 0;
        if t.eval_every_steps.is_none()
            && validate(b, &ctx, &params, &mut progress, cache.as_mut(), &bar)?
        {
            stopped_early = true;
            break;
        }
        checkpoint::save(&last_path, b, &model, &params, &progress)?;
    }
    b.warm_step();
    checkpoint::save(&last_path, b, &model, &params, &progress)?;
    if progress.best_val_loss.is_none() || !best_path.is_file() {
        // No validation has kept a best here (`--max-steps` stopped the first epoch, there is no
        // validation split, or a resume into a new directory stopped before validating): the last
        // checkpoint is the best one known, so the output directory always holds both, and a stale copy
        // from an earlier stop is replaced. `progress` is untouched, so a later resume validates and keeps
        // its best exactly as an uninterrupted run does.
        checkpoint::save(&best_path, b, &model, &params, &progress)?;
    }
    bar.finish_and_clear();
    eprintln!(
        "trained {} steps in {:.1} s{}",
        progress.step,
        started.elapsed().as_secs_f64(),
        if stopped_early {
            " (early stop: no better validation loss)"
        } else {
            ""
        }
    );
    // Final metrics with the best checkpoint.
    if best_path.is_file() {
        let ck = Checkpoint::load(&best_path)?;
        params = ck.upload(b, &model)?;
    }
    let validation = evaluate_split(
        b,
        &model,
        &params,
        &data,
        Split::Validation,
        &stats,
        cache.as_mut(),
    )?;
    let test = evaluate_split(
        b,
        &model,
        &params,
        &data,
        Split::Test,
        &stats,
        cache.as_mut(),
    )?;
    if let Some(c) = &cache {
        eprintln!("embedding cache: {} hits, {} misses", c.hits, c.misses);
    }
    let mut json = serde_json::Map::new();
    if let Some(v) = &validation {
        json.insert("validation".into(), v.to_json());
    }
    if let Some(v) = &test {
        json.insert("test".into(), v.to_json());
    }
    json.insert("steps".into(), serde_json::json!(progress.step));
    json.insert(
        "train_loss".into(),
        serde_json::json!(progress.train_losses),
    );
    json.insert(
        "validation_loss".into(),
        serde_json::json!(progress.val_losses),
    );
    let text =
        serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("serialisable");
    write_atomically(&opts.out_dir.join("metrics.json"), text.as_bytes())?;
    plots::loss_curves(
        &opts.out_dir.join("loss.png"),
        &progress.train_losses,
        &progress.val_losses,
    )?;
    if let Some(m) = test.as_ref().or(validation.as_ref()) {
        let split = if test.is_some() { "test" } else { "validation" };
        plots::r2_bars(
            &opts.out_dir.join("r2_per_tissue.png"),
            &format!(
                "R² per tissue ({split}; mean {} over {} tissues)",
                show(m.r2_mean),
                m.tissues_evaluated()
            ),
            &m.r2,
        )?;
    }
    Ok(TrainOutcome {
        steps: progress.step,
        validation,
        test,
        train_losses: progress.train_losses,
    })
}

/// Starts a run of steps on `b` (training steps, or inference forwards when not `train`) whose batches
/// have `batch_sizes` samples, reading the encoders' outputs from the embedding cache when `cached`: the
/// step buffers come from one arena planned for the largest step when that placement serves every step
/// of the run ([`plan_run_arena`]), else one by one. Returns which, for the user.
pub fn begin_planned_steps<B: Backend>(
    b: &B,
    config: &IsoformerConfig,
    batch_sizes: &[usize],
    train: bool,
    cached: bool,
) -> Result<String> {
    let dtypes = (b.compute_dtype(), b.weight_dtype());
    let plan = plan_run_arena(config, batch_sizes, dtypes, train, cached)?;
    begin_run(b, plan)
}

/// Fills the embedding cache for the batches of `plan` (rows of `data`) before a run, so that the run's
/// steps only read it.
fn fill_cache_for<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    data: &Arc<Dataset>,
    plan: &[Vec<RowRef>],
    cache: &mut EmbeddingCache,
) -> Result<()> {
    let ds = data.clone();
    let loader = Loader::spawn(plan.to_vec(), 4, move |r| ds.sample(r))?;
    let batches = loader.map(|batch| model.prepare_inputs(&seqs(&batch?.samples)));
    fill_embedding_cache(b, model, params, batches, cache)
}

/// What an evaluation during training reads.
struct RunContext<'a> {
    model: &'a Isoformer,
    data: &'a Arc<Dataset>,
    stats: &'a TargetStats,
    best_path: &'a Path,
}

/// Evaluates on the validation split, keeps the best checkpoint, and says whether patience ran out.
fn validate<B: Backend>(
    b: &B,
    ctx: &RunContext<'_>,
    params: &IsoformerParams<B>,
    progress: &mut TrainProgress,
    cache: Option<&mut EmbeddingCache>,
    bar: &ProgressBar,
) -> Result<bool> {
    let (model, data, stats, best_path) = (ctx.model, ctx.data, ctx.stats, ctx.best_path);
    let Some(m) = evaluate_split(b, model, params, data, Split::Validation, stats, cache)? else {
        return Ok(false);
    };
    progress.val_losses.push((progress.step, m.loss));
    let line = format!(
        "step {:>6}  validation loss {:.4}  R² {}  Pearson {}  Spearman {}",
        progress.step,
        m.loss,
        show(m.r2_mean),
        show(m.pearson_mean),
        show(m.spearman_mean)
    );
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
    if progress.best_val_loss.is_none_or(|best| m.loss < best) {
        progress.best_val_loss = Some(m.loss);
        progress.evals_since_best = 0;
        checkpoint::save(best_path, b, model, params, progress)?;
    } else {
        progress.evals_since_best += 1;
    }
    Ok(model
        .cfg
        .train
        .patience
        .is_some_and(|p| progress.evals_since_best >= p))
}
