//! A backend that runs no arithmetic: it hands out address ranges and counts bytes. Running the real model
//! code on it gives the memory a step of that code allocates — per allocation, live and peak — at any size,
//! in well under a second and with no weights (the `plan` command). It is the first piece of the planner:
//! the same code that runs is what gets measured, never a second hand-kept list.
//!
//! Reads return zeros, reductions return 0, and every op checks nothing: it is for sizing, not results.
//!
//! It also keeps a clock of ops and, inside a window ([`RecordingBackend::mark_step_buffers`]), which bytes
//! of which allocation each op reads, overwrites or updates. From that, [`RecordingBackend::end_window`]
//! derives each buffer's lifetime (first to last op that needs its contents) and places the buffers at
//! offsets that reuse memory between lifetimes that never meet ([`crate::runtime::place`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::meter::ByteMeter;
use super::{
    Act, AttentionDims, Backend, BatchNormStats, Conv1dDims, Epilogue, LinearDims, Memory,
    PoolDims, ScratchUse, View, ViewMut,
};
use crate::ops::optim::AdamWStep;
use crate::runtime::{place_segments, ArenaPlan, DType, Lifetime};
use crate::Result;

#[derive(Default, Debug)]
struct Counters {
    meter: ByteMeter,
    allocations: AtomicUsize,
    next_addr: AtomicU64,
    /// Floating-point operations of the matrix products (linear layers, convolutions, attention): what a
    /// recompute policy adds is read from here.
    flops: AtomicU64,
    modules: Mutex<ModuleBytes>,
    uses: Mutex<UseLog>,
}

/// How an op touches a range of memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    /// Overwritten without being read.
    Write,
    /// Read and written (a backward adding into its gradient, an in-place update).
    Update,
}

/// One touch: `(address, bytes, access)`.
type Touch = (u64, u64, Access);

fn rd<B>(v: &View<'_, B>) -> Touch {
    (v.addr(), v.bytes() as u64, Access::Read)
}
fn wr<B>(v: &ViewMut<'_, B>) -> Touch {
    (v.addr(), v.bytes() as u64, Access::Write)
}
fn up<B>(v: &ViewMut<'_, B>) -> Touch {
    (v.addr(), v.bytes() as u64, Access::Update)
}

#[derive(Debug)]
struct AllocInfo {
    addr: u64,
    bytes: usize,
    /// Op clock when allocated and when freed.
    alloc_op: u64,
    free_op: Option<u64>,
}

#[derive(Default, Debug)]
struct UseLog {
    /// Ops run so far: the clock of lifetimes.
    op: u64,
    /// Allocations from this sequence number on are the step's own (not parameters or optimiser state).
    step_first: usize,
    window: Option<u64>,
    /// Every allocation, in order (addresses increase with it).
    allocs: Vec<AllocInfo>,
    /// Touches inside the window: (op, allocation, start, end, access).
    events: Vec<(u64, usize, u64, u64, Access)>,
    /// Where the window's second step starts.
    boundary: Option<u64>,
    /// Bytes live when the step buffers began (parameters, optimiser state, inputs).
    live_before_steps: usize,
    /// The scratch uses of the window's ops, each once.
    scratch: Vec<ScratchUse>,
}

/// One stretch of ops over which a buffer's contents are needed.
#[derive(Clone, Debug)]
struct Segment {
    start: u64,
    end: u64,
    /// Bytes written within the segment (sorted, disjoint ranges).
    written: Vec<(u64, u64)>,
}

/// The step buffers of a window (every allocation after [`RecordingBackend::mark_step_buffers`], in
/// allocation order): sizes, live segments (op indices from the window's start) and the offsets of an
/// arena that reuses memory between buffers never needed at the same time.
#[derive(Clone, Debug, Default)]
pub struct StepLifetimes {
    pub sizes: Vec<usize>,
    pub lives: Vec<Vec<Lifetime>>,
    pub offsets: Vec<usize>,
    /// Whether each buffer's zeros are read (a fresh buffer read before it is written): only those are
    /// zero-filled when carved from an arena, since a buffer's bytes may still belong to another one
    /// between its allocation and its first write.
    pub zeroed: Vec<bool>,
    /// Buffers allocated in the warm step (none, when the steps plan their buffers on the first call as
    /// the models do; an arena places them too, and later steps' allocations come from the heap).
    pub allocated_after_boundary: usize,
    /// Non-empty step buffers released within the window: buffers replaced by a larger one as a step
    /// grew them. None in the models, which make each buffer once at its largest size in the step, so
    /// that the steps allocate the same buffers in the same order at every shape.
    pub regrown: usize,
    /// What the window's ops use of a backend's own scratch ([`StepLifetimes::scratch_bytes`]).
    pub scratch: Vec<ScratchUse>,
}

