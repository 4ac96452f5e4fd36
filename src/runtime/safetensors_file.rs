//! Reading and writing f32 tensors in safetensors files. Writes go to a temporary file that is renamed into
//! place, so an interrupted write never leaves a file that looks complete.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::output::write_atomically;
use crate::{Error, Result};

/// A named f32 tensor to write.
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes `tensors` (and string `metadata`) to `path` atomically.
pub fn save_f32(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|t| {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(Error::Tensor {
                    name: t.name.clone(),
                    msg: format!("{} values for shape {:?}", t.data.len(), t.shape),
                });
            }
            TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(t.data))
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Tensor {
                    name: t.name.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("cannot serialise: {e}"),
    })?;
    write_atomically(path, &bytes)
}

/// A loaded safetensors file: f32 tensors by name, plus the metadata.
pub struct LoadedTensors {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub metadata: HashMap<String, String>,
}

impl LoadedTensors {
    /// The tensor `name` with exactly `shape`, or an error naming the tensor and listing what the file has.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        match self.tensors.get(name) {
            Some((s, data)) if s == shape => Ok(data),
            Some((s, _)) => Err(Error::Tensor {
                name: name.into(),
                msg: format!("has shape {s:?}, expected {shape:?}"),
            }),
            None => {
                let mut names: Vec<&String> = self.tensors.keys().collect();
                names.sort();
                Err(Error::Tensor {
                    name: name.into(),
                    msg: format!("missing; the file has {names:?}"),
                })
            }
        }
    }
}

/// Reads every f32 tensor of a safetensors file.
pub fn load_f32(path: &Path) -> Result<LoadedTensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::Tensor {
                name,
                msg: format!("is {:?}, expected F32", view.dtype()),
            });
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(LoadedTensors {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}
