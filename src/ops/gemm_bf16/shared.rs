//! What the x86 bf16 kernels share: cache-line-aligned pack buffers kept between calls, the packing of B
//! into column strips of `(b[2p][j], b[2p+1][j])` pairs (all of it first, or each task its own strips), the
//! split of the product into tasks, and the epilogue that moves a block's f32 partial sums to the output
//! (overwritten, accumulated, or rounded once to bf16 with the bias).

use std::sync::Mutex;

use half::bf16;
use rayon::prelude::*;

use super::{ActChunk, GemmOut, View};
use crate::ops::amx::Init;
use crate::ops::simd::transpose16x16;

/// 64 bytes, 64-byte aligned: the unit of every pack buffer, so that each 64-byte vector or tile row the
/// kernels load lies in one cache line (a load split over two lines costs twice as much; for AMX tile
/// loads it costs far more).
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct CacheLine([u16; 32]);

/// A pack buffer of whole cache lines, reused between calls. Each pack writes every element it is read
/// back at, so a reused buffer needs no zero-filling; a call that finds it in use allocates its own.
pub(super) struct PackCache(Mutex<Vec<CacheLine>>);

impl PackCache {
    pub(super) const fn new() -> Self {
        PackCache(Mutex::new(Vec::new()))
    }

    /// A buffer of at least `bytes` bytes (it may be longer: callers index the part they need).
    pub(super) fn take(&self, bytes: usize) -> Vec<CacheLine> {
        let lines = bytes.div_ceil(64);
        let mut v = self
            .0
            .try_lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        // Never shortened: with products of alternating sizes, regrowing a truncated buffer zero-filled
        // the difference on every call (2% of a bf16 ESM-2 profile).
        if v.len() < lines {
            v.resize(lines, CacheLine([0; 32]));
        }
        v
    }

    pub(super) fn give_back(&self, v: Vec<CacheLine>) {
        if let Ok(mut c) = self.0.try_lock() {
            if c.capacity() < v.capacity() {
                *c = v;
            }
        }
    }
}

/// Columns per strip of packed B.
pub(super) const NR: usize = 32;

/// Reads `x[i·rs + j·cs]`, or zero outside `rows × cols` (padding of ragged edges and odd k).
#[inline(always)]
fn at(x: &[bf16], v: View, i: usize, j: usize) -> u16 {
    if i < v.rows && j < v.cols {
        x[i * v.rs as usize + j * v.cs as usize].to_bits()
    } else {
        0
    }
}

/// The columns of the product the kernels compute, in the order [`pack_b`] packs B's strips: B's own `n`,
/// or for a SwiGLU output ([`Output::new`]) each [`NR`]-column strip of the gate half followed by the same
/// strip of the value half, both halves padded to whole strips. Tasks' blocks start on multiples of 64
/// columns and span multiples of 64 (the kernels' `NC` are), so each holds both halves of its outputs.
pub(super) fn computed_columns(out: &GemmOut<'_>, n: usize) -> usize {
    match out {
        GemmOut::SwiGlu { .. } => 2 * (n / 2).div_ceil(NR) * NR,
        _ => n,
    }
}

/// Packs all of B (`pairs ≥ ⌈k/2⌉`; the pairs past k are zero) for `out` ([`computed_columns`]): strip `s`
/// holds, for each pair `p`, NR columns as `(b[2p][j], b[2p+1][j])` u16 pairs, one little-endian u32 word
/// a column (128 bytes a pair): columns `s·NR..s·NR+NR`, or for a SwiGLU output those of strip `s/2` of the
/// gate half (even `s`) or of the value half (odd `s`). Written a word at a time so that the loops
/// vectorise.
fn pack_b(packed: &mut [u32], out: &GemmOut<'_>, b: &[bf16], bv: View, pairs: usize) {
    let glu = matches!(out, GemmOut::SwiGlu { .. });
    packed
        .par_chunks_mut((pairs * NR).max(1))
        .take(computed_columns(out, bv.cols).div_ceil(NR))
        .enumerate()
        .for_each(|(s, strip)| pack_b_strip_of(strip, s, glu, b, bv));
}

