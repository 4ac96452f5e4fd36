//! f32 products of few rows against a right operand whose columns are contiguous: `C = A·B` with
//! `A [m, k]` rows and `B [k, n]` columns each contiguous over k, as a linear layer `x·Wᵀ` on a weight
//! `[out, in]`. Each output is a dot product of a row of A and a row of the weight, read in place.
//!
//! The `gemm` crate packs B for every product, in its own layout, before multiplying: for a forward of
//! one peptide (22 rows) that packing was 63% of ESM-2 150M's f32 samples, and the whole model ran 3×
//! slower than PyTorch's (32 peptides of 20 residues one at a time: 7.1 s against PyTorch fp32's 2.3 s).
//! With a few hundred rows or fewer the product is bound by reading the weight, which this kernel does once,
//! in place:
//! - a block is 6 rows of A against 4 weight rows: 24 vector accumulators summed over a k-block 16 values
//!   at a time, then reduced across lanes (the four sums of a row in one pass of shuffles) and added to C;
//! - within a task, for each k-block, each group of 6 rows of A (18 KiB at k = 768, in L1) meets every
//!   4-row block of the task's weight rows (192 KiB, in L2), whose next lines are prefetched, and so are
//!   the next block's rows: the first group reads the weight from memory, and its rows are too short for
//!   the hardware's stream prefetch (ESM-2 150M f32 over 32 peptides one at a time, 1.74–1.75 → 1.44–1.47
//!   s, alternating);
//! - tasks own 64 output columns, and blocks of rows too where the columns alone give fewer than four
//!   tasks a thread.
//!
//! Each output's sum runs over the same k-blocks in the same order (k in vectors of 16, lanes then added
//! in one order), so the bits depend neither on the thread count nor on the other rows.

use rayon::prelude::*;

/// Weight values from which [`product`] runs: 65,536 (256 KiB), where packing the weight on every call
/// costs. Smaller weights, as in the tiny test models, stay with the crate, which packs them cheaply.
const MIN_WEIGHT: usize = 1 << 16;

/// Whether an `m × n × k` product runs here (its B laid out as a weight's rows, A's rows contiguous): up to
/// 256 rows, and up to 512 where the layer does not widen (n ≤ k). Above that the crate's blocking, which
/// packs the weight once for many rows, wins. Both on 64-byte aligned operands as the engine's tensors are,
/// 2 threads on the Xeon model 167, GFLOP/s this kernel against the crate: 22 × 640 × 640 338 against
/// 45; 202 × 640 × 640 325–344 against 212–239; 202 × 640 × 2,560 293–320 against 151–195; 256 × 640 ×
/// 640 341–349 against 257–262; 256 × 2,560 × 640 315–321 against 316–332; 512 × 768 × 768 339–352 against
/// 309–316; 512 × 640 × 2,560 291–301 against 273–281; but 384 × 2,560 × 640 326–344 against 360–363,
/// 512 × 3,072 × 768 339–344 against 378–384 and 768 × 640 × 640 307–323 against 327–341.
///
/// Only where the CPU has AVX-512: elsewhere the kernel is scalar code, and the crate's AVX2 kernels win.
pub(crate) fn suits(m: usize, n: usize, k: usize) -> bool {
    (m <= 256 || (m <= 512 && n <= k)) && n.saturating_mul(k) >= MIN_WEIGHT && has_avx512()
}

/// AVX-512F and FMA, which the kernel is compiled for.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output columns per task: 16 blocks of 4 weight rows.
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

// SAFETY: [`product`]'s contract: its tasks write disjoint blocks of rows and columns of `dst` and only
// read `a` and `b`.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

impl Operands {
    /// Stores `sum` at output (i, j), or adds it to the value there where `add`.
    ///
    /// # Safety
    /// As [`product`]; (i, j) inside `m × n`, written by this task alone.
    unsafe fn store(&self, i: usize, j: usize, sum: f32, add: bool) {
        let (rs, cs) = self.dst_strides;
        // SAFETY: (caller) a valid element of dst, this task's alone.
        unsafe {
            let out = self.dst.offset(i as isize * rs + j as isize * cs);
            *out = if add { *out + sum } else { sum };
        }
    }
}

/// k values per block at most: six rows of A over a block (18 KiB at 768) stay in L1 while the weight's
/// rows stream past them, and the task's weight rows over a block (192 KiB) stay in L2.
const MAX_KC: usize = 768;