impl StepLifetimes {
    /// The most scratch of its own that backend `b` needs for one of these steps' ops.
    pub fn scratch_bytes<B: Backend>(&self, b: &B) -> usize {
        self.scratch
            .iter()
            .map(|op| b.scratch_bytes(op))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of the planned arena.
    pub fn arena_bytes(&self) -> usize {
        self.offsets
            .iter()
            .zip(&self.sizes)
            .map(|(o, s)| o + s)
            .max()
            .unwrap_or(0)
    }

    /// The most bytes needed at one op: no placement can need less.
    pub fn live_floor(&self) -> usize {
        let mut edges: Vec<(usize, bool, usize)> = Vec::new();
        for (s, lives) in self.sizes.iter().zip(&self.lives) {
            for l in lives {
                edges.push((l.first, true, *s));
                edges.push((l.last.saturating_add(1), false, *s));
            }
        }
        // At equal times, ends (false) before starts (true): inclusive lifetimes.
        edges.sort_unstable_by_key(|&(t, start, _)| (t, start));
        let (mut live, mut most) = (0usize, 0usize);
        for (_, start, s) in edges {
            if start {
                live += s;
                most = most.max(live);
            } else {
                live -= s;
            }
        }
        most
    }

    /// Whether this plan's placement also serves steps whose buffers are `other`'s (the same steps at a
    /// smaller shape): as many buffers, none larger than its place, zeros needed only where this plan
    /// gives them, and no two buffers whose places share bytes here alive at the same op there. `Err`
    /// says what differs.
    pub fn admits(&self, other: &StepLifetimes) -> std::result::Result<(), String> {
        let n = self.sizes.len();
        if other.sizes.len() != n {
            return Err(format!(
                "the steps make {} buffers where the plan has {n}",
                other.sizes.len()
            ));
        }
        for k in 0..n {
            if other.sizes[k] > self.sizes[k] {
                return Err(format!(
                    "buffer {k} needs {} bytes where the plan has {}",
                    other.sizes[k], self.sizes[k]
                ));
            }
            if other.zeroed[k] && !self.zeroed[k] {
                return Err(format!(
                    "buffer {k} reads its zeros only at the smaller shape"
                ));
            }
        }
        let meet = |i: usize, j: usize| {
            other.lives[i]
                .iter()
                .any(|a| other.lives[j].iter().any(|b| a.overlaps(b)))
        };
        let mut by_offset: Vec<usize> = (0..n).filter(|&k| self.sizes[k] > 0).collect();
        by_offset.sort_unstable_by_key(|&k| self.offsets[k]);
        for (a, &i) in by_offset.iter().enumerate() {
            let end = self.offsets[i] + self.sizes[i];
            for &j in &by_offset[a + 1..] {
                if self.offsets[j] >= end {
                    break;
                }
                if meet(i, j) {
                    return Err(format!(
                        "buffers {i} and {j} share bytes in the plan but are needed together"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The arena plan to replay on a real backend (allocation `k` of the steps at `offsets[k]`).
    pub fn arena_plan(&self) -> ArenaPlan {
        ArenaPlan {
            sizes: self.sizes.clone(),
            offsets: self.offsets.clone(),
            zeroed: self.zeroed.clone(),
            bytes: self.arena_bytes(),
        }
    }
}

/// Bytes per module (as named by [`Backend::enter_module`]): live now, and live at the latest peak.
#[derive(Default, Debug)]
struct ModuleBytes {
    current: &'static str,
    live: BTreeMap<&'static str, usize>,
    at_peak: BTreeMap<&'static str, usize>,
}

/// A recorded allocation: an address range that exists only in the counters.
pub struct RecordedMem {
    addr: u64,
    bytes: usize,
    module: &'static str,
    seq: usize,
    counters: Arc<Counters>,
}

impl Memory for RecordedMem {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for RecordedMem {
    fn drop(&mut self) {
        self.counters.meter.sub(self.bytes);
        let mut m = self
            .counters
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(live) = m.live.get_mut(self.module) {
            *live = live.saturating_sub(self.bytes);
        }
        drop(m);
        let mut u = self.counters.uses.lock().unwrap_or_else(|e| e.into_inner());
        let now = u.op;
        if let Some(a) = u.allocs.get_mut(self.seq) {
            a.free_op = Some(now);
        }
    }
}

/// The recording backend, with the compute dtype of the backend it stands for (f32 for the CPU, bf16 for
/// kernel devices).
pub struct RecordingBackend {
    compute: DType,
    /// The dtype of the parameters' compute copy (the compute dtype unless the backend it stands for
    /// keeps narrower weights).
    weight: DType,
    counters: Arc<Counters>,
}

impl RecordingBackend {
    pub fn new(compute: DType) -> Self {
        RecordingBackend {
            compute,
            weight: compute,
            counters: Arc::new(Counters {
                next_addr: AtomicU64::new(1 << 20),
                ..Default::default()
            }),
        }
    }

    /// Records for a backend whose weights are `weight` (the CPU's bf16 backend keeps f32 activations).
    pub fn with_weight_dtype(mut self, weight: DType) -> Self {
        self.weight = weight;
        self
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes(&self) -> usize {
        self.counters.meter.live()
    }

    /// The most bytes live at once since the last [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.counters.meter.peak()
    }

    /// Matrix-product FLOPs of every op run so far (forward and backward).
    pub fn flops(&self) -> u64 {
        self.counters.flops.load(Ordering::Relaxed)
    }

    fn count(&self, flops: usize) {
        self.counters
            .flops
            .fetch_add(flops as u64, Ordering::Relaxed);
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.counters.meter.reset_peak();
        let mut m = self.modules();
        m.at_peak = m.live.clone();
    }

    /// Bytes allocated by each module (see [`Backend::enter_module`]; `""` before any) and live at the
    /// peak.
    pub fn bytes_at_peak(&self) -> Vec<(&'static str, usize)> {
        self.modules()
            .at_peak
            .iter()
            .map(|(&k, &v)| (k, v))
            .collect()
    }

    fn uses(&self) -> std::sync::MutexGuard<'_, UseLog> {
        self.counters.uses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocations from now on belong to the steps (their activations and scratch), not to the
    /// parameters and optimiser state made before; from here on, each op's touches are noted.
    pub fn mark_step_buffers(&self) {
        let live = self.live_bytes();
        let mut u = self.uses();
        u.live_before_steps = live;
        u.step_first = u.allocs.len();
        u.window = Some(u.op);
        u.boundary = None;
        u.events.clear();
    }

    /// Bytes live when [`Self::mark_step_buffers`] was called: what an arena of step buffers adds to.
    pub fn bytes_before_steps(&self) -> usize {
        self.uses().live_before_steps
    }

    /// Marks where the second step starts: a buffer whose value crosses it is carried from one step into
    /// the next, and so lives across every step boundary.
    pub fn step_boundary(&self) {
        let mut u = self.uses();
        let op = u.op;
        u.boundary = Some(op);
    }

    /// Ends the window opened by [`Self::mark_step_buffers`] (a first step, which allocates, and a
    /// second, warm one): every step buffer, in allocation order, with its live segments and an offset
    /// ([`StepLifetimes`]).
    ///
    /// A segment runs from an op that writes the buffer to the last op that reads what it wrote. A read
    /// of bytes the current segment has not written needs an earlier value, and merges the segment with
    /// the one before; with none before, the value is a fresh allocation's zeros (the segment starts at
    /// the allocation) or was carried in from before the window (it starts with the window). A buffer
    /// whose value crosses the step boundary, and that outlives the window, also lives to the window's
    /// end: the next step will read it the same way. Buffers the window never touches live throughout.
    pub fn end_window(&self) -> StepLifetimes {
        let mut u = self.uses();
        let Some(start) = u.window.take() else {
            return StepLifetimes::default();
        };
        let end = u.op;
        let step_first = u.step_first;
        let n = u.allocs.len().saturating_sub(step_first);
        let mut segments: Vec<Vec<Segment>> = vec![Vec::new(); n];
        // Fresh buffers that some op reads before anything is written to them: they need their zeros.
        let mut needs_zeros = vec![false; n];
        for &(op, i, lo, hi, access) in &u.events {
            if i < step_first {
                continue;
            }
            let a = &u.allocs[i];
            let origin = a.alloc_op.max(start);
            let segs = &mut segments[i - step_first];
            if access == Access::Write {
                segs.push(Segment {
                    start: op,
                    end: op,
                    written: vec![(lo, hi)],
                });
                continue;
            }
            while segs.len() >= 2 && !covered(&segs[segs.len() - 1].written, lo, hi) {
                let last = segs.pop().expect("two segments");
                let prev = segs.last_mut().expect("one left");
                prev.end = last.end;
                for (l, h) in last.written {
                    add_range(&mut prev.written, l, h);
                }
            }
            let fresh = a.alloc_op >= start;
            match segs.last_mut() {
                Some(seg) if covered(&seg.written, lo, hi) => seg.end = op,
                Some(seg) => {
                    // The first segment needs bytes from before it: zeros or a carried value.
                    seg.start = origin;
                    seg.end = op;
                    seg.written = vec![(0, a.bytes as u64)];
                    needs_zeros[i - step_first] |= fresh;
                }
                None => {
                    segs.push(Segment {
                        start: origin,
                        end: op,
                        written: vec![(0, a.bytes as u64)],
                    });
                    needs_zeros[i - step_first] |= fresh;
                }
            }
            if access == Access::Update {
                let seg = segs.last_mut().expect("pushed above");
                add_range(&mut seg.written, lo, hi);
            }
        }
        let mut out = StepLifetimes::default();
        for (k, a) in u.allocs.iter().enumerate().skip(step_first) {
            let freed = a.free_op.filter(|&f| f <= end);
            out.regrown += (freed.is_some() && a.bytes > 0) as usize;
            let segs = &segments[k - step_first];
            let rel = |op: u64| (op.max(start) - start) as usize;
            let mut lives: Vec<Lifetime> = if segs.is_empty() {
                vec![Lifetime::new(rel(a.alloc_op), rel(freed.unwrap_or(end)))]
            } else {
                segs.iter()
                    .map(|s| Lifetime::new(rel(s.start), rel(s.end)))
                    .collect()
            };
            let crosses = u
                .boundary
                .is_some_and(|b| segs.iter().any(|s| s.start < b && b <= s.end));
            if crosses && freed.is_none() {
                if let Some(last) = lives.last_mut() {
                    *last = Lifetime::new(last.first, rel(end));
                }
            }
            out.sizes.push(a.bytes);
            out.lives.push(lives);
            out.zeroed.push(needs_zeros[k - step_first]);
            out.allocated_after_boundary += u.boundary.is_some_and(|b| a.alloc_op >= b) as usize;
        }
        out.offsets = place_segments(&out.sizes, &out.lives);
        out.scratch = std::mem::take(&mut u.scratch);
        out
    }

    /// Inside a window, notes an op's use of a backend's own scratch.
    fn note_scratch(&self, op: ScratchUse) {
        let mut u = self.uses();
        if u.window.is_some() && !u.scratch.contains(&op) {
            u.scratch.push(op);
        }
    }

    /// Both rotary attention ops as one step: `rotated` (the copies of q and k a backend may write, or
    /// none), the output and log-sum-exp written, q, k, v, the tables and the lengths read.
    fn record_rotary_attention(
        &self,
        rotated: [Option<Touch>; 2],
        [out, lse]: [ViewMut<'_, Self>; 2],
        [q, k, v]: [View<'_, Self>; 3],
        (cos, sin): (View<'_, Self>, View<'_, Self>),
        kv_lens: Option<View<'_, Self>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::Attention(*dims));
        let [q_rot, k_rot] = rotated;
        self.touch([
            Some(wr(&out)),
            Some(wr(&lse)),
            q_rot,
            k_rot,
            Some(rd(&q)),
            Some(rd(&k)),
            Some(rd(&v)),
            Some(rd(&cos)),
            Some(rd(&sin)),
            kv_lens.as_ref().map(rd),
        ]);
        self.count(attention_products(dims) * 2);
        Ok(())
    }

    /// One op: advances the clock and, inside a window, notes what it touches.
    fn touch(&self, touches: impl IntoIterator<Item = Option<Touch>>) {
        let mut u = self.uses();
        let op = u.op;
        u.op += 1;
        if u.window.is_none() {
            return;
        }
        for (addr, bytes, access) in touches.into_iter().flatten() {
            if bytes == 0 {
                continue;
            }
            let i = u.allocs.partition_point(|a| a.addr <= addr);
            if i == 0 {
                continue;
            }
            let a = &u.allocs[i - 1];
            let (lo, hi) = (addr - a.addr, addr - a.addr + bytes);
            if hi as usize > a.bytes {
                continue;
            }
            u.events.push((op, i - 1, lo, hi, access));
        }
    }

    fn modules(&self) -> std::sync::MutexGuard<'_, ModuleBytes> {
        self.counters
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for RecordingBackend {
    type Mem = RecordedMem;

    fn name(&self) -> String {
        format!("recording ({} compute)", self.compute)
    }
    fn compute_dtype(&self) -> DType {
        self.compute
    }
    fn weight_dtype(&self) -> DType {
        self.weight
    }
    fn alloc(&self, bytes: usize) -> Result<RecordedMem> {
        let c = &self.counters;
        c.allocations.fetch_add(1, Ordering::Relaxed);
        let (_, new_peak) = c.meter.add(bytes);
        let module = {
            let mut m = self.modules();
            let module = m.current;
            *m.live.entry(module).or_default() += bytes;
            if new_peak {
                m.at_peak = m.live.clone();
            }
            module
        };
        // Distinct, aligned, never-dereferenced addresses.
        let addr = c
            .next_addr
            .fetch_add((bytes as u64).div_ceil(256) * 256 + 256, Ordering::Relaxed);
        let seq = {
            let mut u = self.uses();
            let op = u.op;
            u.allocs.push(AllocInfo {
                addr,
                bytes,
                alloc_op: op,
                free_op: None,
            });
            u.allocs.len() - 1
        };
        Ok(RecordedMem {
            addr,
            bytes,
            module,
            seq,
            counters: c.clone(),
        })
    }
    fn enter_module(&self, module: &'static str) {
        self.modules().current = module;
    }
    fn begin_steps(&self) -> Result<()> {
        self.mark_step_buffers();
        Ok(())
    }
    fn warm_step(&self) {
        self.step_boundary();
    }
    fn allocations(&self) -> usize {
        self.counters.allocations.load(Ordering::Relaxed)
    }
    fn meter(&self) -> &ByteMeter {
        &self.counters.meter
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn write_f32(&self, a0: ViewMut<'_, Self>, _: &[f32]) -> Result<()> {
        self.touch([Some(wr(&a0))]);
        Ok(())
    }
    fn write_i32(&self, a0: ViewMut<'_, Self>, _: &[i32]) -> Result<()> {
        self.touch([Some(wr(&a0))]);
        Ok(())
    }
    fn read_f32(&self, src: View<'_, Self>) -> Result<Vec<f32>> {
        self.touch([Some(rd(&src))]);
        Ok(vec![0.0; src.numel()])
    }
    fn zero(&self, a0: ViewMut<'_, Self>) -> Result<()> {
        self.touch([Some(wr(&a0))]);
        Ok(())
    }
    fn copy(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn linear(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        a3: Option<View<'_, Self>>,
        dims: LinearDims,
    ) -> Result<()> {
        self.touch([
            Some(wr(&a0)),
            Some(rd(&a1)),
            Some(rd(&a2)),
            a3.as_ref().map(rd),
        ]);
        self.count(linear_flops(&dims));
        Ok(())
    }
    fn linear_heads(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
        _rows: super::HeadRows,
    ) -> Result<()> {
        self.linear(y, x, w, bias, dims)
    }
    // One step: the scratch, if a backend writes it, is live with the residual, and `y` may be written
    // while the residual and x are read.
    fn linear_residual(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        residual: View<'_, Self>,
        scratch: ViewMut<'_, Self>,
        dims: LinearDims,
    ) -> Result<()> {
        self.touch([
            Some(wr(&y)),
            Some(wr(&scratch)),
            Some(rd(&x)),
            Some(rd(&w)),
            bias.as_ref().map(rd),
            Some(rd(&residual)),
        ]);
        self.count(linear_flops(&dims));
        Ok(())
    }
    fn linear_act(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        _: Act,
        dims: LinearDims,
        _: bool,
    ) -> Result<()> {
        self.touch([
            Some(wr(&a0)),
            Some(wr(&a1)),
            Some(rd(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
        ]);
        self.count(linear_flops(&dims));
        Ok(())
    }
    fn linear_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: Option<ViewMut<'_, Self>>,
        a2: Option<ViewMut<'_, Self>>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        dims: LinearDims,
    ) -> Result<()> {
        self.touch([
            dx.as_ref().map(up),
            dw.as_ref().map(up),
            a2.as_ref().map(up),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
        ]);
        self.count(linear_flops(&dims) * (dx.is_some() as usize + dw.is_some() as usize));
        Ok(())
    }
    fn add(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>, a2: View<'_, Self>) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn add_row_bias(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn scale_rows(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn activation(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>, _: Act) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn activation_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        _: Act,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    /// As the CPU backend, the only one that fuses (kernel backends compute in bf16): a plan must size
    /// the buffers the run will make.
    fn linear_epilogue_skips_pre(&self, epilogue: Epilogue) -> bool {
        super::cpu::skips_epilogue_pre(self.weight_dtype(), self.compute_dtype(), epilogue)
    }
    fn fuses_linear_residual(&self) -> bool {
        super::cpu::fuses_residual(self.weight_dtype(), self.compute_dtype())
    }
    fn reads_heads_contiguously(&self, dims: &AttentionDims) -> bool {
        super::cpu::reads_heads(self.weight_dtype(), self.compute_dtype(), dims)
    }
    /// One op, so that `out` lives alongside `x` and `pre`: a fused backend reads `x` while it writes
    /// `out` (recorded as the default's two ops, `out` could share memory with `x`, last read by the first).
    fn linear_swiglu(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        dims: LinearDims,
        _: bool,
    ) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(wr(&a1)), Some(rd(&a2)), Some(rd(&a3))]);
        self.count(linear_flops(&dims));
        Ok(())
    }
    fn swiglu(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>, _: usize) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn swiglu_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        _: usize,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn layernorm(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        self.touch([
            Some(wr(&a0)),
            Some(wr(&a1)),
            Some(wr(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
        ]);
        Ok(())
    }
    fn residual_layernorm(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: ViewMut<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        a6: View<'_, Self>,
        a7: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        self.touch([
            Some(wr(&a0)),
            Some(wr(&a1)),
            Some(wr(&a2)),
            Some(wr(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
            Some(rd(&a6)),
            Some(rd(&a7)),
        ]);
        Ok(())
    }
    fn layernorm_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        a6: View<'_, Self>,
        a7: View<'_, Self>,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::LayerNormBackward {
            rows: a4.numel() / a5.numel().max(1),
            dim: a5.numel(),
        });
        self.touch([
            Some(up(&a0)),
            Some(up(&a1)),
            Some(up(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
            Some(rd(&a6)),
            Some(rd(&a7)),
        ]);
        Ok(())
    }
    fn rotary(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1)), Some(rd(&a2)), Some(rd(&a3))]);
        Ok(())
    }
    fn rotary_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2)), Some(rd(&a3))]);
        Ok(())
    }
    fn embedding(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
    ) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn embedding_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn attention(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: Option<View<'_, Self>>,
        a6: Option<(View<'_, Self>, bool)>,
        dims: &AttentionDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::Attention(*dims));
        self.touch([
            Some(wr(&a0)),
            Some(wr(&a1)),
            Some(rd(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            a5.as_ref().map(rd),
            a6.as_ref().map(|(v, _)| rd(v)),
        ]);
        // QKᵀ and PV.
        self.count(attention_products(dims) * 2);
        Ok(())
    }
    // One step: the rotated copies, if a backend writes them, are live with q and k, and the output is
    // never placed over q or k, which a fused backend reads while it writes the output.
    fn rotary_attention(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        (q_rot, k_rot): (ViewMut<'_, Self>, ViewMut<'_, Self>),
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        tables: (View<'_, Self>, View<'_, Self>),
        kv_lens: Option<View<'_, Self>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        let rotated = [Some(wr(&q_rot)), Some(wr(&k_rot))];
        self.record_rotary_attention(rotated, [out, lse], [q, k, v], tables, kv_lens, dims)
    }
    fn rotary_attention_heads(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        tables: (View<'_, Self>, View<'_, Self>),
        kv_lens: Option<View<'_, Self>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        self.record_rotary_attention([None, None], [out, lse], [q, k, v], tables, kv_lens, dims)
    }
    fn attention_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: Option<ViewMut<'_, Self>>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        a6: View<'_, Self>,
        a7: View<'_, Self>,
        a8: View<'_, Self>,
        a9: View<'_, Self>,
        a10: Option<View<'_, Self>>,
        a11: Option<(View<'_, Self>, bool)>,
        dims: &AttentionDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::AttentionBackward {
            dims: *dims,
            broadcast_dbias: a3.is_some() && a11.as_ref().is_some_and(|(_, per_batch)| !per_batch),
        });
        self.touch([
            Some(up(&a0)),
            Some(up(&a1)),
            Some(up(&a2)),
            a3.as_ref().map(up),
            Some(rd(&a4)),
            Some(rd(&a5)),
            Some(rd(&a6)),
            Some(rd(&a7)),
            Some(rd(&a8)),
            Some(rd(&a9)),
            a10.as_ref().map(rd),
            a11.as_ref().map(|(v, _)| rd(v)),
        ]);
        // QKᵀ again, dV, dP, dQ and dK (FlashAttention-2's count: 2.5× the forward).
        self.count(attention_products(dims) * 5);
        Ok(())
    }
    fn sum_rows(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn softmax(&self, a0: ViewMut<'_, Self>, a1: View<'_, Self>, _: usize) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1))]);
        Ok(())
    }
    fn softmax_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        _: usize,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn conv1d(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        a3: Option<View<'_, Self>>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::Conv1d(*dims));
        self.touch([
            Some(wr(&a0)),
            Some(rd(&a1)),
            Some(rd(&a2)),
            a3.as_ref().map(rd),
        ]);
        self.count(conv_flops(dims));
        Ok(())
    }
    fn conv1d_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        a1: ViewMut<'_, Self>,
        a2: Option<ViewMut<'_, Self>>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::Conv1dBackward {
            dims: *dims,
            dx: dx.is_some(),
        });
        self.touch([
            dx.as_ref().map(up),
            Some(up(&a1)),
            a2.as_ref().map(up),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
        ]);
        self.count(conv_flops(dims) * (1 + dx.is_some() as usize));
        Ok(())
    }
    fn batchnorm(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        a6: BatchNormStats<'_, Self>,
        _: f32,
    ) -> Result<()> {
        let stats = match &a6 {
            BatchNormStats::Running { mean, var } => [Some(rd(mean)), Some(rd(var))],
            BatchNormStats::Batch => [None, None],
        };
        self.touch([
            Some(wr(&a0)),
            Some(wr(&a1)),
            Some(wr(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
            stats[0],
            stats[1],
        ]);
        Ok(())
    }
    fn batchnorm_running_update(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        _: usize,
        _: f32,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(up(&a1)), Some(rd(&a2)), Some(rd(&a3))]);
        Ok(())
    }
    fn batchnorm_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: ViewMut<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        a6: View<'_, Self>,
        a7: View<'_, Self>,
        _: f32,
        _: bool,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::BatchNormBackward {
            channels: a5.numel(),
        });
        self.touch([
            Some(up(&a0)),
            Some(up(&a1)),
            Some(up(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
            Some(rd(&a6)),
            Some(rd(&a7)),
        ]);
        Ok(())
    }
    fn attention_pool(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        _: &PoolDims,
    ) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(wr(&a1)), Some(rd(&a2)), Some(rd(&a3))]);
        Ok(())
    }
    fn attention_pool_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        a5: View<'_, Self>,
        _: &PoolDims,
    ) -> Result<()> {
        self.note_scratch(ScratchUse::AttentionPoolBackward { logits: a5.numel() });
        self.touch([
            Some(up(&a0)),
            Some(up(&a1)),
            Some(rd(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
            Some(rd(&a5)),
        ]);
        Ok(())
    }
    fn relative_logits(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.touch([Some(wr(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn relative_logits_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: ViewMut<'_, Self>,
        a2: View<'_, Self>,
        a3: View<'_, Self>,
        a4: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.touch([
            Some(up(&a0)),
            Some(up(&a1)),
            Some(rd(&a2)),
            Some(rd(&a3)),
            Some(rd(&a4)),
        ]);
        Ok(())
    }
    fn mse(&self, a0: View<'_, Self>, a1: View<'_, Self>) -> Result<f32> {
        self.note_scratch(ScratchUse::Reduction);
        self.touch([Some(rd(&a0)), Some(rd(&a1))]);
        Ok(0.0)
    }
    fn mse_backward(
        &self,
        a0: ViewMut<'_, Self>,
        a1: View<'_, Self>,
        a2: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        self.touch([Some(up(&a0)), Some(rd(&a1)), Some(rd(&a2))]);
        Ok(())
    }
    fn sum_squares(&self, a0: View<'_, Self>) -> Result<f32> {
        self.note_scratch(ScratchUse::Reduction);
        self.touch([Some(rd(&a0))]);
        Ok(0.0)
    }
    fn adamw(
        &self,
        a0: ViewMut<'_, Self>,
        a1: Option<ViewMut<'_, Self>>,
        a2: ViewMut<'_, Self>,
        a3: ViewMut<'_, Self>,
        a4: View<'_, Self>,
        _: &AdamWStep,
    ) -> Result<()> {
        self.touch([
            Some(up(&a0)),
            a1.as_ref().map(up),
            Some(up(&a2)),
            Some(up(&a3)),
            Some(rd(&a4)),
        ]);
        Ok(())
    }
}

/// `2·rows·d_in·d_out`.
fn linear_flops(d: &LinearDims) -> usize {
    2usize
        .saturating_mul(d.rows)
        .saturating_mul(d.d_in)
        .saturating_mul(d.d_out)
}

/// `2·batch·len·c_in·c_out·width`.
fn conv_flops(d: &Conv1dDims) -> usize {
    2usize
        .saturating_mul(d.batch)
        .saturating_mul(d.len)
        .saturating_mul(d.c_in)
        .saturating_mul(d.c_out)
        .saturating_mul(d.width)
}

/// FLOPs of one attention matrix product (`QKᵀ` or `PV`, taking the wider head dim).
fn attention_products(d: &AttentionDims) -> usize {
    2usize
        .saturating_mul(d.batch)
        .saturating_mul(d.heads)
        .saturating_mul(d.q_len)
        .saturating_mul(d.kv_len)
        .saturating_mul(d.head_dim.max(d.v_head_dim))
}

/// Whether `[lo, hi)` lies within the union of the sorted, disjoint `ranges`.
fn covered(ranges: &[(u64, u64)], lo: u64, hi: u64) -> bool {
    let mut at = lo;
    for &(a, b) in ranges {
        if a > at {
            break;
        }
        if b > at {
            at = b;
        }
        if at >= hi {
            return true;
        }
    }
    at >= hi
}

/// Adds `[lo, hi)` to the sorted, disjoint `ranges`, merging neighbours.
fn add_range(ranges: &mut Vec<(u64, u64)>, lo: u64, hi: u64) {
    ranges.push((lo, hi));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *ranges = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Role, Tensor};

    /// Lifetimes come from the uses: a buffer lives from an op that writes it to the last op that reads
    /// that value, is dead in between (x), and a fresh buffer read before it is written needs its zeros
    /// from its allocation on.
    #[test]
    fn lifetimes_follow_the_uses() {
        let b = RecordingBackend::new(DType::F32);
        let table = Tensor::new(&b, Role::Exact, 64).unwrap();
        b.mark_step_buffers();
        let mut x = Tensor::new(&b, Role::Activation, 1024).unwrap();
        let mut y = Tensor::new(&b, Role::Activation, 1024).unwrap();
        let mut z = Tensor::new(&b, Role::Activation, 1024).unwrap();
        let mut fresh = Tensor::new(&b, Role::Activation, 256).unwrap();
        b.write_f32(x.view_mut(), &[]).unwrap(); // op 0: x written
        b.activation(y.view_mut(), x.view(), Act::Relu).unwrap(); // op 1: x read, y written
        b.add(z.view_mut(), y.view(), table.view()).unwrap(); // op 2: y read, z written
        b.scale_rows(fresh.view_mut(), table.view()).unwrap(); // op 3: fresh updated: reads its zeros
        b.activation(x.view_mut(), z.view(), Act::Relu).unwrap(); // op 4: z read, x written again
        let lt = b.end_window();
        // The table was made before the mark: not a step buffer.
        assert_eq!(lt.sizes, vec![4096, 4096, 4096, 1024]);
        let l = Lifetime::new;
        assert_eq!(
            lt.lives[0],
            vec![l(0, 1), l(4, 4)],
            "x is dead between ops 1 and 4"
        );
        assert_eq!(lt.lives[1], vec![l(1, 2)]);
        assert_eq!(lt.lives[2], vec![l(2, 4)]);
        assert_eq!(
            lt.lives[3],
            vec![l(0, 3)],
            "zeros needed from the allocation on"
        );
        assert_eq!(lt.live_floor(), 2 * 4096 + 1024);
        // x, y and z meet pairwise (ops 1, 2, 4): three distinct places.
        assert_eq!(lt.arena_bytes(), 3 * 4096 + 1024);
        drop((x, y, z, fresh));
    }

    #[test]
    fn buffers_whose_lifetimes_never_meet_share_bytes() {
        let b = RecordingBackend::new(DType::F32);
        b.mark_step_buffers();
        let mut a = Tensor::new(&b, Role::Activation, 1000).unwrap();
        let mut c = Tensor::new(&b, Role::Activation, 1000).unwrap();
        let mut d = Tensor::new(&b, Role::Activation, 1000).unwrap();
        b.zero(a.view_mut()).unwrap(); // op 0
        b.activation(c.view_mut(), a.view(), Act::Relu).unwrap(); // op 1: a's last use
        b.activation(d.view_mut(), c.view(), Act::Relu).unwrap(); // op 2: d may take a's bytes
        let _ = b.read_f32(d.view()).unwrap(); // op 3
        let lt = b.end_window();
        let l = Lifetime::new;
        assert_eq!(lt.lives, vec![vec![l(0, 1)], vec![l(1, 2)], vec![l(2, 3)]]);
        assert_eq!(lt.offsets[0], lt.offsets[2], "a and d share bytes");
        assert_ne!(lt.offsets[0], lt.offsets[1]);
        assert_eq!(lt.arena_bytes(), lt.offsets[0].max(lt.offsets[1]) + 4000);
        drop((a, c, d));
    }

    /// Two steps: a table written once in the first step and read in both carries its value across the
    /// step boundary, so it lives to the window's end (the next step reads it too); a buffer written and
    /// read within each step is dead between steps.
    #[test]
    fn values_carried_across_steps_live_to_the_end() {
        let b = RecordingBackend::new(DType::F32);
        b.mark_step_buffers();
        let mut table = Tensor::new(&b, Role::Exact, 100).unwrap();
        let mut scratch = Tensor::new(&b, Role::Activation, 100).unwrap();
        b.write_f32(table.view_mut(), &[]).unwrap(); // op 0: uploaded once
        b.activation(scratch.view_mut(), table.view(), Act::Relu)
            .unwrap(); // op 1
        let _ = b.read_f32(scratch.view()).unwrap(); // op 2
        b.step_boundary(); // the second step starts at op 3
        b.activation(scratch.view_mut(), table.view(), Act::Relu)
            .unwrap(); // op 3
        let _ = b.read_f32(scratch.view()).unwrap(); // op 4
        b.zero(scratch.view_mut()).unwrap(); // op 5: written, never read
        let lt = b.end_window();
        let l = Lifetime::new;
        assert_eq!(
            lt.lives[0],
            vec![l(0, 6)],
            "the table lives through the window's end"
        );
        assert_eq!(lt.lives[1], vec![l(1, 2), l(3, 4), l(5, 5)]);
        assert_eq!(lt.allocated_after_boundary, 0);
        drop((table, scratch));
    }

    /// The steps of `buffers_whose_lifetimes_never_meet_share_bytes` at `n` elements per buffer; with
    /// `late_read`, a last op reads `a` after `d` is written (so `a` and `d` meet).
    fn chain(n: usize, late_read: bool) -> StepLifetimes {
        let b = RecordingBackend::new(DType::F32);
        b.mark_step_buffers();
        let mut a = Tensor::new(&b, Role::Activation, n).unwrap();
        let mut c = Tensor::new(&b, Role::Activation, n).unwrap();
        let mut d = Tensor::new(&b, Role::Activation, n).unwrap();
        b.zero(a.view_mut()).unwrap();
        b.activation(c.view_mut(), a.view(), Act::Relu).unwrap();
        b.activation(d.view_mut(), c.view(), Act::Relu).unwrap();
        if late_read {
            b.add(c.view_mut(), a.view(), d.view()).unwrap();
        }
        let _ = b.read_f32(d.view()).unwrap();
        b.end_window()
    }

    /// A plan made at the largest shape serves the same steps at a smaller one, and refuses steps whose
    /// buffers are larger, more numerous, or alive together where the plan lets them share bytes.
    #[test]
    fn a_plan_admits_the_same_steps_at_a_smaller_shape_only() {
        let big = chain(1000, false);
        assert_eq!(big.offsets[0], big.offsets[2], "a and d share bytes");
        assert_eq!(big.admits(&chain(10, false)), Ok(()));
        assert!(big
            .admits(&chain(2000, false))
            .unwrap_err()
            .contains("bytes"));
        // `a` now lives until `d` is made: they must not share bytes.
        assert!(big
            .admits(&chain(10, true))
            .unwrap_err()
            .contains("needed together"));
        let mut fewer = chain(10, false);
        fewer.sizes.pop();
        assert!(big.admits(&fewer).unwrap_err().contains("buffers"));
    }

    #[test]
    fn range_coverage() {
        let mut r = Vec::new();
        add_range(&mut r, 10, 20);
        add_range(&mut r, 0, 5);
        assert!(!covered(&r, 0, 12));
        add_range(&mut r, 5, 10);
        assert_eq!(r, vec![(0, 20)]);
        assert!(covered(&r, 3, 20));
        assert!(!covered(&r, 3, 21));
    }
}
