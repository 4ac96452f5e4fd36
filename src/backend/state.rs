//! Planned parameter memory on a backend, as llm.c lays it out: every category is one allocation over one
//! [`Layout`], reached through per-tensor views.
//! - [`ParamSet`]: f32 master weights and, where the backend computes in another dtype, their compute copy
//!   (bf16 on kernel devices) at the same element offsets. Inference sets may keep only the compute copy.
//! - [`TrainState`]: a [`ParamSet`] with f32 gradients and both AdamW moments on the same layout, so zeroing,
//!   the global norm and AdamW are single passes over one buffer each.

use std::sync::Arc;

use super::{Backend, Role, Tensor, View, ViewMut};
use crate::runtime::{DType, Layout};
use crate::{Error, Result};

/// Element ranges `(start, len)` of the layout's entries (the layout's specs are f32, so element offsets
/// are byte offsets / 4, whatever the dtype of the tensor laid out with them).
fn entry_ranges(layout: &Layout) -> Result<Vec<(usize, usize)>> {
    layout
        .entries()
        .iter()
        .map(|e| {
            if e.spec.dtype != DType::F32 {
                return Err(Error::invalid(
                    "parameter layout",
                    format!(
                        "'{}' is {}, parameters are laid out as f32",
                        e.spec.name, e.spec.dtype
                    ),
                ));
            }
            Ok((e.offset_bytes / 4, e.numel()))
        })
        .collect()
}

fn layout_elems(layout: &Layout) -> usize {
    layout.total_bytes() / 4
}

fn split_views<'a, B: Backend>(
    t: &'a Tensor<B>,
    ranges: &[(usize, usize)],
) -> Result<Vec<View<'a, B>>> {
    let v = t.view();
    ranges.iter().map(|&(s, n)| v.slice(s, n)).collect()
}

/// Parameters on a backend.
pub struct ParamSet<B: Backend> {
    layout: Arc<Layout>,
    ranges: Vec<(usize, usize)>,
    /// f32 master weights (absent in an inference set on a backend that computes in another dtype).
    master: Option<Tensor<B>>,
    /// The compute-dtype copy, where it differs from the master.
    compute: Option<Tensor<B>>,
}

