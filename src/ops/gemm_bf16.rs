//! bf16 GEMM with f32 accumulation on the CPU: `C = A·B` with bf16 `A [m, k]` and `B [k, n]` (any strides),
//! written as f32 (overwritten or accumulated) or rounded once to bf16 with an optional f32 bias.
//!
//! On CPUs with AVX512-BF16 the products run on `vdpbf16ps`, which multiplies two adjacent bf16 pairs per
//! 32-bit lane and adds both products into an f32 lane: twice the multiply-adds of an f32 FMA per
//! instruction. The operands are packed for it (BLIS-style loops):
//! - **B** is packed once per call, in strips of [`NR`] columns: for each pair of k, the 32 columns'
//!   `(b[2p][j], b[2p+1][j])` side by side, so one 512-bit load feeds 16 lanes;
//! - **A** is packed per task and k-block, in strips of [`MR`] rows: for each pair of k, the rows'
//!   `(a[i][2p], a[i][2p+1])` as one 32-bit word, broadcast to every lane.
//!
//! A [`MR`]×[`NR`] tile of C stays in 24 zmm registers for a whole k-block of [`KP`] pairs; the B strip of
//! that block (24 KiB) stays in L1 while the tiles of a [`MC`]-row block of A stream from L2. Partial sums
//! across k-blocks live in an f32 scratch tile per task, so a bf16 output is rounded exactly once.
//! Odd `k` and ragged edges are padded with zeros in the packs. Work is split over `(MC rows, NC columns)`
//! blocks; each element's summation order is fixed, so results do not depend on the thread count.
//!
//! Without AVX512-BF16 (AVX-512F alone, AVX2, other CPUs) the operands are widened to f32 exactly and the
//! f32 GEMM runs, with the same epilogue.

use half::bf16;
use rayon::prelude::*;

use super::matmul::{gemm_views, View};
use crate::{Error, Result};

/// Rows of a register tile.
pub(crate) const MR: usize = 12;
/// Columns of a register tile: two 16-lane vectors.
pub(crate) const NR: usize = 32;
/// k pairs per block (384 values of k).
const KP: usize = 192;
/// Rows per task (a multiple of [`MR`]).
const MC: usize = 72;
/// Columns per task (a multiple of [`NR`]).
const NC: usize = 768;

/// Where the product goes: a row-major `m × n` buffer.
pub enum GemmOut<'a> {
    /// f32, overwritten, or added to when `accumulate`.
    F32 { c: &'a mut [f32], accumulate: bool },
    /// bf16, `c = round(A·B + bias)` with `bias [n]`.
    Bf16 {
        c: &'a mut [bf16],
        bias: Option<&'a [f32]>,
    },
}

impl GemmOut<'_> {
    fn len(&self) -> usize {
        match self {
            GemmOut::F32 { c, .. } => c.len(),
            GemmOut::Bf16 { c, .. } => c.len(),
        }
    }
}

/// The left operand: bf16, or f32 rounded to bf16 (nearest even) as it is packed, so f32 activations
/// multiply bf16 weights without a separate conversion pass.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
}

impl Lhs<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Lhs::Bf16(a) => a.len(),
            Lhs::F32(a) => a.len(),
        }
    }

    /// Element `idx` as bf16 bits.
    #[inline(always)]
    fn bits(&self, idx: usize) -> u16 {
        match self {
            Lhs::Bf16(a) => a[idx].to_bits(),
            Lhs::F32(a) => super::simd::bf16_bits(a[idx]),
        }
    }
}

/// Whether this CPU runs the `vdpbf16ps` kernel.
pub fn has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn fits(v: View, len: usize) -> bool {
    v.extent().is_some_and(|e| e <= len)
}

