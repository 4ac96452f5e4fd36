//! Reading and writing f32 tensors in safetensors files. Writes go to a temporary file that is renamed into
//! place, so an interrupted write never leaves a file that looks complete.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use std::io::{Seek, SeekFrom, Write};

use super::finite::check_finite;
use super::output::AtomicOutput;
use crate::error::checked_product;
use crate::{Error, Result};

/// A named f32 tensor to write.
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes `tensors` (and string `metadata`) to `path` atomically, through [`StreamingSafetensors`]: the
/// header's keys are sorted, so the same tensors and metadata give the same bytes in every run.
pub fn save_f32(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    for t in tensors {
        if checked_product("safetensors output", &t.shape)? != t.data.len() {
            return Err(Error::Tensor {
                name: t.name.clone(),
                msg: format!("{} values for shape {:?}", t.data.len(), t.shape),
            });
        }
    }
    let layout: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let mut out = StreamingSafetensors::create(path, &[], &layout, metadata)?;
    for (i, t) in tensors.iter().enumerate() {
        out.write(i, t.data)?;
    }
    out.commit()
}

/// A safetensors file written tensor by tensor, in any order, with its header computed up front from the
/// tensors' names and shapes: memory stays bounded by one tensor whatever the file's size. It goes through
/// [`AtomicOutput`], so an unfinished file is never renamed into place, and [`Self::commit`] refuses one with
/// a tensor never written.
pub struct StreamingSafetensors {
    out: AtomicOutput,
    /// Per tensor: absolute byte offset in the file, element count, written yet.
    slots: Vec<(u64, usize, bool)>,
}

impl StreamingSafetensors {
    pub fn create(
        target: &Path,
        inputs: &[&Path],
        tensors: &[(String, Vec<usize>)],
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        // Sorted, so that the header does not depend on the hash map's order.
        let metadata: std::collections::BTreeMap<String, String> = metadata.into_iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(metadata));
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let numel = checked_product("safetensors output", shape)?;
            let bytes = checked_product("safetensors output", &[numel, 4])?;
            let end = offset.checked_add(bytes).ok_or_else(|| {
                Error::invalid(
                    "safetensors output",
                    "the tensors overflow the address space",
                )
            })?;
            if header
                .insert(
                    name.clone(),
                    serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
                )
                .is_some()
            {
                return Err(Error::Tensor { name: name.clone(), msg: "named twice in one output".into() });
            }
            sizes.push((offset, numel));
            offset = end;
        }
        let mut json = serde_json::to_string(&header).expect("a JSON map serialises");
        while !(8 + json.len()).is_multiple_of(8) {
            json.push(' ');
        }
        let data_start = 8 + json.len() as u64;
        let mut out = AtomicOutput::create(target, inputs)?;
        let w = out.writer();
        w.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(|e| Error::io(target, e))?;
        w.write_all(json.as_bytes())
            .map_err(|e| Error::io(target, e))?;
        // The file has its full size from the start; tensors fill their ranges.
        w.flush().map_err(|e| Error::io(target, e))?;
        w.get_ref()
            .set_len(data_start + offset as u64)
            .map_err(|e| Error::io(target, e))?;
        Ok(StreamingSafetensors {
            out,
            slots: sizes
                .into_iter()
                .map(|(o, n)| (data_start + o as u64, n, false))
                .collect(),
        })
    }

    /// Writes tensor `i` (in the order given to [`Self::create`]).
    pub fn write(&mut self, i: usize, data: &[f32]) -> Result<()> {
        let (offset, numel, _) = *self
            .slots
            .get(i)
            .ok_or_else(|| Error::invalid("safetensors output", format!("no tensor {i}")))?;
        if data.len() != numel {
            return Err(Error::shape(
                "safetensors output",
                format!("tensor {i}: {} values for {numel}", data.len()),
            ));
        }
        let target = self.out.target().to_path_buf();
        let w = self.out.writer();
        w.seek(SeekFrom::Start(offset))
            .and_then(|_| w.write_all(bytemuck::cast_slice(data)))
            .map_err(|e| Error::io(&target, e))?;
        self.slots[i].2 = true;
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        if let Some(i) = self.slots.iter().position(|s| !s.2) {
            return Err(Error::invalid(
                "safetensors output",
                format!("tensor {i} was never written"),
            ));
        }
        self.out.commit()
    }
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