/// Strips `strips` of [`pack_b`]'s pack, one after the other from the start of `packed`.
fn pack_b_strips(
    packed: &mut [u32],
    strips: std::ops::Range<usize>,
    glu: bool,
    b: &[bf16],
    bv: View,
    pairs: usize,
) {
    for (strip, s) in packed.chunks_mut((pairs * NR).max(1)).zip(strips) {
        pack_b_strip_of(strip, s, glu, b, bv);
    }
}

/// All of B packed for a product's tasks before they run ([`pack_b`], into the shared scratch), or nothing
/// where they pack their own ([`pack_b_in_tasks`], for `m` rows in blocks of `mc`): the pack (empty then),
/// and whether the tasks pack.
pub(super) fn pack_b_first(
    out: &GemmOut<'_>,
    b: &[bf16],
    bv: View,
    pairs: usize,
    (m, mc): (usize, usize),
) -> (Vec<CacheLine>, bool) {
    let in_tasks = pack_b_in_tasks(m, mc);
    let strips = computed_columns(out, bv.cols).div_ceil(NR);
    let mut packed = PACKED_B.take(if in_tasks { 0 } else { strips * pairs * NR * 4 });
    if !in_tasks {
        pack_b(bytemuck::cast_slice_mut(&mut packed), out, b, bv, pairs);
    }
    (packed, in_tasks)
}

/// Whether the kernels pack B inside the tasks of a product rather than all of it first: where the
/// product has one block of rows, each strip of B is read by one task, which packs it just before its
/// products read it, from L1 and L2, while the other threads compute; packing all of B first streamed the
/// weights through memory on every thread and only then multiplied. NT-v2 250M bf16, one 201-token
/// sequence per forward: packing was a quarter of the samples.
pub(super) fn pack_b_in_tasks(m: usize, mc: usize) -> bool {
    #[cfg(test)]
    if PACK_B_FIRST.with(|first| first.get()) {
        return false;
    }
    m <= mc
}

#[cfg(test)]
thread_local! {
    /// Set by tests to pack all of B first however few rows the product has, so that one machine checks
    /// both ways.
    pub(super) static PACK_B_FIRST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Strip `s` of [`pack_b`]'s pack (for SwiGLU, strip `s / 2` of the gate half or of the value half).
fn pack_b_strip_of(strip: &mut [u32], s: usize, glu: bool, b: &[bf16], bv: View) {
    let n = bv.cols;
    let half = View { cols: n / 2, ..bv };
    // SAFETY: both native kernels (the only callers) need the AVX-512 features.
    unsafe {
        match (glu, s % 2) {
            (false, _) => pack_b_strip(strip, s, b, bv),
            (true, 0) => pack_b_strip(strip, s / 2, b, half),
            // The value half from column n/2 on (`gemm_bf16` checked that the strides are not negative).
            (true, _) => pack_b_strip(strip, s / 2, &b[(n / 2) * bv.cs as usize..], half),
        }
    }
}

/// Strip `s` of [`pack_b`], compiled for AVX-512 so that the interleaving loops vectorise.
///
/// # Safety
/// AVX-512F, BW, VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn pack_b_strip(strip: &mut [u32], s: usize, b: &[bf16], bv: View) {
    let (k, n) = (bv.rows, bv.cols);
    let filled = k.div_ceil(2);
    let word = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
    let j0 = s * NR;
    let width = (n - j0).min(NR);
    if width < NR {
        strip[..filled * NR].fill(0);
    }
    strip[filled * NR..].fill(0);
    // Columns of B contiguous and on whole words (a weight [out, in] of even `in`, 4-byte
    // aligned): each pair is one u32 of the column, and 16 pairs of 16 columns are a 16×16
    // transpose of words.
    let cs = bv.cs as usize;
    let column_words = (bv.rs == 1 && width == NR && cs.is_multiple_of(2))
        .then(|| &b[j0 * cs..][..(NR - 1) * cs + 2 * (k / 2)])
        .and_then(|cols| bytemuck::try_cast_slice::<bf16, u32>(cols).ok());
    if let Some(words) = column_words {
        transpose_pairs(strip, words, cs / 2, k / 2);
        if k % 2 == 1 {
            for jj in 0..NR {
                strip[(k / 2) * NR + jj] = word(b[(j0 + jj) * cs + k - 1].to_bits(), 0);
            }
        }
    } else if bv.rs == 1 {
        // Columns of B are contiguous (a transposed operand, e.g. a weight [out, in]): each pair
        // is one u32 of the column.
        for jj in 0..width {
            let col: &[u16] = bytemuck::cast_slice(&b[(j0 + jj) * bv.cs as usize..][..k]);
            for (p, pair) in col.chunks_exact(2).enumerate() {
                strip[p * NR + jj] = word(pair[0], pair[1]);
            }
            if k % 2 == 1 {
                strip[(k / 2) * NR + jj] = word(col[k - 1], 0);
            }
        }
    } else if bv.cs == 1 {
        // Rows of B are contiguous: interleave two rows at a time.
        for p in 0..filled {
            let out = &mut strip[p * NR..][..width];
            let row0: &[u16] = bytemuck::cast_slice(&b[2 * p * bv.rs as usize + j0..][..width]);
            if 2 * p + 1 < k {
                let row1: &[u16] =
                    bytemuck::cast_slice(&b[(2 * p + 1) * bv.rs as usize + j0..][..width]);
                for ((o, lo), hi) in out.iter_mut().zip(row0).zip(row1) {
                    *o = word(*lo, *hi);
                }
            } else {
                for (o, lo) in out.iter_mut().zip(row0) {
                    *o = word(*lo, 0);
                }
            }
        }
    } else {
        for p in 0..filled {
            for jj in 0..width {
                strip[p * NR + jj] = word(at(b, bv, 2 * p, j0 + jj), at(b, bv, 2 * p + 1, j0 + jj));
            }
        }
    }
}