/// `out = A·B` (see [`GemmOut`]) for bf16 `a` and `b` read through the strided views `av [m, k]` and
/// `bv [k, n]`. `force_portable` runs the widening path even where the native kernel exists (for tests).
pub(crate) fn gemm_bf16(
    out: GemmOut<'_>,
    a: Lhs<'_>,
    av: View,
    b: &[bf16],
    bv: View,
    force_portable: bool,
) -> Result<()> {
    const OP: &str = "gemm_bf16";
    let (m, n, k) = (av.rows, bv.cols, av.cols);
    if bv.rows != k {
        return Err(Error::shape(
            OP,
            format!("a is {m}×{k} but b is {}×{n}", bv.rows),
        ));
    }
    if !fits(av, a.len()) || !fits(bv, b.len()) {
        return Err(Error::shape(OP, "an operand view reaches past its buffer"));
    }
    let mn = m
        .checked_mul(n)
        .ok_or_else(|| Error::invalid(OP, format!("{m} × {n} outputs overflow")))?;
    if out.len() != mn {
        return Err(Error::shape(
            OP,
            format!("output has {} values, expected {mn}", out.len()),
        ));
    }
    if let GemmOut::Bf16 {
        bias: Some(bias), ..
    } = &out
    {
        if bias.len() != n {
            return Err(Error::shape(
                OP,
                format!("bias has {} values, expected {n}", bias.len()),
            ));
        }
    }
    if mn == 0 {
        return Ok(());
    }
    if has_native_bf16() && !force_portable {
        native::gemm(out, a, av, b, bv);
    } else {
        portable_gemm(out, a, av, b, bv);
    }
    Ok(())
}

/// Widens both operands to f32 (exactly) and runs the f32 GEMM.
fn portable_gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) {
    let widen = |x: &[bf16]| -> Vec<f32> { x.par_iter().map(|v| v.to_f32()).collect() };
    let a32 = match a {
        Lhs::Bf16(a) => widen(a),
        Lhs::F32(a) => a.par_iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
    };
    let b32 = widen(b);
    let cv = View::row_major(av.rows, bv.cols, false);
    match out {
        GemmOut::F32 { c, accumulate } => gemm_views(c, cv, accumulate, &a32, av, &b32, bv, None),
        GemmOut::Bf16 { c, bias } => {
            let mut c32 = vec![0.0f32; c.len()];
            gemm_views(&mut c32, cv, false, &a32, av, &b32, bv, None);
            round_rows(c, &c32, bv.cols, bias);
        }
    }
}

/// `c[r, j] = bf16(src[r, j] + bias[j])` for rows of `cols` values.
fn round_rows(c: &mut [bf16], src: &[f32], cols: usize, bias: Option<&[f32]>) {
    c.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .for_each(|(o, s)| match bias {
            Some(bias) => o
                .iter_mut()
                .zip(s.iter().zip(bias))
                .for_each(|(o, (v, b))| *o = bf16::from_f32(v + b)),
            None => o
                .iter_mut()
                .zip(s)
                .for_each(|(o, v)| *o = bf16::from_f32(*v)),
        });
}

#[cfg(target_arch = "x86_64")]
mod native {
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::sync::Mutex;

    use half::bf16;
    use rayon::prelude::*;

    use super::{GemmOut, Lhs, View, KP, MC, MR, NC, NR};

    /// Raw output pointer shared by tasks that write disjoint blocks.
    #[derive(Clone, Copy)]
    struct OutPtr {
        f32s: *mut f32,
        bf16s: *mut bf16,
    }
    // SAFETY: every task writes a disjoint set of output rows × columns (its own block).
    unsafe impl Send for OutPtr {}
    unsafe impl Sync for OutPtr {}

    impl OutPtr {
        fn whole(&self) -> OutPtr {
            *self
        }
    }

    fn bits(v: bf16) -> u16 {
        v.to_bits()
    }

    /// Reads `x[i·rs + j·cs]`, or zero outside `rows × cols` (padding of ragged edges and odd k).
    #[inline(always)]
    fn at(x: &[bf16], v: View, i: usize, j: usize) -> u16 {
        if i < v.rows && j < v.cols {
            bits(x[i * v.rs as usize + j * v.cs as usize])
        } else {
            0
        }
    }

