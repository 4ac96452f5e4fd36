//! The two products of the bf16 attention forward ([`super::bf16`]) as `vdpbf16ps` vector code, for CPUs
//! with AVX512-BF16 but no AMX tiles (AMD Zen 4 and Zen 5). The scores read the keys and query pairs the
//! tiles read; the values get a layout of their own ([`pair_values`]), so that one step of `P·V` reads
//! each value dim of two keys from one line. The rest of the kernel (packing, online softmax, output) is
//! shared.
//!
//! A block's 32 query rows lie in the lanes of two vectors. Each `vdpbf16ps` adds two bf16 products into
//! every f32 lane: a pair of head-dim entries for the scores, a pair of keys for `P·V`. So a key's
//! scores over a head dim of `Dk` take `Dk` instructions for the 32 rows (`Dk / 2` pairs, two vectors),
//! against `2·Dk` f32 FMAs in the f32 lane kernel. The values enter in the two bf16 parts the tiles use
//! (`v ≈ hi + lo`), so `P·V` takes as many instructions as in f32: rounded once, as PyTorch's bf16 SDPA
//! does, the op ran 1.4× faster at NT-v2 shapes, but the tiny NT-v2 fixture's hidden states moved 1.09·10⁻²
//! from f32, past the 10⁻² that `tests/embed.rs` holds the bf16 backend to (9.9·10⁻³ with two parts).

use std::arch::x86_64::*;

use crate::ops::simd::{prefetch_row, ROWS_AHEAD};

/// Query rows of a block: the lanes of two vectors.
const ROWS: usize = 32;
/// f32 lanes of a vector.
const LANES: usize = 16;
/// Keys scored together: 16 independent accumulators, enough to cover `vdpbf16ps`'s latency.
const KEYS: usize = 8;

/// `s[j·32 + r] = Σ_p q[p·32 + r] ⊙ k[j·stride + p]` for keys `j < len` and rows `r < 32`: `q` holds the
/// block's queries as `pairs` lines of 32 words (rows in lanes, a pair of head-dim entries per word),
/// `k` each key's head-dim entries as pair words, `stride` words apart.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `q` holds `32·pairs` words, `k` `(len − 1)·stride + pairs` words, `s`
/// `32·len` values.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn scores(
    q: *const u32,
    k: *const u32,
    stride: usize,
    pairs: usize,
    len: usize,
    s: *mut f32,
) {
    // SAFETY (this function): every address is inside the caller's buffers by its contract.
    unsafe {
        let query = |p: usize, v: usize| -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(q.add(p * ROWS + v * LANES).cast()))
        };
        let key = |j: usize, p: usize| -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(*k.add(j * stride + p) as i32))
        };
        let full = len - len % KEYS;
        for j0 in (0..full).step_by(KEYS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; KEYS];
            for p in 0..pairs {
                let (q0, q1) = (query(p, 0), query(p, 1));
                for (t, a) in acc.iter_mut().enumerate() {
                    let kp = key(j0 + t, p);
                    a[0] = _mm512_dpbf16_ps(a[0], q0, kp);
                    a[1] = _mm512_dpbf16_ps(a[1], q1, kp);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let dst = s.add((j0 + t) * ROWS);
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(LANES), a[1]);
            }
        }
        for j in full..len {
            let mut a = [_mm512_setzero_ps(); 2];
            for p in 0..pairs {
                let kp = key(j, p);
                a[0] = _mm512_dpbf16_ps(a[0], query(p, 0), kp);
                a[1] = _mm512_dpbf16_ps(a[1], query(p, 1), kp);
            }
            _mm512_storeu_ps(s.add(j * ROWS), a[0]);
            _mm512_storeu_ps(s.add(j * ROWS + LANES), a[1]);
        }
    }
}

/// `o[c·32 + r] (+)= Σ_l p[l·32 + r] ⊙ (hi + lo)[l·stride + c]` for value dims `c < dv` and rows `r < 32`,
/// over `lines` pair lines of probabilities (two keys a word, rows in lanes) and the two bf16 parts of the
/// values in [`pair_values`]'s layout, lines `stride` words apart whose word `c` holds the same two keys.
/// `o` is overwritten where `first`, added to otherwise.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `p` holds `32·lines` words, `hi` and `lo` `(lines − 1)·stride + dv` words
/// each, `o` `32·dv` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn values(
    p: *const u32,
    lines: usize,
    hi: *const u32,
    lo: *const u32,
    stride: usize,
    dv: usize,
    o: *mut f32,
    first: bool,
) {
    let mut c0 = 0;
    while c0 < dv {
        // SAFETY: columns c0.. of at most dv (caller's contract).
        c0 += unsafe {
            match dv - c0 {
                w if w >= 12 => values_columns::<12>(p, lines, hi, lo, stride, c0, o, first),
                w if w >= 4 => values_columns::<4>(p, lines, hi, lo, stride, c0, o, first),
                _ => values_columns::<1>(p, lines, hi, lo, stride, c0, o, first),
            }
        };
    }
}

