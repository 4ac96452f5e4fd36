//! The AdamW update of one flat parameter range (decoupled weight decay, bias correction, gradient scale),
//! as the `adamw_bf16` kernel computes it, element by element.

use rayon::prelude::*;

use crate::error::check_len;
use crate::Result;

/// Hyper-parameters of one AdamW step (what the backends' `adamw` takes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (bias correction).
    pub step: u64,
    /// Multiplies the gradients (the global-norm clipping coefficient, or 1).
    pub grad_scale: f32,
}

/// Hyper-parameters of one update, with the bias corrections `1 − βᵗ` already computed.
#[derive(Clone, Copy, Debug)]
pub struct AdamWUpdate {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bias_corr1: f32,
    pub bias_corr2: f32,
    /// Multiplies the gradients (clipping coefficient, or 1).
    pub grad_scale: f32,
}

/// `g = grads·scale; p −= lr·wd·p; m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; p −= lr·(m/bc₁)/(√(v/bc₂) + ε)`.
pub fn adamw_update(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    u: &AdamWUpdate,
) -> Result<()> {
    check_len("adamw", "m", m.len(), p.len())?;
    check_len("adamw", "v", v.len(), p.len())?;
    check_len("adamw", "grads", g.len(), p.len())?;
    const CHUNK: usize = 4096;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let g = g * u.grad_scale;
                *p -= u.lr * u.weight_decay * *p;
                *m = u.beta1 * *m + (1.0 - u.beta1) * g;
                *v = u.beta2 * *v + (1.0 - u.beta2) * g * g;
                *p -= u.lr * (*m / u.bias_corr1) / ((*v / u.bias_corr2).sqrt() + u.eps);
            }
        });
    Ok(())
}
