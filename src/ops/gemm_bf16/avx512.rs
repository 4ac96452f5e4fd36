//! The AVX512-BF16 kernel: a [`MR`]×[`NR`] tile of C in 24 zmm registers, updated by `vdpbf16ps`
//! (two bf16 products added into each f32 lane) from A packed as broadcast pairs and B packed in
//! 32-column strips (see the parent module for the loop structure).

use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::shared::{
    computed_columns, for_each_block, give_back_task_b, pack_b_first, pack_task_b,
    rows_spread_over_sets, zero_product, Block, Dest, Output, Placement, NR, PACKED_A, PACKED_B,
};
use super::{GemmOut, Lhs, View};
use crate::ops::amx::Init;
use crate::ops::simd::{bf16_bits_16, transpose16x16_regs};

/// Rows of a register tile.
const MR: usize = 12;
/// k pairs per block (1,024 values of k). With the task shape below, a task's B block (1 MiB) stays in L2
/// and its C block is loaded and stored once per 1,024 values of k. Against 192 pairs with 72 × 768 tasks,
/// alternating `bench gemm --dtype bf16` runs on Zen 5 (three rounds each, two runs): 2048³ 9–15% faster,
/// ESM-2's and NT-v2's shapes (4096 × 480 × 1920, 4096 × 1920 × 480, 8192 × 768 × 3072 and back) −2 to +4%.
const KP: usize = 512;
/// Rows per task (a multiple of [`MR`]).
const MC: usize = 48;
/// Columns per task (a multiple of [`NR`]).
const NC: usize = 512;
// A SwiGLU output's blocks must hold whole pairs of gate and value strips (`computed_columns`).
const _: () = assert!(NC.is_multiple_of(2 * NR));

/// Packs A into `packed` (every element of its first ⌈m/MR⌉ strips written, except whole strips when
/// `whole_in_place`: the kernel reads those from A itself): strip `s` holds rows `s·MR..s·MR+MR` (padded
/// with zero rows), and for each pair `p` the rows' `(a[i][2p], a[i][2p+1])` as one u32 word each (f32
/// values rounded to bf16).
fn pack_a(packed: &mut [u32], a: Lhs<'_>, av: View, pairs: usize, whole_in_place: bool) {
    let (m, k) = (av.rows, av.cols);
    let strip_len = pairs * MR;
    // Contiguous rows go 16 pairs (32 values of k) at a time through a register transpose; a word at a
    // time, this packing was 8% of a bf16 ESM-2 profile on Zen 5 (a 4-byte store per word).
    let vector_pairs = if av.cs == 1 { k / 32 * 16 } else { 0 };
    packed
        .par_chunks_mut(strip_len.max(1))
        .take(m.div_ceil(MR))
        .enumerate()
        .for_each(|(s, strip)| {
            let valid = MR.min(m - s * MR);
            if whole_in_place && valid == MR {
                return;
            }
            let row_at = |ii: usize| (s * MR + ii) * av.rs as usize;
            if vector_pairs > 0 {
                let rows: [usize; MR] = std::array::from_fn(row_at);
                // SAFETY: the caller checked the kernel's features (`has_native_bf16`); each of the
                // `valid` rows holds k ≥ vector_pairs·2 values from its start, and the strip
                // `pairs·MR ≥ vector_pairs·MR` words.
                unsafe {
                    pack_a_blocks(
                        strip,
                        a,
                        &rows[..valid],
                        MR * av.rs as usize,
                        vector_pairs / 16,
                    )
                };
            }
            for p in vector_pairs..pairs {
                for ii in 0..MR {
                    let at = |kk: usize| {
                        if ii < valid && kk < k {
                            a.bits(row_at(ii) + kk * av.cs as usize) as u32
                        } else {
                            0
                        }
                    };
                    strip[p * MR + ii] = at(2 * p) | at(2 * p + 1) << 16;
                }
            }
        });
}