/// `strip[p·NR + j] = cols[j·stride + p]` for `p < pairs` and `j < NR`: the pairs of NR contiguous
/// columns, as a transpose of 16×16 blocks of words in AVX-512 registers.
fn transpose_pairs(strip: &mut [u32], cols: &[u32], stride: usize, pairs: usize) {
    assert!(strip.len() >= pairs * NR && (pairs == 0 || cols.len() >= (NR - 1) * stride + pairs));
    let full = pairs / 16 * 16;
    // SAFETY: both native kernels (the only callers of the packer) need AVX-512F; the bounds are asserted
    // above: block (p0, j0) reads `cols[(j0 + r)·stride + p0 .. + 16]` and writes
    // `strip[(p0 + r)·NR + j0 .. + 16]` for r < 16, with p0 + 16 ≤ pairs.
    unsafe {
        for p0 in (0..full).step_by(16) {
            for j0 in (0..NR).step_by(16) {
                transpose16x16(
                    cols.as_ptr().add(j0 * stride + p0),
                    stride,
                    strip.as_mut_ptr().add(p0 * NR + j0),
                    NR,
                );
            }
        }
    }
    for p in full..pairs {
        for j in 0..NR {
            strip[p * NR + j] = cols[j * stride + p];
        }
    }
}

/// The output as raw pointers, shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
pub(super) struct Output<'a> {
    f32s: *mut f32,
    bf16s: *mut bf16,
    accumulate: bool,
    bias: Option<&'a [f32]>,
    /// Added to an f32 output's sums ([`GemmOut::Residual`]).
    residual: Option<&'a [f32]>,
    /// Columns of the whole output (for SwiGLU, half the product's).
    n: usize,
    /// SwiGLU of gate and value strips side by side ([`computed_columns`]).
    glu: bool,
    /// The activation a bf16 output passes through ([`GemmOut::Activated`]).
    act: Option<ActChunk>,
    /// Tokens per sequence and values per head of a head-major f32 output ([`GemmOut::F32Heads`]).
    head_major: Option<(usize, usize)>,
}
// SAFETY: every task writes a disjoint set of output rows × columns (its own block).
unsafe impl Send for Output<'_> {}
unsafe impl Sync for Output<'_> {}

