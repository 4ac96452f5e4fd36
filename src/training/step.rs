//! One IsoFormer training step's forward and backward, and inference, on any backend: the whole step a
//! reader should see in one place (llm.c's `gpt2_forward` / `gpt2_backward`).
//!
//! ```text
//! forward (encoders keep activations where they train) → predictions [B, tissues]
//! loss = MSE(predictions, targets)            (targets z-scored per tissue with the training statistics)
//! dpred = ∂loss/∂pred · loss_scale             (1/accumulation steps)
//! backward: head → aggregator → each trained encoder, adding into the gradients
//! ```

use super::adamw::{AdamW, StepReport};
use super::cache::EmbeddingCache;
use crate::backend::{Backend, Role, Tensor};
use crate::models::enformer::BatchNormMode;
use crate::models::isoformer::{
    EncoderActs, EncoderNet, EncoderOutput, Isoformer, IsoformerActivations, IsoformerInputs,
};
use crate::{Error, Result};

use super::params::{trainable_flags, IsoformerParams};

/// Activations and loss buffers reused from step to step.
pub struct StepBuffers<B: Backend> {
    pub acts: IsoformerActivations<B>,
    targets: Option<Tensor<B>>,
    dpred: Option<Tensor<B>>,
    /// Encoder outputs read from the embedding cache, per encoder `[batch, len, width]`.
    cached: Vec<Tensor<B>>,
}

impl<B: Backend> Default for StepBuffers<B> {
    fn default() -> Self {
        StepBuffers {
            acts: IsoformerActivations::default(),
            targets: None,
            dpred: None,
            cached: Vec::new(),
        }
    }
}

/// Every encoder's output for one batch on the host, per encoder `[batch, len, width]` (padding rows
/// zero), as the embedding cache holds them.
pub type CachedOutputs = Vec<Vec<f32>>;

/// Every (frozen) encoder's output for this batch, from the embedding cache. With `encoder_acts`, the
/// encoders run for the samples the cache does not hold yet, and those are stored. Without, a missing
/// entry is an error: a planned run fills the cache before its first step ([`fill_embedding_cache`]),
/// so its steps only read it and allocate exactly what the plan recorded.
pub fn cached_encoder_outputs<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    inputs: &IsoformerInputs,
    cache: &mut EmbeddingCache,
    mut encoder_acts: Option<&mut Vec<EncoderActs<B>>>,
) -> Result<CachedOutputs> {
    let views = params.section_views()?;
    let n_enc = model.encoders.len();
    let batch = inputs.batch;
    let mut outputs = Vec::with_capacity(n_enc);
    for (e, encoder_views) in views.iter().enumerate().take(n_enc) {
        let width = model.cfg.width(model.encoders[e].modality);
        let (lens, len) = model.encoder_output_rows(e, inputs);
        let mut host = vec![0.0f32; batch * len * width];
        let mut missing = Vec::new();
        for (i, &rows) in lens.iter().enumerate() {
            let key = model.encoder_input_bytes(e, inputs, i);
            match cache.get(e, &key, rows, width)? {
                Some(values) => {
                    host[i * len * width..(i * len + rows) * width].copy_from_slice(&values)
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let Some(acts) = encoder_acts.as_deref_mut() else {
                return Err(Error::invalid(
                    "embedding cache",
                    format!(
                        "the {} embedding of {} sample(s) of this batch went missing during the run \
                         (was the cache directory cleaned?)",
                        model.encoders[e].modality.name(),
                        missing.len()
                    ),
                ));
            };
            if acts.len() != n_enc {
                *acts = model.fresh_acts();
            }
            model.encode(
                b,
                e,
                encoder_views,
                &inputs.encoded[e],
                batch,
                &mut acts[e],
                false,
                BatchNormMode::Eval,
            )?;
            let out = b.read_f32(model.encoder_hidden(&acts[e])?)?;
            for i in missing {
                let rows = &out[i * len * width..(i * len + lens[i]) * width];
                cache.put(e, &model.encoder_input_bytes(e, inputs, i), rows, width)?;
                host[i * len * width..(i * len + lens[i]) * width].copy_from_slice(rows);
            }
        }
        outputs.push(host);
    }
    Ok(outputs)
}

/// Runs the (frozen) encoders over every batch in `batches` whose embeddings the cache does not hold
/// yet, and stores them: what a run does before its first step, so that its steps only read the cache.
/// The encoders' buffers are freed at the end.
pub fn fill_embedding_cache<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    batches: impl IntoIterator<Item = Result<IsoformerInputs>>,
    cache: &mut EmbeddingCache,
) -> Result<()> {
    let mut encoder_acts = Vec::new();
    for inputs in batches {
        let inputs = inputs?;
        let held = (0..model.encoders.len()).all(|e| {
            (0..inputs.batch).all(|i| cache.contains(e, &model.encoder_input_bytes(e, &inputs, i)))
        });
        if !held {
            cached_encoder_outputs(b, model, params, &inputs, cache, Some(&mut encoder_acts))?;
        }
    }
    Ok(())
}

/// Copies a batch's cached encoder outputs into `bufs.cached`, each buffer made once at its size.
fn upload_cached<B: Backend>(
    b: &B,
    bufs: &mut StepBuffers<B>,
    cached: &CachedOutputs,
) -> Result<()> {
    for (e, host) in cached.iter().enumerate() {
        if e == bufs.cached.len() {
            bufs.cached
                .push(Tensor::new(b, Role::Activation, host.len())?);
        } else {
            bufs.cached[e].ensure(b, Role::Activation, host.len())?;
        }
        b.write_f32(bufs.cached[e].view_mut(), host)?;
    }
    Ok(())
}

fn cached_outputs<'a, B: Backend>(
    model: &Isoformer,
    inputs: &IsoformerInputs,
    cached: &'a [Tensor<B>],
) -> Vec<EncoderOutput<'a, B>> {
    (0..model.encoders.len())
        .map(|e| {
            let (lens, len) = model.encoder_output_rows(e, inputs);
            EncoderOutput {
                modality: model.encoders[e].modality,
                hidden: cached[e].view(),
                lens,
                len,
            }
        })
        .collect()
}

