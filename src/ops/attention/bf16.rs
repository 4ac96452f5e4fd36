//! The attention forward with bf16 products, for the bf16 backend (`--dtype bf16`): both matrix products
//! run on bf16 operands with f32 accumulation (PyTorch's bf16 SDPA rounds the same operands), as
//! `tdpbf16ps` on AMX tiles where the CPU has them and as `vdpbf16ps` vector code ([`super::dot`])
//! where it has AVX512-BF16 without AMX; the softmax runs in f32 on AVX-512. Both read the same keys,
//! query pairs and probabilities and share everything but the two products and the values' layout.
//!
//! The products are computed transposed, `Sᵀ = K·Qᵀ` and `Oᵀ = Vᵀ·Pᵀ`, so that a block's 32 query rows lie
//! in the lanes of two vectors, as in the f32 lane kernel: each row's running maximum and sum are
//! lane-wise, with no horizontal reductions and no per-row scalar work.
//!
//! One task is one head of one batch entry. Its visible keys (`[keys, Dk]`, 32 values a step with
//! `vcvtne2ps2bf16`) and transposed values (`[Dv, keys]`) are converted once into row-major bf16, the A
//! operands of the tiles ([`crate::ops::amx`]), zero-padded to multiples of 32; the vector products take
//! the values line-major instead ([`super::dot::pair_values`]). With rotary tables
//! ([`super::AttentionRope`]), each key and query row is turned by its position's angles on its way to
//! bf16, so that an inference forward does not write rotated copies of q and k first (NT-v2 250M bf16
//! `embed` on the Xeon model 167, alternating four times: 8.5 → 8.1 s, the rotary passes were 4% of it). The values go in two parts, `v ≈ hi + lo`,
//! and `P·V` is two products: a value's rounding is not averaged out when a few keys carry a row's weight,
//! and it was the larger part of the bf16 backend's error against f32 on NT-v2 (about 1.09e-2 of the
//! hidden states with rounded values, 0.99e-2 split, 0.97e-2 with f32 attention), for tile work that is a
//! small part of the kernel's time (the vector products read both parts too: [`super::dot`] says why).
//! The tiles' values and each block of 32 query rows, packed as B (`Qᵀ` in pairs of head-dim entries),
//! are transposed 16×16 in registers. Each query block goes over the keys in chunks of [`KEY_CHUNK`]
//! ([`KEY_CHUNK_VECTORS`] for the vector products) with FlashAttention's online softmax:
//! 1. the products write the chunk's scores `Sᵀ [chunk, 32]` in f32 (the head dim padded with zeros);
//! 2. the running maximum `m` of each row (lane) is raised by the chunk's (on the tiles, taken from each
//!    32×32 block of scores as it is stored), and `P = 2^(c·S − m)`
//!    (`c = scale·log₂e`) is rounded to bf16 straight into B's pair layout (`vcvtne2ps2bf16` of two keys,
//!    then one word shuffle), zero past the chunk's last key;
//! 3. the running output `Oᵀ [Dv, 32]`, f32 in memory, is rescaled by `2^(m_old − m_new)` per lane, and the
//!    products add `Vᵀ·Pᵀ` to it (both parts of the values; where the last 16 of the padded dims are all
//!    past dv, as at NT-v2's head dim of 48, only the upper half of that 32-dim block is computed, which
//!    took the attention at NT-v2 shapes from 48.9 to 47.7 ms, alternating, on the Xeon model 167);
//! 4. after the last chunk, `Oᵀ` is divided by the row sums lane-wise and turned into output rows by 16×16
//!    register transposes and masked stores (a strided scalar gather before), as f32 or, for the bf16
//!    backend, whose output projection reads bf16, rounded to bf16 in the same store.
//!
//! Per 32 scores the vector units do about 35 instructions (two exponentials, the conversion, the sums),
//! against about 120 with f32 FMA products at head dim 24. Every buffer is carved from the caller's
//! workspace slot on cache lines ([`workspace_len`]).

use std::arch::x86_64::*;

use super::{AttentionDims, AttentionInputs, AttentionRope};
use crate::ops::amx::{block_16x32, block_32x32, ATiles, Init, Tiles, BLOCK, TILE_K, TILE_ROWS};
use crate::ops::simd::{
    bf16_bits, exp2_16, exp2_16_bf16_precision, prefetch_row, transpose16x16, ROWS_AHEAD,
};

/// Keys per chunk of the online softmax on the tiles, at most. A chunk's scores (128 KiB) and
/// probabilities (64 KiB) stay in L2; long chunks keep the tiles' stores and loads far from the vector
/// loads and stores of the same lines (a tile load waits for earlier stores to reach L1 rather than
/// forwarding them), and leave the rescaling to sequences longer than a chunk.
const KEY_CHUNK: usize = 1024;
/// The same for the vector products, whose stores forward to the loads that follow: a chunk's scores
/// (16 KiB) and probabilities (8 KiB) stay in L1.
const KEY_CHUNK_VECTORS: usize = 128;
const _: () = assert!(KEY_CHUNK.is_multiple_of(BLOCK) && KEY_CHUNK_VECTORS.is_multiple_of(BLOCK));