impl<'a> Output<'a> {
    /// `out` for a product of `n` columns.
    pub(super) fn new(out: GemmOut<'a>, n: usize) -> Self {
        match out {
            GemmOut::F32 {
                c,
                accumulate,
                bias,
            } => Output {
                f32s: c.as_mut_ptr(),
                bf16s: std::ptr::null_mut(),
                accumulate,
                bias,
                residual: None,
                n,
                glu: false,
                act: None,
                head_major: None,
            },
            GemmOut::Residual { c, residual, bias } => Output {
                f32s: c.as_mut_ptr(),
                bf16s: std::ptr::null_mut(),
                accumulate: false,
                bias,
                residual: Some(residual),
                n,
                glu: false,
                act: None,
                head_major: None,
            },
            GemmOut::Bf16 { c, bias } => Output {
                f32s: std::ptr::null_mut(),
                bf16s: c.as_mut_ptr(),
                accumulate: false,
                bias,
                residual: None,
                n,
                glu: false,
                act: None,
                head_major: None,
            },
            GemmOut::SwiGlu { c } => Output {
                f32s: std::ptr::null_mut(),
                bf16s: c.as_mut_ptr(),
                accumulate: false,
                bias: None,
                residual: None,
                n: n / 2,
                glu: true,
                act: None,
                head_major: None,
            },
            GemmOut::Activated { c, bias, act } => Output {
                f32s: std::ptr::null_mut(),
                bf16s: c.as_mut_ptr(),
                accumulate: false,
                bias,
                residual: None,
                n,
                glu: false,
                act: Some(act),
                head_major: None,
            },
            GemmOut::F32Heads { c, bias, rows } => Output {
                f32s: c.as_mut_ptr(),
                bf16s: std::ptr::null_mut(),
                accumulate: false,
                bias,
                residual: None,
                n,
                glu: false,
                act: None,
                head_major: Some((rows.len, n / rows.heads)),
            },
        }
    }

    /// What the sums of a block at column `c0` start from where an f32 output is written in place, when it
    /// can be: an f32 output, unless it both accumulates and adds a bias.
    fn start_in_place(&self, c0: usize) -> Option<Init> {
        if self.f32s.is_null() {
            return None;
        }
        match (self.accumulate, self.bias) {
            (false, None) => Some(Init::Zero),
            (true, None) => Some(Init::Load),
            (false, Some(bias)) => Some(Init::Broadcast(bias[c0..].as_ptr())),
            (true, Some(_)) => None,
        }
    }

    /// The f32 output itself as the destination of the block at `(r0, c0)`, where no epilogue is left to
    /// do after the sums (not with a residual to add).
    fn direct(&self, (r0, c0): (usize, usize)) -> Option<Dest> {
        let start = self
            .start_in_place(c0)
            .filter(|_| self.residual.is_none() && self.head_major.is_none())?;
        Some(Dest {
            corner: self.f32s.wrapping_add(r0 * self.n + c0),
            ld: self.n,
            start,
        })
    }

