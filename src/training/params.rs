//! IsoFormer's parameters on a backend, split by what training does with them: the trainable sections (the
//! aggregator and head, and every fine-tuned encoder) in one [`TrainState`] (f32 masters, gradients and both
//! AdamW moments, one allocation each), the frozen encoders in one inference [`ParamSet`] (no gradients, no
//! moments). Each section's views are a contiguous run of one of the two.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::adamw::{AdamW, StepReport};
use crate::backend::state::{ParamSet, TrainState};
use crate::backend::{Backend, LinearDims, Role, Tensor, View, ViewMut};
use crate::models::isoformer::{EncoderMode, Isoformer};
use crate::runtime::{Layout, TensorSpec};
use crate::{Error, Result};

/// Where a section's entries live: the trainable or the frozen set, from which entry.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub trainable: bool,
    pub start: usize,
    pub count: usize,
}

/// A named parameter on the host: name, shape, values.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

pub struct IsoformerParams<B: Backend> {
    pub placement: Vec<Placement>,
    /// Each section's own layout (LoRA gradient buffers are laid out like it).
    sections_layouts: Vec<Arc<Layout>>,
    pub trainable_sections: Vec<usize>,
    pub frozen_sections: Vec<usize>,
    pub train: TrainState<B>,
    pub frozen: Option<ParamSet<B>>,
    /// LoRA adapters of encoders in `lora` mode (their base weights sit in the frozen set).
    lora: LoraState<B>,
}

/// One adapted weight `W [out, in]`: `W_eff = W + (α/r)·B·Aᵀ` with `A_t [in, r]` and `B [out, r]` trained.
#[derive(Clone, Debug)]
struct LoraEntry {
    section: usize,
    entry: usize,
    out: usize,
    inp: usize,
    /// Element offset of the weight in its section's layout.
    offset: usize,
    /// Entries of `A_t` and `B` in the trainable layout.
    a: usize,
    b: usize,
}

/// The adapters, the merged weights the encoder reads, and the encoder's (discarded except through the
/// adapters) weight gradients. Merging keeps the encoder code unchanged: its forward reads `W_eff`, its
/// backward gives `∂L/∂W_eff`, and `∂L/∂A`, `∂L/∂B` follow from that by two small GEMMs.
struct LoraState<B: Backend> {
    rank: usize,
    scale: f32,
    entries: Vec<LoraEntry>,
    /// Per entry, the merged weight (compute dtype) and the per-row scale α/r (f32).
    merged: Vec<Tensor<B>>,
    row_scale: Vec<Tensor<B>>,
    /// Per LoRA section: gradients of every entry of the section (f32), laid out like it.
    grads: Vec<(usize, Tensor<B>)>,
    /// Scratch: `[out, in]` twice and `[out, r]`, sized for the largest entry.
    delta: Option<Tensor<B>>,
    dy: Option<Tensor<B>>,
    db: Option<Tensor<B>>,
}

/// Element ranges of a layout's entries.
fn ranges(layout: &Layout) -> Vec<(usize, usize)> {
    layout
        .entries()
        .iter()
        .map(|e| (e.offset_bytes / 4, e.numel()))
        .collect()
}

/// Which encoders run a backward: fine-tuned and LoRA ones (the aggregator, last, always).
pub fn trainable_flags(model: &Isoformer) -> Vec<bool> {
    let modes = &model.cfg.train.encoders;
    let mut flags: Vec<bool> = model
        .encoders
        .iter()
        .map(|e| modes.get(e.modality) != EncoderMode::Frozen)
        .collect();
    flags.push(true);
    flags
}

/// Which sections keep their weights in the train state: fine-tuned encoders and the aggregator.
fn in_train_state(model: &Isoformer) -> Vec<bool> {
    let modes = &model.cfg.train.encoders;
    let mut flags: Vec<bool> = model
        .encoders
        .iter()
        .map(|e| modes.get(e.modality) == EncoderMode::Finetune)
        .collect();
    flags.push(true);
    flags
}

/// Names of an adapter's two tensors in the trainable layout and checkpoints.
pub fn lora_names(weight: &str) -> (String, String) {
    (format!("{weight}.lora_a_t"), format!("{weight}.lora_b"))
}