/// Steps of 32 keys per `Vᵀ·Pᵀ` tile product: the probabilities of 256 keys for a block's 32 queries are
/// 16 KiB, which stay in L1 while the strips of dims read them.
const PV_STEPS: usize = 8;
/// bf16 words of the probabilities per step of 32 keys: 16 pair lines of 32 queries.
const PAIR_STEP_WORDS: usize = TILE_K / 2 * BLOCK * 2;

/// f32 lanes of a 512-bit vector: a block's 32 query rows are two vectors.
const LANES: usize = 16;

/// The buffers of one task, where this kernel runs: no score bias (the relative-position bias of Enformer
/// keeps the f32 path), nonzero head dims, a positive finite scale, the AVX-512 subsets (BF16 included)
/// the products and the softmax are compiled for, and sizes that do not overflow. None otherwise. The
/// products run on AMX tiles where the CPU has them.
pub(super) fn plan(inp: &AttentionInputs<'_>, d: &AttentionDims) -> Option<Layout> {
    plan_unbiased(d).filter(|_| inp.bias.is_none())
}

/// [`plan`] for inputs without a score bias.
pub(super) fn plan_unbiased(d: &AttentionDims) -> Option<Layout> {
    let runs = d.head_dim > 0
        && d.v_head_dim > 0
        && d.scale.is_finite()
        && d.scale > 0.0
        && crate::ops::gemm_bf16::has_native_bf16();
    runs.then(|| Layout::of(d, tiles_available())).flatten()
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run the vector products on a CPU with AMX too, so that one machine checks both.
    pub(super) static VECTOR_PRODUCTS_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the products run on AMX tiles: where the CPU has them (and a test has not asked for the vector
/// products on this thread).
fn tiles_available() -> bool {
    #[cfg(test)]
    if VECTOR_PRODUCTS_ONLY.with(|only| only.get()) {
        return false;
    }
    crate::ops::amx::available()
}

/// `x` rounded up to a multiple of 32 (the tiles' k step and block width).
fn pad(x: usize) -> usize {
    x.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// The sizes, in f32 elements (each a multiple of 16, a cache line), of one task's buffers.
pub(super) struct Layout {
    /// Whether the products run on AMX tiles (otherwise as `vdpbf16ps` vector code).
    tiles: bool,
    /// Keys per chunk of the online softmax.
    chunk: usize,
    keys: usize,
    values: usize,
    queries: usize,
    scores: usize,
    probs: usize,
    acc: usize,
    /// 16 value rows on their way to `Vᵀ` (each padded to a multiple of 16) and a 16×16 block, or 16 query
    /// rows on their way to `Qᵀ` as words.
    staging: usize,
    /// One query or key row turned by its rotary angles, before it is rounded (see [`AttentionRope`]).
    rotated: usize,
}

impl Layout {
    /// None where a size overflows.
    fn of(d: &AttentionDims, tiles: bool) -> Option<Self> {
        let pad = |x: usize| x.checked_next_multiple_of(BLOCK);
        let (n, dk, dv) = (pad(d.kv_len.max(1))?, pad(d.head_dim)?, pad(d.v_head_dim)?);
        let longest = if tiles { KEY_CHUNK } else { KEY_CHUNK_VECTORS };
        // Every key, padded, up to a chunk.
        let chunk = n.min(longest);
        Some(Layout {
            tiles,
            chunk,
            // bf16: two a float.
            keys: n.checked_mul(dk)? / 2,
            // Two bf16 parts.
            values: n.checked_mul(dv)?,
            queries: BLOCK.checked_mul(dk)? / 2,
            scores: chunk * BLOCK,
            probs: chunk * BLOCK / 2,
            acc: dv.checked_mul(BLOCK)?,
            staging: LANES
                .checked_mul(dv.checked_add(LANES)?)?
                .max(LANES.checked_mul(dk)? / 2),
            rotated: dk,
        })
    }

    fn total(&self) -> Option<usize> {
        // One cache line of slack to align the first buffer.
        [
            self.keys,
            self.values,
            self.queries,
            self.scores,
            self.probs,
            self.acc,
            self.staging,
            self.rotated,
        ]
        .iter()
        .try_fold(LANES, |t, &x| t.checked_add(x))
    }
}

/// f32 elements of workspace one task needs (None where that overflows).
pub(super) fn workspace_len(d: &AttentionDims) -> Option<usize> {
    // The tiles' layout, with the longer chunks, is the larger: enough for either.
    Layout::of(d, true)?.total()
}

/// The attention output `[B, Lq, H, Dv]` that [`forward_head`] writes: f32, or bf16 rounded once to
/// nearest even (the bf16 backend's input of the output projection).
#[derive(Clone, Copy)]
pub(super) enum Out {
    F32(*mut f32),
    Bf16(*mut u16),
}

/// Head `h` of batch `b`: every query row's output and log-sum-exp (`lse[i]` for query row `i`).
///
/// # Safety
/// `layout` is [`plan`]'s for `inp` and `d`; `inp` was checked against `d`; `ws` holds [`workspace_len`]
/// elements; `out`
/// addresses the whole attention output and `lse` this head's `q_len` entries, none of which anyone else
/// touches meanwhile. A bf16 output's values are rounded as the probabilities are (`vcvtneps2bf16`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")]
pub(super) unsafe fn forward_head(
    layout: &Layout,
    inp: &AttentionInputs<'_>,
    d: &AttentionDims,
    (b, h): (usize, usize),
    ws: &mut [f32],
    out: Out,
    lse: *mut f32,
) {
    let (nh, dk, dv) = (d.heads, d.head_dim, d.v_head_dim);
    let (_, _, _, oo) = d.offsets(b, h);
    let head = inp.head_rows(d, b, h);
    let ((oq, q_stride), (ok, k_stride), (ov, v_stride)) = (head.q, head.k, head.v);
    let n = inp.visible(d, b);
    if n == 0 {
        for i in 0..d.q_len {
            let at = oo + i * nh * dv;
            // SAFETY: this task's output rows and lse entries (caller's contract).
            unsafe {
                match out {
                    Out::F32(out) => std::slice::from_raw_parts_mut(out.add(at), dv).fill(0.0),
                    Out::Bf16(out) => std::slice::from_raw_parts_mut(out.add(at), dv).fill(0),
                }
                *lse.add(i) = f32::NEG_INFINITY;
            }
        }
        return;
    }
    let (dk_pad, dv_pad, n_pad) = (pad(dk), pad(dv), pad(n));
    let skip = ws.as_ptr().align_offset(64);
    let rest = &mut ws[skip..];
    let (keys, rest) = rest.split_at_mut(layout.keys);
    let (values, rest) = rest.split_at_mut(layout.values);
    let (queries, rest) = rest.split_at_mut(layout.queries);
    let (scores, rest) = rest.split_at_mut(layout.scores);
    let (probs, rest) = rest.split_at_mut(layout.probs);
    let (acc, rest) = rest.split_at_mut(layout.acc);
    let (staging, rest) = rest.split_at_mut(layout.staging);
    let rotated = &mut rest[..layout.rotated];
    let keys: &mut [u16] = bytemuck::cast_slice_mut(keys);
    let values: &mut [u16] = bytemuck::cast_slice_mut(values);
    let queries: &mut [u32] = bytemuck::cast_slice_mut(queries);
    let probs: &mut [u32] = bytemuck::cast_slice_mut(probs);

    // K as A, `[n_pad, dk_pad]`: each key's head-dim entries, rounded.
    let keys = &mut keys[..n_pad * dk_pad];
    let (visible, padding) = keys.split_at_mut(n * dk_pad);
    padding.fill(0);
    for (key, row) in visible.chunks_exact_mut(dk_pad).enumerate() {
        if key + ROWS_AHEAD < n {
            prefetch_row(&inp.k[ok + (key + ROWS_AHEAD) * k_stride..][..dk]);
        }
        let key_row = rotate(inp.rope, key, &inp.k[ok + key * k_stride..][..dk], rotated);
        // SAFETY: (caller) the AVX-512 features, BF16 included, are present; `row` is `dk_pad` long.
        unsafe { round_row(row, key_row) };
    }
    // Vᵀ as A, `[dv_pad, n_pad]`: each value dim's entries over the keys, in two parts.
    let (values_hi, values_lo) = values.split_at_mut(dv_pad * n_pad);
    let values_lo = &mut values_lo[..dv_pad * n_pad];
    if layout.tiles {
        // SAFETY: (caller) the AVX-512 features are present; `staging` is the layout's.
        unsafe {
            transpose_values(
                staging,
                [&mut *values_hi, &mut *values_lo],
                &inp.v[ov..],
                v_stride,
                (n, dv),
                n_pad,
            )
        };
    } else {
        // The vector products read the values line-major instead: `⌈n/2⌉ ≤ n_pad / 2` lines of `dv_pad`
        // words in each part (`dv_pad·n_pad` bf16 values).
        // SAFETY: (plan) AVX512-BF16 is present; the visible keys' values lie inside v (checked
        // inputs), and each part holds `n_pad / 2` lines of `dv_pad ≥ dv` words.
        unsafe {
            super::dot::pair_values(
                [&mut *values_hi, &mut *values_lo].map(|part| part.as_mut_ptr().cast::<u32>()),
                dv_pad,
                &inp.v[ov..],
                v_stride,
                (n, dv),
            )
        };
    }
    let key_tiles = row_tiles(keys, dk_pad);
    let value_tiles = [row_tiles(values_hi, n_pad), row_tiles(values_lo, n_pad)];
    let c2 = d.scale * std::f32::consts::LOG2_E;
    // SAFETY: (plan) AMX is available where `layout.tiles`; released when `_tiles` drops at the end of
    // this function.
    let _tiles = layout.tiles.then(|| unsafe { Tiles::configure() });
    let words = |x: &[u16]| x.as_ptr().cast::<u32>();
    for i0 in (0..d.q_len).step_by(BLOCK) {
        let rows = BLOCK.min(d.q_len - i0);
        // SAFETY: (caller) the AVX-512 features are present; `staging` holds `8·dk_pad` words
        // ([`Layout::of`]), `queries` `dk_pad / 2` lines.
        unsafe {
            pack_queries(
                queries,
                bytemuck::cast_slice_mut(&mut *staging),
                &inp.q[oq + i0 * q_stride..],
                q_stride,
                (rows, d.q_len - i0, dk, dk_pad),
                inp.rope.map(|rope| (rope, i0)),
                rotated,
            )
        };
        let mut state = Running::new();
        let chunk = layout.chunk;
        for j0 in (0..n).step_by(chunk) {
            let len = chunk.min(n - j0);
            let len_pad = pad(len);
            if !layout.tiles {
                // SAFETY: (plan) AVX512-BF16 is present; the query pairs hold `dk_pad / 2 ≥ ⌈dk/2⌉`
                // lines (the pairs past dk are zero, so they are skipped); keys j0..j0 + len of `n_pad`
                // rows of `dk_pad / 2` words; the scores hold `chunk ≥ len` keys of 32 rows.
                unsafe {
                    super::dot::scores(
                        queries.as_ptr(),
                        words(keys).add(j0 * dk_pad / 2),
                        dk_pad / 2,
                        dk.div_ceil(2),
                        len,
                        scores.as_mut_ptr(),
                    )
                };
            }
            // Each block's scores are maximised over its keys right after its product, while they are in
            // L1, rather than in a pass over the whole chunk's scores from L2 (attention at NT-v2 shapes
            // 49.3 → 45.7 ms, at ESM-2's 13.1 → 11.6 ms).
            let mut tile_max = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
            for g in (0..len_pad / BLOCK).filter(|_| layout.tiles) {
                let strip = 2 * (j0 / BLOCK + g);
                // SAFETY: tiles are configured; key strips `strip` and `strip + 1` (16 keys each, of
                // `n_pad / 16`) hold `dk_pad / 32` steps; the query pairs hold `dk_pad / 2` lines; the
                // 32×32 block of keys `32g..` lies inside the chunk × 32 scores. All start on cache
                // lines.
                unsafe {
                    block_32x32(
                        dk_pad / TILE_K,
                        &key_tiles,
                        key_tiles.tile(strip, 0),
                        key_tiles.tile(strip + 1, 0),
                        queries.as_ptr().cast(),
                        scores.as_mut_ptr().add(g * BLOCK * BLOCK),
                        BLOCK,
                        Init::Zero,
                    )
                };
                // The padding keys past `len` (zero scores) are left out.
                let keys_here = BLOCK.min(len - g * BLOCK);
                tile_max = keys_max(&scores[g * BLOCK * BLOCK..][..keys_here * BLOCK], tile_max);
            }
            // SAFETY: (caller) the AVX-512 features are present; `scores` holds `len` keys of 32 rows,
            // `probs` `len_pad / 2` pair lines.
            let known = layout.tiles.then_some(tile_max);
            let alpha = unsafe { state.chunk(&scores[..len * BLOCK], len_pad, probs, c2, known) };
            if j0 > 0 {
                // SAFETY: as above; `acc` is `dv_pad ≥ dv` rows of 32 lanes.
                unsafe { rescale(&mut acc[..dv * BLOCK], alpha) };
            }
            if !layout.tiles {
                // SAFETY: (plan) AVX512-BF16 is present; the probabilities hold `len_pad / 2 ≥ ⌈len/2⌉`
                // pair lines; both value parts hold lines `j0 / 2..j0 / 2 + ⌈len/2⌉` (of ⌈n/2⌉, written by
                // `pair_values`) of `dv_pad` words; `acc` is `dv_pad ≥ dv` rows of 32 lanes. The
                // padding key of an odd chunk has a zero probability and a zero value.
                unsafe {
                    super::dot::values(
                        probs.as_ptr(),
                        len.div_ceil(2),
                        words(values_hi).add(j0 / 2 * dv_pad),
                        words(values_lo).add(j0 / 2 * dv_pad),
                        dv_pad,
                        dv,
                        acc.as_mut_ptr(),
                        j0 == 0,
                    )
                };
            }
            // Over the chunk's keys in sub-blocks of PV_STEPS steps, both value parts and every strip of
            // dims per sub-block, so that its probabilities (16 KiB) stay in L1 for all the products that
            // read them. At NT-v2's shapes (8 × 16 heads × 1,024² × 48, best of 10, alternating three
            // times) 31.6–32.1 → 30.2–30.3 ms, at ESM-2 35M's (8 × 20 × 512² × 24) 7.5–7.7 → 7.4–7.5 ms;
            // each part over a whole chunk before the other (the order of one pass, the same bits as
            // before) gained half as much at NT-v2's and lost 2–15% at ESM-2's, whose one strip of dims
            // would read the sub-block once.
            let chunk_steps = len_pad / TILE_K;
            let sub_blocks = (0..chunk_steps).step_by(PV_STEPS);
            let tile_work = sub_blocks
                .flat_map(|k0| value_tiles.iter().enumerate().map(move |part| (part, k0)));
            for ((part, tiles), k0) in tile_work.filter(|_| layout.tiles) {
                for cs in 0..dv_pad / BLOCK {
                    // A second strip of dims past dv multiplies zeros: left out (head dim 48).
                    let upper_only = dv <= BLOCK * cs + TILE_ROWS;
                    let steps = (chunk_steps - k0).min(PV_STEPS);
                    let b = probs
                        .as_ptr()
                        .cast::<u16>()
                        .wrapping_add(k0 * PAIR_STEP_WORDS);
                    let (a0, a1) = (
                        tiles.tile(2 * cs, j0 / TILE_K + k0),
                        tiles.tile(2 * cs + 1, j0 / TILE_K + k0),
                    );
                    let c = acc.as_mut_ptr().wrapping_add(cs * BLOCK * BLOCK);
                    let init = if j0 == 0 && part == 0 && k0 == 0 {
                        Init::Zero
                    } else {
                        Init::Load
                    };
                    // SAFETY: tiles are configured; value strips `2cs` and `2cs + 1` (16 dims each, of
                    // `dv_pad / 16`) hold `n_pad / 32 ≥ (j0 + len_pad) / 32` steps, so `steps` steps from
                    // step `j0 / 32 + k0` are inside them; the probabilities hold `len_pad / 2` pair lines,
                    // `steps` steps of 16 from line `16·k0`; the block of dims `32cs..` lies inside the
                    // dv_pad × 32 output. All start on cache lines.
                    unsafe {
                        if upper_only {
                            block_16x32(steps, tiles, a0, b, c, BLOCK, init)
                        } else {
                            block_32x32(steps, tiles, a0, a1, b, c, BLOCK, init)
                        }
                    };
                }
            }
        }
        let (max, sum) = state.lanes();
        // Oᵀ's lanes are the rows: divide them by their sums, then turn 16×16 blocks of it into rows.
        // SAFETY: `acc` is `dv_pad ≥ dv` rows of 32 lanes.
        unsafe { rescale(&mut acc[..dv * BLOCK], state.inverse_sums()) };
        let mut block = [0.0f32; LANES * LANES];
        for r0 in (0..rows).step_by(LANES) {
            for c0 in (0..dv).step_by(LANES) {
                // SAFETY: AVX-512F (this function's features); rows c0..c0 + 16 ≤ dv_pad of `acc`, lanes
                // r0..r0 + 16 ≤ 32 of each, and `block` holds 16 rows of 16.
                unsafe {
                    transpose16x16(
                        acc.as_ptr().add(c0 * BLOCK + r0).cast(),
                        BLOCK,
                        block.as_mut_ptr().cast(),
                        LANES,
                    )
                };
                let width = LANES.min(dv - c0);
                let columns: __mmask16 = ((1u32 << width) - 1) as __mmask16;
                for (r, values) in block.chunks_exact(LANES).take(rows - r0).enumerate() {
                    let at = oo + (i0 + r0 + r) * nh * dv + c0;
                    // SAFETY: AVX-512F, BW, VL and BF16; the mask writes columns c0..c0 + width of
                    // query row i0 + r0 + r of this head's output (caller's contract), and reads 16
                    // values of `block`.
                    unsafe {
                        let values = _mm512_loadu_ps(values.as_ptr());
                        match out {
                            Out::F32(out) => _mm512_mask_storeu_ps(out.add(at), columns, values),
                            Out::Bf16(out) => _mm256_mask_storeu_epi16(
                                out.add(at).cast(),
                                columns,
                                std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(
                                    values,
                                )),
                            ),
                        }
                    };
                }
            }
        }
        for r in 0..rows {
            // SAFETY: this head's lse entry of query row i0 + r (caller's contract).
            unsafe { *lse.add(i0 + r) = max[r] * std::f32::consts::LN_2 + sum[r].ln() };
        }
    }
}

/// `hi[c·n_pad + key] + lo[c·n_pad + key] ≈ v[key·stride + c]` (bf16 parts, about 2⁻¹⁷ relative), for
/// the `n` keys and `dv` dims, zero elsewhere. 16 keys at a time are copied into `staging` (16 rows of
/// `dv` rounded up to 16, zero-padded), turned into dims by 16×16 register transposes and split a vector
/// at a time, so that the source is read and the destination written along their rows (element by
/// element, the transpose was 13% of the kernel's time at ESM-2 35M shapes).
///
/// # Safety
/// AVX-512F, BW, VL and DQ; `staging` holds [`Layout::staging`] values for `dv`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn transpose_values(
    staging: &mut [f32],
    [hi, lo]: [&mut [u16]; 2],
    v: &[f32],
    stride: usize,
    (n, dv): (usize, usize),
    n_pad: usize,
) {
    let width = dv.next_multiple_of(LANES);
    let (rows, rest) = staging.split_at_mut(LANES * width);
    let block = &mut rest[..LANES * LANES];
    // What the groups of 16 keys leave unwritten is padding: the keys past the last group, and every
    // dim past dv.
    let written = n.next_multiple_of(LANES);
    for (c, (h, l)) in hi
        .chunks_exact_mut(n_pad)
        .zip(lo.chunks_exact_mut(n_pad))
        .enumerate()
    {
        let from = if c < dv { written } else { 0 };
        h[from..].fill(0);
        l[from..].fill(0);
    }
    for k0 in (0..n).step_by(LANES) {
        let keys = LANES.min(n - k0);
        for (k, row) in rows.chunks_exact_mut(width).enumerate() {
            let (values, padding) = row.split_at_mut(if k < keys { dv } else { 0 });
            if k < keys {
                if k0 + k + ROWS_AHEAD < n {
                    prefetch_row(&v[(k0 + k + ROWS_AHEAD) * stride..][..dv]);
                }
                let src = &v[(k0 + k) * stride..][..dv];
                values.iter_mut().zip(src).for_each(|(o, &x)| *o = x);
            }
            padding.fill(0.0);
        }
        for c0 in (0..dv).step_by(LANES) {
            // SAFETY: AVX-512F (this function's features); `rows` holds 16 rows of `width ≥ c0 + 16`
            // values, `block` 16 rows of 16.
            unsafe {
                transpose16x16(
                    rows.as_ptr().add(c0).cast(),
                    width,
                    block.as_mut_ptr().cast(),
                    LANES,
                )
            };
            for (c, dim) in block.chunks_exact(LANES).take(dv - c0).enumerate() {
                // Keys k0..k0 + 16 ≤ written ≤ n_pad of dim c0 + c.
                let at = (c0 + c) * n_pad + k0;
                let parts = hi[at..at + LANES].iter_mut().zip(&mut lo[at..at + LANES]);
                for ((h, l), &x) in parts.zip(dim) {
                    *h = bf16_bits(x);
                    *l = bf16_bits(x - f32::from_bits((*h as u32) << 16));
                }
            }
        }
    }
}

/// Row `src` of position `position` turned by its rotary angles into `rotated` where the attention applies
/// them (the rotary op's arithmetic, [`crate::ops::rotary::rotate_vector`]), else `src` as it is.
#[inline(always)]
fn rotate<'a>(
    rope: Option<AttentionRope<'_>>,
    position: usize,
    src: &'a [f32],
    rotated: &'a mut [f32],
) -> &'a [f32] {
    match rope {
        Some(rope) => {
            let rotated = &mut rotated[..src.len()];
            let angles = rope.angles(position, src.len() / 2);
            crate::ops::rotary::rotate_vector(rotated, src, angles, 1.0, false);
            rotated
        }
        None => src,
    }
}

