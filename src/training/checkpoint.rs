//! Training checkpoints: one safetensors file, written atomically, holding every parameter (`param/NAME`,
//! f32 masters of the trained sections and the frozen encoders' weights), both AdamW moments of the trained
//! ones (`adam_m/NAME`, `adam_v/NAME`), and in its metadata the config, the optimiser step, the data
//! position (epoch and batch: the data order is a function of the seed and the epoch, and the model draws no
//! random numbers, so this is the whole random state), the target normalisation, the tissues and the loss
//! history.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::params::{is_lora_name, IsoformerParams};
use crate::backend::Backend;
use crate::data::TargetStats;
use crate::models::isoformer::{Isoformer, IsoformerConfig};
use crate::runtime::safetensors_file::{load_f32, save_f32, LoadedTensors, NamedTensor};
use crate::{Error, Result};

/// The `format` metadata of an engine checkpoint.
pub const FORMAT: &str = "isoformer-engine-checkpoint-1";

/// Everything but the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainProgress {
    /// Optimiser steps taken.
    pub step: usize,
    /// Where the next micro-batch comes from.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub seed: u64,
    /// Training loss per optimiser step, and (step, validation loss) per evaluation.
    pub train_losses: Vec<f32>,
    pub val_losses: Vec<(usize, f64)>,
    pub best_val_loss: Option<f64>,
    pub evals_since_best: usize,
    pub target_mean: Vec<f32>,
    pub target_std: Vec<f32>,
    pub tissues: Vec<String>,
}

impl TrainProgress {
    pub fn target_stats(&self) -> TargetStats {
        TargetStats {
            mean: self.target_mean.clone(),
            std: self.target_std.clone(),
        }
    }
}

pub fn save<B: Backend>(
    path: &Path,
    b: &B,
    model: &Isoformer,
    params: &IsoformerParams<B>,
    progress: &TrainProgress,
) -> Result<()> {
    let mut host = params.to_host(b, model)?;
    host.extend(params.lora_host(b)?);
    let (m, v) = params.train.moment_views()?;
    type Moments = (String, Vec<usize>, Vec<f32>, Vec<f32>);
    let moments: Vec<Moments> = params
        .train_layout()
        .entries()
        .iter()
        .zip(m.iter().zip(&v))
        .map(|(e, (m, v))| {
            Ok((
                e.spec.name.clone(),
                e.spec.shape.dims().to_vec(),
                b.read_f32(*m)?,
                b.read_f32(*v)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut tensors = Vec::new();
    for (name, shape, data) in &host {
        tensors.push(NamedTensor {
            name: format!("param/{name}"),
            shape: shape.clone(),
            data,
        });
    }
    for (name, shape, m, v) in &moments {
        tensors.push(NamedTensor {
            name: format!("adam_m/{name}"),
            shape: shape.clone(),
            data: m,
        });
        tensors.push(NamedTensor {
            name: format!("adam_v/{name}"),
            shape: shape.clone(),
            data: v,
        });
    }
    let mut meta = HashMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert(
        "config".into(),
        serde_json::to_string(&model.cfg).expect("serialisable"),
    );
    meta.insert(
        "progress".into(),
        serde_json::to_string(progress).expect("serialisable"),
    );
    save_f32(path, &tensors, meta)
}

/// A checkpoint read back: the config, the progress, and the tensors.
pub struct Checkpoint {
    pub config: IsoformerConfig,
    pub progress: TrainProgress,
    tensors: LoadedTensors,
    path: std::path::PathBuf,
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Self> {
        let tensors = load_f32(path)?;
        let bad = |msg: String| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg,
        };
        if tensors.metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not an isoformer-engine checkpoint (metadata format is not {FORMAT})"
            )));
        }
        let field = |k: &str| {
            tensors
                .metadata
                .get(k)
                .ok_or_else(|| bad(format!("metadata has no '{k}'")))
        };
        let config = IsoformerConfig::parse(field("config")?, path)?;
        let progress: TrainProgress = serde_json::from_str(field("progress")?)
            .map_err(|e| bad(format!("progress metadata: {e}")))?;
        Ok(Checkpoint {
            config,
            progress,
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// Host parameters per section and entry, by name; a missing or mis-shaped tensor is an error naming it,
    /// and so is a tensor the model does not have.
    pub fn sections(&self, model: &Isoformer) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut used = std::collections::HashSet::new();
        let mut out = Vec::new();
        for section in model.sections() {
            let mut values = Vec::new();
            for e in section.layout.entries() {
                let name = format!("param/{}{}", section.prefix, e.spec.name);
                values.push(self.tensors.get(&name, e.spec.shape.dims())?.to_vec());
                used.insert(name);
            }
            out.push(values);
        }
        let mut unknown: Vec<&String> = self
            .tensors
            .tensors
            .keys()
            .filter(|k| k.starts_with("param/") && !used.contains(*k) && !is_lora_name(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::invalid(
                "checkpoint",
                format!(
                    "{} holds parameters this model does not have: {unknown:?}",
                    self.path.display()
                ),
            ));
        }
        Ok(out)
    }

    /// The LoRA adapters' values by name (empty without LoRA).
    pub fn lora_values(&self) -> HashMap<String, Vec<f32>> {
        self.tensors
            .tensors
            .iter()
            .filter_map(|(k, (_, v))| {
                let name = k.strip_prefix("param/")?;
                is_lora_name(name).then(|| (name.to_string(), v.clone()))
            })
            .collect()
    }

    /// Uploads the checkpoint's parameters (adapters included) to a backend.
    pub fn upload<B: Backend>(&self, b: &B, model: &Isoformer) -> Result<IsoformerParams<B>> {
        IsoformerParams::upload_with_lora(
            b,
            model,
            &self.sections(model)?,
            Some(&self.lora_values()),
        )
    }

    /// Writes the AdamW moments into the uploaded parameters.
    pub fn restore_moments<B: Backend>(
        &self,
        b: &B,
        params: &mut IsoformerParams<B>,
    ) -> Result<()> {
        let layout = params.train_layout().clone();
        let (m, v) = params.train.moments_mut()?;
        for ((e, m), v) in layout.entries().iter().zip(m).zip(v) {
            let dims = e.spec.shape.dims();
            b.write_f32(
                m,
                self.tensors.get(&format!("adam_m/{}", e.spec.name), dims)?,
            )?;
            b.write_f32(
                v,
                self.tensors.get(&format!("adam_v/{}", e.spec.name), dims)?,
            )?;
        }
        params.train.step = self.progress.step as u64;
        Ok(())
    }
}