impl<B: Backend> ParamSet<B> {
    /// Uploads host parameters (`get(i)` is entry i). With `trainable`, f32 masters are kept beside the
    /// compute copy; otherwise only what the forward reads.
    pub fn upload<'h>(
        backend: &B,
        layout: Arc<Layout>,
        get: impl Fn(usize) -> &'h [f32],
        trainable: bool,
    ) -> Result<Self> {
        Self::upload_with(backend, layout, get, trainable, None, |_| {})
    }

    /// [`Self::upload`] of host values that may still need their finiteness checked, and that the caller
    /// lets go entry by entry. With `non_finite`, the first copy of each entry goes through
    /// [`Backend::write_f32_finite`] (the check in the copy's own pass over the values) and a NaN or
    /// infinity at element j of entry i is the error `non_finite(i, j)`. `copied(i)` is called once entry
    /// i has been read for the last time, so that a caller can let its host copy go entry by entry (mapped
    /// weights: their pages) and the peak holds the upload and about one host entry rather than both whole
    /// models.
    pub fn upload_with<'h>(
        backend: &B,
        layout: Arc<Layout>,
        get: impl Fn(usize) -> &'h [f32],
        trainable: bool,
        non_finite: Option<&dyn Fn(usize, usize) -> Error>,
        copied: impl Fn(usize),
    ) -> Result<Self> {
        let ranges = entry_ranges(&layout)?;
        let elems = layout_elems(&layout);
        let separate_copy = backend.weight_dtype() != DType::F32;
        for (i, &(_, n)) in ranges.iter().enumerate() {
            if get(i).len() != n {
                return Err(Error::Tensor {
                    name: layout.entries()[i].spec.name.clone(),
                    msg: format!("{} values, the layout needs {n}", get(i).len()),
                });
            }
        }
        // Entry by entry, straight from the host values: no staging copy of the whole model.
        let fill = |role: Role, first: bool, last: bool| -> Result<Tensor<B>> {
            let mut t = Tensor::new(backend, role, elems)?;
            let mut views = t.view_mut().split_ranges(&ranges)?;
            for (i, v) in views.drain(..).enumerate() {
                match non_finite.filter(|_| first) {
                    Some(error) => {
                        if let Some(j) = backend.write_f32_finite(v, get(i))? {
                            return Err(error(i, j));
                        }
                    }
                    None => backend.write_f32(v, get(i))?,
                }
                if last {
                    copied(i);
                }
            }
            Ok(t)
        };
        let with_master = trainable || !separate_copy;
        let master = if with_master {
            Some(fill(Role::Exact, true, !separate_copy)?)
        } else {
            None
        };
        let compute = if separate_copy {
            Some(fill(Role::Weight, !with_master, true)?)
        } else {
            None
        };
        Ok(ParamSet {
            layout,
            ranges,
            master,
            compute,
        })
    }

    /// Zero-filled parameters (no host copy is made): for sizing a run, or for weights written later.
    pub fn zeros(backend: &B, layout: Arc<Layout>, trainable: bool) -> Result<Self> {
        let ranges = entry_ranges(&layout)?;
        let elems = layout_elems(&layout);
        let separate_copy = backend.weight_dtype() != DType::F32;
        let master = if trainable || !separate_copy {
            Some(Tensor::new(backend, Role::Exact, elems)?)
        } else {
            None
        };
        let compute = if separate_copy {
            Some(Tensor::new(backend, Role::Weight, elems)?)
        } else {
            None
        };
        Ok(ParamSet {
            layout,
            ranges,
            master,
            compute,
        })
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// What the forward reads: one view per layout entry, in the compute dtype.
    pub fn views(&self) -> Result<Vec<View<'_, B>>> {
        let t = self
            .compute
            .as_ref()
            .or(self.master.as_ref())
            .expect("a parameter set holds at least one copy");
        split_views(t, &self.ranges)
    }

    /// The f32 master weights, one view per entry (for checkpoints and tests).
    pub fn master_views(&self) -> Result<Vec<View<'_, B>>> {
        let t = self.master.as_ref().ok_or_else(|| {
            Error::invalid(
                "parameters",
                "this inference set keeps no f32 master weights",
            )
        })?;
        split_views(t, &self.ranges)
    }
}

/// Parameter views for the forward and gradient views for the backward, one per layout entry.
pub type ParamsAndGrads<'a, B> = (Vec<View<'a, B>>, Vec<ViewMut<'a, B>>);

/// The AdamW moments `(m, v)`, one view per entry each.
pub type Moments<'a, B> = (Vec<View<'a, B>>, Vec<View<'a, B>>);

/// One entry's share of an optimiser update.
pub struct EntryUpdate<'a, B> {
    pub master: ViewMut<'a, B>,
    pub compute: Option<ViewMut<'a, B>>,
    pub m: ViewMut<'a, B>,
    pub v: ViewMut<'a, B>,
    pub grad: View<'a, B>,
}

/// Parameters, gradients and AdamW moments on one layout.
pub struct TrainState<B: Backend> {
    pub params: ParamSet<B>,
    grads: Tensor<B>,
    adam_m: Tensor<B>,
    adam_v: Tensor<B>,
    /// Optimiser steps taken (AdamW's bias correction).
    pub step: u64,
}

impl<B: Backend> TrainState<B> {
    pub fn new(backend: &B, params: ParamSet<B>) -> Result<Self> {
        if params.master.is_none() {
            return Err(Error::invalid(
                "training",
                "the parameters were uploaded for inference only",
            ));
        }
        let elems = layout_elems(&params.layout);
        Ok(TrainState {
            grads: Tensor::new(backend, Role::Exact, elems)?,
            adam_m: Tensor::new(backend, Role::Exact, elems)?,
            adam_v: Tensor::new(backend, Role::Exact, elems)?,
            params,
            step: 0,
        })
    }