/// Qᵀ as the B operand of the score tiles for the `rows` query rows at `q` (row stride `stride`, `dk`
/// values each; `q` holds `available ≥ rows` of them, which the prefetch reads ahead into): pair line `p`
/// of `queries` holds head-dim entries 2p and 2p+1 of the 32 rows, one word a row (zero past dk and past
/// `rows`). 16 rows at a time are paired into `staging` (16 rows of `dk_pad / 2` words) and turned into
/// lines by 16×16 register transposes. With `rope`, row `r` is first turned by the angles of position
/// `first + r` (through `rotated`, `dk` values).
///
/// # Safety
/// AVX-512F, BW, VL, DQ and BF16; `staging` holds `8·dk_pad` words, `queries` `dk_pad / 2` lines of 32
/// words.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn pack_queries(
    queries: &mut [u32],
    staging: &mut [u32],
    q: &[f32],
    stride: usize,
    (rows, available, dk, dk_pad): (usize, usize, usize, usize),
    rope: Option<(AttentionRope<'_>, usize)>,
    rotated: &mut [f32],
) {
    let words = dk_pad / 2;
    let staging = &mut staging[..LANES * words];
    for r0 in (0..BLOCK).step_by(LANES) {
        for (r, row) in staging.chunks_exact_mut(words).enumerate() {
            let i = r0 + r;
            if i >= rows {
                row.fill(0);
                continue;
            }
            if i + ROWS_AHEAD < available {
                prefetch_row(&q[(i + ROWS_AHEAD) * stride..][..dk]);
            }
            let src = &q[i * stride..][..dk];
            let src = match rope {
                Some((rope, first)) => rotate(Some(rope), first + i, src, rotated),
                None => src,
            };
            // A word holds two consecutive entries, the first in its low half: the row's bf16 values
            // in order.
            // SAFETY: (caller) the AVX-512 features, BF16 included, are present; `row` is `dk_pad`
            // values.
            unsafe { round_row(bytemuck::cast_slice_mut(row), src) };
        }
        for p0 in (0..words).step_by(LANES) {
            // SAFETY: AVX-512F (this function's features); `staging` holds 16 rows of `words ≥ p0 + 16`
            // words; `queries` holds lines p0..p0 + 16 of 32 words, of which this writes r0..r0 + 16.
            unsafe {
                transpose16x16(
                    staging.as_ptr().add(p0),
                    words,
                    queries.as_mut_ptr().add(p0 * BLOCK + r0),
                    BLOCK,
                )
            };
        }
    }
}

