//! Planned memory, as llm.c does it: every tensor of a category (parameters, gradients, optimizer moments,
//! activations) lives in one allocation made up front, and code reaches it through named views.
//!
//! - [`Layout`] places named tensors at aligned byte offsets. Parameters, gradients and both AdamW moments
//!   share one layout (`backend::state::TrainState`, on any backend), so a parameter and its gradient sit at
//!   the same offset: zeroing, the global norm and a future data-parallel all-reduce are single passes over
//!   one buffer.
//! - [`ActivationPlan`] also knows each tensor's lifetime (first and last step of the schedule that uses it)
//!   and lets tensors whose lifetimes do not intersect share bytes. Recompute policies change the plan (which
//!   tensors exist and how long they live), never the code that reads them.

use std::collections::HashMap;
use std::sync::Arc;

use super::{DType, Shape};
use crate::{Error, Result};

/// Byte alignment of every planned tensor: a cache line on the CPU, and enough for 128-bit GPU loads.
pub const ALIGN_BYTES: usize = 64;

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Shape,
    pub dtype: DType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: impl Into<Shape>, dtype: DType) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.into(),
            dtype,
        }
    }

    pub fn f32(name: impl Into<String>, shape: impl Into<Shape>) -> Self {
        Self::new(name, shape, DType::F32)
    }

    pub fn bytes(&self) -> usize {
        self.shape.numel() * self.dtype.size_in_bytes()
    }
}

#[derive(Clone, Debug)]
pub struct LayoutEntry {
    pub spec: TensorSpec,
    pub offset_bytes: usize,
}

impl LayoutEntry {
    pub fn numel(&self) -> usize {
        self.spec.shape.numel()
    }

    fn byte_range(&self) -> std::ops::Range<usize> {
        self.offset_bytes..self.offset_bytes + self.spec.bytes()
    }
}

/// Named tensors at fixed, aligned offsets inside one buffer.
#[derive(Debug)]
pub struct Layout {
    entries: Vec<LayoutEntry>,
    index: HashMap<String, usize>,
    total_bytes: usize,
}

impl Layout {
    /// Places the tensors one after another, in the given order.
    pub fn sequential(specs: Vec<TensorSpec>) -> Result<Self> {
        let mut offset = 0;
        let placed = specs
            .into_iter()
            .map(|spec| {
                let entry = LayoutEntry {
                    offset_bytes: offset,
                    spec,
                };
                offset = align_up(offset + entry.spec.bytes(), ALIGN_BYTES);
                entry
            })
            .collect();
        Self::from_entries(placed)
    }

    fn from_entries(entries: Vec<LayoutEntry>) -> Result<Self> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if index.insert(e.spec.name.clone(), i).is_some() {
                return Err(Error::invalid(
                    "memory plan",
                    format!("tensor '{}' is declared twice", e.spec.name),
                ));
            }
        }
        let total_bytes = entries
            .iter()
            .map(|e| align_up(e.byte_range().end, ALIGN_BYTES))
            .max()
            .unwrap_or(0);
        Ok(Layout {
            entries,
            index,
            total_bytes,
        })
    }

    pub fn entries(&self) -> &[LayoutEntry] {
        &self.entries
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    pub fn position(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: "not in the memory plan".to_string(),
        })
    }

    pub fn entry(&self, name: &str) -> Result<&LayoutEntry> {
        Ok(&self.entries[self.position(name)?])
    }

    /// Number of parameters (elements) across all entries.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(LayoutEntry::numel).sum()
    }
}

/// One host allocation laid out by a [`Layout`]. Padding between entries stays zero, so whole-buffer passes
/// (zeroing, norms) are correct.
#[derive(Debug)]
pub struct Arena {
    layout: Arc<Layout>,
    // f32 words keep the base 4-byte aligned; entries are typed views into it.
    words: Vec<f32>,
}