/// Whether a checkpoint tensor name is a LoRA adapter's.
pub fn is_lora_name(name: &str) -> bool {
    name.ends_with(".lora_a_t") || name.ends_with(".lora_b")
}

impl<B: Backend> IsoformerParams<B> {
    /// Uploads `host` (per section, per entry) to the backend; LoRA adapters start as PEFT's (A uniform
    /// ±1/√in, seeded; B zero).
    pub fn upload(b: &B, model: &Isoformer, host: &[Vec<Vec<f32>>]) -> Result<Self> {
        Self::upload_with_lora(b, model, host, None)
    }

    /// [`Self::upload`] with the adapters' values by name (a checkpoint's).
    pub fn upload_with_lora(
        b: &B,
        model: &Isoformer,
        host: &[Vec<Vec<f32>>],
        lora_values: Option<&HashMap<String, Vec<f32>>>,
    ) -> Result<Self> {
        Self::build(b, model, Some(host), lora_values, true)
    }

    /// [`Self::upload_with_lora`] for evaluation and prediction: no gradients and no optimiser moments.
    pub fn upload_for_inference(
        b: &B,
        model: &Isoformer,
        host: &[Vec<Vec<f32>>],
        lora_values: Option<&HashMap<String, Vec<f32>>>,
    ) -> Result<Self> {
        Self::build(b, model, Some(host), lora_values, false)
    }

    /// Zero-filled parameters of every section (no host copy): what a run allocates, for planning; with
    /// `training`, also the gradients and moments.
    pub fn zeros(b: &B, model: &Isoformer, training: bool) -> Result<Self> {
        Self::build(b, model, None, None, training)
    }

