//! The on-disk cache of frozen encoders' outputs. When every encoder is frozen, each sequence's embedding
//! is computed once and kept as a small safetensors file keyed by a 128-bit hash of the encoder's input
//! (its token ids or one-hot window) and of a fingerprint of the encoder (its section's config and every
//! weight bit): later epochs, evaluations and runs with the same weights train only the aggregator and head.
//! A changed weight or crop gives a new key, never a stale embedding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::models::isoformer::Isoformer;
use crate::runtime::safetensors_file::{load_f32, save_f32, NamedTensor};
use crate::{Error, Result};

/// FNV-1a, 64-bit, from a seed.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn hash128(bytes: &[u8]) -> String {
    format!(
        "{:016x}{:016x}",
        fnv(0x243F_6A88_85A3_08D3, bytes),
        fnv(0x1319_8A2E_0370_7344, bytes)
    )
}

pub struct EmbeddingCache {
    dir: PathBuf,
    /// Per encoder: the fingerprint mixed into every key.
    fingerprints: Vec<String>,
    pub hits: usize,
    pub misses: usize,
}

impl EmbeddingCache {
    /// A cache under `dir` for `model`'s encoders with these host weights (per section, per entry).
    pub fn new(dir: &Path, model: &Isoformer, host: &[Vec<Vec<f32>>]) -> Result<Self> {
        crate::runtime::output::create_output_dir(dir)?;
        let fingerprints = model
            .encoders
            .iter()
            .enumerate()
            .map(|(e, enc)| {
                let mut bytes = format!(
                    "{:?}",
                    enc.net
                        .layout()
                        .entries()
                        .iter()
                        .map(|x| (&x.spec.name, x.spec.shape.dims()))
                        .collect::<Vec<_>>()
                )
                .into_bytes();
                bytes.extend(
                    format!("{}|{}", enc.modality.name(), model.cfg.width(enc.modality)).bytes(),
                );
                for values in &host[e] {
                    bytes.extend(hash128(bytemuck::cast_slice(values)).bytes());
                }
                hash128(&bytes)
            })
            .collect();
        Ok(EmbeddingCache {
            dir: dir.to_path_buf(),
            fingerprints,
            hits: 0,
            misses: 0,
        })
    }

    fn path(&self, e: usize, input: &[u8]) -> PathBuf {
        let mut bytes = self.fingerprints[e].clone().into_bytes();
        bytes.extend_from_slice(input);
        let key = hash128(&bytes);
        self.dir.join(&key[..2]).join(format!("{key}.safetensors"))
    }

    /// Whether the cache holds encoder `e`'s embedding of this input (read nothing, count nothing).
    pub fn contains(&self, e: usize, input: &[u8]) -> bool {
        self.path(e, input).is_file()
    }

    /// The cached rows `[rows, width]` for this input, if present.
    pub fn get(
        &mut self,
        e: usize,
        input: &[u8],
        rows: usize,
        width: usize,
    ) -> Result<Option<Vec<f32>>> {
        let path = self.path(e, input);
        if !path.is_file() {
            self.misses += 1;
            return Ok(None);
        }
        // A damaged entry (a truncated copy, a NaN) names itself and the way out.
        let mut f = load_f32(&path).map_err(|e| Error::Context {
            context: format!(
                "embedding cache entry {} is unreadable; delete it (or the cache directory) and rerun",
                path.display()
            ),
            source: Box::new(e),
        })?;
        let (shape, data) = f.tensors.remove("embedding").ok_or_else(|| Error::Tensor {
            name: "embedding".into(),
            msg: format!("missing from the cache entry {}", path.display()),
        })?;
        if shape != [rows, width] {
            return Err(Error::Tensor {
                name: "embedding".into(),
                msg: format!(
                    "cache entry {} has shape {shape:?}, expected [{rows}, {width}]",
                    path.display()
                ),
            });
        }
        self.hits += 1;
        Ok(Some(data))
    }

    pub fn put(&self, e: usize, input: &[u8], rows: &[f32], width: usize) -> Result<()> {
        let path = self.path(e, input);
        let parent = path.parent().expect("a cache path has a parent");
        std::fs::create_dir_all(parent).map_err(|err| Error::io(parent, err))?;
        let t = NamedTensor {
            name: "embedding".into(),
            shape: vec![rows.len() / width.max(1), width],
            data: rows,
        };
        save_f32(&path, &[t], HashMap::new())
    }
}