    /// The parameters alone, for inference: no gradients and no optimiser moments are allocated (3× the
    /// parameters' f32 size saved); asking for them is an error.
    pub fn without_optimizer(backend: &B, params: ParamSet<B>) -> Result<Self> {
        Ok(TrainState {
            grads: Tensor::new(backend, Role::Exact, 0)?,
            adam_m: Tensor::new(backend, Role::Exact, 0)?,
            adam_v: Tensor::new(backend, Role::Exact, 0)?,
            params,
            step: 0,
        })
    }

    /// The parameters the forward reads and the gradients the backward adds into, one view per entry.
    pub fn params_and_grads(&mut self) -> Result<ParamsAndGrads<'_, B>> {
        let views = self.params.views()?;
        let grads = self.grads.view_mut().split_ranges(&self.params.ranges)?;
        Ok((views, grads))
    }

    /// Gradient views (read-only), one per entry.
    pub fn grad_views(&self) -> Result<Vec<View<'_, B>>> {
        split_views(&self.grads, &self.params.ranges)
    }

    /// Gradient views to write (tests, gradient accumulation from outside), one per entry.
    pub fn grads_mut(&mut self) -> Result<Vec<ViewMut<'_, B>>> {
        self.grads.view_mut().split_ranges(&self.params.ranges)
    }

    /// The AdamW moments `(m, v)`, one view per entry each (checkpoints, tests).
    pub fn moment_views(&self) -> Result<Moments<'_, B>> {
        Ok((
            split_views(&self.adam_m, &self.params.ranges)?,
            split_views(&self.adam_v, &self.params.ranges)?,
        ))
    }

    /// The AdamW moments `(m, v)` to write (restoring a checkpoint), one view per entry each.
    #[allow(clippy::type_complexity)]
    pub fn moments_mut(&mut self) -> Result<(Vec<ViewMut<'_, B>>, Vec<ViewMut<'_, B>>)> {
        let ranges = &self.params.ranges;
        Ok((
            self.adam_m.view_mut().split_ranges(ranges)?,
            self.adam_v.view_mut().split_ranges(ranges)?,
        ))
    }

    /// Everything one optimiser update touches, entry by entry: f32 master, compute copy (where the
    /// backend keeps one), both moments, and the gradient.
    pub fn update_views(&mut self) -> Result<Vec<EntryUpdate<'_, B>>> {
        let ranges = &self.params.ranges;
        let master = self
            .params
            .master
            .as_mut()
            .ok_or_else(|| Error::invalid("training", "the parameters have no f32 master copy"))?
            .view_mut()
            .split_ranges(ranges)?;
        let mut compute = match self.params.compute.as_mut() {
            Some(c) => c
                .view_mut()
                .split_ranges(ranges)?
                .into_iter()
                .map(Some)
                .collect(),
            None => (0..ranges.len()).map(|_| None).collect::<Vec<_>>(),
        };
        let m = self.adam_m.view_mut().split_ranges(ranges)?;
        let v = self.adam_v.view_mut().split_ranges(ranges)?;
        let g = split_views(&self.grads, ranges)?;
        Ok(master
            .into_iter()
            .zip(compute.drain(..))
            .zip(m.into_iter().zip(v))
            .zip(g)
            .map(|(((master, compute), (m, v)), grad)| EntryUpdate {
                master,
                compute,
                m,
                v,
                grad,
            })
            .collect())
    }

    pub fn zero_grads(&mut self, backend: &B) -> Result<()> {
        backend.zero(self.grads.view_mut())
    }

    /// The L2 norm of every gradient together (padding between entries is zero).
    pub fn grad_norm(&self, backend: &B) -> Result<f32> {
        Ok(backend.sum_squares(self.grads.view())?.sqrt())
    }
}
