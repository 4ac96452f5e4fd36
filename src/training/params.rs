//! IsoFormer's parameters on a backend, split by what training does with them: the trainable sections (the
//! aggregator and head, and every fine-tuned encoder) in one [`TrainState`] (f32 masters, gradients and both
//! AdamW moments, one allocation each), the frozen encoders in one inference [`ParamSet`] (no gradients, no
//! moments). Each section's views are a contiguous run of one of the two.

use std::sync::Arc;

use crate::backend::state::{ParamSet, TrainState};
use crate::backend::{Backend, View, ViewMut};
use crate::models::isoformer::{EncoderMode, Isoformer};
use crate::runtime::Layout;
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
    pub trainable_sections: Vec<usize>,
    pub frozen_sections: Vec<usize>,
    pub train: TrainState<B>,
    pub frozen: Option<ParamSet<B>>,
}

/// Which sections train: the aggregator always, encoders when their mode says so.
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

impl<B: Backend> IsoformerParams<B> {
    /// Uploads `host` (per section, per entry) to the backend.
    pub fn upload(b: &B, model: &Isoformer, host: &[Vec<Vec<f32>>]) -> Result<Self> {
        let flags = trainable_flags(model);
        let sections = model.sections();
        if host.len() != sections.len() {
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
            list.iter()
                .flat_map(|&s| host[s].iter().map(Vec::as_slice))
                .collect()
        };
        let train_layout = Arc::new(Isoformer::combine(sections, &trainable_sections)?);
        let train_host = flat(&trainable_sections);
        let params = ParamSet::upload(b, train_layout, |i| train_host[i], true)?;
        let train = TrainState::new(b, params)?;
        let frozen = if frozen_sections.is_empty() {
            None
        } else {
            let layout = Arc::new(Isoformer::combine(sections, &frozen_sections)?);
            let frozen_host = flat(&frozen_sections);
            Some(ParamSet::upload(b, layout, |i| frozen_host[i], false)?)
        };
        Ok(IsoformerParams {
            placement,
            trainable_sections,
            frozen_sections,
            train,
            frozen,
        })
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
        Ok(self.split(&train, &frozen))
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
        let views = placement
            .iter()
            .map(|p| {
                let src = if p.trainable { &train } else { &frozen };
                src[p.start..p.start + p.count].to_vec()
            })
            .collect();
        let mut grads = grads.into_iter();
        let mut out: Vec<Option<Vec<ViewMut<'_, B>>>> = Vec::with_capacity(placement.len());
        // Trainable sections are laid out in section order, so the gradients come off in runs.
        for p in &placement {
            out.push(if p.trainable {
                Some(grads.by_ref().take(p.count).collect())
            } else {
                None
            });
        }
        Ok((views, out))
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