    /// Packs all of B: strip `s` holds, for each pair `p`, columns `s·NR..s·NR+NR` as
    /// `(b[2p][j], b[2p+1][j])` u16 pairs.
    fn pack_b(packed: &mut [u16], b: &[bf16], bv: View, pairs: usize) {
        let (k, n) = (bv.rows, bv.cols);
        let strip_len = pairs * NR * 2;
        packed
            .par_chunks_mut(strip_len.max(1))
            .enumerate()
            .for_each(|(s, strip)| {
                let j0 = s * NR;
                let width = (n - j0).min(NR);
                if width < NR || k % 2 == 1 {
                    // Padding columns and the missing half of the last pair are zero.
                    strip.fill(0);
                }
                if bv.rs == 1 {
                    // Columns of B are contiguous (a transposed operand, e.g. a weight [out, in]).
                    for jj in 0..width {
                        let col = &b[(j0 + jj) * bv.cs as usize..][..k];
                        for (p, pair) in col.chunks(2).enumerate() {
                            strip[p * NR * 2 + 2 * jj] = bits(pair[0]);
                            strip[p * NR * 2 + 2 * jj + 1] = pair.get(1).copied().map_or(0, bits);
                        }
                    }
                } else if bv.cs == 1 {
                    // Rows of B are contiguous: interleave two rows at a time.
                    for p in 0..pairs {
                        let out = &mut strip[p * NR * 2..][..2 * width];
                        let row0 = &b[2 * p * bv.rs as usize + j0..][..width];
                        for (o, v) in out.iter_mut().step_by(2).zip(row0) {
                            *o = bits(*v);
                        }
                        if 2 * p + 1 < k {
                            let row1 = &b[(2 * p + 1) * bv.rs as usize + j0..][..width];
                            for (o, v) in out.iter_mut().skip(1).step_by(2).zip(row1) {
                                *o = bits(*v);
                            }
                        }
                    }
                } else {
                    for p in 0..pairs {
                        for jj in 0..width {
                            strip[p * NR * 2 + 2 * jj] = at(b, bv, 2 * p, j0 + jj);
                            strip[p * NR * 2 + 2 * jj + 1] = at(b, bv, 2 * p + 1, j0 + jj);
                        }
                    }
                }
            });
    }

    /// Packs all of A into `packed` (every element written): strip `s` holds rows `s·MR..s·MR+MR`
    /// (padded with zero rows), and for each pair `p` the rows' `(a[i][2p], a[i][2p+1])` as one u32 word
    /// each (f32 values rounded to bf16).
    fn pack_a(packed: &mut [u32], a: Lhs<'_>, av: View, pairs: usize) {
        let (m, k) = (av.rows, av.cols);
        let strip_len = pairs * MR;
        packed
            .par_chunks_mut(strip_len.max(1))
            .enumerate()
            .for_each(|(s, strip)| {
                let valid = MR.min(m - s * MR);
                let row_at = |ii: usize| (s * MR + ii) * av.rs as usize;
                match a {
                    // Contiguous bf16 rows: a pair is one little-endian u32 of the row.
                    Lhs::Bf16(a) if av.cs == 1 => {
                        let rows: Vec<&[bf16]> =
                            (0..valid).map(|ii| &a[row_at(ii)..][..k]).collect();
                        for p in 0..k / 2 {
                            let out = &mut strip[p * MR..(p + 1) * MR];
                            for (o, row) in out.iter_mut().zip(&rows) {
                                // SAFETY: 2p + 1 < k, so both halves lie inside the row.
                                *o = unsafe {
                                    (row.as_ptr().add(2 * p) as *const u32).read_unaligned()
                                };
                            }
                            out[valid..].fill(0);
                        }
                        if k % 2 == 1 {
                            let out = &mut strip[(k / 2) * MR..(k / 2 + 1) * MR];
                            for (o, row) in out.iter_mut().zip(&rows) {
                                *o = bits(row[k - 1]) as u32;
                            }
                            out[valid..].fill(0);
                        }
                    }
                    // Contiguous f32 rows: rounded pair by pair.
                    Lhs::F32(a) if av.cs == 1 => {
                        let rows: Vec<&[f32]> =
                            (0..valid).map(|ii| &a[row_at(ii)..][..k]).collect();
                        let round = crate::ops::simd::bf16_bits;
                        for p in 0..pairs {
                            let out = &mut strip[p * MR..(p + 1) * MR];
                            for (o, row) in out.iter_mut().zip(&rows) {
                                let hi = row.get(2 * p + 1).map_or(0, |v| round(*v));
                                *o = round(row[2 * p]) as u32 | (hi as u32) << 16;
                            }
                            out[valid..].fill(0);
                        }
                    }
                    _ => {
                        for p in 0..pairs {
                            for ii in 0..MR {
                                let i = s * MR + ii;
                                let at = |kk: usize| {
                                    if ii < valid && kk < k {
                                        a.bits(i * av.rs as usize + kk * av.cs as usize) as u32
                                    } else {
                                        0
                                    }
                                };
                                strip[p * MR + ii] = at(2 * p) | at(2 * p + 1) << 16;
                            }
                        }
                    }
                }
            });
    }