    fn build(
        b: &B,
        model: &Isoformer,
        host: Option<&[Vec<Vec<f32>>]>,
        lora_values: Option<&HashMap<String, Vec<f32>>>,
        training: bool,
    ) -> Result<Self> {
        let flags = in_train_state(model);
        let sections = model.sections();
        if host.is_some_and(|h| h.len() != sections.len()) {
            return Err(Error::shape(
                "isoformer parameters",
                "one host set per section",
            ));
        }
        let trainable_sections: Vec<usize> = (0..sections.len()).filter(|&s| flags[s]).collect();
        let frozen_sections: Vec<usize> = (0..sections.len()).filter(|&s| !flags[s]).collect();
        let mut placement = vec![
            Placement {
                trainable: false,
                start: 0,
                count: 0
            };
            sections.len()
        ];
        for (list, trainable) in [(&trainable_sections, true), (&frozen_sections, false)] {
            let mut start = 0;
            for &s in list {
                let count = sections[s].layout.entries().len();
                placement[s] = Placement {
                    trainable,
                    start,
                    count,
                };
                start += count;
            }
        }
        let flat = |list: &[usize]| -> Vec<&[f32]> {
            match host {
                Some(host) => list
                    .iter()
                    .flat_map(|&s| host[s].iter().map(Vec::as_slice))
                    .collect(),
                None => Vec::new(),
            }
        };
        // LoRA adapters follow the trainable sections in the train layout.
        let t = &model.cfg.train;
        let mut base = Isoformer::combine(sections, &trainable_sections)?;
        let mut entries = Vec::new();
        let mut lora_specs = Vec::new();
        let mut lora_host: Vec<Vec<f32>> = Vec::new();
        let mut rng = StdRng::seed_from_u64(t.seed ^ 0x4C6F_5241);
        let base_count = base.entries().len();
        for (s, enc) in model.encoders.iter().enumerate() {
            if t.encoders.get(enc.modality) != EncoderMode::Lora {
                continue;
            }
            for i in model.lora_entries(s, &t.lora_targets) {
                let spec = &sections[s].layout.entries()[i].spec;
                let dims = spec.shape.dims();
                let (out, inp) = (dims[0], dims[1..].iter().product::<usize>());
                let name = format!("{}{}", sections[s].prefix, spec.name);
                let (an, bn) = lora_names(&name);
                let (a_vals, b_vals) = match lora_values {
                    Some(v) => {
                        let get = |n: &String, len: usize| -> Result<Vec<f32>> {
                            let x = v.get(n).ok_or_else(|| Error::Tensor {
                                name: n.clone(),
                                msg: "missing from the checkpoint".into(),
                            })?;
                            if x.len() != len {
                                return Err(Error::Tensor {
                                    name: n.clone(),
                                    msg: format!("{} values, expected {len}", x.len()),
                                });
                            }
                            Ok(x.clone())
                        };
                        (get(&an, inp * t.lora_rank)?, get(&bn, out * t.lora_rank)?)
                    }
                    None => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        (
                            (0..inp * t.lora_rank)
                                .map(|_| rng.random_range(-bound..bound))
                                .collect(),
                            vec![0.0; out * t.lora_rank],
                        )
                    }
                };
                entries.push(LoraEntry {
                    section: s,
                    entry: i,
                    offset: sections[s].layout.entries()[i].offset_bytes / 4,
                    out,
                    inp,
                    a: base_count + lora_specs.len(),
                    b: base_count + lora_specs.len() + 1,
                });
                lora_specs.push(TensorSpec::f32(an, vec![inp, t.lora_rank]));
                lora_specs.push(TensorSpec::f32(bn, vec![out, t.lora_rank]));
                lora_host.push(a_vals);
                lora_host.push(b_vals);
            }
        }
        if !lora_specs.is_empty() {
            let mut specs: Vec<TensorSpec> =
                base.entries().iter().map(|e| e.spec.clone()).collect();
            specs.extend(lora_specs);
            base = Layout::sequential(specs)?;
        }
        let train_layout = Arc::new(base);
        let mut train_host = flat(&trainable_sections);
        train_host.extend(lora_host.iter().map(Vec::as_slice));
        let params = if host.is_some() {
            ParamSet::upload(b, train_layout, |i| train_host[i], true)?
        } else {
            ParamSet::zeros(b, train_layout, true)?
        };
        let train = if training {
            TrainState::new(b, params)?
        } else {
            TrainState::without_optimizer(b, params)?
        };
        let frozen = if frozen_sections.is_empty() {
            None
        } else {
            let layout = Arc::new(Isoformer::combine(sections, &frozen_sections)?);
            let frozen_host = flat(&frozen_sections);
            Some(if host.is_some() {
                ParamSet::upload(b, layout, |i| frozen_host[i], false)?
            } else {
                ParamSet::zeros(b, layout, false)?
            })
        };
        let mut lora = LoraState {
            rank: t.lora_rank,
            scale: t.lora_alpha / t.lora_rank as f32,
            merged: Vec::new(),
            row_scale: Vec::new(),
            grads: Vec::new(),
            delta: None,
            dy: None,
            db: None,
            entries,
        };
        let biggest = lora
            .entries
            .iter()
            .map(|e| e.out * e.inp)
            .max()
            .unwrap_or(0);
        if biggest > 0 {
            lora.delta = Some(Tensor::new(b, Role::Activation, biggest)?);
            lora.dy = Some(Tensor::new(b, Role::Activation, biggest)?);
            let rows = lora.entries.iter().map(|e| e.out).max().unwrap_or(0);
            lora.db = Some(Tensor::new(b, Role::Activation, rows * lora.rank)?);
        }
        for e in &lora.entries {
            lora.merged
                .push(Tensor::new(b, Role::Activation, e.out * e.inp)?);
            lora.row_scale
                .push(Tensor::from_f32(b, Role::Exact, &vec![lora.scale; e.out])?);
            if !lora.grads.iter().any(|(s, _)| *s == e.section) {
                let elems = sections[e.section].layout.total_bytes() / 4;
                lora.grads
                    .push((e.section, Tensor::new(b, Role::Exact, elems)?));
            }
        }
        let mut p = IsoformerParams {
            placement,
            sections_layouts: sections.iter().map(|s| s.layout.clone()).collect(),
            trainable_sections,
            frozen_sections,
            train,
            frozen,
            lora,
        };
        p.refresh_lora(b)?;
        Ok(p)
    }

    /// Recomputes every merged weight `W + (α/r)·B·Aᵀ` from the adapters' current compute copies (after
    /// every optimiser step, which [`Self::optimizer_step`] does).
    pub fn refresh_lora(&mut self, b: &B) -> Result<()> {
        if self.lora.entries.is_empty() {
            return Ok(());
        }
        let train = self.train.params.views()?;
        let frozen = match &self.frozen {
            Some(f) => f.views()?,
            None => Vec::new(),
        };
        let l = &mut self.lora;
        let delta = l.delta.as_mut().expect("sized with the entries");
        for (k, e) in l.entries.iter().enumerate() {
            let n = e.out * e.inp;
            let mut d = delta.view_mut().slice_mut(0, n)?;
            b.linear(
                d.rb(),
                train[e.b],
                train[e.a],
                None,
                LinearDims {
                    rows: e.out,
                    d_in: l.rank,
                    d_out: e.inp,
                },
            )?;
            b.scale_rows(d.rb(), l.row_scale[k].view())?;
            let base = frozen[self.placement[e.section].start + e.entry];
            b.add(l.merged[k].view_mut(), base, d.view())?;
        }
        Ok(())
    }

    /// One AdamW step on the train state, then the LoRA merge.
    pub fn optimizer_step(
        &mut self,
        b: &B,
        optimizer: &AdamW,
        lr_scale: f32,
        max_norm: Option<f32>,
    ) -> Result<StepReport> {
        let report = optimizer.step(b, &mut self.train, lr_scale, max_norm)?;
        self.refresh_lora(b)?;
        Ok(report)
    }

    /// Zeroes the gradients of the encoders' merged weights (before a backward).
    pub fn zero_lora_grads(&mut self, b: &B) -> Result<()> {
        for (_, g) in self.lora.grads.iter_mut() {
            b.zero(g.view_mut())?;
        }
        Ok(())
    }

    /// Adds `∂L/∂A_t = (α/r)·dWᵀ·B` and `∂L/∂B = (α/r)·dW·A_t` into the adapters' gradients, from the
    /// merged weights' gradients the encoder backward left.
    pub fn lora_backward(&mut self, b: &B) -> Result<()> {
        if self.lora.entries.is_empty() {
            return Ok(());
        }
        let (views, mut grads) = self.train.params_and_grads()?;
        let l = &mut self.lora;
        let (dy_t, db_t) = (l.dy.as_mut().expect("sized"), l.db.as_mut().expect("sized"));
        for (k, e) in l.entries.iter().enumerate() {
            let (_, sec_grads) = l
                .grads
                .iter()
                .find(|(s, _)| *s == e.section)
                .expect("one per section");
            let dw = sec_grads.view().slice(e.offset, e.out * e.inp)?;
            let mut dy = dy_t.view_mut().slice_mut(0, e.out * e.inp)?;
            b.copy(dy.rb(), dw)?;
            b.scale_rows(dy.rb(), l.row_scale[k].view())?;
            let dims = LinearDims {
                rows: e.out,
                d_in: l.rank,
                d_out: e.inp,
            };
            let [ga, gb] = grads
                .get_disjoint_mut([e.a, e.b])
                .expect("distinct entries");
            b.linear_backward(
                None,
                Some(ga.rb()),
                None,
                dy.view(),
                views[e.b],
                views[e.a],
                dims,
            )?;
            let mut db = db_t.view_mut().slice_mut(0, e.out * l.rank)?;
            b.zero(db.rb())?;
            b.linear_backward(
                Some(db.rb()),
                None,
                None,
                dy.view(),
                views[e.b],
                views[e.a],
                dims,
            )?;
            // One row: adds the compute-dtype values into the f32 gradient.
            b.sum_rows(gb.rb(), db.view())?;
        }
        Ok(())
    }

    pub fn train_layout(&self) -> &Arc<Layout> {
        self.train.params.layout()
    }

    /// Per-section parameter views (for inference).
    pub fn section_views(&self) -> Result<Vec<Vec<View<'_, B>>>> {
        let train = self.train.params.views()?;
        let frozen = match &self.frozen {
            Some(f) => f.views()?,
            None => Vec::new(),
        };
        Ok(self.split_merged(&train, &frozen))
    }

    fn split<'a>(&self, train: &[View<'a, B>], frozen: &[View<'a, B>]) -> Vec<Vec<View<'a, B>>> {
        self.placement
            .iter()
            .map(|p| {
                let src = if p.trainable { train } else { frozen };
                src[p.start..p.start + p.count].to_vec()
            })
            .collect()
    }

    /// [`Self::split`] with each adapted weight replaced by its merged `W_eff` (what the forward reads).
    fn split_merged<'a>(
        &'a self,
        train: &[View<'a, B>],
        frozen: &[View<'a, B>],
    ) -> Vec<Vec<View<'a, B>>> {
        let mut out = self.split(train, frozen);
        for (k, e) in self.lora.entries.iter().enumerate() {
            out[e.section][e.entry] = self.lora.merged[k].view();
        }
        out
    }

    /// Parameter views per section, and gradient views of the trainable sections (None for frozen ones).
    #[allow(clippy::type_complexity)]
    pub fn views_and_grads(
        &mut self,
    ) -> Result<(Vec<Vec<View<'_, B>>>, Vec<Option<Vec<ViewMut<'_, B>>>>)> {
        let frozen = match &self.frozen {
            Some(f) => f.views()?,
            None => Vec::new(),
        };
        let (train, grads) = self.train.params_and_grads()?;
        let placement = self.placement.clone();
        let mut views: Vec<Vec<View<'_, B>>> = placement
            .iter()
            .map(|p| {
                let src = if p.trainable { &train } else { &frozen };
                src[p.start..p.start + p.count].to_vec()
            })
            .collect();
        for (k, e) in self.lora.entries.iter().enumerate() {
            views[e.section][e.entry] = self.lora.merged[k].view();
        }
        let mut grads = grads.into_iter();
        let mut out: Vec<Option<Vec<ViewMut<'_, B>>>> = Vec::with_capacity(placement.len());
        // Trainable sections are laid out in section order, so the gradients come off in runs (the
        // adapters' come last and are not the model's). A LoRA encoder's gradients are its merged weights'.
        let mut lora_grads: Vec<(usize, Vec<ViewMut<'_, B>>)> = Vec::new();
        for (s, g) in self.lora.grads.iter_mut() {
            let r = ranges(&self.sections_layouts[*s]);
            lora_grads.push((*s, g.view_mut().split_ranges(&r)?));
        }
        for (s, p) in placement.iter().enumerate() {
            out.push(if p.trainable {
                Some(grads.by_ref().take(p.count).collect())
            } else {
                lora_grads
                    .iter()
                    .position(|(ls, _)| *ls == s)
                    .map(|i| std::mem::take(&mut lora_grads[i].1))
            });
        }
        Ok((views, out))
    }

    /// The LoRA adapters as host f32 (name, shape, values), for checkpoints.
    pub fn lora_host(&self, b: &B) -> Result<Vec<HostTensor>> {
        let masters = self.train.params.master_views()?;
        let layout = self.train_layout();
        let mut out = Vec::new();
        for e in &self.lora.entries {
            for i in [e.a, e.b] {
                let spec = &layout.entries()[i].spec;
                out.push((
                    spec.name.clone(),
                    spec.shape.dims().to_vec(),
                    b.read_f32(masters[i])?,
                ));
            }
        }
        Ok(out)
    }

    /// Every parameter as host f32, by combined name (`dna.…`, `rna.…`, aggregator names), in section order.
    pub fn to_host(&self, b: &B, model: &Isoformer) -> Result<Vec<HostTensor>> {
        let train = self.train.params.master_views()?;
        let frozen = match &self.frozen {
            Some(f) => f.views()?,
            None => Vec::new(),
        };
        let views = self.split(&train, &frozen);
        let mut out = Vec::new();
        for (s, section) in model.sections().iter().enumerate() {
            for (e, v) in section.layout.entries().iter().zip(&views[s]) {
                out.push((
                    format!("{}{}", section.prefix, e.spec.name),
                    e.spec.shape.dims().to_vec(),
                    b.read_f32(*v)?,
                ));
            }
        }
        Ok(out)
    }
}
