//! Model parameters: a named layout filled from a safetensors file.
//!
//! The file is memory-mapped. When every tensor is stored as f32 the parameters are views straight into
//! the map (no copy); otherwise (bf16/f16 checkpoints, or training, which needs owned weights) they are
//! converted once into one planned arena. Names are resolved through a list of prefixes and aliases, so
//! `esm.`-prefixed and bare HF names, or Enformer's `_trunk.` duplicates, all load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::{Mmap, MmapOptions};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::runtime::finite::{check_finite, non_finite_error};
use crate::runtime::input::open_regular;
use crate::runtime::{Arena, Layout, TensorSpec};
use crate::{Error, Result};

#[derive(Clone, Debug)]
/// One tensor of a safetensors file: dtype, shape and byte range inside the file.
pub struct StoredTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the map.
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file.
pub struct WeightFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, StoredTensor>,
    pub metadata: HashMap<String, String>,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightFile({}, {} tensors)",
            self.path.display(),
            self.tensors.len()
        )
    }
}

/// A safetensors file's tensors by name, and its string metadata.
pub type TensorIndex = (HashMap<String, StoredTensor>, HashMap<String, String>);

/// Tensors and metadata of a safetensors file's bytes, validated: every tensor's byte range lies inside the
/// file and holds exactly its shape's elements of its dtype (all arithmetic checked, so a corrupt header is
/// an error naming the tensor, never a wrapped bound), and the last tensor ends the file (`read_metadata`
/// checks that). The fuzz target of the header parser calls this.
pub fn index_tensors(bytes: &[u8], path: &Path) -> Result<TensorIndex> {
    let bad = |msg: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg,
    };
    let (header_len, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let base = header_len
        .checked_add(8)
        .ok_or_else(|| bad("header length overflows".into()))?;
    let mut tensors = HashMap::new();
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        let range = base.checked_add(a).zip(base.checked_add(b));
        let Some((start, end)) = range.filter(|&(s, e)| s <= e && e <= bytes.len()) else {
            return Err(Error::Tensor {
                name,
                msg: format!("data range {a}..{b} lies outside {}", path.display()),
            });
        };
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        if elems != Some(end - start) {
            return Err(Error::Tensor {
                name,
                msg: format!(
                    "shape {:?} of {:?} does not fill its {} bytes in {}",
                    info.shape,
                    info.dtype,
                    end - start,
                    path.display()
                ),
            });
        }
        tensors.insert(
            name,
            StoredTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        );
    }
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        // SAFETY: read-only map of a weights file that is not modified while we run.
        let map = unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        // The header is checked before any tensor byte is touched: a file that is not a weights file
        // (say a sparse one of terabytes) is refused at once instead of being paged in first.
        let (tensors, metadata) = index_tensors(&map, path)?;
        // Every tensor the model reads is read at load (checked or copied), and prefaulting all pages
        // in one call costs less than a fault per page: an NT-v2 250M `embed` of one short sequence
        // (the fixed cost: load, check, bf16 copy) took 0.38–0.41 s instead of 0.45–0.49 s in f32 and
        // 0.44–0.46 s instead of 0.49–0.59 s in bf16 (Zen 5, alternating, three runs each). A kernel
        // without MADV_POPULATE_READ (before Linux 5.14) faults the pages in as they are read instead.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::PopulateRead);
        Ok(WeightFile {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn f32_view(&self, t: &StoredTensor) -> Option<&[f32]> {
        (t.dtype == Dtype::F32)
            .then(|| bytemuck::try_cast_slice(&self.map[t.start..t.end]).ok())
            .flatten()
    }

    /// Converts a stored tensor to f32 into `out`.
    fn read_into(&self, name: &str, t: &StoredTensor, out: &mut [f32]) -> Result<()> {
        let bytes = &self.map[t.start..t.end];
        let n = out.len();
        let unsupported = || Error::Tensor {
            name: name.into(),
            msg: format!("dtype {:?} is not supported (f32, bf16, f16)", t.dtype),
        };
        let width = match t.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            _ => return Err(unsupported()),
        };
        if bytes.len() != n * width {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!("holds {} bytes, expected {}", bytes.len(), n * width),
            });
        }
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(width)) {
            *o = match t.dtype {
                Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                Dtype::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            };
        }
        Ok(())
    }
}

/// How a model's parameter names map to file names: candidates tried in order for each parameter.
pub trait NameResolver {
    fn candidates(&self, name: &str) -> Vec<String>;
}

/// Tries `prefix + name` for each prefix (e.g. `["esm.", ""]`).
pub struct Prefixes(pub Vec<String>);

impl NameResolver for Prefixes {
    fn candidates(&self, name: &str) -> Vec<String> {
        self.0.iter().map(|p| format!("{p}{name}")).collect()
    }
}