    /// One MR×NR tile over `np` pairs: `c = (first ? 0 : c) + Σ_p a_p ⊗ b_p`, with `c` an f32 tile of row
    /// stride `ldc`.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 must be present; `a` holds `np·MR` words, `b` holds `np·NR·2` values, and
    /// `c` addresses MR rows of NR values at stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel(
        np: usize,
        a: *const u32,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..np {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR).cast()));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR + NR).cast()));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, lanes) in row.iter().enumerate() {
                let dst = c.add(i * ldc + v * 16);
                let sum = if first {
                    *lanes
                } else {
                    _mm512_add_ps(_mm512_loadu_ps(dst), *lanes)
                };
                _mm512_storeu_ps(dst, sum);
            }
        }
    }

    pub(super) fn gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) {
        let (m, n, k) = (av.rows, bv.cols, av.cols);
        let pairs = k.div_ceil(2);
        if pairs == 0 {
            // k = 0: the product is zero.
            return zero_product(out, n);
        }
        let mut packed_b = take(&PACKED_B, n.div_ceil(NR) * pairs * NR * 2);
        pack_b(&mut packed_b, b, bv, pairs);
        let (ptr, accumulate, bias) = match out {
            GemmOut::F32 { c, accumulate } => (
                OutPtr {
                    f32s: c.as_mut_ptr(),
                    bf16s: std::ptr::null_mut(),
                },
                accumulate,
                None,
            ),
            GemmOut::Bf16 { c, bias } => (
                OutPtr {
                    f32s: std::ptr::null_mut(),
                    bf16s: c.as_mut_ptr(),
                },
                false,
                bias,
            ),
        };
        let mut packed_a = take(&PACKED_A, m.div_ceil(MR) * pairs * MR);
        pack_a(&mut packed_a, a, av, pairs);
        let (row_blocks, col_blocks) = (m.div_ceil(MC), n.div_ceil(NC));
        (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
            // A method call captures the whole struct (a closure would otherwise capture the raw-pointer
            // fields alone, which are not Sync).
            let ptr = ptr.whole();
            let (r0, c0) = ((t / col_blocks) * MC, (t % col_blocks) * NC);
            let (rows, cols) = ((m - r0).min(MC), (n - c0).min(NC));
            let (rows_pad, cols_pad) = (rows.div_ceil(MR) * MR, cols.div_ceil(NR) * NR);
            TILE.with_borrow_mut(|scratch| {
                // Every element is written by the first k-block's kernels (`first`), so stale values never
                // survive.
                if scratch.len() < rows_pad * cols_pad {
                    scratch.resize(rows_pad * cols_pad, 0.0);
                }
                let mut p0 = 0;
                while p0 < pairs {
                    let np = (pairs - p0).min(KP);
                    for js in 0..cols_pad / NR {
                        let b_at = (c0 / NR + js) * pairs * NR * 2 + p0 * NR * 2;
                        for is in 0..rows_pad / MR {
                            let a_at = (r0 / MR + is) * pairs * MR + p0 * MR;
                            // SAFETY: features checked by the caller (`has_native_bf16`); both packs hold
                            // `pairs` pairs per strip, so `np` pairs from `p0` are inside them, and the tile
                            // lies inside `scratch`.
                            unsafe {
                                kernel(
                                    np,
                                    packed_a.as_ptr().add(a_at),
                                    packed_b.as_ptr().add(b_at),
                                    scratch.as_mut_ptr().add(is * MR * cols_pad + js * NR),
                                    cols_pad,
                                    p0 == 0,
                                )
                            }
                        }
                    }
                    p0 += np;
                }
                for r in 0..rows {
                    let src = &scratch[r * cols_pad..r * cols_pad + cols];
                    let at = (r0 + r) * n + c0;
                    // SAFETY: rows r0..r0+rows and columns c0..c0+cols of the m×n output belong to this task
                    // alone; the pointer not in use for this output kind is never dereferenced.
                    unsafe {
                        if ptr.bf16s.is_null() {
                            let dst = std::slice::from_raw_parts_mut(ptr.f32s.add(at), cols);
                            if accumulate {
                                dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
                            } else {
                                dst.copy_from_slice(src);
                            }
                        } else {
                            let dst = std::slice::from_raw_parts_mut(ptr.bf16s.add(at), cols);
                            match bias {
                                Some(bias) => dst
                                    .iter_mut()
                                    .zip(src.iter().zip(&bias[c0..c0 + cols]))
                                    .for_each(|(o, (v, b))| *o = bf16::from_f32(v + b)),
                                None => dst
                                    .iter_mut()
                                    .zip(src)
                                    .for_each(|(o, v)| *o = bf16::from_f32(*v)),
                            }
                        }
                    }
                }
            });
        });
        give_back(&PACKED_A, packed_a);
        give_back(&PACKED_B, packed_b);
    }

    /// `out = 0` (plus the bias for a bf16 output).
    fn zero_product(out: GemmOut<'_>, n: usize) {
        match out {
            GemmOut::F32 { c, accumulate } => {
                if !accumulate {
                    c.fill(0.0);
                }
            }
            GemmOut::Bf16 { c, bias } => c.chunks_mut(n).for_each(|row| match bias {
                Some(bias) => row
                    .iter_mut()
                    .zip(bias)
                    .for_each(|(o, b)| *o = bf16::from_f32(*b)),
                None => row.fill(bf16::ZERO),
            }),
        }
    }

    // Pack buffers are kept between calls (each pack writes every element, so no zero-filling is needed
    // when one is reused); a call that finds one in use allocates its own.
    static PACKED_A: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    static PACKED_B: Mutex<Vec<u16>> = Mutex::new(Vec::new());

    thread_local! {
        /// Each worker's f32 partial sums of its current block.
        static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    fn take<T: Copy + Default>(cache: &Mutex<Vec<T>>, len: usize) -> Vec<T> {
        let mut v = cache
            .try_lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        if v.len() < len {
            v.resize(len, T::default());
        }
        v.truncate(len);
        v
    }

    fn give_back<T>(cache: &Mutex<Vec<T>>, v: Vec<T>) {
        if let Ok(mut c) = cache.try_lock() {
            if c.capacity() < v.capacity() {
                *c = v;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod native {
    use super::{GemmOut, Lhs, View};
    use half::bf16;

    pub(super) fn gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) {
        super::portable_gemm(out, a, av, b, bv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rng, uniform};
    use rand::rngs::StdRng;

    /// Naive f64 product of the bf16 values.
    fn reference(a: &[bf16], av: View, b: &[bf16], bv: View) -> (Vec<f64>, Vec<f64>) {
        let (m, n, k) = (av.rows, bv.cols, av.cols);
        let (mut c, mut mag) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = a[i * av.rs as usize + p * av.cs as usize].to_f32() as f64;
                    let y = b[p * bv.rs as usize + j * bv.cs as usize].to_f32() as f64;
                    c[i * n + j] += x * y;
                    mag[i * n + j] += (x * y).abs();
                }
            }
        }
        (c, mag)
    }

    fn random_bf16(rng: &mut StdRng, n: usize) -> Vec<bf16> {
        uniform(rng, n, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// Every edge case of the packing (ragged m and n, odd k, k across several blocks, transposed
    /// operands, bf16 and f32 left operands), on the native kernel where the CPU has it and on the
    /// portable path.
    #[test]
    fn bf16_gemm_matches_f64_on_ragged_and_transposed_shapes() {
        let mut rng = rng(7);
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (25, 64, 385),
            (250, 45, 800),
            (12, 530, 33),
        ];
        for &(m, n, k) in &shapes {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                // f32 values that bf16 cannot hold: packed as `Lhs::F32` they are rounded, so both
                // operand kinds must give the product of the rounded values.
                let a32 = uniform(&mut rng, m * k, -1.0, 1.0);
                let a: Vec<bf16> = a32.iter().map(|v| bf16::from_f32(*v)).collect();
                let b = random_bf16(&mut rng, k * n);
                let bias = uniform(&mut rng, n, -1.0, 1.0);
                let (av, bv) = (View::row_major(m, k, ta), View::row_major(k, n, tb));
                let (want, mag) = reference(&a, av, &b, bv);
                for portable in [false, true] {
                    let mut c32 = vec![0.5f32; m * n];
                    gemm_bf16(
                        GemmOut::F32 {
                            c: &mut c32,
                            accumulate: true,
                        },
                        Lhs::Bf16(&a),
                        av,
                        &b,
                        bv,
                        portable,
                    )
                    .unwrap();
                    let mut c16 = vec![bf16::ZERO; m * n];
                    gemm_bf16(
                        GemmOut::Bf16 {
                            c: &mut c16,
                            bias: Some(&bias),
                        },
                        Lhs::F32(&a32),
                        av,
                        &b,
                        bv,
                        portable,
                    )
                    .unwrap();
                    for i in 0..m * n {
                        // f32 accumulation: error grows with k and the magnitude of the terms.
                        let tol = 4.0 * k as f64 * f32::EPSILON as f64 * mag[i] + 1e-6;
                        let got = c32[i] as f64 - 0.5;
                        assert!(
                            (got - want[i]).abs() <= tol,
                            "{m}×{n}×{k} ta={ta} tb={tb} portable={portable} [{i}]: {got} vs {}",
                            want[i]
                        );
                        let with_bias = want[i] + bias[i % n] as f64;
                        let got16 = c16[i].to_f32() as f64;
                        // one bf16 rounding: half an ulp of 2⁻⁸ relative, plus the f32 error
                        let tol16 = with_bias.abs() * 2f64.powi(-8) + tol + 1e-30;
                        assert!(
                            (got16 - with_bias).abs() <= tol16,
                            "bf16 out {m}×{n}×{k} [{i}]: {got16} vs {with_bias}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gemm_rejects_bad_sizes() {
        let a = vec![bf16::ONE; 6];
        let b = vec![bf16::ONE; 6];
        let mut c = vec![0.0f32; 4];
        let err = gemm_bf16(
            GemmOut::F32 {
                c: &mut c,
                accumulate: false,
            },
            Lhs::Bf16(&a),
            View::row_major(2, 3, false),
            &b,
            View::row_major(3, 3, false),
            false,
        );
        assert!(err.is_err(), "b view past its buffer");
        let mut c = vec![0.0f32; 5];
        let err = gemm_bf16(
            GemmOut::F32 {
                c: &mut c,
                accumulate: false,
            },
            Lhs::Bf16(&a),
            View::row_major(2, 3, false),
            &b,
            View::row_major(3, 2, false),
            false,
        );
        assert!(err.is_err(), "output of the wrong size");
    }
}