    /// Writes a block's sums: `rows × cols` values of `src` (row stride `ld`) to the output at `(r0, c0)`,
    /// in the computed columns ([`computed_columns`]; for SwiGLU, `c0` and `cols` are multiples of 64).
    /// With `biased`, the sums already hold the bias. Compiled for AVX-512: this is a pass over the whole
    /// output.
    ///
    /// # Safety
    /// The block lies inside the output, and no other task writes it meanwhile; AVX-512F, BW, VL and DQ
    /// (both native kernels need them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn write_block(
        &self,
        src: &[f32],
        ld: usize,
        (r0, c0): (usize, usize),
        (rows, cols): (usize, usize),
        biased: bool,
    ) {
        let round = |v: f32| bf16::from_bits(crate::ops::simd::bf16_bits(v));
        if let Some(residual) = self.residual {
            let bias = self.bias.filter(|_| !biased).map(|b| &b[c0..c0 + cols]);
            for r in 0..rows {
                let src = &src[r * ld..r * ld + cols];
                let at = (r0 + r) * self.n + c0;
                let residual = &residual[at..at + cols];
                // SAFETY: (caller) the block is inside the output and this task's alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(self.f32s.add(at), cols) };
                // The product with its bias, then the residual: the bits of the two steps.
                match bias {
                    Some(bias) => dst
                        .iter_mut()
                        .zip(src.iter().zip(bias).zip(residual))
                        .for_each(|(o, ((v, b), x))| *o = (v + b) + x),
                    None => dst
                        .iter_mut()
                        .zip(src.iter().zip(residual))
                        .for_each(|(o, (v, x))| *o = v + x),
                }
            }
            return;
        }
        if self.glu {
            // SAFETY: (caller) as this function's; FMA comes with the native kernels' features
            // ([`super::super::gemm_bf16::has_native_bf16`]).
            unsafe { self.write_swiglu_block(src, ld, (r0, c0), (rows, cols)) };
            return;
        }
        if let Some(act) = self.act {
            // The sums with their bias, then the activation, a run of columns at a time through two
            // buffers in L1 (the activation reads one slice and writes another), then the rounding.
            const RUN: usize = 256;
            let (mut sums, mut activated) = ([0.0f32; RUN], [0.0f32; RUN]);
            for r in 0..rows {
                let src = &src[r * ld..r * ld + cols];
                // SAFETY: (caller) the block is inside the output and this task's alone.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(self.bf16s.add((r0 + r) * self.n + c0), cols)
                };
                for (run, (dst, src)) in dst.chunks_mut(RUN).zip(src.chunks(RUN)).enumerate() {
                    let (sums, activated) = (&mut sums[..src.len()], &mut activated[..src.len()]);
                    match self.bias {
                        Some(bias) => {
                            let bias = &bias[c0 + run * RUN..][..src.len()];
                            sums.iter_mut()
                                .zip(src.iter().zip(bias))
                                .for_each(|(o, (v, b))| *o = v + b);
                        }
                        None => sums.copy_from_slice(src),
                    }
                    act(activated, sums);
                    dst.iter_mut()
                        .zip(activated.iter())
                        .for_each(|(o, v)| *o = round(*v));
                }
            }
            return;
        }
        for r in 0..rows {
            let src = &src[r * ld..r * ld + cols];
            let at = (r0 + r) * self.n + c0;
            // SAFETY: (caller) the block is inside the output and this task's alone; the pointer not in
            // use for this output kind is never dereferenced.
            unsafe {
                if self.bf16s.is_null() {
                    // The row in runs that are contiguous in the output: the whole row, or each head's
                    // part of it in a head-major output.
                    let mut c = c0;
                    while c < c0 + cols {
                        let (to, run) = self.f32_run(r0 + r, c, c0 + cols);
                        let dst = std::slice::from_raw_parts_mut(self.f32s.add(to), run);
                        let src = &src[c - c0..c - c0 + run];
                        let bias = self.bias.filter(|_| !biased).map(|b| &b[c..c + run]);
                        match (self.accumulate, bias) {
                            (false, None) => copy_run(dst, src),
                            (true, None) => dst.iter_mut().zip(src).for_each(|(o, v)| *o += v),
                            (false, Some(bias)) => dst
                                .iter_mut()
                                .zip(src.iter().zip(bias))
                                .for_each(|(o, (v, b))| *o = v + b),
                            (true, Some(bias)) => dst
                                .iter_mut()
                                .zip(src.iter().zip(bias))
                                .for_each(|(o, (v, b))| *o += v + b),
                        }
                        c += run;
                    }
                } else {
                    let dst = std::slice::from_raw_parts_mut(self.bf16s.add(at), cols);
                    match self.bias {
                        Some(bias) => dst
                            .iter_mut()
                            .zip(src.iter().zip(&bias[c0..c0 + cols]))
                            .for_each(|(o, (v, b))| *o = round(v + b)),
                        None => dst.iter_mut().zip(src).for_each(|(o, v)| *o = round(*v)),
                    }
                }
            }
        }
    }

    /// Where column `c` of output row `row` lies in an f32 output, and how many of the columns `c..end`
    /// follow it contiguously there: the rest of the row, or, head-major ([`GemmOut::F32Heads`]), the rest
    /// of its head.
    fn f32_run(&self, row: usize, c: usize, end: usize) -> (usize, usize) {
        match self.head_major {
            None => (row * self.n + c, end - c),
            Some((len, hd)) => {
                let (seq, l, h, i) = (row / len, row % len, c / hd, c % hd);
                let heads = self.n / hd;
                (
                    ((seq * heads + h) * len + l) * hd + i,
                    (hd - i).min(end - c),
                )
            }
        }
    }

    /// [`Self::write_block`] for SwiGLU: each 2·NR computed columns are a strip of gates, then the same
    /// strip of values, and the output's columns `c0/2..` take `round(silu(gate)·value)`, 16 at a time by
    /// [`crate::ops::simd::swiglu_16`] and rounded as [`crate::ops::simd::bf16_bits`] rounds: the bits of
    /// [`crate::ops::elementwise::swiglu`] on the same CPU. One pass with no calls per strip (a call per
    /// 32 values through the elementwise op kept its latency chains from overlapping).
    ///
    /// # Safety
    /// As [`Self::write_block`], with FMA and AVX512-BF16 too.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")]
    unsafe fn write_swiglu_block(
        &self,
        src: &[f32],
        ld: usize,
        (r0, c0): (usize, usize),
        (rows, cols): (usize, usize),
    ) {
        use std::arch::x86_64::*;
        for r in 0..rows {
            let src = &src[r * ld..r * ld + cols];
            for (g, strips) in src.chunks_exact(2 * NR).enumerate() {
                let j0 = c0 / 2 + g * NR;
                let (gates, values) = strips.split_at(NR);
                for v in (0..NR).step_by(16) {
                    let lanes = self.n.saturating_sub(j0 + v).min(16);
                    let mask = ((1u32 << lanes) - 1) as __mmask16;
                    // SAFETY: 16 values at v < NR of each strip; (caller) the block is inside the
                    // output and this task's alone: the mask writes columns j0 + v.. < n of row r0 + r.
                    unsafe {
                        let gate = _mm512_loadu_ps(gates.as_ptr().add(v));
                        let value = _mm512_loadu_ps(values.as_ptr().add(v));
                        let words = crate::ops::simd::bf16_bits_16(crate::ops::simd::swiglu_16(
                            gate, value,
                        ));
                        let at = self.bf16s.add((r0 + r) * self.n + j0 + v);
                        _mm256_mask_storeu_epi16(at.cast(), mask, words);
                    }
                }
            }
        }
    }
}

