//! AdamW (Loshchilov & Hutter), as `torch.optim.AdamW` computes it:
//! `p ← p − lr·wd·p`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.
//! Learning rate and weight decay come per parameter group; every parameter tensor of the layout belongs to
//! exactly one group (for example "no decay" for biases and norms).

use rayon::prelude::*;

use crate::ops::optim::{adamw_update, AdamWUpdate};
use crate::runtime::TrainState;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    pub name: String,
    pub lr: f32,
    pub weight_decay: f32,
    /// Names of the parameter tensors in this group.
    pub params: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Group of each layout entry, resolved once.
    group_of_entry: Vec<usize>,
    groups: Vec<ParamGroup>,
}

impl AdamW {
    /// Resolves the groups against the state's layout: every tensor must be in exactly one group.
    pub fn new(
        state: &TrainState,
        groups: Vec<ParamGroup>,
        beta1: f32,
        beta2: f32,
        eps: f32,
    ) -> Result<Self> {
        let layout = state.layout();
        let mut group_of_entry = vec![usize::MAX; layout.entries().len()];
        for (g, group) in groups.iter().enumerate() {
            for name in &group.params {
                let i = layout.position(name)?;
                if group_of_entry[i] != usize::MAX {
                    return Err(Error::invalid(
                        "parameter groups",
                        format!("'{name}' is in two groups"),
                    ));
                }
                group_of_entry[i] = g;
            }
        }
        if let Some(i) = group_of_entry.iter().position(|&g| g == usize::MAX) {
            return Err(Error::invalid(
                "parameter groups",
                format!("'{}' belongs to no group", layout.entries()[i].spec.name),
            ));
        }
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            group_of_entry,
            groups,
        })
    }

    /// One group holding every parameter.
    pub fn single_group(state: &TrainState, lr: f32, weight_decay: f32) -> Result<Self> {
        let params = state
            .layout()
            .entries()
            .iter()
            .map(|e| e.spec.name.clone())
            .collect();
        Self::new(
            state,
            vec![ParamGroup {
                name: "all".into(),
                lr,
                weight_decay,
                params,
            }],
            0.9,
            0.999,
            1e-8,
        )
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Takes one step with the gradients in `state.grads`; `lr_scale` multiplies every group's learning rate
    /// (the schedule). Gradients are read, not cleared.
    pub fn step(&self, state: &mut TrainState, lr_scale: f32) -> Result<()> {
        if let Some(i) = state.grads.as_f32().iter().position(|g| !g.is_finite()) {
            return Err(Error::NonFinite {
                what: "gradient".into(),
                index: i,
            });
        }
        state.step += 1;
        let t = state.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let layout = state.layout().clone();
        for (i, entry) in layout.entries().iter().enumerate() {
            let group = &self.groups[self.group_of_entry[i]];
            let (lr, wd) = (group.lr * lr_scale, group.weight_decay);
            let name = &entry.spec.name;
            let g = state.grads.f32(name)?;
            // Split borrows: the three arenas are distinct fields.
            let p = state.params.f32_mut(name)?;
            let m = state.adam_m.f32_mut(name)?;
            let v = state.adam_v.f32_mut(name)?;
            adamw_update(
                p,
                m,
                v,
                g,
                &AdamWUpdate {
                    lr,
                    beta1: b1,
                    beta2: b2,
                    eps: self.eps,
                    weight_decay: wd,
                    bias_corr1: bc1,
                    bias_corr2: bc2,
                    grad_scale: 1.0,
                },
            )?;
        }
        Ok(())
    }
}

