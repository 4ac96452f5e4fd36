//! The AMX GEMM (Intel Sapphire Rapids and later) on the tile product of [`crate::ops::amx`]: a 32×32
//! block of C in four tiles, two tiles of A and two of B, four `tdpbf16ps` per step of 32 k.
//!
//! The operands are packed so that every tile is read as 16 rows of one 64-byte cache line each:
//! - **A** in strips of 16 rows, each `[k / 32][16 rows][32 k]` (one KiB a tile), zero-padded, or read in
//!   place where it is contiguous bf16 of whole tiles on cache lines (unless its rows crowd the L1 sets
//!   and the product is wide: [`PACK_CROWDED_FROM_COLUMNS`]);
//! - **B** as the AVX-512 kernel packs it (32-column strips of k pairs, 128 bytes a pair).
//!
//! The loops are BLIS-like: tasks own [`MC`]×[`NC`] blocks of C; within one, k runs in k-blocks and, for
//! each 32-row pair of A strips, the 32-column strips of B stream from L2, prefetched into L1 a step ahead
//! by the tile product. The k-block is [`KC_L1`] where a pair of A strips of that length stays in L1 (its
//! rows spread over the L1 sets: packed A, or rows read in place at a stride like 1,536 bytes), so that only
//! B streams from L2; else [`KC`], where fewer stores and reloads of the C tiles win since A comes from L2
//! anyway. Partial sums across k-blocks go to an aligned f32 scratch block, so a bf16 output is rounded
//! once; an f32 output covered by one k-block takes the tiles' stores directly (see [`gemm`]). Each
//! element's summation order is fixed, so results do not depend on the thread count, nor on the k-block.

use rayon::prelude::*;

use half::bf16;

use super::shared::{
    computed_columns, for_each_block, give_back_task_b, pack_b_first, pack_task_b,
    rows_spread_over_sets, zero_product, Block, Dest, Output, Placement, NR, PACKED_A, PACKED_B,
};
use super::{GemmOut, Lhs, View};
use crate::ops::amx::{block_32x32, ATiles, Tiles, BLOCK, TILE_K, TILE_ROWS};

/// Rows of C per kernel call: two A tiles.
const MR: usize = BLOCK;
// The tile product reads B strips as the AVX-512 kernel packs them: 32 columns a pair line.
const _: () = assert!(NR == BLOCK);
/// k values per block where A's rows crowd a few L1 sets: with the B prefetch, longer k-blocks measured
/// 2–20% faster than 256 or 512 there (in place at 8,192 × 768 × 3,072 and 2048³, 1,024 stayed 1–4% ahead).
const KC: usize = 1024;
/// k values per block where a pair of A strips stays in L1: 32 rows × 256 k of bf16 are 16 KiB, a third of
/// the L1 of Sapphire Rapids, beside B's prefetched lines. At NT-v2's k = 768 (A read in place, rows 1,536
/// bytes apart), alternating with [`KC`]: 8,192 × 768 → 768 2,822–2,867 against 2,228–2,343 GFLOP/s,
/// → 6,144 2,496–2,561 against 2,133–2,143, → 2,304 2,535–2,731 against 2,036–2,290; packed, 2048³
/// 2,314–2,339 against 2,064–2,072 (384: between the two).
const KC_L1: usize = 256;
/// Output columns from which A read in place with crowded rows is packed instead, so that it takes the
/// short k-block: packing costs a pass over A, which each 32-column strip of the product repays a little.
/// Alternating in place and packed (`bench gemm --dtype bf16`, Xeon model 167, 2 threads, three rounds):
/// 2048³ 2,123–2,135 → 2,257–2,337 GFLOP/s, 4096³ 2,122–2,173 → 2,314–2,331, 8,192 × 2,048 × 2,048
/// 2,180–2,264 → 2,221–2,249, 8,192 × 3,072 × 3,072 2,153–2,173 → 2,291–2,359; but 8,192 × 768 × 3,072
/// (NT-v2's FFN output) 2,306–2,428 → 1,847–2,056, 8,192 × 1,024 × 2,048 2,250–2,293 → 2,069–2,105.
const PACK_CROWDED_FROM_COLUMNS: usize = 2048;
/// Rows per task (a multiple of [`MR`]).
const MC: usize = 256;
/// Columns per task (a multiple of [`NR`]).
const NC: usize = 256;
// A SwiGLU output's blocks must hold whole pairs of gate and value strips (`computed_columns`).
const _: () = assert!(NC.is_multiple_of(2 * NR));

