//! AdamW (Loshchilov & Hutter), as `torch.optim.AdamW` computes it:
//! `p ← p − lr·wd·p`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.
//! Learning rate and weight decay come per parameter group; every parameter tensor of the layout belongs to
//! exactly one group (for example "no decay" for biases and norms).

use rayon::prelude::*;

use crate::backend::state::TrainState;
use crate::backend::{AdamWStep, Backend};
use crate::runtime::Layout;
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

/// What one optimiser step saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f32,
    /// The factor the gradients were scaled by (1 without clipping).
    pub clip_scale: f32,
}

impl AdamW {
    /// Resolves the groups against the layout: every tensor must be in exactly one group.
    pub fn new(
        layout: &Layout,
        groups: Vec<ParamGroup>,
        beta1: f32,
        beta2: f32,
        eps: f32,
    ) -> Result<Self> {
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
    pub fn single_group(layout: &Layout, lr: f32, weight_decay: f32) -> Result<Self> {
        let params = layout
            .entries()
            .iter()
            .map(|e| e.spec.name.clone())
            .collect();
        Self::new(
            layout,
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

    /// Takes one step on any backend with the gradients in `state`: refuses non-finite gradients (naming
    /// the tensor) before touching anything, clips by global norm when `max_norm` is given (as PyTorch's
    /// `clip_grad_norm_`, folded into the update), and scales every group's learning rate by `lr_scale`
    /// (the schedule). Gradients are read, not cleared.
    pub fn step<B: Backend>(
        &self,
        b: &B,
        state: &mut TrainState<B>,
        lr_scale: f32,
        max_norm: Option<f32>,
    ) -> Result<StepReport> {
        let grad_norm = state.grad_norm(b)?;
        if !grad_norm.is_finite() {
            let names = state.params.layout().entries();
            for (i, g) in state.grad_views()?.into_iter().enumerate() {
                if !b.sum_squares(g)?.is_finite() {
                    return Err(Error::Tensor {
                        name: names[i].spec.name.clone(),
                        msg: "gradient has a NaN or Inf".into(),
                    });
                }
            }
            return Err(Error::invalid("gradient", "the global norm is not finite"));
        }
        let clip_scale = match max_norm {
            Some(max) => clip_coefficient(grad_norm, max),
            None => 1.0,
        };
        state.step += 1;
        let step = state.step;
        let updates = state.update_views()?;
        for (i, u) in updates.into_iter().enumerate() {
            let group = &self.groups[self.group_of_entry[i]];
            b.adamw(
                u.master,
                u.compute,
                u.m,
                u.v,
                u.grad,
                &AdamWStep {
                    lr: group.lr * lr_scale,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    weight_decay: group.weight_decay,
                    step,
                    grad_scale: clip_scale,
                },
            )?;
        }
        Ok(StepReport {
            grad_norm,
            clip_scale,
        })
    }
}

/// PyTorch's `clip_grad_norm_` coefficient: `max_norm / (norm + 1e−6)`, applied only when below 1.
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// L2 norm of a host buffer, accumulated in f64 over fixed chunks (the same result for any thread count).
pub fn global_norm(x: &[f32]) -> f32 {
    const CHUNK: usize = 16 * 1024;
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    partial.iter().sum::<f64>().sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::state::ParamSet;
    use crate::runtime::TensorSpec;
    use std::sync::Arc;

    fn state(b: &CpuBackend) -> (Arc<Layout>, TrainState<CpuBackend>) {
        let layout = Arc::new(
            Layout::sequential(vec![TensorSpec::f32("w", [2]), TensorSpec::f32("b", [1])]).unwrap(),
        );
        let values = [vec![1.0f32, -2.0], vec![0.5]];
        let params = ParamSet::upload(b, layout.clone(), |i| &values[i], true).unwrap();
        (layout, TrainState::new(b, params).unwrap())
    }

    fn set_grads(b: &CpuBackend, st: &mut TrainState<CpuBackend>, w: &[f32], bias: &[f32]) {
        let mut g = st.grads_mut().unwrap();
        let bias_view = g.pop().unwrap();
        b.write_f32(bias_view, bias).unwrap();
        b.write_f32(g.pop().unwrap(), w).unwrap();
    }

    fn param(b: &CpuBackend, st: &TrainState<CpuBackend>, i: usize) -> Vec<f32> {
        b.read_f32(st.params.master_views().unwrap()[i]).unwrap()
    }

    #[test]
    fn two_steps_match_hand_computation() {
        let cpu = CpuBackend::new();
        let (layout, mut st) = state(&cpu);
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
        let opt = AdamW::new(&layout, groups, 0.9, 0.999, 1e-8).unwrap();
        // Step 1, g = (0.5, -1.0, 2.0). Bias-corrected m̂ = g and v̂ = g², so the update is lr·sign(g)
        // (up to ε) after decoupled decay p·(1 − lr·wd).
        set_grads(&cpu, &mut st, &[0.5, -1.0], &[2.0]);
        opt.step(&cpu, &mut st, 1.0, None).unwrap();
        let w = param(&cpu, &st, 0);
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
        assert!((param(&cpu, &st, 1)[0] - (0.5 - 0.05)).abs() < 1e-6);
        // Step 2 on w[0] with g = 0.25, by hand:
        // m = 0.9·0.05 + 0.1·0.25 = 0.07, v = 0.999·0.00025 + 0.001·0.0625 = 0.00031225,
        // m̂ = 0.07/0.19 = 0.368421…, v̂ = 0.00031225/0.001999 = 0.156203…, √v̂ = 0.395225…
        // p = 0.899·(1 − 0.001) − 0.1·0.368421/0.395225 = 0.898101 − 0.093218 = 0.804883
        set_grads(&cpu, &mut st, &[0.25, 0.0], &[0.0]);
        opt.step(&cpu, &mut st, 1.0, None).unwrap();
        let w0 = param(&cpu, &st, 0)[0];
        assert!((w0 - 0.804_883).abs() < 2e-6, "{w0}");
        let (m, v) = st.moment_views().unwrap();
        assert!((cpu.read_f32(m[0]).unwrap()[0] - 0.07).abs() < 1e-7);
        // v in terms of the f32 hyper-parameters (1 − 0.999 is not exact in f32: 1.0000467e-3).
        let (b2, one_minus_b2) = (0.999f32 as f64, (1.0f32 - 0.999f32) as f64);
        let v_want = b2 * one_minus_b2 * 0.25 + one_minus_b2 * 0.0625;
        assert!((cpu.read_f32(v[0]).unwrap()[0] as f64 - v_want).abs() < 1e-6 * v_want);
        assert_eq!(st.step, 2);
    }

    #[test]
    fn groups_must_cover_every_parameter_once() {
        let cpu = CpuBackend::new();
        let (layout, _) = state(&cpu);
        let only_w = vec![ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            params: vec!["w".into()],
        }];
        assert!(AdamW::new(&layout, only_w, 0.9, 0.999, 1e-8).is_err());
        let twice = vec![ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            params: vec!["w".into(), "b".into(), "w".into()],
        }];
        assert!(AdamW::new(&layout, twice, 0.9, 0.999, 1e-8).is_err());
    }

    #[test]
    fn non_finite_gradient_is_refused_before_any_update_and_named() {
        let cpu = CpuBackend::new();
        let (layout, mut st) = state(&cpu);
        let opt = AdamW::single_group(&layout, 0.1, 0.0).unwrap();
        set_grads(&cpu, &mut st, &[0.1, 0.2], &[f32::NAN]);
        let err = opt.step(&cpu, &mut st, 1.0, None).unwrap_err().to_string();
        assert!(err.contains("'b'") || err.contains(" b"), "{err}");
        assert_eq!(param(&cpu, &st, 0), vec![1.0, -2.0]);
        assert_eq!(st.step, 0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let cpu = CpuBackend::new();
        let (layout, mut st) = state(&cpu);
        let opt = AdamW::single_group(&layout, 0.1, 0.0).unwrap();
        set_grads(&cpu, &mut st, &[3.0, 4.0], &[0.0]);
        let r = opt.step(&cpu, &mut st, 1.0, Some(10.0)).unwrap();
        assert_eq!((r.grad_norm, r.clip_scale), (5.0, 1.0));
        let r = opt.step(&cpu, &mut st, 1.0, Some(1.0)).unwrap();
        assert!((r.clip_scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        let big: Vec<f32> = (0..100_003).map(|i| (i % 7) as f32 - 3.0).collect();
        let want = big.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((global_norm(&big) as f64 - want).abs() < 1e-6 * want);
    }
}