/// The k-block for depth `k`: blocks of about equal length, each a multiple of 16 but the last.
fn k_block(k: usize) -> usize {
    let blocks = k.div_ceil(MAX_KC).max(1);
    k.div_ceil(blocks).div_ceil(16) * 16
}

/// Rows per task where a product's column blocks alone give too few tasks: a multiple of the kernel's
/// six-row groups.
const ROWS_PER_TASK: usize = 96;

/// The product `ops` describes, over tasks of [`COLUMNS_PER_TASK`] output columns (and of
/// [`ROWS_PER_TASK`] rows where the columns give fewer than four tasks a thread), on the thread pool where
/// `parallel`. Each output's sum runs over the same k-blocks in the same order whatever the split.
///
/// # Safety
/// Every element the strides describe must be valid for the pointer it is read or written through, and no
/// other thread may touch `dst`'s elements during the call; distinct (i, j) must be distinct elements.
pub(crate) unsafe fn product(ops: Operands, parallel: bool) {
    let (m, n, k) = ops.mnk;
    let kc = k_block(k);
    let column_tasks = n.div_ceil(COLUMNS_PER_TASK);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let split = if column_tasks < 4 * threads {
        m.div_ceil(ROWS_PER_TASK).max(1)
    } else {
        1
    };
    // Whole groups of six rows a task, and no task without rows.
    let rows_per_task = m.div_ceil(split).next_multiple_of(6).max(1);
    let row_tasks = m.div_ceil(rows_per_task).max(1);
    let run = |t: usize| {
        let (r, c) = (t / column_tasks, t % column_tasks);
        let rows = r * rows_per_task..((r + 1) * rows_per_task).min(m);
        let cols = c * COLUMNS_PER_TASK..((c + 1) * COLUMNS_PER_TASK).min(n);
        // SAFETY: (caller) the elements are valid; these rows and columns are this task's alone.
        unsafe { task(&ops, rows, cols, kc) }
    };
    let tasks = row_tasks * column_tasks;
    if parallel {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Rows `rows` and columns `cols` of [`product`], k in blocks of `kc`.
///
/// # Safety
/// As [`product`], for these rows and columns.
unsafe fn task(
    ops: &Operands,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    kc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features are present; the rest is the caller's contract.
        return unsafe { avx512::task(ops, rows, cols, kc) };
    }
    let (_, _, k) = ops.mnk;
    for j in cols {
        for i in rows.clone() {
            let mut p0 = 0;
            loop {
                let len = kc.min(k - p0);
                let mut sum = 0.0f32;
                for p in p0..p0 + len {
                    // SAFETY: (caller) elements of row i of A and column j of B.
                    sum += unsafe { *ops.a.offset(i as isize * ops.a_rs + p as isize) }
                        * unsafe { *ops.b.offset(j as isize * ops.b_cs + p as isize) };
                }
                // SAFETY: (caller) output (i, j), this task's alone.
                unsafe { ops.store(i, j, sum, ops.accumulate || p0 > 0) };
                p0 += len;
                if p0 >= k {
                    break;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Operands;

    /// Rows of A per group, kept in L1 while the weight's blocks stream past them: each weight vector
    /// loaded from L2 feeds this many FMAs.
    const ROWS: usize = 6;
    /// Weight rows (output columns) per block: with [`ROWS`], 24 vector accumulators, four weight vectors
    /// and the row vector being multiplied, 29 of the 32 registers.
    const COLS: usize = 4;
    /// How far ahead of the products the weight rows are prefetched into L1, in values: four cache lines
    /// (without it, 202 × 640 × 640 ran at 298–308 GFLOP/s against 328–344).
    const PREFETCH: usize = 64;

    /// Rows `rows` and columns `cols` of the product, k in blocks of `kc` (a multiple of 16).
    ///
    /// # Safety
    /// AVX-512F and FMA; as [`super::product`] for these rows and columns.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn task(
        ops: &Operands,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        kc: usize,
    ) {
        let (_, _, k) = ops.mnk;
        // One pass at least: a product over no k values stores zeros.
        let mut p0 = 0;
        loop {
            let len = kc.min(k - p0);
            // The first k-block stores (or adds to the old value where the product accumulates); later ones add.
            let add = ops.accumulate || p0 > 0;
            let mut i0 = rows.start;
            while i0 < rows.end {
                let ni = (rows.end - i0).min(ROWS);
                let mut j0 = cols.start;
                while j0 < cols.end {
                    let nj = (cols.end - j0).min(COLS);
                    let at = Block {
                        i0,
                        j0,
                        p0,
                        len,
                        add,
                    };
                    // One flat match: a nested generic dispatcher (rows, then columns) let LLVM inline
                    // `block` in spite of `#[inline(never)]`, and its accumulators spilled again.
                    // SAFETY: (caller) rows i0..i0 + ni and columns j0..j0 + nj are this task's.
                    unsafe {
                        match (ni, nj) {
                            (6, 4) => block::<6, 4>(ops, at),
                            (6, 3) => block::<6, 3>(ops, at),
                            (6, 2) => block::<6, 2>(ops, at),
                            (6, _) => block::<6, 1>(ops, at),
                            (5, 4) => block::<5, 4>(ops, at),
                            (5, 3) => block::<5, 3>(ops, at),
                            (5, 2) => block::<5, 2>(ops, at),
                            (5, _) => block::<5, 1>(ops, at),
                            (4, 4) => block::<4, 4>(ops, at),
                            (4, 3) => block::<4, 3>(ops, at),
                            (4, 2) => block::<4, 2>(ops, at),
                            (4, _) => block::<4, 1>(ops, at),
                            (3, 4) => block::<3, 4>(ops, at),
                            (3, 3) => block::<3, 3>(ops, at),
                            (3, 2) => block::<3, 2>(ops, at),
                            (3, _) => block::<3, 1>(ops, at),
                            (2, 4) => block::<2, 4>(ops, at),
                            (2, 3) => block::<2, 3>(ops, at),
                            (2, 2) => block::<2, 2>(ops, at),
                            (2, _) => block::<2, 1>(ops, at),
                            (_, 4) => block::<1, 4>(ops, at),
                            (_, 3) => block::<1, 3>(ops, at),
                            (_, 2) => block::<1, 2>(ops, at),
                            (_, _) => block::<1, 1>(ops, at),
                        }
                    }
                    j0 += nj;
                }
                i0 += ni;
            }
            p0 += len;
            if p0 >= k {
                return;
            }
        }
    }

    /// Where a block sits: its first row and column, its k-block, and whether it adds to the output.
    #[derive(Clone, Copy)]
    struct Block {
        i0: usize,
        j0: usize,
        p0: usize,
        len: usize,
        add: bool,
    }

    /// `R` rows of A against `C` weight rows over one k-block: `R·C` accumulators of 16 lanes, summed over
    /// the block 16 values at a time (the last fewer under a mask), then reduced across lanes.
    ///
    /// A function of its own (not inlined into [`task`]), so that its 24 accumulators are allocated to
    /// registers whatever the caller's code around it: inlined, the engine's build spilled them to the
    /// stack on every step (ESM-2 150M at 200 residues 15.2 s against 10.6 s with the crate).
    ///
    /// # Safety
    /// AVX-512F and FMA; the rows, columns and k values are the caller's.
    #[target_feature(enable = "avx512f,fma")]
    #[inline(never)]
    unsafe fn block<const R: usize, const C: usize>(ops: &Operands, at: Block) {
        let Block {
            i0,
            j0,
            p0,
            len,
            add,
        } = at;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        // SAFETY: rows i0..i0 + R of A and columns j0..j0 + C of B hold k values each (the caller's
        // contract); whole vectors below `full`, the rest masked, nothing past p0 + len read.
        unsafe {
            let rows: [*const f32; R] =
                std::array::from_fn(|i| ops.a.offset((i0 + i) as isize * ops.a_rs + p0 as isize));
            let cols: [*const f32; C] =
                std::array::from_fn(|j| ops.b.offset((j0 + j) as isize * ops.b_cs + p0 as isize));
            // The next block's weight rows, prefetched at the same offsets as these are read: the rows
            // are too short (2.5 KiB at k = 640) for the hardware's stream prefetch to reach them in
            // time from memory, where a forward of few rows finds the weights.
            let ahead: [*const f32; C] =
                std::array::from_fn(|j| cols[j].wrapping_offset(C as isize * ops.b_cs));
            let full = len / 16 * 16;
            for p in (0..full).step_by(16) {
                step::<R, C>(&mut acc, &rows, &cols, &ahead, p, 0xffff);
            }
            // The last fewer than 16 values under a mask (nothing past the block read); with no k values at
            // all, the sums stay zero.
            if full < len {
                let mask = ((1u32 << (len - full)) - 1) as __mmask16;
                step::<R, C>(&mut acc, &rows, &cols, &ahead, full, mask);
            }
            for (i, row) in acc.into_iter().enumerate() {
                for (j, sum) in reduce_lanes(row).into_iter().enumerate() {
                    ops.store(i0 + i, j0 + j, sum, add);
                }
            }
        }
    }

    /// One step of 16 k values (those under `mask`) at offset `p`: `C` weight vectors loaded, each row's
    /// vector multiplied into its `C` accumulators; the weight rows' lines [`PREFETCH`] values on, and the
    /// next block's rows (`ahead`) at `p`, prefetched.
    ///
    /// # Safety
    /// AVX-512F and FMA (inlined into [`block`]); the values under `mask` readable.
    #[inline(always)]
    unsafe fn step<const R: usize, const C: usize>(
        acc: &mut [[__m512; C]; R],
        rows: &[*const f32; R],
        cols: &[*const f32; C],
        ahead: &[*const f32; C],
        p: usize,
        mask: __mmask16,
    ) {
        // SAFETY: (caller) readable under the mask.
        unsafe {
            // Prefetches read nothing past an allocation's end and cannot fault.
            for col in cols {
                _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(p + PREFETCH) as *const i8);
            }
            for col in ahead {
                _mm_prefetch::<_MM_HINT_T0>(col.wrapping_add(p) as *const i8);
            }
            let w: [__m512; C] =
                std::array::from_fn(|j| _mm512_maskz_loadu_ps(mask, cols[j].add(p)));
            for i in 0..R {
                let x = _mm512_maskz_loadu_ps(mask, rows[i].add(p));
                for j in 0..C {
                    acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
                }
            }
        }
    }

    /// The lane sums of up to four vectors, in a fixed order: 128-bit quarters added pairwise across the
    /// vectors' halves, then within each quarter.
    #[inline(always)]
    unsafe fn reduce_lanes<const C: usize>(acc: [__m512; C]) -> [f32; C] {
        let mut v = [_mm512_setzero_ps(); 4];
        v[..C].copy_from_slice(&acc);
        // Quarters (q0 + q2, q1 + q3) of vectors 0 and 1 side by side, then of 2 and 3.
        let x01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(v[0], v[1]),
            _mm512_shuffle_f32x4::<0xEE>(v[0], v[1]),
        );
        let x23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(v[2], v[3]),
            _mm512_shuffle_f32x4::<0xEE>(v[2], v[3]),
        );
        // Quarter j now holds vector j's four partial sums; then pairs of lanes, then the pairs' sums.
        let quarters = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x01, x23),
            _mm512_shuffle_f32x4::<0xDD>(x01, x23),
        );
        let pairs = _mm512_add_ps(quarters, _mm512_permute_ps::<0xB1>(quarters));
        let total = _mm512_add_ps(pairs, _mm512_permute_ps::<0x4E>(pairs));
        let mut lanes = [0.0f32; 16];
        // SAFETY: 16 f32 lanes into a 16-element array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total) };
        std::array::from_fn(|j| lanes[4 * j])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rng, uniform};

    /// Against f64 dot products, within the rounding bound of the kernel's sums: row counts around the
    /// groups of 6 and the row tasks, column counts around the blocks of 4 and the tasks of 64, k with and
    /// without a tail of fewer than 16 and over several k-blocks, strided output, accumulation; one
    /// thread, the pool, and a pool of 8 (more tasks split by rows); the bits do not depend on the split.
    #[test]
    fn few_row_products_match_f64() {
        let mut rng = rng(41);
        let pool_of_8 = rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .build()
            .unwrap();
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 16),
            (4, 64, 17),
            (7, 130, 640),
            (16, 67, 33),
            (5, 3, 0),
            (13, 6, 1601),
            (200, 67, 100),
            (301, 9, 48),
            (97, 131, 769),
        ] {
            let a = uniform(&mut rng, m * k, -1.0, 1.0);
            let w = uniform(&mut rng, n * k, -1.0, 1.0);
            let start = uniform(&mut rng, m * n * 2, -1.0, 1.0);
            // Roundings in one output's sum: a lane's k/16 FMAs, the k-blocks' additions, the four of the
            // lane reduction and the accumulation.
            let roundings = (k / 16 + k.div_ceil(k_block(k).max(1)) + 6) as f64;
            for accumulate in [false, true] {
                let mut runs = Vec::new();
                for (parallel, pool) in [(false, None), (true, None), (true, Some(&pool_of_8))] {
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
                    match pool {
                        Some(pool) => pool.install(|| unsafe { product(ops, parallel) }),
                        None => unsafe { product(ops, parallel) },
                    }
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
                                err <= roundings * f32::EPSILON as f64 / 2.0 * mag,
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
                assert_eq!(runs[0], runs[2], "{m}×{n}×{k}: bits depend on the split");
            }
        }
    }
}