/// Packs all of A into tiles: strip `s` (rows `16s..16s+16`, zero past m) is `steps` tiles of 16 rows ×
/// 32 k (zero past k), f32 values rounded to bf16.
fn pack_a(packed: &mut [u16], a: Lhs<'_>, av: View, steps: usize) {
    packed
        .par_chunks_mut(steps * TILE_ROWS * TILE_K)
        .take(av.rows.div_ceil(MR) * MR / TILE_ROWS)
        .enumerate()
        // SAFETY: AMX implies the AVX-512 features (checked with it, `has_native_bf16`).
        .for_each(|(s, strip)| unsafe { pack_a_strip(strip, s, a, av, steps) });
}

/// Strip `s` of [`pack_a`], compiled for AVX-512 so that the copies and roundings vectorise.
///
/// # Safety
/// AVX-512F, BW, VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn pack_a_strip(strip: &mut [u16], s: usize, a: Lhs<'_>, av: View, steps: usize) {
    let (m, k) = (av.rows, av.cols);
    let tile = TILE_ROWS * TILE_K;
    for r in 0..TILE_ROWS {
        let i = s * TILE_ROWS + r;
        let row_at = i * av.rs as usize;
        for st in 0..steps {
            let out = &mut strip[st * tile + r * TILE_K..][..TILE_K];
            let (k0, k1) = (st * TILE_K, ((st + 1) * TILE_K).min(k));
            if i >= m || k0 >= k {
                out.fill(0);
                continue;
            }
            let width = k1 - k0;
            match a {
                Lhs::Bf16(a) if av.cs == 1 => {
                    let src = &a[row_at + k0..][..width];
                    out.iter_mut().zip(src).for_each(|(o, v)| *o = v.to_bits());
                }
                Lhs::F32(a) if av.cs == 1 => {
                    let src = &a[row_at + k0..][..width];
                    let round = crate::ops::simd::bf16_bits;
                    out.iter_mut().zip(src).for_each(|(o, v)| *o = round(*v));
                }
                _ => {
                    for (kk, o) in out[..width].iter_mut().enumerate() {
                        *o = a.bits(row_at + (k0 + kk) * av.cs as usize);
                    }
                }
            }
            out[width..].fill(0);
        }
    }
}

/// The tiles of A read in place from contiguous bf16 rows, where no tile needs padding (m and k multiples
/// of 32) and every tile row is one cache line (64-byte aligned start and row stride); None otherwise.
fn in_place(a: Lhs<'_>, av: View) -> Option<ATiles> {
    let Lhs::Bf16(values) = a else { return None };
    let row_bytes = av.rs as usize * 2;
    let aligned = (values.as_ptr() as usize).is_multiple_of(64) && row_bytes.is_multiple_of(64);
    (av.cs == 1 && aligned && av.rows.is_multiple_of(MR) && av.cols.is_multiple_of(TILE_K)).then(
        || ATiles {
            base: values.as_ptr().cast(),
            strip_bytes: TILE_ROWS * row_bytes,
            step_bytes: TILE_K * 2,
            row_bytes,
        },
    )
}