/// `dst = src` rounded to bf16 (nearest even, as the probabilities are: `vcvtne2ps2bf16`, which reads an
/// f32 subnormal as zero), zero past `src.len()`: 32 values a step, with masked loads, so that a head's
/// keys and queries are rounded a vector at a time rather than a value at a time.
///
/// # Safety
/// AVX-512F, BW and BF16; `dst.len()` is a multiple of 32 and at least `src.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row(dst: &mut [u16], src: &[f32]) {
    debug_assert!(dst.len().is_multiple_of(BLOCK) && dst.len() >= src.len());
    for (g, out) in dst.chunks_exact_mut(BLOCK).enumerate() {
        let (first, left) = (g * BLOCK, src.len().saturating_sub(g * BLOCK));
        let lanes = |skip: usize| ((1u32 << left.saturating_sub(skip).min(LANES)) - 1) as __mmask16;
        // SAFETY: a masked load reads (and may fault on) only its selected lanes, all inside `src`;
        // the unselected ones read as zero. `out` holds 32 words.
        unsafe {
            let low = _mm512_maskz_loadu_ps(lanes(0), src.as_ptr().wrapping_add(first));
            let high =
                _mm512_maskz_loadu_ps(lanes(LANES), src.as_ptr().wrapping_add(first + LANES));
            let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
            _mm512_storeu_si512(out.as_mut_ptr().cast(), words);
        }
    }
}