/// A read-only map of a safetensors file (a regular file: see `open_regular`). Mapped rather than read,
/// so the header is checked before any tensor is touched: a file of the wrong shape, such as a sparse
/// multi-terabyte one, is refused without reading it.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = super::input::open_regular(path)?;
    // SAFETY: a read-only map of a file that is not modified while we run.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The string metadata of a safetensors file, from its header alone (its tensors are not touched).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = map_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("not a safetensors file: {e}"),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Reads every f32 tensor of a safetensors file.
pub fn load_f32(path: &Path) -> Result<LoadedTensors> {
    let bytes = map_file(path)?;
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
        // Checkpoints, caches, statistics and gamma tables: none holds a NaN or infinity legitimately.
        check_finite(&name, path, &data)?;
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(LoadedTensors {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_tensors_written_out_of_order_read_back_like_save_f32() {
        let dir = std::env::temp_dir().join(format!("isoformer-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (
            dir.join("streamed.safetensors"),
            dir.join("saved.safetensors"),
        );
        let x: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let y: Vec<f32> = vec![-1.0, 2.5];
        let meta: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let mut s = StreamingSafetensors::create(
            &a,
            &[],
            &[("x".into(), vec![2, 3]), ("y".into(), vec![1, 2])],
            meta.clone(),
        )
        .unwrap();
        s.write(1, &y).unwrap();
        assert!(
            s.write(0, &y).is_err(),
            "a tensor of the wrong size is refused"
        );
        s.write(0, &x).unwrap();
        s.commit().unwrap();
        save_f32(
            &b,
            &[
                NamedTensor {
                    name: "x".into(),
                    shape: vec![2, 3],
                    data: &x,
                },
                NamedTensor {
                    name: "y".into(),
                    shape: vec![1, 2],
                    data: &y,
                },
            ],
            meta,
        )
        .unwrap();
        let (la, lb) = (load_f32(&a).unwrap(), load_f32(&b).unwrap());
        assert_eq!(la.tensors, lb.tensors);
        assert_eq!(la.metadata, lb.metadata);
        // A tensor never written: no file.
        let c = dir.join("unfinished.safetensors");
        let s = StreamingSafetensors::create(&c, &[], &[("x".into(), vec![2])], HashMap::new())
            .unwrap();
        assert!(s.commit().is_err());
        assert!(!c.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A NaN or infinity in any tensor of a file (a checkpoint's parameter or optimiser moment, a cached
    /// embedding) is an error naming the tensor, the file and the element; eval and predict printed NaN
    /// tables and files before.
    #[test]
    fn non_finite_values_are_refused_with_the_tensor_named() {
        let dir = std::env::temp_dir().join(format!("iso-st-nan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ck.safetensors");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let clean = vec![0.5f32; 40];
            let mut dirty = clean.clone();
            dirty[33] = bad;
            let tensors = [
                NamedTensor {
                    name: "param/a".into(),
                    shape: vec![40],
                    data: &clean,
                },
                NamedTensor {
                    name: "adam_m/b".into(),
                    shape: vec![4, 10],
                    data: &dirty,
                },
            ];
            save_f32(&path, &tensors, HashMap::new()).unwrap();
            let e = load_f32(&path).err().expect("refused").to_string();
            assert!(
                e.contains("adam_m/b") && e.contains("ck.safetensors") && e.contains("element 33"),
                "{bad}: {e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The same tensors and metadata give the same bytes, whatever order the metadata's hash map (seeded
    /// afresh per map) iterates in: checkpoints of identical runs compare equal with `cmp`.
    #[test]
    fn identical_contents_give_identical_bytes() {
        let dir = std::env::temp_dir().join(format!("iso-st-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = [1.0f32, -2.0, 3.5];
        let write = |file: &str| {
            let meta: HashMap<String, String> = (0..16)
                .map(|i| (format!("key{i}"), format!("value{i}")))
                .collect();
            let path = dir.join(file);
            let tensor = |name: &str| NamedTensor {
                name: name.into(),
                shape: vec![3],
                data: &data,
            };
            save_f32(&path, &[tensor("b"), tensor("a")], meta).unwrap();
            std::fs::read(&path).unwrap()
        };
        let first = write("first.safetensors");
        for i in 0..4 {
            assert_eq!(first, write(&format!("again{i}.safetensors")));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