/// # Safety
/// [`crate::ops::amx::available`] must be true.
pub(super) unsafe fn gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) {
    let (m, n, k) = (av.rows, bv.cols, av.cols);
    if k == 0 {
        return zero_product(out, n);
    }
    let steps = k.div_ceil(TILE_K);
    let pairs = steps * TILE_K / 2;
    // The product's columns as computed: B's, or for SwiGLU gate and value strips side by side.
    let columns = computed_columns(&out, n);
    let glu = matches!(out, GemmOut::SwiGlu { .. });
    let (packed_b, in_tasks) = pack_b_first(&out, b, bv, pairs, (m, MC));
    // Contiguous bf16 rows that need no padding are read in place, unless they crowd the L1 sets and the
    // product is wide enough to repay packing them; anything else is packed.
    let in_place = in_place(a, av)
        .filter(|t| rows_spread_over_sets(t.row_bytes, MR) || columns < PACK_CROWDED_FROM_COLUMNS);
    let a_tiles = m.div_ceil(MR) * MR / TILE_ROWS * steps;
    let mut packed_a = PACKED_A.take(if in_place.is_some() {
        0
    } else {
        a_tiles * TILE_ROWS * TILE_K * 2
    });
    let a_tiles = in_place.unwrap_or_else(|| {
        let packed: &mut [u16] = bytemuck::cast_slice_mut(&mut packed_a);
        pack_a(packed, a, av, steps);
        ATiles::packed(packed, steps)
    });
    let b_values: &[u16] = bytemuck::cast_slice(&packed_b);
    // An accumulating output keeps the long k-block: its in-place start is the output itself, which a
    // scratch block cannot take without changing the summation order.
    let accumulates = matches!(
        out,
        GemmOut::F32 {
            accumulate: true,
            ..
        }
    );
    let a_in_l1 = rows_spread_over_sets(a_tiles.row_bytes, MR);
    let kc = if a_in_l1 && !accumulates { KC_L1 } else { KC };
    let output = Output::new(out, n);
    let fill = |block: &Block, dest: Dest| {
        let Block {
            r0,
            c0,
            rows_pad,
            cols_pad,
        } = *block;
        // SAFETY: (caller) AMX is available. The tiles are released when `_tiles` drops, before the
        // sums are moved out.
        let _tiles = unsafe { Tiles::configure() };
        // B's strips from `first` on: all of B's, or this task's own, packed here.
        let task_b = in_tasks.then(|| pack_task_b(block, glu, b, bv, pairs));
        let (b_values, first) = match &task_b {
            Some(lines) => (bytemuck::cast_slice::<_, u16>(lines), c0 / NR),
            None => (b_values, 0),
        };
        let mut s0 = 0;
        while s0 < steps {
            let ns = (steps - s0).min(kc / TILE_K);
            for is in 0..rows_pad / MR {
                let strip = (r0 + is * MR) / TILE_ROWS;
                for js in 0..cols_pad / NR {
                    let b_at = ((c0 / NR + js - first) * pairs + s0 * TILE_K / 2) * NR * 2;
                    let (c, init) = dest.block((is * MR, js * NR), s0 == 0);
                    // SAFETY: tiles are configured; A strips `strip` and `strip + 1` exist (A is
                    // padded, or in place, to a multiple of 32 rows) and hold `steps` tiles, B
                    // strips hold `pairs` pairs, so `ns` steps from `s0` are inside both; the 32×32
                    // block lies inside the task's `dest`, and a bias start holds its 32 columns
                    // (`for_each_block`); the B pack starts on a cache line, and its offsets are
                    // multiples of 64 bytes.
                    unsafe {
                        block_32x32(
                            ns,
                            &a_tiles,
                            a_tiles.tile(strip, s0),
                            a_tiles.tile(strip + 1, s0),
                            b_values.as_ptr().add(b_at),
                            c,
                            dest.ld,
                            init,
                        )
                    }
                }
            }
            s0 += ns;
        }
        if let Some(lines) = task_b {
            give_back_task_b(lines);
        }
    };
    // An f32 output is written in place only where one k-block covers k. Alternating in one process (six
    // rounds, bias added, f32 activations): with one k-block, 8,192 × 768 → 6,144 (NT-v2's FFN) ran
    // 1.00–1.25× as fast in place (median 1.16×); at 8,192 × 3,072 → 768, where each later k-block reloads
    // its C tiles from the output (unaligned, out of cache by then) rather than from the aligned scratch
    // in L2, 0.78–1.03× (median 0.93×). Where the short k-block splits a k that one long block covers,
    // the scratch starts from the bias as the output would, so the bits do not depend on the k-block.
    let placement = Placement {
        in_place: steps <= kc / TILE_K,
        start_as_in_place: steps <= KC / TILE_K,
    };
    // SAFETY: AMX implies the AVX-512 features (checked with it, `has_native_bf16`).
    unsafe { for_each_block(&output, (m, columns), (MC, NC), (MR, NR), placement, fill) };
    PACKED_A.give_back(packed_a);
    PACKED_B.give_back(packed_b);
}