/// [`values`] for the `W` value dims from `c0`, their `2·W` accumulators in registers. Returns `W`.
///
/// # Safety
/// As [`values`], with `c0 + W ≤ dv`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn values_columns<const W: usize>(
    p: *const u32,
    lines: usize,
    hi: *const u32,
    lo: *const u32,
    stride: usize,
    c0: usize,
    o: *mut f32,
    first: bool,
) -> usize {
    // SAFETY (this function): every address is inside the caller's buffers by its contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; W];
        if !first {
            for (c, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_loadu_ps(o.add((c0 + c) * ROWS));
                a[1] = _mm512_loadu_ps(o.add((c0 + c) * ROWS + LANES));
            }
        }
        let word = |part: *const u32, c: usize, l: usize| -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(*part.add(l * stride + c0 + c) as i32))
        };
        for l in 0..lines {
            let p0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p.add(l * ROWS).cast()));
            let p1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p.add(l * ROWS + LANES).cast()));
            for (c, a) in acc.iter_mut().enumerate() {
                for part in [hi, lo] {
                    let vc = word(part, c, l);
                    a[0] = _mm512_dpbf16_ps(a[0], p0, vc);
                    a[1] = _mm512_dpbf16_ps(a[1], p1, vc);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add((c0 + c) * ROWS), a[0]);
            _mm512_storeu_ps(o.add((c0 + c) * ROWS + LANES), a[1]);
        }
    }
    W
}

/// The word shuffle that turns `vcvtne2ps2bf16(second, first)` (16 bf16 of `first` in elements 0–15, of
/// `second` in 16–31) into 16 pair words, word `i` holding element `i` of each: the layout of both the
/// probabilities and [`pair_values`]'s values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn pair_words() -> __m512i {
    _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    )
}

/// The values of `n` keys (`[n, dv]`, rows `stride` apart in `v`) as [`values`] reads them: for each line
/// `l < ⌈n/2⌉`, `hi[l·line + c]` holds dim `c` of keys `2l` and `2l + 1` rounded to bf16 (nearest even,
/// as the tiles' values), `lo[l·line + c]` what that rounding left, rounded again (`v ≈ hi + lo`); a
/// missing second key is zero. Words past `dv` in a line are not written. Two rows at a time, 16 dims a
/// step: no transposes, unlike the tiles' `Vᵀ`.
///
/// # Safety
/// AVX-512F, BW and BF16; `v` holds `(n − 1)·stride + dv` values when `n > 0`; `hi` and `lo` hold
/// `(⌈n/2⌉ − 1)·line + dv` words each.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pair_values(
    [hi, lo]: [*mut u32; 2],
    line: usize,
    v: &[f32],
    stride: usize,
    (n, dv): (usize, usize),
) {
    let interleave = pair_words();
    let widen =
        |bits: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)));
    for l in 0..n.div_ceil(2) {
        let (first, second) = (2 * l, 2 * l + 1);
        for ahead in [first, second]
            .map(|r| r + ROWS_AHEAD)
            .into_iter()
            .filter(|&r| r < n)
        {
            prefetch_row(&v[ahead * stride..][..dv]);
        }
        for c0 in (0..dv).step_by(16) {
            let lanes = ((1u32 << (dv - c0).min(16)) - 1) as __mmask16;
            // SAFETY (this step): rows `first` and, below n, `second` hold dims c0..c0 + 16 under the
            // mask (caller); line l's words c0.. likewise.
            unsafe {
                let a = _mm512_maskz_loadu_ps(lanes, v.as_ptr().add(first * stride + c0));
                let b = if second < n {
                    _mm512_maskz_loadu_ps(lanes, v.as_ptr().add(second * stride + c0))
                } else {
                    _mm512_setzero_ps()
                };
                let rounded: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                let (ra, rb) = (
                    widen(_mm512_castsi512_si256(rounded)),
                    widen(_mm512_extracti64x4_epi64::<1>(rounded)),
                );
                let rest: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                    _mm512_sub_ps(b, rb),
                    _mm512_sub_ps(a, ra),
                ));
                let at = l * line + c0;
                _mm512_mask_storeu_epi32(
                    hi.add(at).cast(),
                    lanes,
                    _mm512_permutexvar_epi16(interleave, rounded),
                );
                _mm512_mask_storeu_epi32(
                    lo.add(at).cast(),
                    lanes,
                    _mm512_permutexvar_epi16(interleave, rest),
                );
            }
        }
    }
}