/// The A tiles of a row-major bf16 buffer `cols` wide (a multiple of 32).
fn row_tiles(buffer: &[u16], cols: usize) -> ATiles {
    ATiles {
        base: buffer.as_ptr().cast(),
        strip_bytes: TILE_ROWS * cols * 2,
        step_bytes: TILE_K * 2,
        row_bytes: cols * 2,
    }
}

/// The online softmax's running maximum (base 2, scaled) and sum of a block's 32 rows, two vectors each.
struct Running {
    max: [__m512; 2],
    sum: [__m512; 2],
}

impl Running {
    #[target_feature(enable = "avx512f")]
    fn new() -> Self {
        Running {
            max: [_mm512_set1_ps(f32::NEG_INFINITY); 2],
            sum: [_mm512_setzero_ps(); 2],
        }
    }

    /// One chunk of scores `s [len, 32]` (key-major, rows in lanes), whose lane-wise maximum over the keys
    /// is `known_max` where the caller has it: raises the running maxima to `m = max(m_old, c·max_j s)`, writes `P = 2^(c·s − m)` rounded to bf16 as `len_pad / 2` B pair lines
    /// (`p[line·32 + row]` = keys `2·line` and `2·line + 1`; zero past `len` keys), adds the chunk's sums,
    /// and returns the factors `2^(m_old − m)` by which earlier sums and outputs shrink.
    ///
    /// # Safety
    /// AVX-512F, BW, DQ, BF16 and FMA; `s.len() = 32·len`, `len ≤ len_pad`, `p` holds `16·len_pad` words.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16,fma")]
    unsafe fn chunk(
        &mut self,
        s: &[f32],
        len_pad: usize,
        p: &mut [u32],
        c2: f32,
        known_max: Option<[__m512; 2]>,
    ) -> [__m512; 2] {
        let len = s.len() / BLOCK;
        assert!(len <= len_pad && p.len() >= len_pad / 2 * BLOCK);
        // Word 2i of a pair line is key 2·line's lane i, word 2i+1 key 2·line+1's: the conversion puts
        // the first key in elements 0–15 and the second in 16–31.
        let interleave = super::dot::pair_words();
        // SAFETY: key j's lanes are s[32j..32j+32], j < len; pair line l's words p[32l..32l+32],
        // l < len_pad / 2 (checked above).
        unsafe {
            let at = |j: usize, v: usize| _mm512_loadu_ps(s.as_ptr().add(j * BLOCK + v * LANES));
            let chunk_max =
                known_max.unwrap_or_else(|| keys_max(s, [_mm512_set1_ps(f32::NEG_INFINITY); 2]));
            let vc = _mm512_set1_ps(c2);
            let mut alpha = [_mm512_setzero_ps(); 2];
            let mut m = [_mm512_setzero_ps(); 2];
            for v in 0..2 {
                m[v] = _mm512_max_ps(self.max[v], _mm512_mul_ps(chunk_max[v], vc));
                // 2^(−∞) = 0 on the first chunk, where nothing has accumulated yet.
                alpha[v] = exp2_16(_mm512_sub_ps(self.max[v], m[v]));
            }
            // The probabilities go to the products rounded to bf16, so their exponential needs only
            // bf16's precision (the rescaling factors above keep the full one: they multiply f32 sums).
            let exp =
                |j: usize, v: usize| exp2_16_bf16_precision(_mm512_fmsub_ps(at(j, v), vc, m[v]));
            let mut sum = [_mm512_setzero_ps(); 2];
            let mut store_line = |line: usize, v: usize, e0: __m512, e1: __m512| {
                sum[v] = _mm512_add_ps(sum[v], _mm512_add_ps(e0, e1));
                let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
                let words = _mm512_permutexvar_epi16(interleave, halves);
                _mm512_storeu_si512(p.as_mut_ptr().add(line * BLOCK + v * LANES).cast(), words);
            };
            // Lines of two visible keys with no test per key (a test per exponential cost 1–2% of the
            // attention at NT-v2's shapes), then the last line, half or wholly padding, and the padding.
            let full = len / 2;
            for line in 0..full {
                for v in 0..2 {
                    store_line(line, v, exp(2 * line, v), exp(2 * line + 1, v));
                }
            }
            for line in full..len_pad / 2 {
                for v in 0..2 {
                    let (e0, e1) = [2 * line, 2 * line + 1]
                        .map(|j| {
                            if j < len {
                                exp(j, v)
                            } else {
                                _mm512_setzero_ps()
                            }
                        })
                        .into();
                    store_line(line, v, e0, e1);
                }
            }
            for v in 0..2 {
                self.sum[v] = _mm512_fmadd_ps(self.sum[v], alpha[v], sum[v]);
                self.max[v] = m[v];
            }
            alpha
        }
    }

