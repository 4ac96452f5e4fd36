//! f32 products of few rows against a right operand whose columns are contiguous: `C = A·B` with
//! `A [m, k]` rows and `B [k, n]` columns each contiguous over k, as a linear layer `x·Wᵀ` on a weight
//! `[out, in]`. Each output is a dot product of a row of A and a row of the weight, read in place.
//!
//! The `gemm` crate packs B for every product, in its own layout, before multiplying: for a forward of
//! one peptide (22 rows) that packing was 63% of ESM-2 150M's f32 samples, and the whole model ran 3×
//! slower than PyTorch's (32 peptides of 20 residues one at a time: 7.1 s against PyTorch fp32's 2.3 s;
//! 2.0 s with this kernel). With so few rows the product is bound by reading the weight once, which this
//! kernel does, in place: blocks of 4 weight rows against groups of 4 rows of A, 16 vector accumulators
//! summed over k 16 values at a time, then reduced across lanes. Threads take blocks of output columns.
//! Each output's summation order is fixed (k in vectors of 16, lanes then added in one order), so the bits
//! depend neither on the thread count nor on the other rows.

use rayon::prelude::*;

/// Rows up to which [`product`] runs instead of the `gemm` crate. ESM-2 150M f32 `embed --batch 1` on the
/// Xeon model 167 (2 threads), 16 proteins a run, the crate against this kernel: 8 tokens 2.72 → 0.61 s,
/// 32 tokens 3.78 → 1.12 s, 64 tokens 4.17 → 1.89 s, 128 tokens 4.40 → 3.36 s; 8 proteins of 192 tokens
/// 2.78 → 2.54 s, but of 256 tokens 2.99 → 3.74 s, where the crate's blocking wins.
const MAX_ROWS: usize = 128;

/// Weight values from which [`product`] runs: 65,536 (256 KiB), where packing the weight on every call
/// costs. Smaller weights, as in the tiny test models, stay with the crate, which packs them cheaply.
const MIN_WEIGHT: usize = 1 << 16;

/// Whether an `m × n × k` product runs here (its B laid out as a weight's rows, A's rows contiguous).
pub(crate) fn suits(m: usize, n: usize, k: usize) -> bool {
    m <= MAX_ROWS && n.saturating_mul(k) >= MIN_WEIGHT
}

/// Output columns per task: 4 weight rows a block, 16 blocks.
const COLUMNS_PER_TASK: usize = 64;

/// One product's operands as strided raw pointers: `dst[i·dst_rs + j·dst_cs] (+)= Σ_p a[i·a_rs + p] ·
/// b[j·b_cs + p]` for `i < m`, `j < n`, `p < k`, added to the old value where `accumulate`.
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub dst: *mut f32,
    pub dst_strides: (isize, isize),
    pub accumulate: bool,
    pub a: *const f32,
    pub a_rs: isize,
    pub b: *const f32,
    pub b_cs: isize,
    pub mnk: (usize, usize, usize),
}

// SAFETY: [`product`]'s contract: its tasks write disjoint columns of `dst` and only read `a` and `b`.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

impl Operands {
    /// Stores `sum` at output (i, j), or adds it there where the product accumulates.
    ///
    /// # Safety
    /// As [`product`]; (i, j) inside `m × n`, written by this task alone.
    unsafe fn store(&self, i: usize, j: usize, sum: f32) {
        let (rs, cs) = self.dst_strides;
        // SAFETY: (caller) a valid element of dst, this task's alone.
        unsafe {
            let out = self.dst.offset(i as isize * rs + j as isize * cs);
            *out = if self.accumulate { *out + sum } else { sum };
        }
    }
}

/// The product `ops` describes, over blocks of [`COLUMNS_PER_TASK`] output columns, on the thread pool
/// where `parallel`.
///
/// # Safety
/// Every element the strides describe must be valid for the pointer it is read or written through, and no
/// other thread may touch `dst`'s elements during the call; distinct (i, j) must be distinct elements.
pub(crate) unsafe fn product(ops: Operands, parallel: bool) {
    let (_, n, _) = ops.mnk;
    let columns = |j0: usize| {
        let cols = j0..(j0 + COLUMNS_PER_TASK).min(n);
        // SAFETY: (caller) the elements are valid; these columns are this task's alone.
        unsafe { columns_block(&ops, cols) }
    };
    let tasks = n.div_ceil(COLUMNS_PER_TASK);
    if parallel {
        (0..tasks)
            .into_par_iter()
            .for_each(|t| columns(t * COLUMNS_PER_TASK));
    } else {
        (0..tasks).for_each(|t| columns(t * COLUMNS_PER_TASK));
    }
}