enum Storage {
    Mapped {
        file: Arc<WeightFile>,
        ranges: Vec<(usize, usize)>,
        /// Each entry's tensor name in the file, for the finiteness check's error.
        names: Vec<String>,
    },
    Owned(Arena),
}

/// The parameters of a model, in its layout order.
pub struct ModelParams {
    layout: Arc<Layout>,
    storage: Storage,
    /// Tensors of the weight file that the model does not read (see [`ModelParams::unused`]).
    unused: Vec<String>,
    /// Mapped values whose finiteness is still to be checked ([`ModelParams::load_unchecked`]).
    unchecked: AtomicBool,
}

impl ModelParams {
    /// Parameters initialised to zero, owned (for tests and training from scratch).
    pub fn zeros(layout: Arc<Layout>) -> Self {
        ModelParams {
            storage: Storage::Owned(Arena::zeros(layout.clone())),
            layout,
            unused: Vec::new(),
            unchecked: AtomicBool::new(false),
        }
    }

    /// Loads every parameter of `layout` from `file`. A missing or mis-shaped tensor is an error that names
    /// it and shows the file's tensors of similar names. `owned` forces a copy (training).
    pub fn load(
        layout: Arc<Layout>,
        file: Arc<WeightFile>,
        resolver: &dyn NameResolver,
        owned: bool,
    ) -> Result<Self> {
        let params = Self::load_unchecked(layout, file, resolver, owned)?;
        params.check_all()?;
        Ok(params)
    }

    /// [`Self::load`] without checking the values of mapped f32 weights yet (copied ones are checked as
    /// they are copied): [`Self::check_all`] before they are used in place, or a copy that checks them
    /// as it reads them ([`crate::backend::ParamSet::upload_with`]), so that a copy to bf16 reads the file
    /// once rather than twice.
    pub(crate) fn load_unchecked(
        layout: Arc<Layout>,
        file: Arc<WeightFile>,
        resolver: &dyn NameResolver,
        owned: bool,
    ) -> Result<Self> {
        let mut found = Vec::with_capacity(layout.entries().len());
        let mut accounted = std::collections::HashSet::new();
        for e in layout.entries() {
            let spec = &e.spec;
            let candidates = resolver.candidates(&spec.name);
            // Every name the entry answers to counts as read (a checkpoint may hold a module under two
            // aliases).
            accounted.extend(
                candidates
                    .iter()
                    .filter(|c| file.tensors.contains_key(*c))
                    .cloned(),
            );
            let Some((fname, t)) = candidates
                .iter()
                .find_map(|c| file.tensors.get(c).map(|t| (c.clone(), t)))
            else {
                return Err(missing_tensor(&file, spec, &candidates));
            };
            let want: Vec<usize> = spec.shape.dims().to_vec();
            if t.shape.iter().product::<usize>() != want.iter().product::<usize>()
                || squeeze(&t.shape) != squeeze(&want)
            {
                return Err(Error::Tensor {
                    name: fname,
                    msg: format!(
                        "has shape {:?} in {}, the model needs {:?}",
                        t.shape,
                        file.path.display(),
                        want
                    ),
                });
            }
            found.push((fname, t.clone()));
        }
        let all_f32 = found.iter().all(|(_, t)| file.f32_view(t).is_some());
        if all_f32 && !owned {
            // Mapped f32 weights are used in place or copied: checked then (a NaN or Inf would otherwise
            // give all-NaN outputs without a word).
            let ranges = found.iter().map(|(_, t)| (t.start, t.end)).collect();
            let unused = unused_names(&file, &accounted);
            let names = found.into_iter().map(|(name, _)| name).collect();
            return Ok(ModelParams {
                layout,
                storage: Storage::Mapped {
                    file,
                    ranges,
                    names,
                },
                unused,
                unchecked: AtomicBool::new(true),
            });
        }
        let mut arena = Arena::zeros(layout.clone());
        for (i, (fname, t)) in found.iter().enumerate() {
            let e = &layout.entries()[i];
            let dst = arena.f32_mut(&e.spec.name)?;
            file.read_into(fname, t, dst)?;
            check_finite(fname, &file.path, dst)?;
        }
        Ok(ModelParams {
            layout,
            storage: Storage::Owned(arena),
            unused: unused_names(&file, &accounted),
            unchecked: AtomicBool::new(false),
        })
    }

    /// Whether the values are still to be checked ([`Self::load_unchecked`]).
    pub(crate) fn is_unchecked(&self) -> bool {
        self.unchecked.load(Ordering::Acquire)
    }

    /// Checks every value, where they are still unchecked: a NaN or an infinity is an error naming the
    /// tensor, its file and the element. The values count as checked once it passes.
    pub(crate) fn check_all(&self) -> Result<()> {
        if let Storage::Mapped { file, names, .. } = &self.storage {
            if self.is_unchecked() {
                for (i, name) in names.iter().enumerate() {
                    check_finite(name, &file.path, self.get(i))?;
                }
            }
        }
        self.mark_checked();
        Ok(())
    }

