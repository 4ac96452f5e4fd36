//! The AVX512-BF16 kernel: a [`MR`]×[`NR`] tile of C in 24 zmm registers, updated by `vdpbf16ps`
//! (two bf16 products added into each f32 lane) from A packed as broadcast pairs and B packed in
//! 32-column strips (see the parent module for the loop structure).

use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::shared::{
    for_each_block, pack_b, zero_product, Block, Dest, Output, NR, PACKED_A, PACKED_B,
};
use super::{GemmOut, Lhs, View};
use crate::ops::amx::Init;

/// Rows of a register tile.
const MR: usize = 12;
/// k pairs per block (384 values of k).
const KP: usize = 192;
/// Rows per task (a multiple of [`MR`]).
const MC: usize = 72;
/// Columns per task (a multiple of [`NR`]).
const NC: usize = 768;

fn bits(v: bf16) -> u16 {
    v.to_bits()
}

/// Packs all of A into `packed` (every element of its first ⌈m/MR⌉ strips written): strip `s` holds rows `s·MR..s·MR+MR`
/// (padded with zero rows), and for each pair `p` the rows' `(a[i][2p], a[i][2p+1])` as one u32 word
/// each (f32 values rounded to bf16).
fn pack_a(packed: &mut [u32], a: Lhs<'_>, av: View, pairs: usize) {
    let (m, k) = (av.rows, av.cols);
    let strip_len = pairs * MR;
    packed
        .par_chunks_mut(strip_len.max(1))
        .take(m.div_ceil(MR))
        .enumerate()
        .for_each(|(s, strip)| {
            let valid = MR.min(m - s * MR);
            let row_at = |ii: usize| (s * MR + ii) * av.rs as usize;
            match a {
                // Contiguous bf16 rows: a pair is one little-endian u32 of the row.
                Lhs::Bf16(a) if av.cs == 1 => {
                    let rows: Vec<&[bf16]> = (0..valid).map(|ii| &a[row_at(ii)..][..k]).collect();
                    for p in 0..k / 2 {
                        let out = &mut strip[p * MR..(p + 1) * MR];
                        for (o, row) in out.iter_mut().zip(&rows) {
                            // SAFETY: 2p + 1 < k, so both halves lie inside the row.
                            *o =
                                unsafe { (row.as_ptr().add(2 * p) as *const u32).read_unaligned() };
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
                    let rows: Vec<&[f32]> = (0..valid).map(|ii| &a[row_at(ii)..][..k]).collect();
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

/// One MR×NR tile over `np` pairs: `c = init + Σ_p a_p ⊗ b_p`, with `c` an f32 tile of row stride `ldc`.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be present; `a` holds `np·MR` words, `b` holds `np·NR·2` values, `c`
/// addresses MR rows of NR values at stride `ldc`, and an [`Init::Broadcast`] address holds NR values.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(np: usize, a: *const u32, b: *const u16, c: *mut f32, ldc: usize, init: Init) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..np {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR + NR).cast()));
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
    let mut packed_b = PACKED_B.take(n.div_ceil(NR) * pairs * NR * 2 * 2);
    pack_b(bytemuck::cast_slice_mut(&mut packed_b), b, bv, pairs);
    let mut packed_a = PACKED_A.take(m.div_ceil(MR) * pairs * MR * 4);
    pack_a(bytemuck::cast_slice_mut(&mut packed_a), a, av, pairs);
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
        let mut p0 = 0;
        while p0 < pairs {
            let np = (pairs - p0).min(KP);
            for js in 0..cols_pad / NR {
                let b_at = (c0 / NR + js) * pairs * NR * 2 + p0 * NR * 2;
                for is in 0..rows_pad / MR {
                    let a_at = (r0 / MR + is) * pairs * MR + p0 * MR;
                    let (c, init) = dest.block((is * MR, js * NR), p0 == 0);
                    // SAFETY: features checked by the caller; both packs hold `pairs` pairs per
                    // strip, so `np` pairs from `p0` are inside them; the tile lies inside the
                    // task's `dest`, and a bias start holds its NR columns (`for_each_block`).
                    unsafe {
                        kernel(
                            np,
                            a_words.as_ptr().add(a_at),
                            b_values.as_ptr().add(b_at),
                            c,
                            dest.ld,
                            init,
                        )
                    }
                }
            }
            p0 += np;
        }
    };
    // SAFETY: the features were checked by the caller (`has_native_bf16`).
    // In place only where one k-block covers k, as in the AMX kernel: later k-blocks would reload their
    // sums from the output rather than from the scratch in L2.
    let output_in_place = pairs <= KP;
    unsafe { for_each_block(&output, (m, n), (MC, NC), (MR, NR), output_in_place, fill) };
    PACKED_A.give_back(packed_a);
    PACKED_B.give_back(packed_b);
}
