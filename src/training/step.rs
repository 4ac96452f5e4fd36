//! One IsoFormer training step's forward and backward, and inference, on any backend: the whole step a
//! reader should see in one place (llm.c's `gpt2_forward` / `gpt2_backward`).
//!
//! ```text
//! forward (encoders keep activations where they train) → predictions [B, tissues]
//! loss = MSE(predictions, targets)            (targets z-scored per tissue with the training statistics)
//! dpred = ∂loss/∂pred · loss_scale             (1/accumulation steps)
//! backward: head → aggregator → each trained encoder, adding into the gradients
//! ```

use crate::backend::{Backend, Role, Tensor};
use crate::models::enformer::BatchNormMode;
use crate::models::isoformer::{
    EncoderActs, EncoderNet, Isoformer, IsoformerActivations, IsoformerInputs,
};
use crate::{Error, Result};

use super::params::{trainable_flags, IsoformerParams};

/// Activations and loss buffers reused from step to step.
pub struct StepBuffers<B: Backend> {
    pub acts: IsoformerActivations<B>,
    targets: Option<Tensor<B>>,
    dpred: Option<Tensor<B>>,
}

impl<B: Backend> Default for StepBuffers<B> {
    fn default() -> Self {
        StepBuffers {
            acts: IsoformerActivations::default(),
            targets: None,
            dpred: None,
        }
    }
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

/// Forward and backward of one (micro-)batch: returns the MSE loss and adds `loss_scale · ∂loss/∂θ` into
/// the trainable sections' gradients. Fine-tuned Enformer trunks use the batch's batchnorm statistics; call
/// [`update_running_stats`] after the optimiser step.
pub fn forward_backward<B: Backend>(
    b: &B,
    model: &Isoformer,
    params: &mut IsoformerParams<B>,
    inputs: &IsoformerInputs,
    targets: &[f32],
    bufs: &mut StepBuffers<B>,
    loss_scale: f32,
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
    let (views, mut grads) = params.views_and_grads()?;
    let refs: Vec<&[_]> = views.iter().map(Vec::as_slice).collect();
    model.forward(
        b,
        &refs,
        inputs,
        &mut bufs.acts,
        &flags[..model.encoders.len()],
        true,
    )?;
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
    let flags = trainable_flags(model);
    for (e, enc) in model.encoders.iter().enumerate() {
        let (EncoderNet::Enformer(trunk), EncoderActs::Enformer(acts), true) =
            (&enc.net, &bufs.acts.encoders[e], flags[e])
        else {
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
    let _ = BatchNormMode::Eval;
    b.read_f32(acts.aggregate.predictions()?)
}