/// Columns `cols` of [`product`].
///
/// # Safety
/// As [`product`], for these columns.
unsafe fn columns_block(ops: &Operands, cols: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features are present; the rest is the caller's contract.
        return unsafe { avx512::columns_block(ops, cols) };
    }
    let (m, _, k) = ops.mnk;
    for j in cols {
        for i in 0..m {
            let mut sum = 0.0f32;
            for p in 0..k {
                // SAFETY: (caller) elements of row i of A and column j of B.
                sum += unsafe { *ops.a.offset(i as isize * ops.a_rs + p as isize) }
                    * unsafe { *ops.b.offset(j as isize * ops.b_cs + p as isize) };
            }
            // SAFETY: (caller) output (i, j), this task's alone.
            unsafe { ops.store(i, j, sum) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Operands;

    /// Weight rows (output columns) per block, and rows of A per group: 16 accumulators.
    const COLS: usize = 4;
    const ROWS: usize = 4;

    /// # Safety
    /// AVX-512F and FMA; as [`super::product`] for columns `cols`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn columns_block(ops: &Operands, cols: std::ops::Range<usize>) {
        let (m, _, k) = ops.mnk;
        let full = k / 16 * 16;
        // The last k values, fewer than 16, read under a mask (nothing past k is touched).
        let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        let mut j0 = cols.start;
        while j0 < cols.end {
            let nj = (cols.end - j0).min(COLS);
            let mut i0 = 0;
            while i0 < m {
                let ni = (m - i0).min(ROWS);
                let mut acc = [[_mm512_setzero_ps(); COLS]; ROWS];
                // SAFETY: rows i0..i0 + ni of A and columns j0..j0 + nj of B hold k values each (the
                // caller's contract); whole vectors below `full`, the rest masked.
                unsafe {
                    let row = |i: usize| ops.a.offset((i0 + i) as isize * ops.a_rs);
                    let col = |j: usize| ops.b.offset((j0 + j) as isize * ops.b_cs);
                    let mut step = |p: usize, mask: __mmask16| {
                        let mut w = [_mm512_setzero_ps(); COLS];
                        for (j, w) in w.iter_mut().enumerate().take(nj) {
                            *w = _mm512_maskz_loadu_ps(mask, col(j).add(p));
                        }
                        for (i, acc) in acc.iter_mut().enumerate().take(ni) {
                            let x = _mm512_maskz_loadu_ps(mask, row(i).add(p));
                            for (acc, w) in acc.iter_mut().zip(&w) {
                                *acc = _mm512_fmadd_ps(x, *w, *acc);
                            }
                        }
                    };
                    for p in (0..full).step_by(16) {
                        step(p, 0xffff);
                    }
                    if full < k {
                        step(full, tail);
                    }
                    for (i, acc) in acc.iter().enumerate().take(ni) {
                        for (j, acc) in acc.iter().enumerate().take(nj) {
                            ops.store(i0 + i, j0 + j, _mm512_reduce_add_ps(*acc));
                        }
                    }
                }
                i0 += ni;
            }
            j0 += nj;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rng, uniform};

    /// Against f64 dot products: row counts around the groups of 4, column counts around the blocks of 4
    /// and the tasks of 64, k with and without a tail of fewer than 16, strided output, accumulation, one
    /// thread and several; and the bits do not depend on the thread count.
    #[test]
    fn few_row_products_match_f64() {
        let mut rng = rng(41);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 16),
            (4, 64, 17),
            (7, 130, 640),
            (16, 67, 33),
            (5, 3, 0),
        ] {
            let a = uniform(&mut rng, m * k, -1.0, 1.0);
            let w = uniform(&mut rng, n * k, -1.0, 1.0);
            let start = uniform(&mut rng, m * n * 2, -1.0, 1.0);
            for accumulate in [false, true] {
                let mut runs = Vec::new();
                for parallel in [false, true] {
                    // The output transposed (column-major) with a gap: rows 1 apart, columns 2m apart.
                    let mut c = start.clone();
                    // SAFETY: c holds 2·m·n values; (i, j) → i + 2m·j < 2mn; a and w hold m·k and n·k.
                    let ops = Operands {
                        dst: c.as_mut_ptr(),
                        dst_strides: (1, 2 * m as isize),
                        accumulate,
                        a: a.as_ptr(),
                        a_rs: k as isize,
                        b: w.as_ptr(),
                        b_cs: k as isize,
                        mnk: (m, n, k),
                    };
                    unsafe { product(ops, parallel) };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                                .sum();
                            let at = i + 2 * m * j;
                            let want = dot + if accumulate { start[at] as f64 } else { 0.0 };
                            let mag: f64 = (0..k)
                                .map(|p| (a[i * k + p] as f64 * w[j * k + p] as f64).abs())
                                .sum::<f64>()
                                + start[at].abs() as f64;
                            let err = (c[at] as f64 - want).abs();
                            assert!(
                                err <= 1e-6 * mag.max(1e-30),
                                "{m}×{n}×{k} accumulate {accumulate} ({i}, {j}): {} vs {want}",
                                c[at]
                            );
                        }
                    }
                    // Untouched: the gap between the columns.
                    for j in 0..n {
                        for i in m..2 * m {
                            assert_eq!(c[i + 2 * m * j], start[i + 2 * m * j]);
                        }
                    }
                    runs.push(c);
                }
                assert_eq!(runs[0], runs[1], "{m}×{n}×{k}: bits depend on the threads");
            }
        }
    }
}
