//! Initial parameters of each section: pre-trained weights from a `save_pretrained` directory, or a seeded
//! random initialisation in PyTorch's default manner (uniform ±1/√fan_in for matrices, ones for norm
//! scales and running variances, zeros for biases and running means).

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{EncoderNet, Isoformer};
use crate::models::enformer::EnformerNames;
use crate::models::weights::{ModelParams, NameResolver, Prefixes, WeightFile};
use crate::runtime::Layout;
use crate::{Error, Result};

/// Random values for every entry of `layout`, as one host vector per entry.
pub fn random_section(layout: &Layout, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    layout
        .entries()
        .iter()
        .map(|e| {
            let dims = e.spec.shape.dims();
            let name = &e.spec.name;
            let n = e.numel();
            if dims.len() <= 1 {
                let one = name.ends_with("running_var")
                    || (name.ends_with(".weight") && !name.contains("head."));
                vec![if one { 1.0 } else { 0.0 }; n]
            } else {
                let fan_in = (n / dims[0]).max(1);
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            }
        })
        .collect()
}

/// Pre-trained weights of encoder `e` from a directory (`config.json` is not read: the IsoFormer config
/// holds the shapes, and a mismatch is an error naming the tensor).
pub fn load_encoder(model: &Isoformer, e: usize, dir: &Path) -> Result<Vec<Vec<f32>>> {
    let file_path = if dir.is_dir() {
        dir.join("model.safetensors")
    } else {
        dir.to_path_buf()
    };
    let file = Arc::new(WeightFile::open(&file_path)?);
    let enc = &model.encoders[e];
    let resolver: Box<dyn NameResolver> = match enc.net {
        EncoderNet::Enformer(_) => Box::new(EnformerNames {
            prefixes: vec!["".into(), "enformer.".into()],
        }),
        EncoderNet::Transformer(_) => Box::new(Prefixes(vec!["esm.".into(), "".into()])),
    };
    let layout = enc.net.layout().clone();
    let params = ModelParams::load(layout.clone(), file, resolver.as_ref(), true)?;
    Ok((0..layout.entries().len())
        .map(|i| params.get(i).to_vec())
        .collect())
}

/// Every section's initial values: pre-trained where the config gives weights, random where it asks for
/// random initialisation (seeded per section), the aggregator and head always random.
pub fn initial_sections(model: &Isoformer, seed: u64) -> Result<Vec<Vec<Vec<f32>>>> {
    let cfg = &model.cfg;
    let mut out = Vec::new();
    for (s, section) in model.sections().iter().enumerate() {
        let section_seed = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(s as u64 + 1);
        let values = match model.encoders.get(s) {
            Some(enc) => {
                let m = enc.modality;
                if cfg.random_init.contains(&m) {
                    random_section(&section.layout, section_seed)
                } else if let Some(dir) = cfg.weights(m) {
                    load_encoder(model, s, dir)?
                } else {
                    return Err(Error::invalid(
                        "isoformer weights",
                        format!(
                            "the {} encoder needs pre-trained weights: pass --weights-{} DIR, set weights_{} in \
                             the config, or list \"{}\" in random_init",
                            m.name(),
                            m.name(),
                            m.name(),
                            m.name()
                        ),
                    ));
                }
            }
            None => random_section(&section.layout, section_seed),
        };
        out.push(values);
    }
    Ok(out)
}