fn ensure<B: Backend>(b: &B, slot: &mut Option<Tensor<B>>, role: Role, n: usize) -> Result<()> {
    match slot {
        Some(t) => t.ensure(b, role, n),
        None => {
            *slot = Some(Tensor::new(b, role, n)?);
            Ok(())
        }
    }
}

/// One micro-batch of a training run, as the trainer, the planner and `bench step` all run it:
/// [`forward_backward`], then [`update_running_stats`] (fine-tuned Enformer trunks). Returns the loss.
#[allow(clippy::too_many_arguments)]
pub fn train_micro_step<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &mut IsoformerParams<B>,
    inputs: &IsoformerInputs,
    targets: &[f32],
    bufs: &mut StepBuffers<B>,
    loss_scale: f32,
    cached: Option<&CachedOutputs>,
) -> Result<f32> {
    let loss = forward_backward(b, model, params, inputs, targets, bufs, loss_scale, cached)?;
    if !loss.is_finite() {
        // Batch statistics of a non-finite forward would poison the running statistics.
        return Ok(loss);
    }
    update_running_stats(b, model, params, bufs)?;
    Ok(loss)
}

/// The optimiser step that closes a group of micro-batches (AdamW on the accumulated gradients, clipped
/// to `max_norm`, the learning rate scaled by `lr_factor`), then zeroed gradients for the next group.
pub fn optimizer_update<B: Backend>(
    b: &B,
    params: &mut IsoformerParams<B>,
    optimizer: &AdamW,
    lr_factor: f32,
    max_norm: Option<f32>,
) -> Result<StepReport> {
    let report = params.optimizer_step(b, optimizer, lr_factor, max_norm)?;
    params.train.zero_grads(b)?;
    Ok(report)
}