    /// `1 / sum` of each row (lane).
    #[target_feature(enable = "avx512f")]
    fn inverse_sums(&self) -> [__m512; 2] {
        self.sum.map(|s| _mm512_div_ps(_mm512_set1_ps(1.0), s))
    }

    /// The running maxima and sums of the 32 rows.
    #[target_feature(enable = "avx512f")]
    fn lanes(&self) -> ([f32; BLOCK], [f32; BLOCK]) {
        let (mut max, mut sum) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
        for v in 0..2 {
            // SAFETY: 16 lanes stored at v·16 inside the 32-element arrays.
            unsafe {
                _mm512_storeu_ps(max.as_mut_ptr().add(v * LANES), self.max[v]);
                _mm512_storeu_ps(sum.as_mut_ptr().add(v * LANES), self.sum[v]);
            }
        }
        (max, sum)
    }
}

/// The lane-wise maximum of `m` and the keys of `s [keys, 32]` (rows in lanes).
#[target_feature(enable = "avx512f")]
fn keys_max(s: &[f32], mut m: [__m512; 2]) -> [__m512; 2] {
    for key in s.chunks_exact(BLOCK) {
        for (v, m) in m.iter_mut().enumerate() {
            // SAFETY: lanes v·16..v·16 + 16 of a 32-value key.
            *m = _mm512_max_ps(*m, unsafe { _mm512_loadu_ps(key.as_ptr().add(v * LANES)) });
        }
    }
    m
}

/// `acc[c][row] *= alpha[row]` for every value dim `c` of a `[dims, 32]` output: the dv dims the products
/// write, not the padding past them, which the tiles' half block (head dim 48) and the vector products
/// leave as the workspace held it (old values, possibly subnormal, which would cost assists here) and
/// which no output reads.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn rescale(acc: &mut [f32], alpha: [__m512; 2]) {
    for row in acc.chunks_exact_mut(BLOCK) {
        for (v, a) in alpha.iter().enumerate() {
            // SAFETY: 16 lanes at v·16 inside a 32-element row.
            unsafe {
                let ptr = row.as_mut_ptr().add(v * LANES);
                _mm512_storeu_ps(ptr, _mm512_mul_ps(_mm512_loadu_ps(ptr), *a));
            }
        }
    }
}