/// `dst = src` in 16-lane vectors, the last one masked. A head-major output is written a head's run at a
/// time (48 values for NT-v2's q, k and v), which `copy_from_slice` sent to a `memmove` call each: 1.2% of
/// a bf16 NT-v2 `embed` profile, where these inline copies add 0.9 points to [`Output::write_block`].
#[target_feature(enable = "avx512f")]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len());
    for c in (0..n).step_by(16) {
        let mask = (u32::MAX >> (32 - (n - c).min(16))) as __mmask16;
        // SAFETY: the mask keeps lanes c.. below n, inside both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(c));
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(c), mask, v);
        }
    }
}

/// One task's block of C: its corner and extent, and the extent padded to whole register (or tile) blocks,
/// which its kernels cover.
pub(super) struct Block {
    pub(super) r0: usize,
    pub(super) c0: usize,
    pub(super) rows_pad: usize,
    pub(super) cols_pad: usize,
}

/// Where a task's kernels leave the `rows_pad × cols_pad` sums of its block: `corner` and row stride `ld`
/// (in f32 values), starting from `start` (added to by the first k-block's kernels, which must write
/// every sum; later k-blocks start from [`Init::Load`]).
pub(super) struct Dest {
    pub(super) corner: *mut f32,
    pub(super) ld: usize,
    pub(super) start: Init,
}

impl Dest {
    /// The register block at `(row, column)` of the task's block: its first sum, and what it starts
    /// from in the first k-block (`first`) or a later one.
    pub(super) fn block(&self, (row, column): (usize, usize), first: bool) -> (*mut f32, Init) {
        let init = if first {
            self.start.at_column(column)
        } else {
            Init::Load
        };
        (self.corner.wrapping_add(row * self.ld + column), init)
    }
}

/// Whether `rows` rows `row_bytes` apart spread over enough L1 sets to stay there: at most 6 of their lines
/// in any one set, counting 64 sets of 64-byte lines (the 4 KiB period of the L1 caches of Zen 4, Zen 5
/// and Golden Cove). Rows a multiple of 4 KiB apart all fall in one set and evict each other and B's
/// lines.
pub(super) fn rows_spread_over_sets(row_bytes: usize, rows: usize) -> bool {
    let mut lines_per_set = [0usize; 64];
    for i in 0..rows {
        lines_per_set[(i * row_bytes / 64) % 64] += 1;
    }
    lines_per_set.iter().all(|&lines| lines <= 6)
}