    /// The error of [`Self::check_all`] for a non-finite element `j` of entry `i` that a copy found.
    pub(crate) fn non_finite_error(&self, i: usize, j: usize) -> Error {
        match &self.storage {
            Storage::Mapped { file, names, .. } => {
                non_finite_error(&names[i], &file.path, self.get(i), j)
            }
            Storage::Owned(arena) => Error::Tensor {
                name: self.layout.entries()[i].spec.name.clone(),
                msg: format!(
                    "has a non-finite value ({}) at element {j}",
                    arena.entry_f32(i)[j]
                ),
            },
        }
    }

    /// Records that every value has been checked (by [`Self::check_all`], or as a copy read them).
    pub(crate) fn mark_checked(&self) {
        self.unchecked.store(false, Ordering::Release);
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Tensors of the file the model did not read, sorted. A config with fewer layers than its weights shows
    /// up here; the caller decides which extras are expected (an LM head, a contact head, position ids).
    pub fn unused(&self) -> &[String] {
        &self.unused
    }

    /// Lets the OS drop the pages of mapped weights from memory, for when a backend has made its own copy
    /// (the CPU's bf16 weights, a GPU upload): the process's resident memory then holds one copy of the
    /// model. The pages are read from the file again if the host weights are used later.
    pub fn release_mapped_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mapped { file, .. } = &self.storage {
            // SAFETY: the map is read-only and nothing writes through it; MADV_DONTNEED only drops its
            // clean pages, which the kernel reads back from the file when they are touched again, so every
            // later read still sees the file's bytes. A failure only leaves the pages resident.
            let _ = unsafe {
                file.map
                    .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
            };
        }
    }

    /// [`Self::release_mapped_pages`] for parameter `i` alone (and the pages it shares with its
    /// neighbours), so that a backend copying the parameters one by one holds little more than its copy
    /// at any time.
    pub fn release_entry_pages(&self, i: usize) {
        #[cfg(unix)]
        if let Storage::Mapped { file, ranges, .. } = &self.storage {
            if let Some(&(a, b)) = ranges.get(i) {
                // SAFETY: as for `release_mapped_pages`; memmap2 widens the range to whole pages, and
                // dropping a neighbour's clean pages only makes them be read from the file again.
                let _ = unsafe {
                    file.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        a,
                        b.saturating_sub(a),
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = i;
    }

    /// Whether the parameters are views into the mapped file (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Parameter `i` of the layout.
    pub fn get(&self, i: usize) -> &[f32] {
        match &self.storage {
            Storage::Mapped { file, ranges, .. } => {
                let (a, b) = ranges[i];
                bytemuck::cast_slice(&file.map[a..b])
            }
            Storage::Owned(arena) => arena.entry_f32(i),
        }
    }

    /// Mutable access (copies mapped parameters into an owned arena first).
    pub fn arena_mut(&mut self) -> &mut Arena {
        if let Storage::Mapped { .. } = self.storage {
            let mut arena = Arena::zeros(self.layout.clone());
            for i in 0..self.layout.entries().len() {
                let name = self.layout.entries()[i].spec.name.clone();
                arena
                    .f32_mut(&name)
                    .expect("layout entry")
                    .copy_from_slice(self.get(i));
            }
            self.storage = Storage::Owned(arena);
        }
        match &mut self.storage {
            Storage::Owned(a) => a,
            Storage::Mapped { .. } => unreachable!("converted above"),
        }
    }
}

fn unused_names(file: &WeightFile, accounted: &std::collections::HashSet<String>) -> Vec<String> {
    let mut out: Vec<String> = file
        .tensors
        .keys()
        .filter(|n| !accounted.contains(*n))
        .cloned()
        .collect();
    out.sort();
    out
}

/// Shapes compared without size-1 dimensions (a `[c, c, 1, 1]` 1×1 conv is a `[c, c]` matrix).
fn squeeze(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

fn missing_tensor(file: &WeightFile, spec: &TensorSpec, candidates: &[String]) -> Error {
    let stem = spec.name.rsplit('.').nth(1).unwrap_or(&spec.name);
    let mut similar: Vec<String> = file
        .tensors
        .iter()
        .filter(|(n, _)| n.contains(stem))
        .map(|(n, t)| format!("{n} {:?}", t.shape))
        .collect();
    similar.sort();
    similar.truncate(8);
    Error::Tensor {
        name: spec.name.clone(),
        msg: format!(
            "missing from {} (looked for {candidates:?}, shape {}); the file has {} tensors{}",
            file.path.display(),
            spec.shape,
            file.tensors.len(),
            if similar.is_empty() {
                String::new()
            } else {
                format!(", of similar names: {}", similar.join(", "))
            }
        ),
    }
}