impl Arena {
    pub fn zeros(layout: Arc<Layout>) -> Self {
        let words = vec![0.0f32; layout.total_bytes() / 4];
        Arena { layout, words }
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The whole buffer as f32 (valid when every entry is f32, which is how parameters live on the host).
    pub fn as_f32(&self) -> &[f32] {
        &self.words
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        &mut self.words
    }

    fn checked_entry(&self, name: &str, dtype: DType) -> Result<&LayoutEntry> {
        let e = self.layout.entry(name)?;
        if e.spec.dtype != dtype {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!("is {}, read as {dtype}", e.spec.dtype),
            });
        }
        Ok(e)
    }

    pub fn f32(&self, name: &str) -> Result<&[f32]> {
        let e = self.checked_entry(name, DType::F32)?;
        let start = e.offset_bytes / 4;
        Ok(&self.words[start..start + e.numel()])
    }

    pub fn f32_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        let e = self.checked_entry(name, DType::F32)?;
        let (start, n) = (e.offset_bytes / 4, e.numel());
        Ok(&mut self.words[start..start + n])
    }

    /// The f32 view of entry `i` in layout order.
    pub fn entry_f32(&self, i: usize) -> &[f32] {
        let e = &self.layout.entries()[i];
        &self.words[e.offset_bytes / 4..e.offset_bytes / 4 + e.numel()]
    }

    /// Every entry's f32 view at once, mutably, in layout order (they are disjoint by construction).
    pub fn entries_f32_mut(&mut self) -> Vec<&mut [f32]> {
        let mut order: Vec<usize> = (0..self.layout.entries().len()).collect();
        order.sort_by_key(|&i| self.layout.entries()[i].offset_bytes);
        let mut out: Vec<Option<&mut [f32]>> = (0..order.len()).map(|_| None).collect();
        let mut rest: &mut [f32] = &mut self.words;
        let mut consumed = 0;
        for i in order {
            let e = &self.layout.entries()[i];
            let (start, n) = (e.offset_bytes / 4, e.numel());
            let tail = std::mem::take(&mut rest);
            let (_, from) = tail.split_at_mut(start - consumed);
            let (mine, after) = from.split_at_mut(n);
            out[i] = Some(mine);
            rest = after;
            consumed = start + n;
        }
        out.into_iter()
            .map(|s| s.expect("every entry is visited"))
            .collect()
    }

    pub fn zero(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0.0);
    }
}

/// Inclusive range of schedule steps during which a tensor must keep its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub first: usize,
    pub last: usize,
}

impl Lifetime {
    pub const WHOLE_STEP: Lifetime = Lifetime {
        first: 0,
        last: usize::MAX,
    };

    pub fn new(first: usize, last: usize) -> Self {
        Lifetime {
            first,
            last: last.max(first),
        }
    }

    pub fn overlaps(&self, other: &Lifetime) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Offsets for buffers of `sizes` bytes alive over `lives`: largest first, each at the lowest aligned
/// offset that does not collide with a placed buffer whose lifetime intersects its own. Buffers alive at
/// the same time never overlap; the arena needs `max(offset + size)` bytes.
pub fn place(sizes: &[usize], lives: &[Lifetime]) -> Vec<usize> {
    place_by(sizes, |i, j| lives[i].overlaps(&lives[j]))
}

/// The same for buffers alive over several segments each (dead between them).
pub fn place_segments(sizes: &[usize], lives: &[Vec<Lifetime>]) -> Vec<usize> {
    place_by(sizes, |i, j| {
        lives[i]
            .iter()
            .any(|a| lives[j].iter().any(|b| a.overlaps(b)))
    })
}

fn place_by(sizes: &[usize], overlap: impl Fn(usize, usize) -> bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut offsets = vec![0usize; sizes.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(sizes.len());
    for &i in &order {
        let size = sizes[i];
        // Address ranges already taken by buffers alive at the same time, in address order.
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| overlap(i, j))
            .map(|&j| (offsets[j], offsets[j] + sizes[j]))
            .collect();
        busy.sort_unstable();
        let mut candidate = 0;
        for (start, end) in busy {
            if candidate + size <= start {
                break;
            }
            candidate = candidate.max(align_up(end, ALIGN_BYTES));
        }
        offsets[i] = candidate;
        placed.push(i);
    }
    offsets
}

/// Where each allocation of a step goes in one arena: allocation `k` (in the order the step makes them)
/// of `sizes[k]` bytes at `offsets[k]`, zero-filled when `zeroed[k]` (its zeros are read), in an arena of
/// `bytes`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArenaPlan {
    pub sizes: Vec<usize>,
    pub offsets: Vec<usize>,
    pub zeroed: Vec<bool>,
    pub bytes: usize,
}

/// Handle to a planned activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActId(pub usize);