/// How [`for_each_block`] places a task's sums.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    /// A block of whole register blocks (no padding) of an f32 output (not one with a residual) is
    /// written in place: the output is the destination, starting from zero, from its own values
    /// (accumulate) or from the bias broadcast over the rows, with no epilogue pass over the block.
    pub(super) in_place: bool,
    /// Such a block, where it goes to the scratch instead (with a residual, or when a kernel runs k in
    /// several blocks but one k-block used to cover it), starts from zero or the bias as in place would, so
    /// that its sums keep the bits of the in-place output (not for an accumulating output, whose start
    /// is the output itself).
    pub(super) start_as_in_place: bool,
}

/// Columns per task: `nc`, halved (down to two strips of `nr`, so that a SwiGLU block still holds whole
/// pairs of gate and value strips) while the product has fewer than four tasks a thread. A product of few
/// rows, as in a forward of one short sequence, otherwise has a handful of tasks: 201 rows × 768 columns
/// were three, two for one thread and one for the other. No sum depends on the blocks (each runs over k in
/// the same order), so neither do the bits.
///
/// A block whose columns are not whole strips (n not a multiple of `nr`, in the last block) starts its
/// sums from zero where whole blocks of an f32 output may start from the bias ([`Placement`]), so a split
/// must leave that block's columns as they are: halving is refused where the last block would lose columns
/// to a new whole block.
pub(super) fn task_columns(row_blocks: usize, n: usize, nc: usize, nr: usize) -> usize {
    let enough = 4 * rayon::current_num_threads();
    let mut nc = nc;
    while nc.is_multiple_of(4 * nr)
        && row_blocks.saturating_mul(n.div_ceil(nc)) < enough
        && (n.is_multiple_of(nr) || n % nc < nc / 2)
    {
        nc /= 2;
    }
    nc
}

/// The loop both native kernels share: the m×n output in `(mc, nc)` blocks, one rayon task each. A task
/// runs `fill(block, dest)`, which must write every one of the block's `rows_pad × cols_pad` sums. Blocks
/// not written in place ([`Placement`]) go to a per-thread f32 scratch (64-byte aligned, kept between
/// calls), which the epilogue then moves to the output.
///
/// # Safety
/// AVX-512F, BW, VL and DQ (for [`Output::write_block`]).
pub(super) unsafe fn for_each_block(
    output: &Output<'_>,
    (m, n): (usize, usize),
    (mc, nc): (usize, usize),
    (mr, nr): (usize, usize),
    placement: Placement,
    fill: impl Fn(&Block, Dest) + Sync,
) {
    let nc = task_columns(m.div_ceil(mc), n, nc, nr);
    let (row_blocks, col_blocks) = (m.div_ceil(mc), n.div_ceil(nc));
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / col_blocks) * mc, (t % col_blocks) * nc);
        let (rows, cols) = ((m - r0).min(mc), (n - c0).min(nc));
        let block = Block {
            r0,
            c0,
            rows_pad: rows.div_ceil(mr) * mr,
            cols_pad: cols.div_ceil(nr) * nr,
        };
        let whole = block.rows_pad == rows && block.cols_pad == cols;
        if let Some(dest) = (placement.in_place && whole)
            .then(|| output.direct((r0, c0)))
            .flatten()
        {
            // Rows r0..r0+rows and columns c0..c0+cols belong to this task alone.
            return fill(&block, dest);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let lines = (block.rows_pad * block.cols_pad * 4).div_ceil(64);
            if scratch.len() < lines {
                scratch.resize(lines, CacheLine([0; 32]));
            }
            let sums: &mut [f32] = bytemuck::cast_slice_mut(&mut scratch[..lines]);
            // A block that an f32 output would write in place starts as it would (from the bias), so
            // that its sums have the bits of that output's.
            let start = (whole && (placement.in_place || placement.start_as_in_place))
                .then(|| output.start_in_place(c0))
                .flatten()
                .filter(|start| !matches!(start, Init::Load))
                .unwrap_or(Init::Zero);
            let biased = matches!(start, Init::Broadcast(_));
            let dest = Dest {
                corner: sums.as_mut_ptr(),
                ld: block.cols_pad,
                start,
            };
            fill(&block, dest);
            // SAFETY: rows r0..r0+rows and columns c0..c0+cols belong to this task alone; (caller) the
            // features are present.
            unsafe { output.write_block(sums, block.cols_pad, (r0, c0), (rows, cols), biased) };
        });
    });
}