/// Forward and backward of one (micro-)batch: returns the MSE loss and adds `loss_scale · ∂loss/∂θ` into
/// the trainable sections' gradients. Fine-tuned Enformer trunks use the batch's batchnorm statistics
/// and copy them for [`update_running_stats`].
/// With `cached` (every encoder frozen), the encoders' outputs are given, as read from the embedding
/// cache ([`cached_encoder_outputs`]), and only the aggregator and head run.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &mut IsoformerParams<B>,
    inputs: &IsoformerInputs,
    targets: &[f32],
    bufs: &mut StepBuffers<B>,
    loss_scale: f32,
    cached: Option<&CachedOutputs>,
) -> Result<f32> {
    let n = inputs.batch * model.cfg.num_tissues;
    if targets.len() != n {
        return Err(Error::shape(
            "training step",
            format!("{} targets for {n} outputs", targets.len()),
        ));
    }
    if let Some(i) = targets.iter().position(|t| !t.is_finite()) {
        return Err(Error::invalid(
            "targets",
            format!("value {} at position {i} is not finite", targets[i]),
        ));
    }
    let flags = trainable_flags(model);
    ensure(b, &mut bufs.targets, Role::Exact, n)?;
    ensure(b, &mut bufs.dpred, Role::Activation, n)?;
    let t = bufs.targets.as_mut().expect("ensured");
    b.write_f32(t.view_mut(), targets)?;
    params.zero_lora_grads(b)?;
    let (views, mut grads) = params.views_and_grads()?;
    let refs: Vec<&[_]> = views.iter().map(Vec::as_slice).collect();
    let n_enc = model.encoders.len();
    if let Some(cached) = cached {
        if flags[..n_enc].iter().any(|&f| f) {
            return Err(Error::invalid(
                "embedding cache",
                "it serves only when every encoder is frozen",
            ));
        }
        upload_cached(b, bufs, cached)?;
        let outputs = cached_outputs(model, inputs, &bufs.cached);
        let top = &mut bufs.acts.aggregate;
        model.aggregate_forward(b, refs[n_enc], &outputs, &inputs.present, top, inputs.batch)?;
        let pred = top.predictions()?;
        let t = bufs.targets.as_ref().expect("ensured").view();
        let loss = b.mse(pred, t)?;
        let dpred = bufs.dpred.as_mut().expect("ensured");
        b.zero(dpred.view_mut())?;
        b.mse_backward(dpred.view_mut(), pred, t, loss_scale)?;
        let g = grads[n_enc]
            .as_deref_mut()
            .ok_or_else(|| Error::invalid("training step", "the aggregator always trains"))?;
        let no_encoder_grads = vec![false; n_enc];
        model.aggregate_backward(
            b,
            refs[n_enc],
            &outputs,
            &inputs.present,
            top,
            inputs.batch,
            dpred.view(),
            g,
            &no_encoder_grads,
        )?;
        return Ok(loss);
    }
    model.forward(b, &refs, inputs, &mut bufs.acts, &flags[..n_enc], true)?;
    let pred = bufs.acts.aggregate.predictions()?;
    let t = bufs.targets.as_ref().expect("ensured").view();
    let loss = b.mse(pred, t)?;
    let dpred = bufs.dpred.as_mut().expect("ensured");
    b.zero(dpred.view_mut())?;
    b.mse_backward(dpred.view_mut(), pred, t, loss_scale)?;
    let mut grad_slots: Vec<Option<&mut [_]>> =
        grads.iter_mut().map(|g| g.as_deref_mut()).collect();
    model.backward(
        b,
        &refs,
        inputs,
        &mut bufs.acts,
        dpred.view(),
        &mut grad_slots,
    )?;
    drop(grad_slots);
    drop(refs);
    drop(grads);
    drop(views);
    // LoRA encoders: their merged weights' gradients become the adapters'.
    params.lora_backward(b)?;
    Ok(loss)
}

/// Folds the batch statistics of the latest training forward into every fine-tuned Enformer's running
/// statistics (PyTorch's momentum update).
pub fn update_running_stats<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &mut IsoformerParams<B>,
    bufs: &StepBuffers<B>,
) -> Result<()> {
    for (e, enc) in model.encoders.iter().enumerate() {
        // Only fine-tuned trunks run on batch statistics (their weights are in the train state).
        let (EncoderNet::Enformer(trunk), Some(EncoderActs::Enformer(acts)), true) = (
            &enc.net,
            bufs.acts.encoders.get(e),
            params.placement[e].trainable,
        ) else {
            continue;
        };
        let start = params.placement[e].start;
        let entries = trunk.running_stat_entries();
        let mut updates = params.train.update_views()?;
        // Pull out (mean, var) master views of every batchnorm, in block order.
        let mut running = Vec::with_capacity(entries.len());
        let mut taken: Vec<Option<_>> = updates.drain(..).map(|u| Some(u.master)).collect();
        for &(m, v) in &entries {
            let mean = taken[start + m].take().expect("distinct entries");
            let var = taken[start + v].take().expect("distinct entries");
            running.push((mean, var));
        }
        trunk.update_running_stats(b, acts, &mut running)?;
        drop(running);
        drop(taken);
        // The compute copy must follow the master (kernel devices keep both).
        let mut updates = params.train.update_views()?;
        for &(m, v) in &entries {
            for i in [start + m, start + v] {
                let u = &mut updates[i];
                if let Some(c) = u.compute.as_mut() {
                    b.copy(c.rb(), u.master.view())?;
                }
            }
        }
    }
    Ok(())
}

/// Predictions `[batch, tissues]` (normalised units) of an inference forward: batchnorm uses the running
/// statistics, nothing is kept for a backward.
pub fn predict<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    inputs: &IsoformerInputs,
    acts: &mut IsoformerActivations<B>,
) -> Result<Vec<f32>> {
    let views = params.section_views()?;
    let refs: Vec<&[_]> = views.iter().map(Vec::as_slice).collect();
    let eval = vec![false; model.encoders.len()];
    model.forward(b, &refs, inputs, acts, &eval, false)?;
    b.read_f32(acts.aggregate.predictions()?)
}

/// [`predict`] with the encoders' outputs given, as read from the embedding cache (every encoder frozen).
pub fn predict_cached<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    inputs: &IsoformerInputs,
    bufs: &mut StepBuffers<B>,
    cached: &CachedOutputs,
) -> Result<Vec<f32>> {
    let views = params.section_views()?;
    upload_cached(b, bufs, cached)?;
    let outputs = cached_outputs(model, inputs, &bufs.cached);
    let n_enc = model.encoders.len();
    let top = &mut bufs.acts.aggregate;
    model.aggregate_forward(
        b,
        &views[n_enc],
        &outputs,
        &inputs.present,
        top,
        inputs.batch,
    )?;
    b.read_f32(top.predictions()?)
}