/// Activation tensors with lifetimes, placed so that tensors never alive together may share bytes.
#[derive(Debug)]
pub struct ActivationPlan {
    layout: Layout,
    lifetimes: Vec<Lifetime>,
}

impl ActivationPlan {
    /// Greedy placement ([`place`]). Deterministic for a given input.
    pub fn new(specs: Vec<(TensorSpec, Lifetime)>) -> Result<Self> {
        let sizes: Vec<usize> = specs.iter().map(|(s, _)| s.bytes()).collect();
        let lives: Vec<Lifetime> = specs.iter().map(|(_, l)| *l).collect();
        let offsets = place(&sizes, &lives);
        let lifetimes = specs.iter().map(|(_, l)| *l).collect();
        let entries = specs
            .into_iter()
            .zip(offsets)
            .map(|((spec, _), offset_bytes)| LayoutEntry { spec, offset_bytes })
            .collect();
        Ok(ActivationPlan {
            layout: Layout::from_entries(entries)?,
            lifetimes,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn id(&self, name: &str) -> Result<ActId> {
        self.layout.position(name).map(ActId)
    }

    pub fn lifetime(&self, id: ActId) -> Lifetime {
        self.lifetimes[id.0]
    }

    /// Bytes the arena needs.
    pub fn total_bytes(&self) -> usize {
        self.layout.total_bytes()
    }

    /// Bytes the tensors would need without sharing.
    pub fn unshared_bytes(&self) -> usize {
        self.layout
            .entries()
            .iter()
            .map(|e| align_up(e.spec.bytes(), ALIGN_BYTES))
            .sum()
    }
}

/// The single activation allocation of a plan.
#[derive(Debug)]
pub struct ActivationArena {
    plan: Arc<ActivationPlan>,
    words: Vec<f32>,
}

impl ActivationArena {
    pub fn new(plan: Arc<ActivationPlan>) -> Self {
        let words = vec![0.0f32; plan.total_bytes() / 4];
        ActivationArena { plan, words }
    }

    pub fn plan(&self) -> &ActivationPlan {
        &self.plan
    }

    fn range(&self, id: ActId) -> Result<std::ops::Range<usize>> {
        let e = self
            .plan
            .layout
            .entries()
            .get(id.0)
            .ok_or_else(|| Error::invalid("activation id", format!("{id:?}")))?;
        if e.spec.dtype != DType::F32 {
            return Err(Error::Tensor {
                name: e.spec.name.clone(),
                msg: format!("is {}, read as f32", e.spec.dtype),
            });
        }
        Ok(e.offset_bytes / 4..e.offset_bytes / 4 + e.numel())
    }

    pub fn get(&self, id: ActId) -> Result<&[f32]> {
        Ok(&self.words[self.range(id)?])
    }

    pub fn get_mut(&mut self, id: ActId) -> Result<&mut [f32]> {
        let r = self.range(id)?;
        Ok(&mut self.words[r])
    }

    /// Several activations borrowed mutably at once. Fails if two of them share bytes, which happens when
    /// their lifetimes do not intersect: using both at the same step contradicts the plan.
    pub fn get_many_mut<const N: usize>(&mut self, ids: [ActId; N]) -> Result<[&mut [f32]; N]> {
        let mut ranges = Vec::with_capacity(N);
        for id in ids {
            ranges.push((self.range(id)?, id));
        }
        let mut sorted: Vec<_> = ranges
            .iter()
            .enumerate()
            .map(|(k, (r, _))| (r.start, r.end, k))
            .collect();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[1].0 < w[0].1 {
                let (a, b) = (
                    &self.plan.layout.entries()[ranges[w[0].2].1 .0],
                    &self.plan.layout.entries()[ranges[w[1].2].1 .0],
                );
                return Err(Error::invalid(
                    "activation borrow",
                    format!(
                        "'{}' and '{}' share memory (their lifetimes do not intersect)",
                        a.spec.name, b.spec.name
                    ),
                ));
            }
        }
        // Hand out the disjoint ranges by splitting the buffer in address order.
        let mut out: [Option<&mut [f32]>; N] = std::array::from_fn(|_| None);
        let mut rest: &mut [f32] = &mut self.words;
        let mut consumed = 0;
        for (start, end, k) in sorted {
            let tail = std::mem::take(&mut rest);
            let (_, from_start) = tail.split_at_mut(start - consumed);
            let (mine, after) = from_start.split_at_mut(end - start);
            out[k] = Some(mine);
            rest = after;
            consumed = end;
        }
        Ok(out.map(|s| s.expect("every id is assigned a range above")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_layout_is_aligned_and_named() {
        let layout = Layout::sequential(vec![
            TensorSpec::f32("w", [3, 5]),
            TensorSpec::f32("b", [5]),
            TensorSpec::new("h", [7], DType::BF16),
        ])
        .unwrap();
        for e in layout.entries() {
            assert_eq!(e.offset_bytes % ALIGN_BYTES, 0);
        }
        assert_eq!(layout.entry("b").unwrap().offset_bytes, 64);
        assert_eq!(layout.numel(), 27);
        assert!(layout.entry("missing").is_err());
        assert!(
            Layout::sequential(vec![TensorSpec::f32("a", [1]), TensorSpec::f32("a", [2])]).is_err()
        );
    }

    #[test]
    fn activations_with_disjoint_lifetimes_share_memory_and_live_ones_never_do() {
        let specs = vec![
            (TensorSpec::f32("a", [100]), Lifetime::new(0, 1)),
            (TensorSpec::f32("b", [100]), Lifetime::new(2, 3)),
            (TensorSpec::f32("c", [50]), Lifetime::new(1, 2)),
            (TensorSpec::f32("d", [10]), Lifetime::WHOLE_STEP),
        ];
        let plan = ActivationPlan::new(specs.clone()).unwrap();
        assert!(
            plan.total_bytes() < plan.unshared_bytes(),
            "a and b should share"
        );
        let entries = plan.layout().entries();
        for i in 0..entries.len() {
            for j in i + 1..entries.len() {
                let (ri, rj) = (entries[i].byte_range(), entries[j].byte_range());
                let collide = ri.start < rj.end && rj.start < ri.end;
                if specs[i].1.overlaps(&specs[j].1) {
                    assert!(
                        !collide,
                        "{} and {} are alive together but share bytes",
                        specs[i].0.name, specs[j].0.name
                    );
                }
            }
        }
        let plan = Arc::new(plan);
        let mut arena = ActivationArena::new(plan.clone());
        let (a, c, d) = (
            plan.id("a").unwrap(),
            plan.id("c").unwrap(),
            plan.id("d").unwrap(),
        );
        let [va, vc, vd] = arena.get_many_mut([a, c, d]).unwrap();
        va.fill(1.0);
        vc.fill(2.0);
        vd.fill(3.0);
        assert!(arena.get(a).unwrap().iter().all(|&x| x == 1.0));
        assert!(arena.get(c).unwrap().iter().all(|&x| x == 2.0));
        let b = plan.id("b").unwrap();
        assert!(
            arena.get_many_mut([a, b]).is_err(),
            "a and b share bytes and cannot be borrowed together"
        );
    }

    /// Property: over random sizes and lifetimes, buffers alive at the same time never share a byte,
    /// every offset is aligned, and the arena is no smaller than the most bytes alive at one time.
    #[test]
    fn placement_never_overlaps_live_buffers_on_random_cases() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for case in 0..300 {
            let n = rng.random_range(1..40);
            let sizes: Vec<usize> = (0..n).map(|_| rng.random_range(1..5000)).collect();
            let lives: Vec<Lifetime> = (0..n)
                .map(|_| {
                    let a = rng.random_range(0..50);
                    Lifetime::new(a, a + rng.random_range(0..20))
                })
                .collect();
            let offsets = place(&sizes, &lives);
            let mut floor = 0;
            for t in 0..70 {
                let live: usize = (0..n)
                    .filter(|&i| lives[i].first <= t && t <= lives[i].last)
                    .map(|i| sizes[i])
                    .sum();
                floor = floor.max(live);
            }
            let arena = (0..n).map(|i| offsets[i] + sizes[i]).max().unwrap();
            assert!(arena >= floor, "case {case}");
            for i in 0..n {
                assert_eq!(offsets[i] % ALIGN_BYTES, 0);
                for j in i + 1..n {
                    let collide =
                        offsets[i] < offsets[j] + sizes[j] && offsets[j] < offsets[i] + sizes[i];
                    assert!(
                        !(collide && lives[i].overlaps(&lives[j])),
                        "case {case}: buffers {i} and {j} are alive together and overlap"
                    );
                }
            }
        }
    }
}
