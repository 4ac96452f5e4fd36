//! The released IsoFormer checkpoint (HF `InstaDeepAI/isoformer`, `pytorch_model.bin` converted to safetensors
//! with `tools/convert_checkpoint.py`): its tensor names mapped onto the model's sections.
//!
//! | section | released prefix |
//! |---|---|
//! | DNA (Enformer) | `enformer.` (enformer-pytorch names; `_trunk.*` aliases accepted) |
//! | RNA (NT-v2) | `nt_model.esm.` |
//! | protein (ESM-2) | `esm_model.esm.` |
//! | aggregator | `cross_attention_layer_rna.*`, `cross_attention_layer_protein.*` as released; `head.*` |
//!
//! The released head's names and widths are not public (see README): the head is read under this engine's
//! names, and a checkpoint whose head differs is refused with the list of tensors it could not place. Every
//! missing tensor and every tensor nothing reads is listed, never skipped silently.

use std::path::Path;
use std::sync::Arc;

use super::{EncoderNet, Isoformer, Modality};
use crate::models::enformer::EnformerNames;
use crate::models::weights::{ModelParams, NameResolver, Prefixes, WeightFile};
use crate::{Error, Result};

fn resolver(model: &Isoformer, s: usize) -> Box<dyn NameResolver> {
    match model.encoders.get(s) {
        Some(enc) => match (&enc.net, enc.modality) {
            (EncoderNet::Enformer(_), _) => Box::new(EnformerNames {
                prefixes: vec!["enformer.".into()],
            }),
            (EncoderNet::Transformer(_), Modality::Protein) => {
                Box::new(Prefixes(vec!["esm_model.esm.".into(), "esm_model.".into()]))
            }
            (EncoderNet::Transformer(_), Modality::Rna) => {
                Box::new(Prefixes(vec!["nt_model.esm.".into(), "nt_model.".into()]))
            }
            (EncoderNet::Transformer(_), Modality::Dna) => {
                Box::new(Prefixes(vec!["dna_model.esm.".into(), "dna_model.".into()]))
            }
        },
        None => Box::new(Prefixes(vec!["".into()])),
    }
}

/// Tensors of the released file that inference does not need.
fn expected_extra(name: &str) -> bool {
    [
        "lm_head",
        "contact_head",
        "position_ids",
        "inv_freq",
        "num_batches_tracked",
        "enformer._heads.",
        "enformer._trunk.",
    ]
    .iter()
    .any(|p| name.contains(p))
}

/// Every section's parameters from a released-layout checkpoint.
pub fn load_released(model: &Isoformer, path: &Path) -> Result<Vec<Vec<Vec<f32>>>> {
    let file = Arc::new(WeightFile::open(path)?);
    let mut missing = Vec::new();
    let mut read = std::collections::HashSet::new();
    for (s, section) in model.sections().iter().enumerate() {
        let r = resolver(model, s);
        for e in section.layout.entries() {
            let candidates = r.candidates(&e.spec.name);
            let found: Vec<&String> = candidates.iter().filter(|c| file.contains(c)).collect();
            if found.is_empty() {
                missing.push(
                    candidates
                        .first()
                        .cloned()
                        .unwrap_or_else(|| e.spec.name.clone()),
                );
            }
            read.extend(found.into_iter().cloned());
        }
    }
    let mut unknown: Vec<&str> = file
        .names()
        .into_iter()
        .filter(|n| !read.contains(*n) && !expected_extra(n))
        .collect();
    unknown.sort_unstable();
    if !missing.is_empty() || !unknown.is_empty() {
        return Err(Error::invalid(
            "released checkpoint",
            format!(
                "{} does not match the config: {} missing tensor(s) {:?}; {} tensor(s) nothing reads {:?}",
                path.display(),
                missing.len(),
                missing,
                unknown.len(),
                unknown
            ),
        ));
    }
    model
        .sections()
        .iter()
        .enumerate()
        .map(|(s, section)| {
            let r = resolver(model, s);
            let p = ModelParams::load(section.layout.clone(), file.clone(), r.as_ref(), true)?;
            Ok((0..section.layout.entries().len())
                .map(|i| p.get(i).to_vec())
                .collect())
        })
        .collect()
}