/// L2 norm of a buffer, accumulated in f64 over fixed chunks (the same result for any thread count).
pub fn global_norm(x: &[f32]) -> f32 {
    const CHUNK: usize = 16 * 1024;
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    partial.iter().sum::<f64>().sqrt() as f32
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// coefficient `max_norm / (norm + 1e−6)`, applied only when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads.par_iter_mut().for_each(|g| *g *= coef);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Layout, TensorSpec};
    use std::sync::Arc;

    fn state() -> TrainState {
        let layout =
            Layout::sequential(vec![TensorSpec::f32("w", [2]), TensorSpec::f32("b", [1])]).unwrap();
        let mut st = TrainState::new(Arc::new(layout));
        st.params
            .f32_mut("w")
            .unwrap()
            .copy_from_slice(&[1.0, -2.0]);
        st.params.f32_mut("b").unwrap().copy_from_slice(&[0.5]);
        st
    }

    #[test]
    fn two_steps_match_hand_computation() {
        let mut st = state();
        let groups = vec![
            ParamGroup {
                name: "decay".into(),
                lr: 0.1,
                weight_decay: 0.01,
                params: vec!["w".into()],
            },
            ParamGroup {
                name: "no_decay".into(),
                lr: 0.05,
                weight_decay: 0.0,
                params: vec!["b".into()],
            },
        ];
        let opt = AdamW::new(&st, groups, 0.9, 0.999, 1e-8).unwrap();
        // Step 1, g = (0.5, -1.0, 2.0). Bias-corrected m̂ = g and v̂ = g², so the update is lr·sign(g)
        // (up to ε) after decoupled decay p·(1 − lr·wd).
        st.grads.f32_mut("w").unwrap().copy_from_slice(&[0.5, -1.0]);
        st.grads.f32_mut("b").unwrap().copy_from_slice(&[2.0]);
        opt.step(&mut st, 1.0).unwrap();
        let w = st.params.f32("w").unwrap();
        assert!(
            (w[0] - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-6,
            "{}",
            w[0]
        );
        assert!(
            (w[1] - (-2.0 * (1.0 - 0.001) + 0.1)).abs() < 1e-6,
            "{}",
            w[1]
        );
        assert!((st.params.f32("b").unwrap()[0] - (0.5 - 0.05)).abs() < 1e-6);
        // Step 2 on w[0] with g = 0.25, by hand:
        // m = 0.9·0.05 + 0.1·0.25 = 0.07, v = 0.999·0.00025 + 0.001·0.0625 = 0.00031225,
        // m̂ = 0.07/0.19 = 0.368421…, v̂ = 0.00031225/0.001999 = 0.156203…, √v̂ = 0.395225…
        // p = 0.899·(1 − 0.001) − 0.1·0.368421/0.395225 = 0.898101 − 0.093218 = 0.804883
        st.grads.f32_mut("w").unwrap().copy_from_slice(&[0.25, 0.0]);
        opt.step(&mut st, 1.0).unwrap();
        let w0 = st.params.f32("w").unwrap()[0];
        assert!((w0 - 0.804_883).abs() < 2e-6, "{w0}");
        assert!((st.adam_m.f32("w").unwrap()[0] - 0.07).abs() < 1e-7);
        // v in terms of the f32 hyper-parameters (1 − 0.999 is not exact in f32: 1.0000467e-3).
        let (b2, one_minus_b2) = (0.999f32 as f64, (1.0f32 - 0.999f32) as f64);
        let v_want = b2 * one_minus_b2 * 0.25 + one_minus_b2 * 0.0625;
        assert!((st.adam_v.f32("w").unwrap()[0] as f64 - v_want).abs() < 1e-6 * v_want);
        assert_eq!(st.step, 2);
    }

    #[test]
    fn groups_must_cover_every_parameter_once() {
        let st = state();
        let only_w = vec![ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            params: vec!["w".into()],
        }];
        assert!(AdamW::new(&st, only_w, 0.9, 0.999, 1e-8).is_err());
        let twice = vec![ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            params: vec!["w".into(), "b".into(), "w".into()],
        }];
        assert!(AdamW::new(&st, twice, 0.9, 0.999, 1e-8).is_err());
    }

    #[test]
    fn non_finite_gradient_is_refused_before_any_update() {
        let mut st = state();
        let opt = AdamW::single_group(&st, 0.1, 0.0).unwrap();
        st.grads.f32_mut("b").unwrap()[0] = f32::NAN;
        assert!(opt.step(&mut st, 1.0).is_err());
        assert_eq!(st.params.f32("w").unwrap(), &[1.0, -2.0]);
        assert_eq!(st.step, 0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let big: Vec<f32> = (0..100_003).map(|i| (i % 7) as f32 - 3.0).collect();
        let want = big.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((global_norm(&big) as f64 - want).abs() < 1e-6 * want);
    }
}