/// The first `blocks` blocks of 16 pairs of a strip whose rows start at `rows` (contiguous; rows past
/// `rows.len()` are zero): each block's rows loaded (f32 rounded by [`bf16_bits_16`], the same bits as the
/// scalar rounding), transposed in registers, and stored as 16 pairs of MR words. The same block of the
/// next strip (`next` values further on) is prefetched meanwhile: A comes from memory here, and each row's
/// run in a strip is too short for the hardware prefetcher to ramp up (the loads were two thirds of this
/// function's samples without it).
///
/// # Safety
/// AVX-512F, BW, VL, DQ and BF16; `rows.len() ≤ MR`, each row holds `32·blocks` values from its start,
/// and `strip` holds `16·blocks·MR` words.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn pack_a_blocks(strip: &mut [u32], a: Lhs<'_>, rows: &[usize], next: usize, blocks: usize) {
    debug_assert!(rows.len() <= MR && strip.len() >= 16 * blocks * MR);
    const LANES: __mmask16 = (1 << MR) - 1;
    for block in 0..blocks {
        let k0 = block * 32;
        let mut words = [_mm512_setzero_si512(); 16];
        // SAFETY (both loads): values k0..k0+32 of each row are inside it (caller).
        for (w, &row) in words.iter_mut().zip(rows) {
            *w = match a {
                Lhs::Bf16(a) => unsafe {
                    let x = a.as_ptr().add(row + k0);
                    // A hint: it never faults, and the address is only formed, not dereferenced.
                    _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(next).cast());
                    _mm512_loadu_si512(x.cast())
                },
                Lhs::F32(a) => unsafe {
                    let x = a.as_ptr().add(row + k0);
                    _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(next).cast());
                    _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(next + 16).cast());
                    let low = bf16_bits_16(_mm512_loadu_ps(x));
                    let high = bf16_bits_16(_mm512_loadu_ps(x.add(16)));
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
                },
            };
        }
        let dst = strip.as_mut_ptr().wrapping_add(block * 16 * MR);
        for (p, pair) in transpose16x16_regs(words).iter().enumerate() {
            // SAFETY: pair p of this block is strip words (block·16 + p)·MR .. + MR (caller).
            unsafe { _mm512_mask_storeu_epi32(dst.add(p * MR).cast(), LANES, *pair) };
        }
    }
}

/// Whether a strip's MR rows, `row_bytes` apart, spread over enough L1 sets to be read in place
/// ([`rows_spread_over_sets`]): read in place with rows a multiple of 4 KiB apart, a 2048³ product ran 25%
/// slower, and k = 4,096 40% slower, than packed; rows 2 KiB apart (6 a set) ran 10% faster at
/// 4,096 × 1,024 × 1,024 (Zen 5, alternating runs).
fn strip_spreads(row_bytes: usize) -> bool {
    rows_spread_over_sets(row_bytes, MR)
}

/// Where a tile's A pairs come from: a packed strip, or MR rows of A itself.
#[derive(Clone, Copy)]
enum APairs {
    /// `np·MR` words, pair by pair.
    Packed(*const u32),
    /// Contiguous bf16 rows `row_stride` values apart, starting at the tile's first pair (no packing
    /// pass: for the contiguous bf16 activations of linear layers, whose packing was 5–8% of a bf16
    /// ESM-2 profile on Zen 5, most of it waiting on memory).
    Rows {
        first: *const bf16,
        row_stride: usize,
    },
}

/// One MR×NR tile over `np` pairs: `c = init + Σ_p a_p ⊗ b_p`, with `c` an f32 tile of row stride `ldc`.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be present; `a` holds `np` pairs of MR rows, `b` holds `np·NR·2`
/// values, `c` addresses MR rows of NR values at stride `ldc`, and an [`Init::Broadcast`] address holds NR
/// values.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(np: usize, a: APairs, b: *const u16, c: *mut f32, ldc: usize, init: Init) {
    match a {
        APairs::Packed(words) => tile(np, |p, i| *words.add(p * MR + i), b, c, ldc, init),
        APairs::Rows { first, row_stride } => tile(
            np,
            |p, i| (first.add(i * row_stride + 2 * p) as *const u32).read_unaligned(),
            b,
            c,
            ldc,
            init,
        ),
    }
}