// The packs of both kernels (a call uses one kernel; a call that finds a cache in use allocates its own).
pub(super) static PACKED_A: PackCache = PackCache::new();
pub(super) static PACKED_B: PackCache = PackCache::new();

/// A task's own strips of B ([`pack_b_in_tasks`]): those of `block`'s columns, as [`pack_b`] packs
/// them, from the start of this thread's buffer (give it back with [`give_back_task_b`], for the thread's
/// next task).
pub(super) fn pack_task_b(
    block: &Block,
    glu: bool,
    b: &[bf16],
    bv: View,
    pairs: usize,
) -> Vec<CacheLine> {
    let strips = block.cols_pad / NR;
    let mut lines = TASK_B.take();
    let need = (strips * pairs * NR * 4).div_ceil(64);
    if lines.len() < need {
        lines.resize(need, CacheLine([0; 32]));
    }
    let first = block.c0 / NR;
    pack_b_strips(
        bytemuck::cast_slice_mut(&mut lines),
        first..first + strips,
        glu,
        b,
        bv,
        pairs,
    );
    lines
}

pub(super) fn give_back_task_b(lines: Vec<CacheLine>) {
    TASK_B.set(lines);
}

thread_local! {
    /// Each worker's packed strips of B for its current task ([`pack_b_in_tasks`]).
    static TASK_B: std::cell::Cell<Vec<CacheLine>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each worker's f32 partial sums of its current block, cache-line aligned for AMX tile stores.
    static SCRATCH: std::cell::RefCell<Vec<CacheLine>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = 0` (plus the bias for a bf16 output): the product when k = 0.
pub(super) fn zero_product(out: GemmOut<'_>, n: usize) {
    match out {
        GemmOut::F32 {
            c,
            accumulate,
            bias,
        } => c.chunks_mut(n).for_each(|row| match (accumulate, bias) {
            (false, None) => row.fill(0.0),
            (false, Some(bias)) => row.copy_from_slice(bias),
            (true, Some(bias)) => row.iter_mut().zip(bias).for_each(|(o, b)| *o += b),
            (true, None) => {}
        }),
        GemmOut::Residual { c, residual, bias } => c
            .chunks_mut(n)
            .zip(residual.chunks(n))
            .for_each(|(row, res)| match bias {
                Some(bias) => row
                    .iter_mut()
                    .zip(bias.iter().zip(res))
                    .for_each(|(o, (b, r))| *o = b + r),
                None => row.iter_mut().zip(res).for_each(|(o, r)| *o = 0.0 + r),
            }),
        GemmOut::Bf16 { c, bias } => c.chunks_mut(n).for_each(|row| match bias {
            Some(bias) => row
                .iter_mut()
                .zip(bias)
                .for_each(|(o, b)| *o = bf16::from_f32(*b)),
            None => row.fill(bf16::ZERO),
        }),
        GemmOut::F32Heads { c, bias, rows } => {
            let hd = n / rows.heads;
            for (r, head_row) in c.chunks_mut(hd).enumerate() {
                // Chunk r is head (r / len) % heads of its sequence.
                let h = (r / rows.len) % rows.heads;
                match bias {
                    Some(bias) => head_row.copy_from_slice(&bias[h * hd..(h + 1) * hd]),
                    None => head_row.fill(0.0),
                }
            }
        }
        // silu(0)·0.
        GemmOut::SwiGlu { c } => c.fill(bf16::ZERO),
        GemmOut::Activated { c, bias, act } => {
            let sums = bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
            let mut row = vec![0.0; n];
            act(&mut row, &sums);
            c.chunks_mut(n).for_each(|out| {
                out.iter_mut()
                    .zip(&row)
                    .for_each(|(o, v)| *o = bf16::from_bits(crate::ops::simd::bf16_bits(*v)))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_of_16_by_16_blocks_put_every_word_in_place() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let (stride, pairs) = (41, 37);
        let cols: Vec<u32> = (0..NR * stride).map(|i| i as u32 * 2654435761).collect();
        let mut strip = vec![0u32; pairs * NR];
        transpose_pairs(&mut strip, &cols, stride, pairs);
        for p in 0..pairs {
            for j in 0..NR {
                let from = cols[j * stride + p];
                assert_eq!(strip[p * NR + j], from, "pair {p} column {j}");
            }
        }
    }
}