/// [`kernel`]'s loop, with `pair(p, i)` the word of pair `p` of row `i`.
///
/// # Safety
/// As [`kernel`]; `pair` reads inside A for `p < np`, `i < MR`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn tile(
    np: usize,
    pair: impl Fn(usize, usize) -> u32,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..np {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR + NR).cast()));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair(p, i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, lanes) in row.iter().enumerate() {
            let dst = c.add(i * ldc + v * 16);
            let sum = match init {
                Init::Zero => *lanes,
                Init::Load => _mm512_add_ps(_mm512_loadu_ps(dst), *lanes),
                Init::Broadcast(row) => _mm512_add_ps(_mm512_loadu_ps(row.add(v * 16)), *lanes),
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
    // The product's columns as computed: B's, or for SwiGLU gate and value strips side by side.
    let columns = computed_columns(&out, n);
    let glu = matches!(out, GemmOut::SwiGlu { .. });
    let (packed_b, in_tasks) = pack_b_first(&out, b, bv, pairs, (m, MC));
    // Whole strips of contiguous bf16 rows with whole pairs are read in place, unless the row stride
    // crowds a strip's rows into few L1 sets.
    let rows_in_place = match a {
        Lhs::Bf16(a) if av.cs == 1 && k % 2 == 0 && strip_spreads(av.rs as usize * 2) => Some(a),
        _ => None,
    };
    let mut packed_a = PACKED_A.take(m.div_ceil(MR) * pairs * MR * 4);
    pack_a(
        bytemuck::cast_slice_mut(&mut packed_a),
        a,
        av,
        pairs,
        rows_in_place.is_some(),
    );
    let (a_words, b_values): (&[u32], &[u16]) = (
        bytemuck::cast_slice(&packed_a),
        bytemuck::cast_slice(&packed_b),
    );
    let output = Output::new(out, n);
    let fill = |block: &Block, dest: Dest| {
        let Block {
            r0,
            c0,
            rows_pad,
            cols_pad,
        } = *block;
        // B's strips from `first` on: all of B's, or this task's own, packed here.
        let task_b = in_tasks.then(|| pack_task_b(block, glu, b, bv, pairs));
        let (b_values, first) = match &task_b {
            Some(lines) => (bytemuck::cast_slice::<_, u16>(lines), c0 / NR),
            None => (b_values, 0),
        };
        let mut p0 = 0;
        while p0 < pairs {
            let np = (pairs - p0).min(KP);
            for js in 0..cols_pad / NR {
                let b_at = (c0 / NR + js - first) * pairs * NR * 2 + p0 * NR * 2;
                for is in 0..rows_pad / MR {
                    let strip_row = r0 + is * MR;
                    let a_pairs = match rows_in_place {
                        // SAFETY: rows strip_row..strip_row+MR are all inside A (a whole strip),
                        // each with k = 2·pairs values, so pair p0 of the first row is inside it.
                        Some(a) if strip_row + MR <= m => APairs::Rows {
                            first: unsafe { a.as_ptr().add(strip_row * av.rs as usize + 2 * p0) },
                            row_stride: av.rs as usize,
                        },
                        // SAFETY: the pack holds `pairs` pairs per strip, so `np` from `p0` are in it.
                        _ => APairs::Packed(unsafe {
                            a_words
                                .as_ptr()
                                .add((strip_row / MR) * pairs * MR + p0 * MR)
                        }),
                    };
                    let (c, init) = dest.block((is * MR, js * NR), p0 == 0);
                    // SAFETY: features checked by the caller; B's pack holds `pairs` pairs per
                    // strip, so `np` pairs from `p0` are inside it, and so are A's (above); the tile
                    // lies inside the task's `dest`, and a bias start holds its NR columns
                    // (`for_each_block`).
                    unsafe { kernel(np, a_pairs, b_values.as_ptr().add(b_at), c, dest.ld, init) }
                }
            }
            p0 += np;
        }
        if let Some(lines) = task_b {
            give_back_task_b(lines);
        }
    };
    // SAFETY: the features were checked by the caller (`has_native_bf16`).
    // In place only where one k-block covers k, as in the AMX kernel: later k-blocks would reload their
    // sums from the output rather than from the scratch in L2.
    let placement = Placement {
        in_place: pairs <= KP,
        start_as_in_place: false,
    };
    unsafe { for_each_block(&output, (m, columns), (MC, NC), (MR, NR), placement, fill) };
    PACKED_A.give_back(packed_a);
    PACKED_B.give_back(packed_b);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strides of 4 KiB multiples crowd every row into one set; strides of linear layers' widths that
    /// are not (480 or 1,920 values, ESM-2) spread.
    #[test]
    fn rows_a_page_apart_are_packed() {
        for bytes in [4096, 8192, 3 * 4096] {
            assert!(!strip_spreads(bytes), "{bytes}");
        }
        for bytes in [960, 2048, 3840, 2000, 64] {
            assert!(strip_spreads(bytes), "{bytes}");
        }
    }
}
